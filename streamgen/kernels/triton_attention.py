"""Triton kernel (d): attention for streaming, on the GPU beside `kernels.triton_ops` (the
other kernels of the DiT's hot path, whose conventions it shares: see there).

A flash-attention style forward for a chunk of queries against sink + window + itself
(`attention`), with the block-causal frame mask of training, QK^T and PV in e4m3
(`fp8_attention`, `fp8_attention_quantized`), and each row's log-sum-exp for ring
attention's partials (`return_lse`). Called through `kernels.attention_backends`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# (triton_ops also sets Triton's environment, read when a kernel compiles)
from streamgen.kernels.triton_ops import (
    INTERPRET,
    LOG2E,
    quantize_fp8_rows,
    quantize_fp8_values,
    round_to_e4m3,
)

# ---------------------------------------------------------------------------
# (d) Attention: flash-attention style forward, one program per (query block,
# batch * head), online softmax over key blocks in fp32. Lq and Lk are
# independent (a chunk of queries against sink + window + itself) and need not
# be multiples of the blocks. With BLOCK_CAUSAL, token i's frame is i // S and
# a query attends to keys whose frame block id is <= its own; key blocks that
# no query of the tile may see are skipped.

if INTERPRET:
    _ATTN_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1)]
else:
    _ATTN_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        # (BLOCK_M, BLOCK_N, warps, stages). Compiled for sm_90 at head dim 128 in bf16 and in
        # both FP8 modes (`streamgen bench resources`), none spills and all fit in shared
        # memory; (128, 64) with 4 warps needed 255 registers and spilled, so it is not offered,
        # nor (256, 64), which spilled 168-204 bytes. (256, 32) reads each key block for twice
        # the queries of a 128-row tile: a steady chunk's 39,000 keys and values are read once
        # per query tile, 8.9 GB a call in bf16 for 1.1 TFLOP, 126 FLOP a byte, under the H200's
        # balance point (~184) unless its L2 serves the tiles of one head together.
        for bm, bn, w, s in (
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (256, 32, 8, 3),
            (64, 64, 4, 3),
            (64, 32, 4, 2),
        )
    ]


@triton.jit
def _attend_key_block(
    q, k_base, v_base, k_scales, cols, col_ok, dims, dim_ok, allowed, stride_kl, stride_vl, stride_vd,
    q_factor, m_i, l_i, acc, DOT_FP32: tl.constexpr, FP8_QK: tl.constexpr, FP8_PV: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """One online-softmax step: fold the key block `cols` into (running max, sum, acc). Without
    MASKED every key of the block is allowed (a full block of the unmasked loop): the scores
    skip the select, one operation per score less beside the exp2.

    The softmax's scale (q_factor, > 0: a scalar, or each row's with FP8_QK) is applied inside
    the exponent, scores * q_factor - max as one fused multiply-add, and the block's maximum is
    taken before scaling (a positive factor keeps the order). In bf16 PV accumulates into `acc`
    through tl.dot's third operand, the tensor cores' own fp32 accumulator. In FP8 it must not:
    on sm_90 Triton lets e4m3 products accumulate in the tensor cores' reduced precision (about
    14 bits, maxNumImpreciseAcc 2^30 by default), so `acc` fed to every block's product kept a
    steady chunk's whole PV sum (600 key blocks at 832x480) in it; each block's product starts
    from zero and is added in fp32 (SageAttention2's two-level accumulation). The add costs a
    second tile of registers: some tiles spill (`streamgen bench resources`)."""
    k = tl.load(
        k_base + cols[None, :] * stride_kl + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None], other=0.0
    )  # [BLOCK_D, BLOCK_N]
    v = tl.load(
        v_base + cols[:, None] * stride_vl + dims[None, :] * stride_vd,
        mask=col_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]; with FP8_PV from v transposed, the keys' axis contiguous
    if DOT_FP32:
        scores = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        scores = tl.dot(q, k)
    if FP8_QK:  # each key's scale; the query's, with the softmax's, is q_factor
        scores = scores * tl.load(k_scales, mask=col_ok, other=0.0)[None, :]
    if MASKED:
        scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1) * q_factor)
    # with FP8_PV the probabilities come out times 2^8 = reference.FP8_P_SCALE (exactly: a power
    # of two in the exponent), so the small ones stay normal e4m3 numbers; l_i sums them so
    # scaled, and acc / l_i cancels the factor
    exponent_max = m_new - 8.0 if FP8_PV else m_new
    if FP8_QK:
        p = tl.exp2(scores * q_factor[:, None] - exponent_max[:, None])
    else:
        p = tl.exp2(scores * q_factor - exponent_max[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if FP8_PV:
        if DOT_FP32:  # the interpreter's fp8 cast is wrong: round to e4m3 in fp32, as the GPU's cast
            acc = tl.dot(round_to_e4m3(p), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)  # (Triton does not fold it into the dot: fp8)
    elif DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


def _prune_attention_configs(configs, named_args, **kwargs):
    """The exact fp32 dots (DOT_FP32) spill registers in every config on Hopper (docs/kernels.md):
    that path is for exactness, not speed, so it takes the smallest tile and is not autotuned.
    Every other mode builds every tile for sm_90 without spilling, with the log-sum-exp too
    (Triton 3.9 and the H200 image's 3.6; `streamgen bench resources`)."""
    return configs[-1:] if kwargs.get("DOT_FP32") else configs


@triton.autotune(
    configs=_ATTN_CONFIGS,
    # the lengths by powers of two: one tile for every call would be the one tuned on the first
    # (a stream's sink, 1560 keys at 832x480), for the steady chunk's 39,000 keys too
    key=["HEAD_DIM", "BLOCK_CAUSAL", "DOT_FP32", "FP8_QK", "FP8_PV", "RETURN_LSE", "LQ_BUCKET", "LK_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_attention_configs},
)
@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET"])  # read by the autotuner only: no new build
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_block_ptr, k_block_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol, stride_oh, stride_ksb,
    H, Lq, Lk, S, qk_scale, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    FP8_QK: tl.constexpr, FP8_PV: tl.constexpr, RETURN_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    row_ok = rows < Lq
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    # FP8: the scales of q and k, one per (batch, token, head), are [B, L, H], q's contiguous, k's
    # a view (a KV cache keeps its keys' scales for more tokens than a call attends to)
    k_scale_base = k_scale_ptr + b * stride_ksb + h
    if FP8_QK:
        # (rows past Lq get a factor of 1: a 0 would make the masked scores' -inf NaN)
        q_scale = tl.load(q_scale_ptr + (b * Lq + rows) * H + h, mask=row_ok, other=1.0)
        q_factor = q_scale * qk_scale
    else:
        q_factor = qk_scale

    # a finite start for the running max keeps exp2(m_old - m_new) finite when a
    # whole key block is masked for some row
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_CAUSAL:
        q_block = tl.load(q_block_ptr + rows // S, mask=row_ok, other=-(2**30))
        q_block_max = tl.max(q_block, axis=0)

    if BLOCK_CAUSAL:
        for start_n in range(0, Lk, BLOCK_N):
            cols = start_n + cols0
            col_ok = cols < Lk
            k_block = tl.load(k_block_ptr + cols // S, mask=col_ok, other=2**30)
            if tl.min(k_block, axis=0) <= q_block_max:  # else no query of this tile sees the block
                allowed = (k_block[None, :] <= q_block[:, None]) & col_ok[None, :]
                m_i, l_i, acc = _attend_key_block(
                    q, k_base, v_base, k_scale_base + cols * H, cols, col_ok, dims, dim_ok, allowed,
                    stride_kl, stride_vl, stride_vd, q_factor, m_i, l_i, acc, DOT_FP32, FP8_QK, FP8_PV,
                    True,
                )  # fmt: skip
    else:
        # full key blocks with no branch and no select, so the compiler can pipeline the loads;
        # then the partial block at the end, if any, masked
        full_end = Lk - Lk % BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            cols = start_n + cols0
            m_i, l_i, acc = _attend_key_block(
                q, k_base, v_base, k_scale_base + cols * H, cols, cols < Lk, dims, dim_ok, None,
                stride_kl, stride_vl, stride_vd, q_factor, m_i, l_i, acc, DOT_FP32, FP8_QK, FP8_PV,
                False,
            )  # fmt: skip
        if full_end < Lk:
            cols = full_end + cols0
            col_ok = cols < Lk
            m_i, l_i, acc = _attend_key_block(
                q, k_base, v_base, k_scale_base + cols * H, cols, col_ok, dims, dim_ok, col_ok[None, :],
                stride_kl, stride_vl, stride_vd, q_factor, m_i, l_i, acc, DOT_FP32, FP8_QK, FP8_PV,
                True,
            )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if RETURN_LSE:  # each row's log-sum-exp of its scores, natural log (the scores are in log2 units);
        # rows past Lq (not stored) may have seen no key: no log of 0 for them
        lse = m_i + tl.log2(tl.where(row_ok, l_i, 1.0))
        if FP8_PV:  # l_i summed the probabilities times 2^8
            lse = lse - 8.0
        tl.store(lse_ptr + bh * Lq + rows, lse * 0.6931471805599453, mask=row_ok)
    if FP8_PV:  # v's scale per channel
        out = out * tl.load(v_scale_ptr + bh * HEAD_DIM + dims, mask=dim_ok, other=0.0)[None, :]
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def attention(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, return_lse: bool = False):
    """Triton `reference.attention`: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    Inputs may be strided views (e.g. slices of a KV cache) as long as the head
    dim is unit-stride. block_mask_frames=(q_block [Fq], k_block [Fk]) selects
    the block-causal mask over frames of `tokens_per_frame` tokens. With
    `return_lse`: (out in fp32, the rows' log-sum-exp [B, H, Lq] fp32), the
    partial of one block of keys that ring attention merges.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    v_strides = (v.stride(0), v.stride(1), v.stride(2), 1)
    out_dtype = torch.float32 if return_lse else q.dtype
    return _launch_attention(
        q, k, v, v_strides, None, block_mask_frames, tokens_per_frame, out_dtype, q.dtype, return_lse
    )


def fp8_attention(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, pv: bool = False):
    """Triton `reference.fp8_attention` (pv=True), or with QK^T alone in e4m3 and PV in v's dtype:
    q and k quantized per token and head (`quantize_fp8_rows`), v per head and channel and
    transposed, the keys' axis contiguous, as Hopper's FP8 tensor cores read it."""
    inputs = quantize_fp8_attention(q, k, v, pv)
    return fp8_attention_quantized(*inputs, block_mask_frames, tokens_per_frame, q.dtype)


def quantize_fp8_heads(x, out=None):
    """`reference.quantize_fp8_heads`: q or k [B, L, H, D] -> (e4m3 [B, L, H, D], fp32 [B, L, H]),
    written into `out` = (e4m3, scales) where given (a KV cache's, `KVCache.fp8_keys`)."""
    if out is not None and not all(t.is_contiguous() for t in out):  # (a slice of a batch)
        for t, new in zip(out, quantize_fp8_heads(x)):
            t.copy_(new)
        return out
    x8, scale = quantize_fp8_rows(x, out=out)
    return x8.view(x.shape), scale.view(x.shape[:-1])


def quantize_fp8_attention(q, k, v, pv: bool, v_scale=None):
    """`reference.quantize_fp8_attention`: (q8, q_scale, k8, k_scale, v8 or v, v_scale or None)."""
    q8, q_scale = quantize_fp8_heads(q)
    k8, k_scale = quantize_fp8_heads(k)
    if not pv:
        return q8, q_scale, k8, k_scale, v, None
    return q8, q_scale, k8, k_scale, *quantize_fp8_values(v, v_scale)


def fp8_attention_quantized(
    q8, q_scale, k8, k_scale, v, v_scale, block_mask_frames=None, tokens_per_frame: int = 1,
    dtype=torch.bfloat16, return_lse: bool = False,
):  # fmt: skip
    """Attention of inputs quantized by `quantize_fp8_attention`, out in `dtype` (the inputs' own:
    fp32 takes the exact dots); with `return_lse`, as in `attention`."""
    if v_scale is None:  # QK^T alone in FP8: v in its own dtype, [B, Lk, H, D]
        v = v if v.stride(-1) == 1 else v.contiguous()
        v_strides = (v.stride(0), v.stride(1), v.stride(2), 1)
    else:  # [B, H, D, Lk], read as [B, Lk, H, D]
        v_strides = (v.stride(0), v.stride(3), v.stride(1), v.stride(2))
    out_dtype = torch.float32 if return_lse else dtype
    scales = (q_scale, k_scale, v_scale)
    return _launch_attention(
        q8, k8, v, v_strides, scales, block_mask_frames, tokens_per_frame, out_dtype, dtype, return_lse
    )


def head_dim_tile(head_dim: int, fp8: bool) -> int:
    """The kernel's tile over the head dim (BLOCK_D): head_dim up to a power of two, at least 16,
    tl.dot's smallest K. With QK^T in e4m3 at least 32: Hopper's FP8 products sum 32 values and
    Triton refuses a smaller K ("K >= 32"), so heads of 16 and less are padded (the loads past
    head_dim give zeros, which add nothing to the scores; nothing is stored there)."""
    return max(32 if fp8 else 16, triton.next_power_of_2(head_dim))


def _launch_attention(
    q, k, v, v_strides, fp8_scales, block_mask_frames, tokens_per_frame, out_dtype, dtype, return_lse
):  # fmt: skip
    """`dtype` is the model's: in fp32 (and in the interpreter) the dots are exact fp32 products."""
    bsz, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    assert k.shape == (bsz, lk, heads, head_dim) and v.numel() == k.numel(), (q.shape, k.shape, v.shape)
    out = torch.empty(bsz, lq, heads, head_dim, device=q.device, dtype=out_dtype)
    lse = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32) if return_lse else out
    if block_mask_frames is not None:
        q_block, k_block = (t.to(device=q.device, dtype=torch.int32).contiguous() for t in block_mask_frames)
        assert q_block.numel() * tokens_per_frame == lq and k_block.numel() * tokens_per_frame == lk
    else:
        q_block = k_block = out  # unused pointers without the mask (nothing allocated per call)
    # unused pointers without FP8 (v's scale: without FP8 products for PV)
    q_scale, k_scale, v_scale = (out if t is None else t for t in (fp8_scales or (None,) * 3))
    if fp8_scales is not None:  # [B, L, H]: the keys' may be a view of a cache's longer buffer
        assert q_scale.is_contiguous() and k_scale.stride()[1:] == (heads, 1), k_scale.stride()

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), bsz * heads)

    _attention_kernel[grid](
        q, k, v, out, lse, q_block, k_block, q_scale, k_scale, v_scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *v_strides, out.stride(0), out.stride(1), out.stride(2), k_scale.stride(0),
        heads, lq, lk, max(tokens_per_frame, 1), LOG2E / math.sqrt(head_dim),
        triton.next_power_of_2(lq), triton.next_power_of_2(lk),  # for the autotuner's key only
        HEAD_DIM=head_dim, BLOCK_D=head_dim_tile(head_dim, fp8_scales is not None),
        BLOCK_CAUSAL=block_mask_frames is not None, DOT_FP32=INTERPRET or dtype == torch.float32,
        FP8_QK=fp8_scales is not None, FP8_PV=v_scale is not out, RETURN_LSE=return_lse,
    )  # fmt: skip
    return (out, lse) if return_lse else out
