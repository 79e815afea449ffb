"""Triton kernels for the DiT hot path.

Each kernel reproduces a function of `kernels.reference` (the semantics) and
is called through the dispatch in `streamgen/kernels/__init__.py`, which uses this module
on CUDA tensors only. Everything computes in fp32 registers and rounds to the
input dtype exactly where the reference does, so bf16 results match bitwise up
to the order of the reductions.

Under `TRITON_INTERPRET=1` (read when this module is imported, because
`triton.jit` decides at decoration time) the same kernels run on CPU tensors
with numpy: then every autotuned kernel has a single config, and `tl.dot`
operands are cast to fp32 (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import math
import os

import torch

# Triton 3.9 warns that its default for fusing a*b+c into one FMA becomes "off" in 3.10. These
# kernels are checked against the reference with fusion on (the default they were written for):
# keep it, unless the user chose otherwise.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from streamgen.kernels import reference
from streamgen.kernels.reference import rope_inv_freq, rope_split

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def _row_block(d: int) -> tuple[int, int]:
    """Block width (a power of two covering one row) and warps for a row of d elements."""
    block = triton.next_power_of_2(d)
    warps = 1 if INTERPRET else (4 if block <= 2048 else 8 if block <= 8192 else 16)
    return block, warps


def _per_frame(t: torch.Tensor, b: int, f: int, d: int) -> torch.Tensor:
    """A modulation tensor broadcast to [B, F, D] (stride 0 where it broadcasts), last dim unit-stride."""
    t = t.expand(b, f, d)
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------
# (a) LayerNorm (no affine) + adaLN modulation, (b) gated residual, and (b)
# fused with the next norm. One program per token row of width D; the
# modulation row is the token's frame row, found as row // S.


@triton.jit
def _layernorm_modulate_row(h, cols, col_ok, D, shift_row_ptr, scale_row_ptr, eps, AFFINE: tl.constexpr):
    """n = LayerNorm(h) over the valid columns, then n * (1 + scale) + shift (fp32); with AFFINE,
    n * scale + shift (a LayerNorm's own weight and bias)."""
    mean = tl.sum(h, axis=0) / D
    centered = tl.where(col_ok, h - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / D
    normed = centered * tl.rsqrt(var + eps)
    shift = tl.load(shift_row_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_row_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if AFFINE:
        factor = scale
    else:
        factor = 1.0 + scale
    return normed * factor + shift


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    F, S, D, stride_mod_b, stride_mod_f, eps,
    BLOCK_D: tl.constexpr, AFFINE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    frame = row // S
    mod_off = (frame // F) * stride_mod_b + (frame % F) * stride_mod_f
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = _layernorm_modulate_row(x, cols, col_ok, D, shift_ptr + mod_off, scale_ptr + mod_off, eps, AFFINE)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, h_ptr, out_ptr,
    F, S, D, stride_gate_b, stride_gate_f, stride_mod_b, stride_mod_f, eps,
    BLOCK_D: tl.constexpr, WITH_NORM: tl.constexpr,
):  # fmt: skip
    """h = x + y * gate; with WITH_NORM also out = layernorm_modulate(h)."""
    row = tl.program_id(0).to(tl.int64)
    frame = row // S
    b = frame // F
    f = frame % F
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate_b + f * stride_gate_f + cols, mask=col_ok, other=0.0)
    h = (x + y * gate.to(tl.float32)).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * D + cols, h, mask=col_ok)
    if WITH_NORM:
        # the reference normalises h after rounding it to the storage dtype
        mod_off = b * stride_mod_b + f * stride_mod_f
        n = _layernorm_modulate_row(
            h.to(tl.float32), cols, col_ok, D, shift_ptr + mod_off, scale_ptr + mod_off, eps, False
        )
        tl.store(out_ptr + row * D + cols, n.to(out_ptr.dtype.element_ty), mask=col_ok)


def layernorm_modulate(x, shift, scale, eps: float = 1e-6, affine: bool = False):
    """Triton `reference.layernorm_modulate`: x [B, F, S, D], shift/scale [B, F, D]."""
    b, f, s, d = x.shape
    x = x.contiguous()
    shift, scale = _per_frame(shift, b, f, d), _per_frame(scale, b, f, d)
    if shift.stride() != scale.stride():
        shift, scale = shift.contiguous(), scale.contiguous()
    out = torch.empty_like(x)
    block, warps = _row_block(d)
    _layernorm_modulate_kernel[(b * f * s,)](
        x, shift, scale, out, f, s, d, shift.stride(0), shift.stride(1), eps,
        BLOCK_D=block, AFFINE=affine, num_warps=warps,
    )  # fmt: skip
    return out


def layernorm_affine(x, weight, bias, eps: float = 1e-6):
    """Triton `reference.layernorm_affine`: x [B, F, S, D], weight/bias [D] (the cross-attention's
    norm). One pass in bf16 where the reference makes an fp32 copy of x, normalises it and
    rounds it back: the same kernel, with the weight and bias as every frame's scale and shift."""
    return layernorm_modulate(x, bias, weight, eps, affine=True)


def _gated_residual(x, y, gate, shift, scale, eps, with_norm):
    b, f, s, d = x.shape
    x, y = x.contiguous(), y.contiguous()  # y may have its own dtype: loaded as-is, summed in fp32
    gate = _per_frame(gate, b, f, d)
    h = torch.empty_like(x)
    if with_norm:
        shift, scale = _per_frame(shift, b, f, d), _per_frame(scale, b, f, d)
        if shift.stride() != scale.stride():
            shift, scale = shift.contiguous(), scale.contiguous()
        out = torch.empty_like(x)
    else:
        shift = scale = out = h  # unused pointers
    block, warps = _row_block(d)
    _gated_residual_kernel[(b * f * s,)](
        x, y, gate, shift, scale, h, out,
        f, s, d, gate.stride(0), gate.stride(1), shift.stride(0), shift.stride(1), eps,
        BLOCK_D=block, WITH_NORM=with_norm, num_warps=warps,
    )  # fmt: skip
    return h, out


def gated_residual(x, y, gate):
    """Triton `reference.gated_residual`: x + y * gate, gate per frame [B, F, D]."""
    return _gated_residual(x, y, gate, None, None, 0.0, with_norm=False)[0]


def gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps: float = 1e-6):
    """Triton `reference.gated_residual_layernorm_modulate`: returns (h, modulated LayerNorm of h)."""
    return _gated_residual(x, y, gate, shift, scale, eps, with_norm=True)


