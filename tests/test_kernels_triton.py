"""Every Triton kernel against its PyTorch reference, on CPU under the Triton interpreter.

Triton picks the interpreter when it is imported (its own library functions,
`tl.sum` and friends, are jitted at that moment), so TRITON_INTERPRET=1 must
be set before anything imports triton, and must not leak into other tests.
Hence two layers in this file:
- `test_*` launchers, collected normally, run this same file (and
  test_kernels_quick_shapes.py) in a fresh Python process with
  TRITON_INTERPRET=1 and `python_functions=check_*`;
- `check_*` cases, collected only there, call `kernels.triton_ops` and
  `kernels.triton_attention` directly on CPU tensors (the dispatch would pick the references on CPU).
Shapes are tiny and odd on purpose: row widths, token counts and sequence
lengths that are not multiples of any block, so every masked tail runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from streamgen.kernels import reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# the `check_*` processes' pytest: without the plugins no check uses, hypothesis' and anyio's (their
# ~100 modules imported and assertion-rewritten in each process, ~1.3 of its ~5 CPU s to start)
CHECKS_PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                 "-p", "no:anyio", "-o", "python_functions=check_*"]  # fmt: skip


# the files whose `check_*` cases run interpreted, in one process: its start (torch, triton, pytest)
# and what each kernel's first launch costs (the interpreter rewrites the kernel's source, once a
# process) are paid once rather than once a file
INTERPRETED_FILES = [Path(__file__).resolve(), Path(__file__).resolve().with_name("test_kernels_quick_shapes.py")]


def _run_cases(marker: str = "not gpu"):
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [*CHECKS_PYTEST, "-m", marker, *map(str, INTERPRETED_FILES)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def test_triton_kernels_match_references_under_interpreter():
    """This file's checks and test_kernels_quick_shapes.py's (the kernels at `bench gpu --quick`'s
    shapes)."""
    _run_cases()


def _scan_triton_language_once():
    """Make the interpreter find Triton's builtins by name, once per namespace.

    At every launch and every call of a jitted helper (`tl.sum` is one) the interpreter swaps
    the builtins of triton.language for interpreted ones, finding them anew with
    `inspect.getmembers` over every name of the module: ~40% of the time of a program here.
    The names do not change, so they are looked up once (in the first launch, before anything
    is swapped); each is still checked to be a builtin, and swapped, as before. Without the
    function (another Triton) the interpreter runs as it is."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_builtin = getattr(interpreter, "_patch_builtin", None)
    if patch_builtin is None or getattr(patch_builtin, "names", None) is not None:
        return
    names = {}

    def _patch_builtin(pkg, builder, scope):
        if pkg not in names:
            names[pkg] = [name for name, member in inspect.getmembers(pkg) if tl.core.is_builtin(member)]
        for name in names[pkg]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    _patch_builtin.names = names
    interpreter._patch_builtin = _patch_builtin


def _map_dtypes_to_numpy_once():
    """Make the interpreter map each Triton dtype to its numpy storage dtype once.

    The interpreter asks for the numpy dtype of a value's Triton type at most of its operations
    (loads, stores, casts, splats, constants), and each time builds its table of every dtype
    anew (19 numpy dtypes made and hashed): ~6% of the time of a program here. The table does
    not change, so each type's answer, the same function's, is kept (a block's is its element
    type's, as the function answers it). Without the function (another Triton) the interpreter
    runs as it is."""
    import triton.language as tl
    from triton.runtime import interpreter

    get_np_dtype = getattr(interpreter, "_get_np_dtype", None)
    if get_np_dtype is None or getattr(get_np_dtype, "known", None) is not None:
        return
    known = {}

    def _get_np_dtype(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):  # (not hashable; answered before the table)
            return get_np_dtype(element)
        if element not in known:
            known[element] = get_np_dtype(element)
        return known[element]

    _get_np_dtype.known = known
    interpreter._get_np_dtype = _get_np_dtype


@pytest.fixture(scope="module")
def ops():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the test_* launchers"
    _scan_triton_language_once()
    _map_dtypes_to_numpy_once()
    from streamgen.kernels import triton_ops

    assert triton_ops.INTERPRET
    return triton_ops


