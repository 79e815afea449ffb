"""The KV cache: cached streaming equals block-causal attention; memory and positions stay bounded."""

import collections

import pytest
import torch

from streamgen.kernels import Rope
from streamgen.model import DiT, get_config
from streamgen.model.cache import KVCache
from streamgen.model.model import CrossAttention
from streamgen.sampling import (
    cached_velocity,
    encode_sink,
    generate_chunk,
    reencode_chunk,
    sample_few_step,
    student_sigmas,
)

HW = (8, 8)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = get_config("debug", **overrides)
    return DiT(cfg).eval(), cfg


def rand_audio(cfg, frames):
    return torch.randn(1, frames, cfg.audio_window, cfg.audio_dim)


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2])
def test_cached_chunks_equal_one_block_causal_forward(steps):
    model, cfg = make()
    c = cfg.frames_per_chunk
    ctx = torch.randn(1, 2, cfg.text_dim)
    ref = torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW)
    cache = model.new_cache(1, HW)
    encode_sink(model, cache, ref, ctx)
    clean, audios = [], []
    n_chunks = cfg.window_frames // c  # stays within the window
    for k in range(n_chunks + 1):
        # the velocity the stream sees for a noisy chunk k ...
        noisy, audio, sigma = torch.randn(1, cfg.in_channels, c, *HW), rand_audio(cfg, c), 0.3 + 0.1 * k
        v_cached = model(noisy, torch.full((1, c), sigma * 1000), ctx, audio, mode="cached", cache=cache)
        # ... equals one block-causal pass over [reference, clean chunks 0..k-1, noisy chunk k]
        x = torch.cat([ref, *clean, noisy], dim=2)
        t = torch.cat([torch.zeros(1, x.shape[2] - c), torch.full((1, c), sigma * 1000)], dim=1)
        a = torch.cat(
            [torch.zeros(1, cfg.sink_frames, cfg.audio_window, cfg.audio_dim), *audios, audio], dim=1
        )
        mask = torch.ones(1, a.shape[1])
        mask[:, : cfg.sink_frames] = 0
        v_full = model(x, t, ctx, a, mask, mode="block_causal")
        assert (v_full[:, :, -c:] - v_cached).abs().max().item() <= 1e-4
        if k < n_chunks:
            audios.append(audio)
            clean.append(
                generate_chunk(model, cache, torch.randn_like(noisy), ctx, audio, student_sigmas(steps))
            )


@torch.no_grad()
def test_one_reference_frame_fills_a_sink_of_several():
    """sink_frames > 1: the sink holds the one reference frame repeated, as the block-causal path
    (and training's conditioning) see it; a stream's start failed on a shape mismatch."""
    model, cfg = make(sink_frames=2)
    c, ctx = cfg.frames_per_chunk, torch.randn(1, 2, cfg.text_dim)
    ref = torch.randn(1, cfg.in_channels, 1, *HW)
    cache = model.new_cache(1, HW)
    encode_sink(model, cache, ref, ctx)
    noisy, audio = torch.randn(1, cfg.in_channels, c, *HW), rand_audio(cfg, c)
    v_cached = model(noisy, torch.full((1, c), 300.0), ctx, audio, mode="cached", cache=cache)
    x = torch.cat([ref.expand(-1, -1, 2, -1, -1), noisy], dim=2)
    t = torch.cat([torch.zeros(1, 2), torch.full((1, c), 300.0)], dim=1)
    a = torch.cat([torch.zeros(1, 2, cfg.audio_window, cfg.audio_dim), audio], dim=1)
    mask = torch.cat([torch.zeros(1, 2), torch.ones(1, c)], dim=1)
    v_full = model(x, t, ctx, a, mask, mode="block_causal")
    assert (v_full[:, :, -c:] - v_cached).abs().max().item() <= 1e-4


@torch.no_grad()
def test_block_causal_differs_from_bidirectional_only_by_the_mask():
    model, cfg = make(num_layers=1)  # one layer: keys depend on the inputs alone
    x = torch.randn(1, cfg.in_channels, 1 + 2 * cfg.frames_per_chunk, *HW)
    t, ctx = torch.rand(1, x.shape[2]) * 1000, torch.randn(1, 1, cfg.text_dim)
    bc = model(x, t, ctx, mode="block_causal")
    bi = model(x, t, ctx, mode="bidirectional")
    last = -cfg.frames_per_chunk
    # the last chunk sees every frame in both modes; earlier chunks do not
    assert torch.allclose(bc[:, :, last:], bi[:, :, last:], atol=1e-5)
    assert not torch.allclose(bc[:, :, :last], bi[:, :, :last], atol=1e-3)


