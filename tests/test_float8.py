"""FP8 linear layers (kernels.fp8_linear, streamgen.model.float8) on the CPU, where torch's
scaled matrix product computes the exact products of the e4m3 values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamgen import kernels
from streamgen.kernels import reference
from streamgen.model.config import get_config
from streamgen.model.float8 import (
    Float8FeedForward,
    Float8Linear,
    check_float8_device,
    float8_layers,
    float8_linears,
)
from streamgen.model.model import DiT
from streamgen.model.vae import TinyCausalVAE
from streamgen.models import AvatarModel
from streamgen.stream import StreamSession


def test_quantized_rows_span_e4m3_and_round_trip_within_its_precision():
    torch.manual_seed(0)
    x = torch.randn(6, 100) * torch.logspace(-3, 3, 6)[:, None]  # rows six decades apart
    q, scale = reference.quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert (q.float().abs().amax(1) == reference.FP8_MAX).all()
    back = q.float() * scale
    # 3 mantissa bits: within half a step, 1/16 of the value, above e4m3's subnormals
    normal = x.abs() >= scale * 2**-6
    assert ((back - x).abs() <= x.abs() / 16 + 1e-12)[normal].all()


def test_fp8_linear_is_the_product_of_the_dequantized_operands():
    """The scales are applied on the right axes: rows of x, rows (output channels) of the weight."""
    torch.manual_seed(1)
    x = torch.randn(2, 7, 64) * torch.logspace(-2, 2, 7)[:, None]
    weight = torch.randn(48, 64) * torch.logspace(-2, 2, 48)[:, None]
    bias = torch.randn(48)
    weight_q, weight_scale = reference.quantize_fp8_rows(weight)
    for gelu in (False, True):
        out = kernels.fp8_linear(x, weight_q, weight_scale.t().contiguous(), bias, gelu=gelu)
        q, scale = reference.quantize_fp8_rows(x, gelu)
        dequantized = F.linear(q.float() * scale, weight_q.float() * weight_scale, bias).view(2, 7, 48)
        torch.testing.assert_close(out, dequantized, rtol=1e-5, atol=1e-5)
        h = reference.gelu_tanh(x) if gelu else x
        exact = F.linear(h, weight, bias)
        assert (out - exact).norm() / exact.norm() < 0.04  # e4m3's precision, not an axis mix-up


def debug_dit(dtype=torch.float32) -> DiT:
    torch.manual_seed(0)
    cfg = get_config("debug", frames_per_chunk=2, window_frames=4, in_channels=4)
    return DiT(cfg).to(dtype).eval()


def test_float8_linears_swaps_the_block_linears_it_should():
    dit = debug_dit()
    before = sum(b.numel() * b.element_size() for b in dit.state_dict().values())
    head = copy.deepcopy(dit.head.state_dict())
    float8_linears(dit)
    for block in dit.blocks:
        for attn in (block.cross_attn, block.audio_attn):
            assert all(isinstance(getattr(attn, n), Float8Linear) for n in "qkvo")
        assert isinstance(block.self_attn.q, Float8Linear) and isinstance(block.self_attn.k, Float8Linear)
        assert isinstance(block.self_attn.v, torch.nn.Linear) and isinstance(
            block.self_attn.o, torch.nn.Linear
        )
        assert isinstance(block.ffn, Float8FeedForward) and block.ffn.down.gelu_input
    per_block = 4 + 4 + 2 + 2  # cross and audio q/k/v/o, self q/k, the MLP's two
    assert float8_layers(dit) == per_block * len(dit.blocks)
    assert all(torch.equal(v, dit.head.state_dict()[k]) for k, v in head.items())  # the head stays
    after = sum(b.numel() * b.element_size() for b in dit.state_dict().values())
    assert after < before
    every = float8_linears(debug_dit(), keep=())
    assert float8_layers(every) == (per_block + 2) * len(every.blocks)


def _stream(dit, dtype, chunks=4):
    torch.manual_seed(0)
    cfg = dit.cfg
    vae = TinyCausalVAE(latent_channels=cfg.in_channels, temporal_factor=cfg.temporal_compression).eval()
    model = AvatarModel("debug", dit, vae, 64, 64)
    session = StreamSession(model, dtype=dtype, decode_dtype=None)
    rng = np.random.default_rng(0)
    session.start((rng.random((64, 64, 3)) * 255).astype(np.uint8), seed=0)
    session.push_audio((rng.standard_normal(16000 * 4) * 0.1).astype(np.float32))
    latents = []
    for _ in range(chunks):
        session.next_chunk()
        latents.append(session._pending[0].float())
    session.close()
    return torch.cat(latents, dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stream_with_fp8_linears_stays_near_the_full_precision_stream(dtype):
    """Four chunks through the KV cache: the FP8 model's latents are not the same as the
    model's own (the FP8 products run), and stay within e4m3's precision of them."""
    exact = _stream(debug_dit(dtype), dtype)
    fp8 = _stream(float8_linears(debug_dit(dtype)), dtype)
    error = ((fp8 - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < 0.03, error  # bf16 alone: 0.005


def test_float8_layers_are_for_inference_only():
    layer = Float8Linear(torch.nn.Linear(32, 16))
    with torch.no_grad():
        assert layer(torch.randn(3, 32)).shape == (3, 16)
    with pytest.raises(RuntimeError, match="inference"):
        layer(torch.randn(3, 32, requires_grad=True))


def test_float8_refuses_devices_that_cannot(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="sm_89 or later.*sm_80"):
        check_float8_device("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_device("cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        check_float8_device("cuda", torch.float32)
    check_float8_device("cpu", torch.float32)


def test_layers_the_fp8_products_cannot_take_stay():
    linear = torch.nn.Linear(24, 40)  # 24 is not a multiple of 16
    dit = debug_dit()
    dit.blocks[0].cross_attn.q = linear
    float8_linears(dit)
    assert dit.blocks[0].cross_attn.q is linear


@pytest.mark.parametrize("backend", ["fp8_qk", "fp8"])
def test_a_gradient_step_with_fp8_attention_reads_no_cache_buffer(backend):
    """Self-Forcing's exit step runs with gradient against the KV cache, and later forwards write
    into its buffers in place. With an FP8 attention backend that step attends exactly (SDPA) to a
    fresh concatenation (`KVCache.update`), never to the cache's buffers nor its e4m3 copies: its
    gradients are those of the SDPA model, and in-place writes after it leave them intact."""
    from streamgen.sampling import encode_sink

    dit = debug_dit().train()
    g = torch.Generator().manual_seed(1)
    ctx, hw = torch.randn(1, 3, dit.cfg.text_dim, generator=g), (4, 8)

    def latents():
        return torch.randn(1, 4, 2, *hw, generator=g)

    cache = dit.new_cache(1, hw)
    with torch.no_grad():
        encode_sink(dit, cache, torch.randn(1, 4, dit.cfg.sink_frames, *hw, generator=g), ctx)
        dit(latents(), torch.zeros(1), ctx, mode="cached", cache=cache, cache_write="ring")
        cache.advance()
    x, t = latents().requires_grad_(), torch.full((1,), 500.0)
    steps = {}
    for name in ("sdpa", backend):
        for block in dit.blocks:
            block.self_attn.backend = name
        steps[name] = dit(x, t, ctx, mode="cached", cache=cache)
    assert all(layer.k8 is None and layer.v8 is None for layer in cache.layers)  # never quantized
    with torch.no_grad():  # later steps and a ring write, in place into the buffers
        dit(latents(), t, ctx, mode="cached", cache=cache)
        dit(latents(), torch.zeros(1), ctx, mode="cached", cache=cache, cache_write="ring")
        cache.advance()
    weights = [p for p in dit.parameters() if p.requires_grad]
    exact, fp8 = (
        torch.autograd.grad(steps[n].square().sum(), [x, *weights], allow_unused=True)
        for n in ("sdpa", backend)
    )
    assert torch.equal(steps["sdpa"], steps[backend]) and exact[0].abs().sum() > 0
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(exact, fp8))