@pytest.fixture(scope="module")
def attn(ops):
    from streamgen.kernels import triton_attention

    assert len(triton_attention._ATTN_CONFIGS) == 1
    return triton_attention


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16/fp16 outputs may differ by one rounding step of the output (the order of fp32 reductions differs)
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# --- (a) LayerNorm + modulation, (b) gated residual and its fusion with the next norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 40), (1, 2, 3, 33)])
def check_layernorm_modulate(ops, dtype, shape):
    torch.manual_seed(0)
    b, f, s, d = shape
    x = rand(b, f, s, d, dtype=dtype, scale=3.0) + 1.5  # a non-zero mean, so centring matters
    shift, scale = rand(b, f, d, dtype=dtype), rand(b, f, d, dtype=dtype)
    close(ops.layernorm_modulate(x, shift, scale), reference.layernorm_modulate(x, shift, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 40), (1, 2, 3, 33)])
def check_layernorm_affine(ops, dtype, shape):
    """The cross-attention's norm: its own weight and bias (in the model's dtype), per channel."""
    torch.manual_seed(1)
    b, f, s, d = shape
    x = rand(b, f, s, d, dtype=dtype, scale=3.0) + 1.5
    weight, bias = rand(d, dtype=dtype) + 1.0, rand(d, dtype=dtype)
    close(ops.layernorm_affine(x, weight, bias), reference.layernorm_affine(x, weight, bias), dtype)


def check_layernorm_modulate_broadcast_modulation(ops):
    """One modulation row for all frames ([B, 1, D]) broadcasts like the reference."""
    torch.manual_seed(1)
    x = rand(2, 3, 4, 24)
    shift, scale = rand(2, 1, 24), rand(2, 1, 24)
    close(
        ops.layernorm_modulate(x, shift, scale), reference.layernorm_modulate(x, shift, scale), torch.float32
    )