# ---------------------------------------------------------------------------
# (c) q/k RMSNorm over the full width, fused with 3D RoPE. One program per
# token. The row is loaded as [D/2, 2] so the interleaved rotary pairs are the
# two columns. The rotation either comes from a table of (cos, sin) [L, Dh/2, 2]
# (`reference.Rope`'s, made once per forward: a sine and a cosine for each pair
# of every head was 4.5x the instructions, likely why it ran at 578 GB/s on the
# H200) or is
# computed here from the token's (frame, h, w) position and the fp32
# inverse-frequency table: frame positions are a small int tensor, a runtime
# value, so a new chunk never recompiles.

ROPE_NONE, ROPE_TABLE, ROPE_POSITIONS = 0, 1, 2


@triton.jit
def _rmsnorm_rope_kernel(
    x_ptr, w_ptr, out_ptr, cos_sin_ptr, frame_pos_ptr, inv_freq_ptr,
    L, D, stride_xb, stride_xl, eps,
    HALF_HEAD, TOKENS_PER_FRAME, GRID_W, T_PAIRS, TH_PAIRS,
    BLOCK_HALF: tl.constexpr, ROPE_MODE: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    tok = row % L
    pair = tl.arange(0, BLOCK_HALF)
    pair_ok = pair < D // 2
    offs = 2 * pair[:, None] + tl.arange(0, 2)[None, :]  # [BLOCK_HALF, 2]
    ok = pair_ok[:, None]
    y = tl.load(x_ptr + b * stride_xb + tok * stride_xl + offs, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(tl.sum(y * y, axis=1), axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # the reference rounds the normed values to the storage dtype before rotating
        y = (y * inv_rms * w).to(out_ptr.dtype.element_ty).to(tl.float32)
    if ROPE_MODE != 0:
        even, odd = tl.split(y)
        j = pair % HALF_HEAD  # rotary pair index inside the head
        if ROPE_MODE == 1:  # the (cos, sin) of pair j, shared by the heads (from L1 after the first)
            cos_sin = tl.load(cos_sin_ptr + 2 * (tok * HALF_HEAD + j)[:, None] + offs % 2, mask=ok, other=0.0)
            cos, sin = tl.split(cos_sin)
        else:
            frame = tok // TOKENS_PER_FRAME
            in_frame = tok % TOKENS_PER_FRAME
            t_pos = tl.load(frame_pos_ptr + frame).to(tl.float32)
            h_pos = (in_frame // GRID_W).to(tl.float32)
            w_pos = (in_frame % GRID_W).to(tl.float32)
            pos = tl.where(j < T_PAIRS, t_pos, tl.where(j < TH_PAIRS, h_pos, w_pos))
            angle = pos * tl.load(inv_freq_ptr + j, mask=pair_ok, other=0.0)
            cos = tl.cos(angle)
            sin = tl.sin(angle)
        y = tl.join(even * cos - odd * sin, even * sin + odd * cos)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


_INV_FREQ_CACHE: dict[tuple, torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """The fp32 inverse-frequency table of one head, computed once per device."""
    key = (head_dim, theta, str(device))
    if key not in _INV_FREQ_CACHE:
        _INV_FREQ_CACHE[key] = rope_inv_freq(head_dim, theta, device)[0].float().contiguous()
    return _INV_FREQ_CACHE[key]


def _rmsnorm_rope_launch(
    x, weight, num_heads, eps, mode, angles=None, frame_pos=None, grid_hw=(1, 1), theta=1e4, norm=True
):
    bsz, length, d = x.shape
    head_dim = d // num_heads
    assert head_dim * num_heads == d and head_dim % 2 == 0, (d, num_heads)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if norm:  # (the kernel reads the weight's D values at unit stride: a strided one read others)
        weight = weight.contiguous()
    out = torch.empty(bsz, length, num_heads, head_dim, device=x.device, dtype=x.dtype)
    t_dim, h_dim, _ = rope_split(head_dim)
    not_read = out  # the pointer passed for the arguments this mode's kernel never reads
    inv_freq = _inv_freq(head_dim, theta, x.device) if mode == ROPE_POSITIONS else not_read
    cos_sin = None
    if mode == ROPE_TABLE:  # a Rope's rotations as (cos, sin) pairs: a view of its complex table
        cos_sin = torch.view_as_real(reference.Rope.of_any(angles).cis).contiguous()
        assert cos_sin.shape == (length, head_dim // 2, 2), (cos_sin.shape, length, head_dim)
    block_half, warps = _row_block(d // 2)
    _rmsnorm_rope_kernel[(bsz * length,)](
        x, weight if norm else not_read, out, cos_sin if cos_sin is not None else not_read,
        frame_pos if frame_pos is not None else not_read, inv_freq,
        length, d, x.stride(0), x.stride(1), eps,
        head_dim // 2, grid_hw[0] * grid_hw[1], grid_hw[1], t_dim // 2, (t_dim + h_dim) // 2,
        BLOCK_HALF=block_half, ROPE_MODE=mode, NORM=norm, num_warps=warps,
    )  # fmt: skip
    return out


def rmsnorm_rope(x, weight, num_heads: int, angles, eps: float = 1e-6):
    """Triton `reference.rmsnorm_rope`: x [B, L, H*Dh], angles (a `reference.Rope`, or its angle
    table [L, Dh/2]) or None -> [B, L, H, Dh]."""
    mode = ROPE_NONE if angles is None else ROPE_TABLE
    return _rmsnorm_rope_launch(x, weight, num_heads, eps, mode, angles=angles)


def apply_rope(x, angles):
    """Triton `reference.apply_rope`: rotate x [B, L, H, Dh] by angles (a `reference.Rope`, or
    [L, Dh/2]; no norm).

    The KV cache re-rotates its un-rotated ring keys with this at read time.
    """
    bsz, length, heads, head_dim = x.shape
    flat = x.reshape(bsz, length, heads * head_dim)  # a view when heads are packed, as in the cache
    return _rmsnorm_rope_launch(flat, None, heads, 0.0, ROPE_TABLE, angles=angles, norm=False)


def rmsnorm_rope_positions(x, weight, num_heads: int, frame_pos, grid_hw, eps: float = 1e-6, theta=1e4):
    """Triton `reference.rmsnorm_rope_positions`: angles computed in the kernel.

    frame_pos: int tensor [F] of frame positions, or an int start frame for
    contiguous frames; tokens are frame-major over the (Hp, Wp) grid.
    """
    tokens_per_frame = grid_hw[0] * grid_hw[1]
    frames = x.shape[1] // tokens_per_frame
    assert frames * tokens_per_frame == x.shape[1], (x.shape, grid_hw)
    if isinstance(frame_pos, int):
        frame_pos = torch.arange(frame_pos, frame_pos + frames, device=x.device, dtype=torch.int32)
    else:
        frame_pos = frame_pos.to(device=x.device, dtype=torch.int32).contiguous()
        assert frame_pos.numel() == frames, (frame_pos.shape, frames)
    return _rmsnorm_rope_launch(
        x, weight, num_heads, eps, ROPE_POSITIONS, frame_pos=frame_pos, grid_hw=grid_hw, theta=theta
    )


# ---------------------------------------------------------------------------
# (e) GELU-tanh, elementwise. 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u), which
# needs one exp and no libdevice tanh.

_GELU_C = math.sqrt(2.0 / math.pi)


@triton.jit
def _gelu_tanh_f32(x):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # clamped so the interpreter (numpy) does not warn on overflow; exp(80) is already inf-like
    return x / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))


@triton.jit
def _gelu_tanh_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    y = _gelu_tanh_f32(tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def gelu_tanh(x):
    """Triton `reference.gelu_tanh` (any shape)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    block = 1024
    _gelu_tanh_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block, num_warps=1 if INTERPRET else 4)
    return out


# ---------------------------------------------------------------------------
# Row-wise FP8 quantization (`reference.quantize_fp8_rows`), of x or of
# GELU-tanh(x). One program per row: a first pass finds max|v|, a second (its
# loads from L2) scales and casts. With the GELU it stands in for the MLP's gelu
# kernel: the hidden activation is read once more, and half its bytes written.


@triton.jit
def round_to_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, kept in fp32, so the
    cast after it is exact (the interpreter's own fp8 cast can be off by a binade)."""
    exponent = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # -6: subnormals
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    return ((v / step + 12582912.0) - 12582912.0) * step  # + 1.5 * 2^23: rounds to an integer


@triton.jit
def _quantize_fp8_rows_kernel(
    x_ptr, fp8_ptr, row_scale_ptr, M, K, stride_row, GELU: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    offsets = rows[:, None] * stride_row + cols[None, :]
    amax = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ok = row_ok[:, None] & (start + cols < K)[None, :]
        v = tl.load(x_ptr + offsets + start, mask=ok, other=0.0).to(tl.float32)
        if GELU:
            v = _gelu_tanh_f32(v)  # gelu(0) = 0: the masked tail adds nothing to the max
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, 1) / 448.0, 1e-12 / 448.0)  # reference.FP8_MAX, FP8_MIN_SCALE
    tl.store(row_scale_ptr + rows, scale, mask=row_ok)
    for start in range(0, K, BLOCK_K):
        ok = row_ok[:, None] & (start + cols < K)[None, :]
        v = tl.load(x_ptr + offsets + start, mask=ok, other=0.0).to(tl.float32)
        if GELU:
            v = _gelu_tanh_f32(v)
        q = round_to_e4m3(tl.minimum(tl.maximum(v / scale[:, None], -448.0), 448.0))
        tl.store(fp8_ptr + rows[:, None] * K + start + cols[None, :], q.to(fp8_ptr.dtype.element_ty), mask=ok)


def quantize_fp8_rows(x, gelu: bool = False, out=None):
    """Triton `reference.quantize_fp8_rows`: x [..., K] -> (e4m3 [M, K], fp32 scales [M, 1]),
    into `out` = (e4m3, scales) where given (contiguous, of those shapes' sizes). A program takes
    one row of a linear layer's input, or several short rows (attention's heads: `fp8_attention`),
    so that each moves a few KiB."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    if out is not None:
        q, scale = out[0].view(m, k), out[1].view(m, 1)
    else:
        q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    block, warps = _row_block(min(k, 2048))
    rows = max(1, 2048 // block)
    grid = (triton.cdiv(m, rows),)
    _quantize_fp8_rows_kernel[grid](
        x2, q, scale, m, k, x2.stride(0), GELU=gelu, ROWS=rows, BLOCK_K=block, num_warps=warps
    )
    return q, scale


@triton.jit
def _quantize_fp8_values_kernel(
    v_ptr, channel_scale_ptr, applied_scale_ptr, fp8_ptr, L, H, stride_vb, stride_vl, stride_vh,
    stride_vd, stride_out, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    CHANGED_ONLY: tl.constexpr,
):  # fmt: skip
    """One program per (block of keys, batch * head): v [B, L, H, D] (any strides) / its channel's
    scale, rounded to e4m3 and stored transposed, [B, H, D, L] with rows `stride_out` apart (the
    keys' axis contiguous). CHANGED_ONLY: only the channels whose scale is not the applied one,
    and nothing, not even a load, where no channel of the head changed."""
    keys = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    scale = tl.load(channel_scale_ptr + bh * HEAD_DIM + dims, mask=dim_ok, other=1.0)
    if CHANGED_ONLY:
        dim_ok = dim_ok & (tl.load(applied_scale_ptr + bh * HEAD_DIM + dims, mask=dim_ok, other=1.0) != scale)
    if tl.max(dim_ok.to(tl.int32), axis=0) > 0:
        ok = (keys < L)[:, None] & dim_ok[None, :]
        v_base = v_ptr + b * stride_vb + h * stride_vh
        v = tl.load(v_base + keys[:, None] * stride_vl + dims[None, :] * stride_vd, mask=ok, other=0.0)
        q = round_to_e4m3(tl.minimum(tl.maximum(v.to(tl.float32) / scale[None, :], -448.0), 448.0))
        out = fp8_ptr + bh * HEAD_DIM * stride_out + dims[None, :] * stride_out + keys[:, None]
        tl.store(out, q.to(fp8_ptr.dtype.element_ty), mask=ok)


def quantize_fp8_values(v, scale=None, out=None, applied=None):
    """Triton `reference.quantize_fp8_values`: v [B, L, H, D] -> (e4m3 [B, H, D, L], fp32 scales
    [B, H, D]), into `out` where given, and with `applied` only the channels whose scale changed.
    The scales are one reduction over the keys (`reference.fp8_value_scales`: torch's max-norm
    reads v once, with no temporary), then one kernel reads v again and writes it transposed at a
    byte per element."""
    bsz, lk, heads, head_dim = v.shape
    if scale is None:
        scale = reference.fp8_value_scales(v)
    if out is None:
        out = torch.empty(bsz, heads, head_dim, lk, device=v.device, dtype=reference.FP8_DTYPE)
    assert out.shape == (bsz, heads, head_dim, lk) and out.stride(3) == 1, out.stride()
    assert out.stride(1) == head_dim * out.stride(2) and out.stride(0) == heads * out.stride(1), out.stride()
    block_l = 16 if INTERPRET else 64
    grid = (triton.cdiv(lk, block_l), bsz * heads)
    _quantize_fp8_values_kernel[grid](
        v, scale, scale if applied is None else applied, out, lk, heads,
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), out.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_L=block_l,
        CHANGED_ONLY=applied is not None, num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return out, scale


# ---------------------------------------------------------------------------
# The Wan VAE's RMSNorm over channels: x viewed as [B, C, P] (P = the positions
# T*H*W, contiguous). One program per (block of positions, batch): a first pass
# over the channels sums squares per position, a second normalises and writes
# (its loads of the same tile come from L2). Rounded to x's dtype after the
# normalisation and after each multiply, as diffusers' module is.


@triton.jit
def _round(v, like_ptr):
    return v.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _rmsnorm_channels_kernel(
    x_ptr, gamma_ptr, bias_ptr, out_ptr, C, P, stride_c, stride_p, scale, eps,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # element (c, p) of batch row b sits at b * C * P + c * stride_c + p * stride_p: (P, 1) for
    # NC... tensors, (1, C) for channels-last ones
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pos_ok = pos < P
    base = tl.program_id(1).to(tl.int64) * C * P
    squares = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        ok = (ch[:, None] < C) & pos_ok[None, :]
        offs = base + ch[:, None].to(tl.int64) * stride_c + pos[None, :].to(tl.int64) * stride_p
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=0)
    denom = tl.maximum(tl.sqrt(squares), eps)[None, :]
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        ch_ok = ch < C
        ok = ch_ok[:, None] & pos_ok[None, :]
        offs = base + ch[:, None].to(tl.int64) * stride_c + pos[None, :].to(tl.int64) * stride_p
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = _round(_round(x / denom, out_ptr) * scale, out_ptr)
        gamma = tl.load(gamma_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[:, None]
        y = y * gamma
        if HAS_BIAS:
            y = _round(y, out_ptr) + tl.load(bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[:, None]
        if SILU:  # on the norm's output as stored, in fp32 (as torch computes SiLU), rounded once
            y = _round(y, out_ptr)
            y = y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def _channel_strides(x) -> tuple[int, int] | None:
    """(stride of a channel, stride of a position) where x [B, C, ...] is NC... or channels-last
    dense, else None."""
    if x.is_contiguous():
        return x[0, 0].numel(), 1
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if layout is not None and x.is_contiguous(memory_format=layout):
        return 1, x.shape[1]
    return None


def rmsnorm_channels(x, gamma, bias=None, eps: float = 1e-12, silu: bool = False):
    """Triton `reference.rmsnorm_channels`: x [B, C, ...], gamma/bias C values. The output keeps
    x's layout, NC... or channels-last."""
    strides = _channel_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = _channel_strides(x)
    b, c = x.shape[:2]
    p = x[0, 0].numel()
    out = torch.empty_like(x)  # the same strides as x (dense)
    gamma = gamma.reshape(c).contiguous()
    bias_c = gamma if bias is None else bias.reshape(c).contiguous()  # unused pointer without bias
    block_p = 16 if INTERPRET else 64
    block_c = 8 if INTERPRET else 32
    _rmsnorm_channels_kernel[(triton.cdiv(p, block_p), b)](
        x, gamma, bias_c, out, c, p, *strides, c**0.5, eps,
        HAS_BIAS=bias is not None, SILU=silu, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return out