@torch.no_grad()
def test_memory_constant_and_outputs_finite_over_1000_chunks():
    model, cfg = make(window_frames=4, frames_per_chunk=2)
    hw = (4, 4)
    ctx = torch.zeros(1, 1, cfg.text_dim)
    cache = model.new_cache(1, hw)
    encode_sink(model, cache, torch.randn(1, cfg.in_channels, 1, *hw), ctx)
    buffers = {name: (b.data_ptr(), b.shape) for name, b in cache.named_buffers()}
    mem = cache.memory_bytes()
    gen = torch.Generator().manual_seed(0)
    for i in range(1000):
        noise = torch.randn(1, cfg.in_channels, 2, *hw, generator=gen)
        x0 = generate_chunk(model, cache, noise, ctx, rand_audio(cfg, 2), student_sigmas(1), gen)
        assert torch.isfinite(x0).all(), f"non-finite output at chunk {i}"
    assert cache.memory_bytes() == mem
    assert {name: (b.data_ptr(), b.shape) for name, b in cache.named_buffers()} == buffers
    assert cache.frames_written == 2000


@torch.no_grad()
def test_positions_after_ten_hours_equal_those_after_one_minute():
    model, cfg = make(window_frames=6, frames_per_chunk=2)
    hw = (4, 4)
    ctx = torch.zeros(1, 1, cfg.text_dim)
    latent_fps = 25 / cfg.temporal_compression

    def stream_at(latent_frames_done):
        """A cache whose ring holds the same content, after a given amount of streaming."""
        torch.manual_seed(1)
        cache = model.new_cache(1, hw)
        encode_sink(model, cache, torch.randn(1, cfg.in_channels, 1, *hw), ctx)
        # fast-forward the bookkeeping to just before the last window, then stream it for real
        cache.frames_written = latent_frames_done - cfg.window_frames
        for _ in range(cfg.window_frames // 2):
            generate_chunk(
                model, cache, torch.randn(1, cfg.in_channels, 2, *hw), ctx, None, student_sigmas(1)
            )
        return cache

    minute = stream_at(int(60 * latent_fps) // 6 * 6)
    hours = stream_at(int(10 * 3600 * latent_fps) // 6 * 6)
    assert hours.positions_in_use() == minute.positions_in_use()
    bound = cfg.sink_frames + cfg.window_frames + cfg.frames_per_chunk
    assert max(max(v) for v in hours.positions_in_use().values()) < bound
    x = torch.randn(1, cfg.in_channels, 2, *hw)
    t = torch.full((1, 2), 500.0)
    assert torch.equal(
        model(x, t, ctx, mode="cached", cache=minute), model(x, t, ctx, mode="cached", cache=hours)
    )


def test_chunk_must_fit_in_ring():
    """Refused as the config is made (a model.json's, a flavor's overrides), not at a stream's start."""
    with pytest.raises(ValueError, match=r"frames_per_chunk \(2\) must not exceed window_frames \(1\)"):
        get_config("debug", window_frames=1, frames_per_chunk=2)


def test_a_denoising_step_with_gradient_through_the_cache():
    """Self-Forcing backpropagates through one cached step; later steps must not break it."""
    model, cfg = make()
    ctx = torch.zeros(1, 1, cfg.text_dim)
    cache = model.new_cache(1, HW)
    with torch.no_grad():
        encode_sink(model, cache, torch.randn(1, cfg.in_channels, 1, *HW), ctx)
        generate_chunk(model, cache, torch.randn(1, cfg.in_channels, 2, *HW), ctx, None, student_sigmas(1))
    x = torch.randn(1, cfg.in_channels, 2, *HW)
    v = model(x, torch.full((1, 2), 500.0), ctx, mode="cached", cache=cache)
    with torch.no_grad():  # a later step rewrites the chunk region of the buffers
        v2 = model(torch.randn_like(x), torch.full((1, 2), 250.0), ctx, mode="cached", cache=cache)
    v.square().mean().backward()
    grads = [p.grad for p in model.blocks[0].self_attn.q.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # and the gradient path computes the same values as the buffer path
        v_again = model(x, torch.full((1, 2), 500.0), ctx, mode="cached", cache=cache)
    assert torch.allclose(v.detach(), v_again, atol=1e-6) and not torch.allclose(v2, v_again)


@torch.no_grad()
def test_a_cache_write_keeps_keys_and_values_only(monkeypatch):
    # a write's last layer stores its keys/values and reads none back to attend with, and the
    # write returns no velocity (the stream equals block-causal attention with it: above)
    model, cfg = make()
    ctx, ref = torch.randn(1, 2, cfg.text_dim), torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW)
    cache = model.new_cache(1, HW)
    encode_sink(model, cache, ref, ctx)
    reads, writes = [], []
    for name, seen in (("update", reads), ("write_ring", writes)):
        method = getattr(KVCache, name)
        monkeypatch.setattr(KVCache, name, lambda self, *a, m=method, s=seen: s.append(self) or m(self, *a))
    x, t = torch.randn(1, cfg.in_channels, cfg.frames_per_chunk, *HW), torch.zeros(1, cfg.frames_per_chunk)
    assert model(x, t, ctx, mode="cached", cache=cache, cache_write="ring") is None
    assert writes == list(cache.layers) and reads == list(cache.layers[:-1])
    with pytest.raises(ValueError, match="cache write"):
        model.blocks[0].self_attn(
            torch.zeros(1, 4, cfg.dim), None, None, 4, cache=cache.layers[0], write_only=True
        )


@torch.no_grad()
@pytest.mark.parametrize("window", [2, 4])  # a ring of one chunk (the shipped student's) and of two
def test_a_clean_reencode_sees_the_ring_its_chunk_was_denoised_against(monkeypatch, window):
    # Once the ring is full the re-encode overwrites its oldest chunk's slots. Every layer's
    # attention in that forward must still read the ring as the denoising steps read it: the
    # keys and values it writes are then those of a read-only forward of the same clean chunk.
    model, cfg = make(window_frames=window, frames_per_chunk=2)
    ctx = torch.randn(1, 2, cfg.text_dim)
    cache = model.new_cache(1, HW)
    encode_sink(model, cache, torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW), ctx)
    for _ in range(window // 2 + 1):  # the ring full, and wrapped once
        generate_chunk(model, cache, torch.randn(1, cfg.in_channels, 2, *HW), ctx, None, student_sigmas(1))
    assert cache.filled == window
    seen = {"update": [], "write_ring": []}
    for name in seen:
        method = getattr(KVCache, name)
        record = seen[name].append
        monkeypatch.setattr(
            KVCache, name, lambda self, *a, m=method, r=record: r(a[1].clone()) or m(self, *a)
        )
    x0, t0 = torch.randn(1, cfg.in_channels, 2, *HW), torch.zeros(1, 2)
    model(x0, t0, ctx, mode="cached", cache=cache)  # reads only: the values each layer computes
    read_values = list(seen["update"])
    model(x0, t0, ctx, mode="cached", cache=cache, cache_write="ring")
    written = seen["write_ring"]
    assert len(written) == len(read_values) == cfg.num_layers
    for layer, (w, r) in enumerate(zip(written, read_values)):
        assert (w - r).abs().max().item() <= 1e-6, f"layer {layer}"


@torch.no_grad()
def test_cache_from_the_last_step_keeps_the_keys_and_values_that_step_computed():
    # cache_from="last_step": no re-encode; the ring holds the last denoising step's own keys
    # and values. Built by hand: the same steps reading the cache, then a write-only forward of
    # the last step's input at its timestep. Three chunks: the ring of 4 frames wraps.
    model, cfg = make(window_frames=4, frames_per_chunk=2)
    ctx, audio = torch.randn(1, 2, cfg.text_dim), rand_audio(cfg, 2)
    ref = torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW)
    sigmas = student_sigmas(3, shift=1.0)
    noises = [torch.randn(1, cfg.in_channels, 2, *HW) for _ in range(3)]

    def streamed(cache_from):
        cache = model.new_cache(1, HW)
        encode_sink(model, cache, ref, ctx)
        gen = torch.Generator().manual_seed(0)
        chunks = [
            generate_chunk(model, cache, n, ctx, audio, sigmas, gen, cache_from=cache_from) for n in noises
        ]
        return chunks, cache

    chunks, cache = streamed("last_step")
    by_hand = model.new_cache(1, HW)
    encode_sink(model, by_hand, ref, ctx)
    gen = torch.Generator().manual_seed(0)
    for noise, chunk in zip(noises, chunks):
        inputs = []

        def velocity(x, sigma, inputs=inputs):
            inputs.append(x)
            t = (sigma * 1000)[:, None].expand(1, 2)
            return model(x, t, ctx, audio, mode="cached", cache=by_hand)

        assert torch.allclose(sample_few_step(velocity, noise, sigmas, gen), chunk, atol=1e-6)
        t_last = torch.full((1, 2), sigmas[-1].item() * 1000)
        model(inputs[-1], t_last, ctx, audio, mode="cached", cache=by_hand, cache_write="ring")
        by_hand.advance()
    assert cache.frames_written == by_hand.frames_written == 6
    for mine, theirs in zip(cache.layers, by_hand.layers):
        for name in ("k", "v", "k_ring_raw"):
            assert torch.allclose(getattr(mine, name), getattr(theirs, name), atol=1e-6), name
    reencoded, _ = streamed("reencode")
    assert torch.equal(reencoded[0], chunks[0])  # the same first chunk: only the cache differs ...
    assert not torch.allclose(reencoded[1], chunks[1], atol=1e-3)  # ... which the next one reads
    with pytest.raises(ValueError, match="cache_from"):
        generate_chunk(model, cache, noises[0], ctx, audio, sigmas, cache_from="last")


@torch.no_grad()
def test_a_chunks_forwards_compute_its_audio_keys_and_values_once(monkeypatch):
    # A chunk's denoising steps and its clean re-encode get the same audio windows: the first of
    # them computes each layer's audio cross-attention keys/values, the others read them; the
    # next chunk's windows get their own. The caption's are computed once for the stream. The
    # chunks are those of a model that computes them at every forward.
    model, cfg = make(window_frames=4, frames_per_chunk=2)
    ctx, ref = torch.randn(1, 2, cfg.text_dim), torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW)
    sigmas, steps = student_sigmas(3), 3
    inputs = [(torch.randn(1, cfg.in_channels, 2, *HW), rand_audio(cfg, 2)) for _ in range(3)]
    calls = []
    context_kv = CrossAttention.context_kv
    monkeypatch.setattr(
        CrossAttention, "context_kv", lambda self, c: calls.append(self) or context_kv(self, c)
    )
    audio_attns = [blk.audio_attn for blk in model.blocks]

    def forget(cache):  # what a model without the reuse would compute again
        for layer in cache.layers:
            layer.audio_kv = None
            layer.context_kv = None

    def stream(reuse):
        cache = model.new_cache(1, HW)
        encode_sink(model, cache, ref, ctx)
        gen, chunks, per_chunk = torch.Generator().manual_seed(0), [], []
        for noise, audio in inputs:
            calls.clear()
            if reuse:
                chunks.append(generate_chunk(model, cache, noise, ctx, audio, sigmas, gen))
            else:

                def velocity(x, sigma, audio=audio):
                    forget(cache)
                    return cached_velocity(model, cache, ctx, audio)(x, sigma)

                chunks.append(sample_few_step(velocity, noise, sigmas, gen))
                forget(cache)
                reencode_chunk(model, cache, chunks[-1], ctx, audio)
            per_chunk.append(sum(c in audio_attns for c in calls))
        return chunks, per_chunk, calls

    chunks, audio_calls, last_chunks_calls = stream(reuse=True)
    layers = cfg.num_layers
    assert audio_calls == [layers] * 3
    assert not any(blk.cross_attn in last_chunks_calls for blk in model.blocks)  # the caption's: kept
    again, audio_calls, _ = stream(reuse=False)
    # (the re-encode's last layer only writes its keys and values: no cross-attention)
    assert audio_calls == [steps * layers + layers - 1] * 3
    assert all(torch.equal(a, b) for a, b in zip(chunks, again))


@torch.no_grad()
@pytest.mark.parametrize("backend", ["fp8_qk", "fp8"])
@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_fp8_attention_reads_the_caches_keys_and_values_quantized_once_each_time_they_change(
    backend, cache_from, monkeypatch
):
    """The FP8 backends read the cache's keys in e4m3: the sink's and the ring's quantized again
    once per chunk (after the ring moved on), the chunk's at every call; with `fp8` its values
    too, of which a call quantizes again only the channels whose scale moved. The chunks are
    exactly those of quantizing every key and value at every call."""
    from streamgen.kernels import attention_backends, reference

    quantize = reference.quantize_fp8_heads
    tokens = []  # the length of each (q or k) quantized per token and head
    monkeypatch.setattr(
        reference, "quantize_fp8_heads", lambda x, out=None: tokens.append(x.shape[1]) or quantize(x, out)
    )
    quantize_values, values = reference.quantize_fp8_values, []

    def count_values(v, scale=None, out=None, applied=None):  # how many values each call quantizes
        channels = v[0, 0].numel() if applied is None else int((scale != applied).sum())
        values.append(v.shape[1] * channels)
        return quantize_values(v, scale, out, applied)

    monkeypatch.setattr(reference, "quantize_fp8_values", count_values)
    attention = attention_backends.attention

    def stream(keep: bool):
        if not keep:  # every call quantizes every key and value, as without a cache
            monkeypatch.setattr(attention_backends, "attention", lambda *a: attention(*a[:6]))
        model, cfg = make(attn_backend=backend)
        gen = torch.Generator().manual_seed(1)
        ctx = torch.randn(1, 2, cfg.text_dim, generator=gen)
        cache = model.new_cache(1, HW)
        encode_sink(model, cache, torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW, generator=gen), ctx)
        tokens.clear()
        values.clear()
        chunks = []
        for _ in range(cfg.window_frames // cfg.frames_per_chunk + 3):  # past the ring's wrap
            noise = torch.randn(1, cfg.in_channels, cfg.frames_per_chunk, *HW, generator=gen)
            audio = torch.randn(1, cfg.frames_per_chunk, cfg.audio_window, cfg.audio_dim, generator=gen)
            chunks.append(
                generate_chunk(model, cache, noise, ctx, audio, student_sigmas(2), gen, cache_from=cache_from)
            )
        monkeypatch.setattr(attention_backends, "attention", attention)
        return torch.cat(chunks, 2), list(tokens), sum(values), cfg, cache.tokens_per_frame

    kept, kept_tokens, kept_values, cfg, s = stream(keep=True)
    every_call, every_call_tokens, every_call_values, *_ = stream(keep=False)
    assert torch.equal(kept, every_call)
    # (fp8: this random model moves the scales of ~40% of the channels at each call: ~30% fewer
    # values quantized; and the kept ones' scales read them once per chunk, not at every call)
    assert 0 < kept_values < every_call_values if backend == "fp8" else kept_values == every_call_values == 0
    sink, chunk, ring = (n * s for n in (cfg.sink_frames, cfg.frames_per_chunk, cfg.window_frames))
    kept_n, every_n = collections.Counter(kept_tokens), collections.Counter(every_call_tokens)
    # every call quantized the sink, the chunk and the filled ring (the cross-attentions: fewer)
    self_attention_calls = sum(n for size, n in every_n.items() if size >= sink + chunk)
    rebuilds = cfg.num_layers * kept.shape[2] // cfg.frames_per_chunk  # layers x chunks
    # with the kept keys: each layer its sink and whole ring once per chunk, after the ring moved
    # on, and the chunk's keys at every call; no call quantizes the whole cache
    assert kept_n[ring] == kept_n[sink] - every_n[sink] == rebuilds > 0
    assert kept_n[chunk] - every_n[chunk] == self_attention_calls > rebuilds
    assert max(kept_n) == ring < max(every_n)


def check_fp8_cache_follows_every_write(ops, device="cpu", batch=2):
    """Whatever writes the keys or values (a restored start, a stacked batch, the ring's rotation
    or a ring write, a chunk, the ring filling), the e4m3 keys and values a KV cache gives next
    are those of quantizing them as they are (`ops`: the module whose quantization it uses). One
    stream's cache writes its e4m3 keys in place; a batch's slices are not contiguous."""
    torch.manual_seed(0)
    cache = KVCache(batch, 2, 3, 4, heads=2, head_dim=8, dtype=torch.float32, device=device)

    def check(end):
        k8, k_scale = cache.fp8_keys(ops, end)
        v8, v_scale = cache.fp8_values(ops, end)
        want_k8, want_k_scale = ops.quantize_fp8_heads(cache.k[:, :end])
        want_v8, want_v_scale = ops.quantize_fp8_values(cache.v[:, :end])
        for got, want in ((k8, want_k8), (v8, want_v8)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(k_scale, want_k_scale) and torch.equal(v_scale, want_v_scale)

    def randn(tokens):
        return torch.randn(batch, tokens, 2, 8, device=device)

    def index(*slots):
        return torch.tensor(slots, device=device)

    def chunk(scale=1.0):
        return cache.update(randn(3), randn(3) * scale, 4)

    cache.k.normal_()
    cache.v.normal_()
    check(5)  # sink and chunk
    chunk(scale=3.0)  # a chunk that moves every channel's value scale up
    check(5)
    chunk(scale=0.1)  # ... and back down
    check(5)
    cache.write_ring(randn(2), randn(2) * 2, index(0, 1))
    check(7)  # the ring filling: the new slots
    cache.write_ring(randn(2), randn(2), index(3, 2))
    check(9)  # the ring full
    cache.write_ring(randn(2), randn(2) * 0.5, index(0, 1))
    chunk()
    check(9)  # the oldest slots overwritten: their values' maxima gone
    cache.k[:, :2].copy_(randn(2))  # the sink (a restored start)
    cache.v[:, :2].copy_(randn(2))
    check(9)
    cache.k_ring_raw.normal_()
    cache.rotate_ring(Rope.of(torch.zeros(4, 4, device=device)))  # the ring's rotation
    check(9)
    cache.k.mul_(2)  # anything else
    cache.v.mul_(2)
    check(9)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_caches_fp8_keys_and_values_follow_every_write_into_them(batch):
    from streamgen.kernels import reference

    check_fp8_cache_follows_every_write(reference, batch=batch)


@torch.no_grad()
@pytest.mark.parametrize(("window", "chunk"), [(6, 2), (5, 2), (5, 3), (4, 4)])
def test_the_ring_after_rolling_over_many_times_equals_a_recompute_of_the_last_window(window, chunk):
    """Far past the window (ten times round the ring, a window that is no whole number of chunks
    included: a chunk's slots then wrap round the ring's end), a chunk attends to exactly the sink
    and the last `window` clean frames at positions by age, as one forward over [reference, those
    frames, the chunk] computes it afresh. One layer: every key depends on its frame alone, so the
    recompute needs no older frames (with more layers the ring's keys carry what is evicted)."""
    model, cfg = make(num_layers=1, window_frames=window, frames_per_chunk=chunk)
    hw = (4, 4)
    ctx = torch.randn(1, 2, cfg.text_dim)
    ref = torch.randn(1, cfg.in_channels, cfg.sink_frames, *hw)
    cache = model.new_cache(1, hw)
    encode_sink(model, cache, ref, ctx)
    gen = torch.Generator().manual_seed(1)
    clean, audios = [], []
    for _ in range(10 * window // chunk + 1):
        audio = rand_audio(cfg, chunk)
        noise = torch.randn(1, cfg.in_channels, chunk, *hw)
        clean.append(generate_chunk(model, cache, noise, ctx, audio, student_sigmas(2), gen))
        audios.append(audio)
    assert cache.frames_written > 10 * window
    assert cache.positions_in_use() == {
        "sink": list(range(cfg.sink_frames)),
        "ring": list(range(cfg.sink_frames, cfg.sink_frames + window)),
        "chunk": list(range(cfg.sink_frames + window, cfg.sink_frames + window + chunk)),
    }
    noisy, audio, sigma = torch.randn(1, cfg.in_channels, chunk, *hw), rand_audio(cfg, chunk), 0.6
    v_cached = model(noisy, torch.full((1, chunk), sigma * 1000), ctx, audio, mode="cached", cache=cache)
    x = torch.cat([ref, torch.cat(clean, 2)[:, :, -window:], noisy], dim=2)
    t = torch.cat([torch.zeros(1, x.shape[2] - chunk), torch.full((1, chunk), sigma * 1000)], dim=1)
    sink_audio = torch.zeros(1, cfg.sink_frames, cfg.audio_window, cfg.audio_dim)
    a = torch.cat([sink_audio, torch.cat(audios, 1)[:, -window:], audio], dim=1)
    mask = torch.ones(1, a.shape[1])
    mask[:, : cfg.sink_frames] = 0
    # (bidirectional: the block-causal mask cuts blocks by whole chunks from the sink on, and the
    # last chunk attends to every frame either way)
    v_full = model(x, t, ctx, a, mask, mode="bidirectional")
    assert (v_full[:, :, -chunk:] - v_cached).abs().max().item() <= 1e-5
