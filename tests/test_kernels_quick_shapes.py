"""Every Triton kernel at the shapes `bench gpu --quick` gives it on a GPU, against its reference,
under the Triton interpreter (as tests/test_kernels_triton.py, whose fixtures these checks share,
and whose launcher runs them in its interpreter process).

`--quick` runs at 32x48 pixels (bench.gpu.QUICK_SIZE) since 2026-12-07, 64x96 on the one GPU run
so far: the debug DiT's latent frame is 4x6, 6 tokens in a 2x3 grid after its 2x2 patches, where
it was 24. The shapes below were recorded from a CPU `--quick` run with every stream variant
(each kernel's and attention backend's arguments): chunks of 3 frames (18 queries) against the
sink and the ring (24, 42, 60 keys), the text (8), a frame's self-attention (6) and the audio's
per-frame cross-attention (a batch of 3 frames of 6 queries against 8 audio tokens); 2 heads of
24. None of these lengths is a multiple of a tile, several are under tl.dot's 16, and no call
has a frame mask (a stream reads its cache without one). A failure on the GPU costs a GPU loan.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

# (`ops` and `attn`: its fixtures, which set up the interpreter, registered here by the import)
from test_kernels_triton import _qkv, attn, close, ops, rand  # noqa: E402, F401

from streamgen.kernels import reference  # noqa: E402

HEADS, HEAD_DIM, WIDTH, GRID = 2, 24, 48, (2, 3)  # the debug DiT's; a 4x6 latent frame in 2x2 patches
# (batch, queries, keys) of each attention call of a --quick stream
ATTENTION_CALLS = [(1, 18, 24), (1, 18, 42), (1, 18, 60), (1, 18, 8), (1, 6, 6), (1, 6, 8), (3, 6, 8)]
DTYPES = [torch.float32, torch.bfloat16]  # the CPU run's and the GPU run's


@pytest.fixture(scope="module")
def triton_ops(request):  # (by name: a parameter `ops` would shadow the imported fixture)
    return request.getfixturevalue("ops")


@pytest.fixture(scope="module")
def triton_attention(request):
    return request.getfixturevalue("attn")


def test_the_shapes_are_the_quick_runs():
    # the debug model at bench gpu's --quick size gives the token grid and widths these checks use
    from bench import gpu
    from streamgen.model.config import get_config

    cfg = get_config("debug", frames_per_chunk=3, window_frames=6, in_channels=4)
    latent = [side // 8 for side in gpu.QUICK_SIZE]  # the Wan VAE's spatial factor
    assert tuple(side // p for side, p in zip(latent, cfg.patch_size[1:])) == GRID
    assert (cfg.num_heads, cfg.dim // cfg.num_heads, cfg.dim) == (HEADS, HEAD_DIM, WIDTH)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,lq,lk", ATTENTION_CALLS)
def check_attention_at_the_quick_shapes(triton_attention, dtype, b, lq, lk):
    torch.manual_seed(lq * 100 + lk)
    q, k, v = _qkv(b, lq, lk, HEADS, HEAD_DIM, dtype)
    close(triton_attention.attention(q, k, v), reference.attention(q, k, v), dtype)
    out, lse = triton_attention.attention(q, k, v, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / HEAD_DIM**0.5
    close(lse, torch.logsumexp(scores, -1), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,lq,lk", ATTENTION_CALLS)
def check_fp8_attention_at_the_quick_shapes(triton_attention, dtype, b, lq, lk):
    """QK^T in e4m3 (`fp8_qk`) is the reference's; with PV too (`fp8`) the kernel rounds P against
    the running max of the key blocks seen so far (the interpreter's blocks are 16 keys), the
    reference against the row's: the same within one block, as near the exact attention past it."""
    torch.manual_seed(lq * 100 + lk + 1)
    q, k, v = _qkv(b, lq, lk, HEADS, HEAD_DIM, dtype)
    close(
        triton_attention.fp8_attention(q, k, v, pv=False), reference.fp8_attention(q, k, v, pv=False), dtype
    )
    out, ref = triton_attention.fp8_attention(q, k, v, pv=True), reference.fp8_attention(q, k, v, pv=True)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out.float()).all()
    if lk <= 16:
        close(out, ref, dtype)
    else:
        exact = reference.attention_reference_math(q.float(), k.float(), v.float())
        err, err_ref = (out.float() - exact).abs().max(), (ref.float() - exact).abs().max()
        assert err < 0.1 and err < 2 * err_ref + 0.02, (err, err_ref)