@pytest.mark.parametrize("dtype", DTYPES)
def check_gated_residual(ops, dtype):
    torch.manual_seed(2)
    x, y = rand(2, 3, 5, 40, dtype=dtype), rand(2, 3, 5, 40, dtype=dtype)
    gate = rand(2, 3, 40, dtype=dtype)
    close(ops.gated_residual(x, y, gate), reference.gated_residual(x, y, gate), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def check_gated_residual_layernorm_modulate(ops, dtype):
    torch.manual_seed(3)
    x, y = rand(2, 2, 7, 36, dtype=dtype), rand(2, 2, 7, 36, dtype=dtype)
    gate, shift, scale = (rand(2, 2, 36, dtype=dtype) for _ in range(3))
    h, n = ops.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    h_ref, n_ref = reference.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    close(h, h_ref, dtype)
    close(n, n_ref, dtype)


def check_gated_residual_fp32_branch_into_bf16_stream(ops):
    """y (an fp32 branch output) may differ in dtype from the residual stream x."""
    torch.manual_seed(4)
    x, y, gate = rand(1, 2, 3, 20, dtype=torch.bfloat16), rand(1, 2, 3, 20), rand(1, 2, 20)
    close(ops.gated_residual(x, y, gate), reference.gated_residual(x, y, gate), torch.bfloat16)


# --- (c) RMSNorm over the full width + 3D RoPE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,heads,grid", [(24, 2, (2, 3)), (16, 3, (3, 1))])
def check_rmsnorm_rope_table_and_positions(ops, dtype, head_dim, heads, grid):
    torch.manual_seed(5)
    frame_pos = torch.tensor([0, 9, 4])  # not contiguous: ring-cache slots
    length = len(frame_pos) * grid[0] * grid[1]
    x = rand(2, length, heads * head_dim, dtype=dtype, scale=2.0)
    weight = rand(heads * head_dim, dtype=dtype) + 1.0
    angles = reference.rope_angles(frame_pos, grid, head_dim)
    expected = reference.rmsnorm_rope(x, weight, heads, angles)
    close(ops.rmsnorm_rope(x, weight, heads, angles), expected, dtype)
    close(ops.rmsnorm_rope_positions(x, weight, heads, frame_pos, grid), expected, dtype)
    close(ops.rmsnorm_rope(x, weight, heads, None), reference.rmsnorm_rope(x, weight, heads, None), dtype)


def check_rmsnorm_rope_start_frame_and_strided_input(ops):
    """An int start frame equals explicit positions; q sliced out of a fused qkv buffer (strided) works."""
    torch.manual_seed(6)
    heads, head_dim, grid = 2, 24, (2, 2)
    qkv = rand(2, 2 * 4, 3 * heads * head_dim)
    q = qkv[..., : heads * head_dim]  # row stride 3 * width
    weight = rand(heads * head_dim)
    expected = reference.rmsnorm_rope_positions(q, weight, heads, torch.tensor([7, 8]), grid)
    close(ops.rmsnorm_rope_positions(q, weight, heads, 7, grid), expected, torch.float32)
    close(reference.rmsnorm_rope_positions(q, weight, heads, 7, grid), expected, torch.float32)


def check_rmsnorm_rope_strided_weight(ops):
    """A norm weight that is a strided view (every other value of a buffer) is read as its values:
    the kernel read the D values after its first, at unit stride (all wrong but the first)."""
    torch.manual_seed(7)
    heads, head_dim, grid = 2, 24, (2, 2)
    x = rand(1, 2 * 4, heads * head_dim)
    weight = rand(2 * heads * head_dim)[::2]
    angles = reference.rope_angles(torch.tensor([3, 4]), grid, head_dim)
    expected = reference.rmsnorm_rope(x, weight, heads, angles)
    close(ops.rmsnorm_rope(x, weight, heads, angles), expected, torch.float32)
    close(ops.rmsnorm_rope_positions(x, weight, heads, 3, grid), expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def check_apply_rope(ops, dtype):
    """RoPE alone: the cache rotates its un-rotated ring keys [B, L, H, Dh] at read time."""
    torch.manual_seed(12)
    heads, head_dim, grid = 3, 24, (2, 2)
    keys = rand(2, 3 * 4, heads, head_dim, dtype=dtype)
    angles = reference.rope_angles(torch.tensor([2, 0, 1]), grid, head_dim)
    close(ops.apply_rope(keys, angles), reference.apply_rope(keys, angles), dtype)


# --- (e) GELU-tanh


@pytest.mark.parametrize("dtype", DTYPES)
def check_gelu_tanh(ops, dtype):
    torch.manual_seed(7)
    x = rand(3, 1000 + 7, dtype=dtype, scale=4.0)  # not a multiple of the block
    x[0, :4] = torch.tensor([-60.0, 60.0, 0.0, -3.0]).to(dtype)  # saturated both ways
    close(ops.gelu_tanh(x), reference.gelu_tanh(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("width", [37, 2048 + 300])  # one partial block; a full one and a tail
def check_quantize_fp8_rows(ops, dtype, gelu, width):
    torch.manual_seed(8)
    x = rand(2, 5, width + 8, dtype=dtype, scale=3.0)[..., :width]  # rows 8 elements apart
    x[0, 0] = 0  # an all-zero row: zeros, not NaN
    x[0, 1, 3] = 1e4  # an outlier takes only its own row's precision
    x[1, 2, :4] = torch.tensor([448.0, 100.0, -100.0, 1e-3])  # scale 1: a tie each way, a subnormal
    q, scale = ops.quantize_fp8_rows(x, gelu)
    q_ref, scale_ref = reference.quantize_fp8_rows(x, gelu)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (10, width) and scale.shape == (10, 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # the same values (the kernel rounds to e4m3 itself); through the GELU one rounding apart at
    # most, and rarely (numpy's exp is not torch's)
    steps = reference.fp8_steps_apart(q, q_ref)
    assert steps.max() <= int(gelu) and steps.float().mean() < 0.01
    assert (q[0].float() == 0).all() and not q.float().isnan().any()
    assert (q[1:].float().abs().amax(1) == reference.FP8_MAX).all()  # each row spans e4m3's range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def check_quantize_fp8_values(ops, dtype):
    """v [B, L, H, D] strided (a cache's view), to e4m3 per head and channel, transposed: the
    reference's scales and values (the kernel rounds to e4m3 itself)."""
    torch.manual_seed(9)
    v = rand(2, 37, 4, 24, dtype=dtype, scale=3.0)[:, :, 1:]  # keys not a multiple of the block
    v[0, 5, 1, 2] = 1e3  # an outlier takes only its own channel's precision
    v[1, :, 2, :] = 0  # an all-zero head: zeros, not NaN
    q, scale = ops.quantize_fp8_values(v)
    q_ref, scale_ref = reference.quantize_fp8_values(v)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (2, 3, 24, 37) and q.is_contiguous()
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    assert reference.fp8_steps_apart(q, q_ref).max() == 0 and not q.float().isnan().any()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def check_rmsnorm_channels(ops, dtype, with_bias):
    """The Wan VAE's channel RMSNorm (and the SiLU after it): 5D (conv layers) and 4D (its
    attention), channel counts and position counts that are not multiples of the blocks. The
    bias and the SiLU each alone in every dtype, both at once in the GPU's bf16. (The SiLU is
    checked against the kernel's norm of the same inputs, the one checked here without it: one
    case for both, where each was a case of its own that ran that norm again.)"""
    torch.manual_seed(8)
    layouts = {5: torch.channels_last_3d, 4: torch.channels_last}
    with_silu = not with_bias or dtype == torch.bfloat16
    # (positions 21 and 33: a full block of the interpreter's 16 and a ragged one; channels 19 and
    # 12: whole blocks of its 8 and a ragged one)
    cases = [(shape, layout) for shape in [(2, 19, 1, 3, 7), (3, 12, 3, 11)] for layout in ("nc", "nhwc")]
    for shape, layout in cases:
        x = rand(*shape, dtype=dtype, scale=3.0)
        x[0, :, 0] = 0.0  # a position of zeros: the eps clamp, no division by zero
        if layout == "nhwc":  # the decoder's channels-last convolutions feed it NDHWC
            x = x.contiguous(memory_format=layouts[x.dim()])
        gamma = rand(shape[1], 1, 1, dtype=dtype) + 1.0
        bias = rand(shape[1], dtype=dtype) if with_bias else None
        norm = ops.rmsnorm_channels(x, gamma, bias)
        outputs = {False: norm}  # by `silu`
        if with_silu:
            outputs[True] = ops.rmsnorm_channels(x, gamma, bias, silu=True)
        for silu, actual in outputs.items():
            expected = reference.rmsnorm_channels(x, gamma, bias, silu=silu)
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            assert actual.stride() == x.stride()  # x's layout kept, channels-last too
        # It rounds to the dtype 3-4 times, as diffusers does, and the interpreter's casts truncate
        # where the GPU's round to nearest: up to a unit in the last place each, relative to the
        # product before the bias (which survives where the bias nearly cancels it)
        expected = reference.rmsnorm_channels(x, gamma, bias)
        before_bias = reference.rmsnorm_channels(x, gamma).float().abs()
        rtol = max(TOL[dtype]["rtol"], 4 * torch.finfo(dtype).eps)
        error = (norm.float() - expected.float()).abs()
        assert (error <= TOL[dtype]["atol"] + rtol * before_bias).all(), error.max()
        if with_silu:
            # the SiLU of the kernel's own norm, to one rounding of the output (the norm's own
            # error is bounded just above; SiLU's slope is at most 1.1)
            expected = F.silu(norm)
            error = (outputs[True].float() - expected.float()).abs()
            ulp = 2 * torch.finfo(dtype).eps * expected.float().abs() + torch.finfo(dtype).tiny
            assert (error <= ulp).all(), error.max()


# --- (d) attention


def _qkv(b, lq, lk, heads, head_dim, dtype):
    return (
        rand(b, lq, heads, head_dim, dtype=dtype),
        rand(b, lk, heads, head_dim, dtype=dtype),
        rand(b, lk, heads, head_dim, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk,head_dim", [(14, 37, 16), (33, 33, 32), (5, 70, 64)])
def check_attention_full(attn, dtype, lq, lk, head_dim):
    torch.manual_seed(8)
    q, k, v = _qkv(2, lq, lk, 2, head_dim, dtype)
    close(attn.attention(q, k, v), reference.attention(q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def check_attention_block_causal(attn, dtype):
    """Training layout: Lq == Lk, chunks of 2 frames of 7 tokens, causal across chunks."""
    torch.manual_seed(9)
    s = 7
    blocks = torch.tensor([0, 0, 1, 1, 2])  # 5 frames, 3 chunks; tokens 35: a ragged last tile
    q, k, v = _qkv(1, 5 * s, 5 * s, 2, 16, dtype)
    close(
        attn.attention(q, k, v, (blocks, blocks), s), reference.attention(q, k, v, (blocks, blocks), s), dtype
    )


def check_attention_streaming_chunk_against_strided_cache(attn):
    """A chunk of queries against sink + ring-window K/V read straight out of a cache buffer.

    The ring slots' block ids are out of order, and one slot is in the future
    (masked), so block ids are honoured per frame rather than by position.
    """
    torch.manual_seed(10)
    s, heads, head_dim = 5, 2, 32
    cache_k = rand(1, 8 * s, heads + 1, head_dim)  # an extra head: the views below are strided
    cache_v = rand(1, 8 * s, heads + 1, head_dim)
    k, v = cache_k[:, :, :heads], cache_v[:, :, :heads]
    q = rand(1, 2 * s, heads, head_dim)
    k_block = torch.tensor([0, 4, 2, 3, 9, 5, 5, 1])
    q_block = torch.tensor([5, 5])
    mask = (k_block[None, :] <= q_block[:, None]).repeat_interleave(s, 0).repeat_interleave(s, 1)
    expected = reference.attention_reference_math(q, k, v, mask[None, None])
    close(attn.attention(q, k, v, (q_block, k_block), s), expected, torch.float32)
    close(reference.attention(q, k, v, (q_block, k_block), s), expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def check_attention_head_dim_128(attn, dtype):
    torch.manual_seed(11)
    q, k, v = _qkv(1, 10, 45, 2, 128, dtype)
    blocks_q, blocks_k = torch.tensor([3, 4]), torch.tensor([0, 1, 2, 3, 4, 4, 5, 0, 2])
    close(attn.attention(q, k, v), reference.attention(q, k, v), dtype)
    close(
        attn.attention(q, k, v, (blocks_q, blocks_k), 5),
        reference.attention(q, k, v, (blocks_q, blocks_k), 5),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk,head_dim", [(14, 37, 16), (10, 45, 128), (9, 20, 6)])  # 6: tile 32
def check_fp8_qk_attention(attn, dtype, lq, lk, head_dim):
    """QK^T of e4m3 values: the kernel's scores are the reference's (the same products, in fp32),
    so its output is too, up to one rounding of P to the output dtype; both are e4m3's precision
    from the exact attention."""
    torch.manual_seed(12)
    q, k, v = _qkv(2, lq, lk, 2, head_dim, dtype)
    out = attn.fp8_attention(q, k, v, pv=False)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, reference.fp8_attention(q, k, v, pv=False), dtype)
    exact = reference.attention_reference_math(q.float(), k.float(), v.float())
    assert 0 < (out.float() - exact).norm() / exact.norm() < 0.06


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def check_fp8_attention_one_key_block(attn, dtype):
    """QK^T and PV of e4m3 values, keys within one block (the interpreter's BLOCK_N, 16): the
    online softmax's running max is the row's max, so P rounds to the same e4m3 values as in the
    reference, which the kernel rounds itself (the interpreter's fp8 cast is wrong)."""
    torch.manual_seed(13)
    q, k, v = _qkv(2, 21, 13, 3, 32, dtype)
    close(attn.fp8_attention(q, k, v, pv=True), reference.fp8_attention(q, k, v, pv=True), dtype)


def check_fp8_attention_streaming_chunk_against_strided_cache(attn):
    """Both products in e4m3 over many key blocks, some masked, from strided cache views: the
    kernel rounds P against the running max, the reference against the row's max, so they agree
    to e4m3's precision, and each is as near the exact attention as the other."""
    torch.manual_seed(14)
    s, heads, head_dim = 5, 2, 32
    cache_k, cache_v = rand(1, 12 * s, heads + 1, head_dim), rand(1, 12 * s, heads + 1, head_dim)
    k, v = cache_k[:, :, :heads], cache_v[:, :, :heads]
    q = rand(1, 2 * s, heads, head_dim)
    q_block, k_block = torch.tensor([5, 5]), torch.tensor([0, 4, 2, 3, 9, 5, 5, 1, 2, 3, 4, 0])
    out = attn.fp8_attention(q, k, v, (q_block, k_block), s, pv=True)
    ref = reference.fp8_attention(q, k, v, (q_block, k_block), s, pv=True)
    mask = (k_block[None, :] <= q_block[:, None]).repeat_interleave(s, 0).repeat_interleave(s, 1)
    exact = reference.attention_reference_math(q, k, v, mask[None, None])
    err, err_ref = (out - exact).abs().max(), (ref - exact).abs().max()
    assert 0 < err < 0.05 and 0 < err_ref < 0.05 and err < 2 * err_ref and err_ref < 2 * err
    assert (out - ref).abs().max() < 0.03


@pytest.mark.parametrize("pv", [False, True])
def check_fp8_attention_of_a_caches_kept_keys(attn, pv):
    """Keys a KV cache keeps in e4m3 (`KVCache.fp8_keys`, with this module's quantization): views
    of its buffers, longer than the keys attended to and two streams deep, so that the scales'
    batch stride is the buffer's. Keys within one block (BLOCK_N, 16), as above."""
    from streamgen.model.cache import KVCache

    torch.manual_seed(17)
    cache = KVCache(2, 3, 4, 9, heads=3, head_dim=32, dtype=torch.float32, device="cpu")
    cache.k.normal_()
    cache.v.normal_()
    q = rand(2, 4, 3, 32)
    k, v = cache.k[:, :12], cache.v[:, :12]
    q8, q_scale = attn.quantize_fp8_heads(q)
    k8, k_scale = cache.fp8_keys(attn, 12)
    assert k_scale.stride(0) == 16 * 3 and k8.stride(0) == 16 * 3 * 32
    v_q, v_scale = attn.quantize_fp8_values(v) if pv else (v, None)
    out = attn.fp8_attention_quantized(q8, q_scale, k8, k_scale, v_q, v_scale, dtype=torch.float32)
    close(out, reference.fp8_attention(q, k, v, pv=pv), torch.float32)


def check_fp8_cache_follows_every_write_through_the_kernels(attn):
    """tests/test_model_cache.py's check with this module's quantization kernels: the moved
    channels alone (CHANGED_ONLY), into views of the cache's buffers, from its transposed rows."""
    from test_model_cache import check_fp8_cache_follows_every_write as follows  # (not collected here)

    for batch in (1, 2):
        follows(attn, batch=batch)


@pytest.mark.parametrize("masked", [False, True])
def check_attention_log_sum_exp(attn, masked):
    """The partial of one block of keys, as ring attention merges it: fp32 out and each row's
    log-sum-exp of its scaled scores, over odd lengths, with and without the frame mask."""
    torch.manual_seed(15)
    s = 5
    q, k, v = _qkv(2, 2 * s, 7 * s, 3, 32, torch.float32)
    blocks = (torch.tensor([4, 4]), torch.tensor([0, 4, 2, 5, 9, 1, 4])) if masked else None
    out, lse = attn.attention(q, k, v, blocks, s, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 32**0.5
    if masked:
        scores = scores.masked_fill(~reference.frame_mask(*blocks, s), float("-inf"))
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (2, 3, 2 * s)
    close(lse, torch.logsumexp(scores, -1), torch.float32)
    close(out, reference.attention(q, k, v, blocks, s), torch.float32)


@pytest.mark.parametrize("pv", [False, True])
def check_fp8_attention_log_sum_exp(attn, pv):
    """The same partial of e4m3 inputs quantized once (`quantize_fp8_attention`; v's scales given,
    as a ring takes them over every process): the reference's, keys within one block (BLOCK_N,
    16) so that P rounds against the same max."""
    torch.manual_seed(16)
    q, k, v = _qkv(2, 9, 13, 3, 32, torch.float32)
    v_scale = reference.fp8_value_scales(v) * 1.5 if pv else None  # not v's own
    inputs = attn.quantize_fp8_attention(q, k, v, pv, v_scale)
    ref_inputs = reference.quantize_fp8_attention(q, k, v, pv, v_scale)
    for got, expected in zip(inputs, ref_inputs):
        if got is not None and got.dtype == reference.FP8_DTYPE:
            assert reference.fp8_steps_apart(got, expected).max() == 0
    out, lse = attn.fp8_attention_quantized(*inputs, dtype=torch.float32, return_lse=True)
    ref_out, ref_lse = reference.fp8_attention_quantized(*ref_inputs, return_lse=True)
    close(lse, ref_lse, torch.float32)
    close(out, ref_out, torch.float32)


# --- the whole model through the kernels: what the GPU runs, checked op by op above, together


def stream_then_block_causal(flavor: str, hw, device, dtype, **overrides):
    """A model of `flavor` (seeded, attention on our kernel) streams one chunk past a full ring,
    so the cache overwrites and re-rotates its oldest slot; then one block-causal forward over
    the sink and the last two chunks (training's mask). Returns (chunks, block-causal output)."""
    from streamgen.model import DiT, get_config
    from streamgen.sampling import encode_sink, generate_chunk, student_sigmas

    torch.manual_seed(0)
    cfg = get_config(flavor, attn_backend="triton", **overrides)
    model, c = DiT(cfg).to(device, dtype).eval(), cfg.frames_per_chunk

    def rnd(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    ctx, ref = rnd(1, 2, cfg.text_dim), rnd(1, cfg.in_channels, cfg.sink_frames, *hw)
    audio = rnd(1, c, cfg.audio_window, cfg.audio_dim)
    cache = model.new_cache(1, hw, dtype, device)
    with torch.no_grad():
        encode_sink(model, cache, ref, ctx)
        chunks = [
            generate_chunk(model, cache, rnd(1, cfg.in_channels, c, *hw), ctx, audio, student_sigmas(1))
            for _ in range(cfg.window_frames // c + 1)
        ]
        x = torch.cat([ref, *chunks[-2:]], dim=2)  # few frames: the reference may build the full mask
        block_causal = model(x, torch.rand(1, x.shape[2], device=device) * 1000, ctx, mode="block_causal")
    return torch.cat(chunks, dim=2), block_causal


USED_BY_THE_MODEL = ("layernorm_modulate", "layernorm_affine", "gated_residual",
                     "gated_residual_layernorm_modulate", "rmsnorm_rope", "apply_rope", "gelu_tanh",
                     "attention")  # fmt: skip


def count_kernel_calls(ops, attn, monkeypatch) -> dict:
    """name -> launches of each kernel the model uses, from now on."""
    calls = {}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return call

    for name in USED_BY_THE_MODEL:
        module = attn if name == "attention" else ops
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    return calls


def check_dit_streams_the_same_through_the_kernels(ops, attn, monkeypatch):
    """A debug DiT streams past a full ring (the cache re-rotates its keys), then one
    block-causal forward (training's mask), with every op on the Triton kernels and again on
    the references: the model's views, strides and dtypes reach the kernels as they expect."""
    from streamgen import kernels

    calls = count_kernel_calls(ops, attn, monkeypatch)

    def run(through_kernels: bool):
        monkeypatch.setattr(kernels, "_TRITON_ON_CPU", through_kernels)
        # (the interpreter runs a program per token in the norms: few tokens, a 2x3 grid of them,
        # and a ring of 2 chunks, past which the third streams)
        return stream_then_block_causal("debug", (4, 6), "cpu", torch.float32, window_frames=4)

    streamed, block_causal = run(through_kernels=True)
    used = dict(calls)
    streamed_ref, block_causal_ref = run(through_kernels=False)
    assert calls == used, "the reference run must not touch the kernels"
    assert set(used) == set(USED_BY_THE_MODEL), used
    torch.testing.assert_close(streamed, streamed_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(block_causal, block_causal_ref, atol=1e-4, rtol=1e-4)


def check_a_stream_through_the_kernels_is_counted_as_through_the_references(ops, attn, monkeypatch):
    """bench gpu's `stages` counts a stream's work (bench/floor.py: PyTorch's FLOP counter and a
    dispatch mode) with the Triton kernels on: they run under the counting modes, and the
    count is the references' (the kernels fuse what the counter does not count)."""
    from bench import floor, gpu
    from streamgen import kernels
    from streamgen.stream import StreamSession

    calls = count_kernel_calls(ops, attn, monkeypatch)
    # 16x32: 2 tokens a latent frame, the smallest size with a few (the interpreter is slow); a ring
    # of one chunk (--quick's holds two): the clip's chunk fills it, and the steady chunk attends
    # to the sink and the full ring, then overwrites it, as at any window, a chunk fewer each run
    model = gpu.build_model(
        "wan2.1-1.3b", 16, 32, "cpu", torch.float32, quick=True, backend="sdpa", window_frames=3
    )
    context = torch.zeros(1, 8, model.cfg.text_dim)

    def work(through_kernels: bool):
        monkeypatch.setattr(kernels, "_TRITON_ON_CPU", through_kernels)
        # two denoising steps (the GPU run's 4: twice the interpreter's launches), so the second
        # reuses what the first cached, as each later one does
        session = StreamSession(model, steps=2, dtype=torch.float32)
        # a one-chunk clip (the default, 81 frames, is 7 chunks): the start, one chunk, the steady one
        return floor.chunk_work(session, lambda: gpu.start_stream(session, context, 10.0), 2, clip_frames=9)

    through_kernels = work(True)
    assert set(calls) == set(USED_BY_THE_MODEL) - {"attention"}, calls  # attention: SDPA, as in `stages`
    assert through_kernels == work(False)

