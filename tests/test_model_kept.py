"""What a stream's forwards make once and keep (the cache's rotary table, the caption's keys/values
and embedding) or leave out (a mask of ones): each gives the chunks made the way before, bit for bit."""

import pytest
import torch
from test_model_cache import HW, make, rand_audio
from torch.overrides import TorchFunctionMode

import streamgen.model.cache as cache_module
from streamgen import kernels
from streamgen.kernels import Rope
from streamgen.model import DiT
from streamgen.model.cache import StreamCache
from streamgen.sampling import encode_sink, generate_chunk, student_sigmas


@torch.no_grad()
def test_a_caches_rotations_are_made_once_and_equal_those_made_for_each_forward(monkeypatch):
    # The sink's, each chunk's (at every fill level, the ring rolled over) and the ring's rotations
    # are slices and selections of one table the cache makes on its first forward; the chunks are
    # those of a model that made them at every forward and ring rotation.
    model, cfg = make(window_frames=4, frames_per_chunk=2)
    ctx, ref = torch.randn(1, 2, cfg.text_dim), torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW)
    inputs = [(torch.randn(1, cfg.in_channels, 2, *HW), rand_audio(cfg, 2)) for _ in range(5)]
    made_for, grid = [], model.grid(HW)
    angles = kernels.rope_angles

    def counted(frame_pos, *args):
        made_for.append(frame_pos.tolist())
        return angles(frame_pos, *args)

    def fresh(positions, grid_hw):
        return Rope.of(angles(positions, grid_hw, cfg.head_dim, cfg.rope_theta))

    def every_forward(monkeypatch):  # the cache before the table: its rotations made at each call
        monkeypatch.setattr(StreamCache, "sink_rope", lambda c, g: fresh(c.sink_frame_positions(), g))
        monkeypatch.setattr(StreamCache, "chunk_rope", lambda c, g: fresh(c.chunk_frame_positions(), g))

        def rotate_ring(c):
            angles = fresh(c.ring_frame_positions(), c.grid_hw)
            for layer in c.layers:
                layer.rotate_ring(angles)

        monkeypatch.setattr(StreamCache, "rotate_ring", rotate_ring)

    def stream():
        cache = model.new_cache(1, HW)
        encode_sink(model, cache, ref, ctx)
        gen, chunks = torch.Generator().manual_seed(0), []
        for noise, audio in inputs:
            for got, want in ((cache.chunk_rope(grid), fresh(cache.chunk_frame_positions(), grid)),
                              (cache.sink_rope(grid), fresh(cache.sink_frame_positions(), grid))):  # fmt: skip
                assert torch.equal(got.angles, want.angles) and torch.equal(got.cis, want.cis)
            chunks.append(generate_chunk(model, cache, noise, ctx, audio, student_sigmas(3), gen))
        return chunks, cache

    monkeypatch.setattr(cache_module, "rope_angles", counted)
    monkeypatch.setattr(kernels, "rope_angles", counted)
    chunks, cache = stream()
    assert cache.frames_written > cfg.window_frames  # (the ring rolled over)
    table_frames = cfg.sink_frames + cfg.window_frames + cfg.frames_per_chunk
    assert made_for == [list(range(table_frames))]  # once, for the stream
    with monkeypatch.context() as m:
        every_forward(m)
        again, _ = stream()
    assert all(torch.equal(a, b) for a, b in zip(chunks, again))


@torch.no_grad()
@pytest.mark.parametrize("mode", ["bidirectional", "cached"])
def test_audio_without_a_mask_conditions_every_frame_without_multiplying_by_ones(mode):
    # a stream gives no mask: every layer multiplied its audio output by a mask of ones it made
    model, cfg = make()
    for blk in model.blocks:  # (a new audio branch's output is zero: it would change nothing)
        torch.nn.init.normal_(blk.audio_attn.o.weight, std=0.1)
    f = cfg.frames_per_chunk
    x, t = torch.randn(1, cfg.in_channels, f, *HW), torch.full((1, f), 500.0)
    ctx, audio = torch.randn(1, 2, cfg.text_dim), rand_audio(cfg, f)
    ref = torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW)

    class MaskProducts(TorchFunctionMode):  # products by a per-frame mask [B, F, 1, 1]
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__):
                self.count += any(isinstance(a, torch.Tensor) and a.shape == (1, f, 1, 1) for a in args)
            return func(*args, **(kwargs or {}))

    def forward(mask):
        cache = None
        if mode == "cached":
            cache = model.new_cache(1, HW)
            encode_sink(model, cache, ref, ctx)
        with MaskProducts() as products:
            out = model(x, t, ctx, audio, mask, mode=mode, cache=cache)
        return out, products.count

    unmasked, products = forward(None)
    assert products == 0
    ones, products = forward(torch.ones(1, f))
    assert products == cfg.num_layers and torch.equal(unmasked, ones)
    dropped, _ = forward(torch.zeros(1))
    assert not torch.equal(dropped, unmasked)


@torch.no_grad()
def test_a_stream_embeds_its_caption_only_until_every_layer_keeps_its_keys_and_values(monkeypatch):
    # The sink's forward keeps the caption's keys/values in every layer but its last (a cache write
    # stops at its keys), the first denoising step in that one too: from then on no forward reads
    # the embedding. The chunks are those of a model that embedded it at every forward.
    model, cfg = make(window_frames=4, frames_per_chunk=2)
    ctx, ref = torch.randn(1, 2, cfg.text_dim), torch.randn(1, cfg.in_channels, cfg.sink_frames, *HW)
    inputs = [(torch.randn(1, cfg.in_channels, 2, *HW), rand_audio(cfg, 2)) for _ in range(3)]
    embedded = []
    model.text_embed.register_forward_hook(lambda *_: embedded.append(1))

    def stream():
        cache = model.new_cache(1, HW)
        encode_sink(model, cache, ref, ctx)
        gen = torch.Generator().manual_seed(0)
        chunks = [generate_chunk(model, cache, n, ctx, a, student_sigmas(3), gen) for n, a in inputs]
        return chunks, cache

    chunks, cache = stream()
    assert len(embedded) == 2 and DiT.text_kept(cache)
    with torch.enable_grad():  # (training: embedded at every forward, whatever a cache keeps)
        assert not DiT.text_kept(cache)
    embedded.clear()
    monkeypatch.setattr(DiT, "text_kept", staticmethod(lambda cache: False))
    again, _ = stream()
    assert len(embedded) == 1 + len(inputs) * (3 + 1)  # the sink, then each chunk's steps and re-encode
    assert all(torch.equal(a, b) for a, b in zip(chunks, again))