@pytest.mark.parametrize("pv", [False, True])
def check_fp8_attention_of_a_quick_streams_cache(triton_attention, pv):
    """The FP8 backends read a stream's keys and values from its cache in e4m3 (`KVCache.fp8_keys`,
    `fp8_values`): --quick's cache of a 6-token sink, an 18-token chunk and a 36-token ring, read to
    24, 42 and 60 keys, gives what quantizing those keys and values at the call gives."""
    from streamgen.model.cache import KVCache

    torch.manual_seed(23)
    cache = KVCache(1, 6, 18, 36, heads=HEADS, head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
    cache.k.normal_()
    cache.v.normal_()
    q = rand(1, 18, HEADS, HEAD_DIM)
    for end in (24, 42, 60):
        k, v = cache.k[:, :end], cache.v[:, :end]
        q8, q_scale = triton_attention.quantize_fp8_heads(q)
        k8, k_scale = cache.fp8_keys(triton_attention, end)
        v_in, v_scale = cache.fp8_values(triton_attention, end) if pv else (v, None)
        out = triton_attention.fp8_attention_quantized(
            q8, q_scale, k8, k_scale, v_in, v_scale, dtype=torch.float32
        )
        close(out, triton_attention.fp8_attention(q, k, v, pv=pv), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def check_row_kernels_at_the_quick_shapes(triton_ops, dtype):
    """The DiT's norms, residuals, RoPE and GELU at a chunk's [1, 3 frames, 6 tokens, 48] (and the
    sink's single frame), the queries' and keys' [1, 18, 48] and the audio's per-frame [3, 6, 48]."""
    torch.manual_seed(20)
    for frames in (3, 1):
        x, y = rand(1, frames, 6, WIDTH, dtype=dtype, scale=3.0) + 1.5, rand(1, frames, 6, WIDTH, dtype=dtype)
        gate, shift, scale = (rand(1, frames, WIDTH, dtype=dtype) for _ in range(3))
        close(
            triton_ops.layernorm_modulate(x, shift, scale),
            reference.layernorm_modulate(x, shift, scale),
            dtype,
        )
        weight, bias = rand(WIDTH, dtype=dtype) + 1.0, rand(WIDTH, dtype=dtype)
        close(
            triton_ops.layernorm_affine(x, weight, bias), reference.layernorm_affine(x, weight, bias), dtype
        )
        close(triton_ops.gated_residual(x, y, gate), reference.gated_residual(x, y, gate), dtype)
        fused = triton_ops.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        for got, expected in zip(
            fused, reference.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        ):
            close(got, expected, dtype)
        hidden = rand(1, frames, 6, 2 * WIDTH, dtype=dtype, scale=3.0)
        close(triton_ops.gelu_tanh(hidden), reference.gelu_tanh(hidden), dtype)
    weight = rand(WIDTH, dtype=dtype) + 1.0
    frame_pos = torch.tensor([4, 5, 6])  # a chunk's 3 frames after the sink
    angles = reference.rope_angles(frame_pos, GRID, HEAD_DIM)
    for tokens, batch in ((18, 1), (6, 1), (8, 1), (6, 3), (8, 3)):  # chunk, frame, text, audio's
        x = rand(batch, tokens, WIDTH, dtype=dtype, scale=2.0)
        expected = reference.rmsnorm_rope(x, weight, HEADS, None)
        close(triton_ops.rmsnorm_rope(x, weight, HEADS, None), expected, dtype)
    x = rand(1, 18, WIDTH, dtype=dtype, scale=2.0)
    close(
        triton_ops.rmsnorm_rope(x, weight, HEADS, angles),
        reference.rmsnorm_rope(x, weight, HEADS, angles),
        dtype,
    )
    expected = reference.rmsnorm_rope_positions(x, weight, HEADS, frame_pos, GRID)
    close(triton_ops.rmsnorm_rope_positions(x, weight, HEADS, frame_pos, GRID), expected, dtype)
    keys = rand(1, 18, HEADS, HEAD_DIM, dtype=dtype)  # the ring's keys, rotated at read time
    close(triton_ops.apply_rope(keys, angles), reference.apply_rope(keys, angles), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def check_fp8_quantization_at_the_quick_shapes(triton_ops, dtype):
    """FP8 linears' rows (the block linears' 48 and 96 wide, the audio's 16) and attention's values
    (ring lengths 24, 42, 60): the reference's scales and e4m3 values."""
    torch.manual_seed(21)
    for shape, gelu in (
        ((1, 18, 48), False),
        ((3, 6, 48), False),
        ((3, 8, 16), False),
        ((1, 3, 6, 96), True),
    ):
        x = rand(*shape, dtype=dtype, scale=3.0)
        q, scale = triton_ops.quantize_fp8_rows(x, gelu)
        q_ref, scale_ref = reference.quantize_fp8_rows(x, gelu)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
        assert reference.fp8_steps_apart(q, q_ref).max() <= int(gelu)
    for lk in (24, 42, 60):
        v = rand(1, lk, HEADS, HEAD_DIM, dtype=dtype, scale=3.0)
        q, scale = triton_ops.quantize_fp8_values(v)
        q_ref, scale_ref = reference.quantize_fp8_values(v)
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
        assert q.shape == (1, HEADS, HEAD_DIM, lk) and reference.fp8_steps_apart(q, q_ref).max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def check_vae_channel_norm_at_the_quick_shapes(triton_ops, dtype):
    """The tiny Wan VAE's channel RMSNorm at 32x48, as its decoder calls it (`WanVAE.fused_norms`):
    with the SiLU of the residual blocks and the head on its 5D frames (the latent 4x6, 16
    channels; the output's 8 channels at 32x48), without it in its attention's 4D frames.
    The output's frame is taken 4 rows high, 4x48 of its 32x48: the interpreter runs a program per
    16 positions (1536 at 32x48, 96 programs in each layout: a quarter of this file's checks' time),
    and 192 positions are, as 1536 are, whole blocks of the interpreter's 16 and of the GPU's 64,
    with the same 8 channels and both layouts' strides (a channel's the positions', a position's
    the 8 channels'): the kernel takes the same path, masks and all."""
    torch.manual_seed(22)
    for shape, silu in (((1, 16, 3, 4, 6), True), ((3, 16, 4, 6), False), ((1, 8, 1, 4, 48), True)):
        contiguous = rand(*shape, dtype=dtype, scale=3.0)
        layout = torch.channels_last_3d if contiguous.dim() == 5 else torch.channels_last
        for x in (contiguous, contiguous.contiguous(memory_format=layout)):
            gamma = rand(shape[1], *[1] * (len(shape) - 2), dtype=dtype) + 1.0
            norm = reference.rmsnorm_channels(x, gamma).float()
            actual = triton_ops.rmsnorm_channels(x, gamma, silu=silu)
            assert actual.shape == x.shape and actual.stride() == x.stride()
            # the norm rounded to the dtype 3-4 times (as test_kernels_triton.py's
            # check_rmsnorm_channels says); the SiLU's slope is at most 1.1, its output one rounding
            bound = 4 * torch.finfo(dtype).eps * norm.abs() + 2e-5
            expected = torch.nn.functional.silu(norm) if silu else norm
            if silu:
                bound = 1.1 * bound + 2 * torch.finfo(dtype).eps * expected.abs()
            error = (actual.float() - expected).abs()
            assert (error <= bound).all(), error.max()


@pytest.mark.slow
def test_every_kernel_builds_for_hopper_at_the_quick_shapes():
    """The interpreter accepts code the compiler rejects, and Triton builds a kernel anew for each
    specialization of its integer arguments (1, multiples of 16), which these lengths and strides
    change: each kernel of a --quick stream, every autotune config, built for sm_90 in the GPU run's
    bf16 by Triton's compiler (`bench resources`' compile_only: nothing is launched), none spilling.
    The FP8 builds pad heads of 24 to a 32-wide tile, as heads of 16 and less are padded
    (test_kernels_offline.py's test_the_head_dim_tile_is_at_least_32_for_fp8_products): the same
    code but for the head dim's mask bound."""
    from bench import resources
    from streamgen.kernels import triton_attention as attention
    from streamgen.kernels import triton_ops

    bf16 = torch.bfloat16
    with resources.compile_only(90) as compiled:
        for b, lq, lk in ATTENTION_CALLS:
            q, k, v = _qkv(b, lq, lk, HEADS, HEAD_DIM, bf16)
            attention.attention(q, k, v)
            attention.fp8_attention(q, k, v, pv=False)
            attention.fp8_attention(q, k, v, pv=True)
        x, modulation = rand(1, 3, 6, WIDTH, dtype=bf16), rand(1, 3, WIDTH, dtype=bf16)
        triton_ops.layernorm_modulate(x, modulation, modulation)
        triton_ops.layernorm_affine(x, rand(WIDTH, dtype=bf16), rand(WIDTH, dtype=bf16))
        triton_ops.gated_residual(x, x, modulation)
        triton_ops.gated_residual_layernorm_modulate(x, x, modulation, modulation, modulation)
        triton_ops.gelu_tanh(rand(1, 3, 6, 2 * WIDTH, dtype=bf16))
        angles = reference.rope_angles(torch.tensor([4, 5, 6]), GRID, HEAD_DIM)
        triton_ops.rmsnorm_rope(rand(1, 18, WIDTH, dtype=bf16), rand(WIDTH, dtype=bf16), HEADS, angles)
        triton_ops.rmsnorm_rope(rand(3, 8, WIDTH, dtype=bf16), rand(WIDTH, dtype=bf16), HEADS, None)
        triton_ops.apply_rope(rand(1, 18, HEADS, HEAD_DIM, dtype=bf16), angles)
        for shape, gelu in (((1, 18, WIDTH), False), ((3, 8, 16), False), ((1, 3, 6, 2 * WIDTH), True)):
            triton_ops.quantize_fp8_rows(rand(*shape, dtype=bf16), gelu)
        triton_ops.quantize_fp8_values(rand(1, 42, HEADS, HEAD_DIM, dtype=bf16))
        triton_ops.rmsnorm_channels(
            rand(1, 16, 3, 4, 6, dtype=bf16), rand(16, 1, 1, 1, dtype=bf16), silu=True
        )
    built = {name for name, *_ in compiled}
    assert built == {
        "_attention_kernel", "_layernorm_modulate_kernel", "_gated_residual_kernel", "_gelu_tanh_kernel",
        "_rmsnorm_rope_kernel", "_quantize_fp8_rows_kernel", "_quantize_fp8_values_kernel",
        "_rmsnorm_channels_kernel",
    }  # fmt: skip
    # every attention config (the GPU's tiles, not the exact fp32 dots' one), in bf16, FP8 QK^T and FP8
    # both, for the 32-wide head tile of heads of 24
    tiles = [
        (v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"]) for name, v, *_ in compiled if name == "_attention_kernel"
    ]
    configs = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 32) for c in attention._ATTN_CONFIGS}
    assert attention.head_dim_tile(HEAD_DIM, fp8=True) == 32 > HEAD_DIM  # a padded tile, as below 16
    assert set(tiles) == configs and len(tiles) >= 3 * len(configs)
    reported = set()
    for name, variant, kernel, _seconds, report in compiled:
        # (no report where the build came from Triton's cache: the same binary again)
        usage = resources.ptxas_usage(report)
        if usage:
            reported.add(name)
            assert usage["spill_stores"] == usage["spill_loads"] == 0, (name, variant, usage)
        assert kernel.metadata.shared <= 227 * 1024, (name, variant)  # Hopper's shared memory a block
    assert reported == built
