"""PyTorch reference implementations of the DiT hot path.

These are the semantics every backend must reproduce. They compute in fp32 and
return the input dtype, like Wan's FP32LayerNorm blocks do.

Shapes used throughout: a video token sequence is laid out frame-major,
`x [B, F, S, D]` = batch, latent frames, tokens per frame, width. Modulation
tensors are per frame, `[B, F, D]`, so different frames (chunks) can sit at
different noise levels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """LayerNorm without affine, then adaLN modulation `n * (1 + scale) + shift`.

    x: [B, F, S, D]; shift, scale: [B, F, D].
    """
    n = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    # one fused multiply-add instead of mul + add: on the CPU the student's small
    # tensors pay per op, not per element
    return torch.addcmul(shift.float().unsqueeze(2), n, 1 + scale.float().unsqueeze(2)).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor):
    """`x + y * gate` with a per-frame gate. x, y: [B, F, S, D]; gate: [B, F, D]."""
    return torch.addcmul(x.float(), y.float(), gate.float().unsqueeze(2)).to(x.dtype)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
):
    """Gated residual fused with the next norm: returns (h, layernorm_modulate(h, shift, scale))."""
    h = gated_residual(x, y, gate)
    return h, layernorm_modulate(h, shift, scale, eps)


def layernorm_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6):
    """Wan's cross-attention norm (norm2): LayerNorm with affine, computed in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def rmsnorm_channels(
    x: torch.Tensor,
    gamma: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-12,
    silu: bool = False,
):
    """diffusers' `WanRMS_norm` (channel first), the Wan VAE's norm: x [B, C, ...] normalised over
    C in fp32 (`F.normalize`: x / max(||x||, eps)), rounded to x's dtype, then `* sqrt(C) * gamma
    (+ bias)` in x's dtype. gamma, bias: C values (any shape that flattens to C). silu: then the
    SiLU that follows the norm in the decoder's residual blocks and head."""
    view = (x.shape[1],) + (1,) * (x.dim() - 2)
    out = F.normalize(x.float(), dim=1, eps=eps).to(x.dtype) * x.shape[1] ** 0.5 * gamma.reshape(view)
    out = out if bias is None else out + bias.reshape(view)
    return F.silu(out) if silu else out


# ---------------------------------------------------------------------------
# 3D RoPE. Wan splits each head's dim into (t, h, w) parts and rotates
# interleaved pairs (x[2i], x[2i+1]). Angles are computed from integer
# positions at call time, so the frame offset is a runtime value (a new chunk
# never needs a new table) and positions can be anything the cache asks for.


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head into (t, h, w) rotary dims."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def rope_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rotary pair: inverse frequency [head_dim/2] and which axis (0=t, 1=h, 2=w) it rotates with."""
    freqs, axes = [], []
    for axis, d in enumerate(rope_split(head_dim)):
        k = torch.arange(0, d, 2, dtype=torch.float64, device=device)[: d // 2]
        freqs.append(1.0 / theta ** (k / d))
        axes.append(torch.full((d // 2,), axis, dtype=torch.long, device=device))
    # float64 only here, once, for the table of frequencies (matches Wan's table)
    return torch.cat(freqs).float(), torch.cat(axes)


def rope_angles(frame_pos: torch.Tensor, grid_hw: tuple[int, int], head_dim: int, theta: float = 10000.0):
    """Rotation angles [F * Hp * Wp, head_dim/2] for tokens laid out frame-major.

    frame_pos: [F] integer frame positions (need not be contiguous: the ring
    cache passes the position of each physical slot).
    """
    hp, wp = grid_hw
    inv_freq, axes = rope_inv_freq(head_dim, theta, frame_pos.device)
    hh = torch.arange(hp, device=frame_pos.device)
    ww = torch.arange(wp, device=frame_pos.device)
    pos = torch.stack(
        torch.broadcast_tensors(frame_pos[:, None, None], hh[None, :, None], ww[None, None, :]), dim=-1
    ).reshape(-1, 3)  # [L, 3]
    return pos.float().gather(1, axes[None, :].expand(pos.shape[0], -1)) * inv_freq


class Rope(NamedTuple):
    """Rotary angles [L, Dh/2] with their rotation as complex numbers, made once per forward.

    Every layer rotates q and k with the same table; on the CPU, recomputing
    cos/sin for each of them cost more than the rotation. Anything that takes
    `angles` accepts either a plain angle tensor or a Rope.
    """

    angles: torch.Tensor
    cis: torch.Tensor  # exp(i * angles), complex64

    @classmethod
    def of(cls, angles: torch.Tensor) -> Rope:
        return cls(angles, torch.polar(torch.ones_like(angles), angles))

    @classmethod
    def of_any(cls, angles) -> Rope:
        """`angles` as a Rope: itself if it is one (its rotations made once), else made now."""
        return angles if isinstance(angles, Rope) else cls.of(angles)

    def map(self, fn) -> Rope:
        """Apply the same token selection to both tables (e.g. a sequence shard)."""
        return Rope(fn(self.angles), fn(self.cis))


def rope_angle_tensor(angles) -> torch.Tensor:
    return angles.angles if isinstance(angles, Rope) else angles


def apply_rope(x: torch.Tensor, angles) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, Dh] by angles [L, Dh/2] (fp32 math).

    The pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1]; the
    rotation is one complex multiplication.
    """
    if torch.compiler.is_compiling():
        # inductor generates no code for complex numbers (it would call eager kernels between its
        # fused ones): the same rotation in real arithmetic, which it fuses with the norm before
        a = rope_angle_tensor(angles)[None, :, None, :]
        cos, sin = a.cos(), a.sin()
        x_re, x_im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((x_re * cos - x_im * sin, x_re * sin + x_im * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)
    rope = Rope.of_any(angles)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * rope.cis[None, :, None, :]).flatten(-2).to(x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with a weight (Wan's qk-norm is over the full width)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rmsnorm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    num_heads: int,
    angles: torch.Tensor | None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """q/k RMSNorm over the full width [B, L, H*Dh], split into heads, then RoPE.

    angles=None skips the rotation (keys stored un-rotated in the KV cache).
    Returns [B, L, H, Dh].
    """
    y = rmsnorm(x, weight, eps).unflatten(-1, (num_heads, -1))
    return apply_rope(y, angles) if angles is not None else y


def rmsnorm_rope_positions(
    x: torch.Tensor,
    weight: torch.Tensor,
    num_heads: int,
    frame_pos: torch.Tensor | int,
    grid_hw: tuple[int, int],
    eps: float = 1e-6,
    theta: float = 10000.0,
) -> torch.Tensor:
    """`rmsnorm_rope` with the angles given by positions instead of a table.

    frame_pos: [F] integer frame positions, or an int start frame for F
    contiguous frames; x holds F * Hp * Wp tokens, frame-major.
    """
    tokens_per_frame = grid_hw[0] * grid_hw[1]
    if isinstance(frame_pos, int):
        frames = x.shape[1] // tokens_per_frame
        frame_pos = torch.arange(frame_pos, frame_pos + frames, device=x.device)
    angles = rope_angles(frame_pos.to(x.device), grid_hw, x.shape[-1] // num_heads, theta)
    return rmsnorm_rope(x, weight, num_heads, angles, eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Wan's MLP activation).

    Inference uses the identity 0.5 * (1 + tanh(u)) = sigmoid(2u) with in-place
    steps: on the CPU this is about twice as fast as F.gelu(approximate="tanh")
    and equal to it within fp32 rounding. Autograd needs the plain version.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return F.gelu(x, approximate="tanh")
    xf = x.float()  # one copy of a bfloat16 x (the MLP's widest tensor), none of a float32 one
    y = xf * xf
    y.mul_(0.044715).add_(1.0).mul_(xf).mul_(1.5957691216057308)  # 2u = 2*sqrt(2/pi)*(x + 0.044715 x^3)
    return y.sigmoid_().mul_(xf).to(x.dtype)


# ---------------------------------------------------------------------------
# FP8 (e4m3) linear layers: each row of activations and each row of a weight
# (an output channel) gets its own fp32 scale, so one outlier token or channel
# costs only its own row's precision. Hopper's tensor cores multiply e4m3 at
# twice the bf16 rate; torch._scaled_mm applies both scales in its epilogue.

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
FP8_MIN_SCALE = 1e-12 / FP8_MAX  # an all-zero row quantizes to zeros, not to NaN


def quantize_fp8_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [M, K] float8_e4m3fn, scale [M, 1] fp32), x ~ q * scale row by row.

    Each row is divided by max|row| / 448, so its largest element lands on e4m3's largest
    value. gelu: quantize gelu_tanh(x), computed in fp32 (the MLP's hidden activation on its
    way into the second linear, never rounded to x's dtype).
    """
    v = x.reshape(-1, x.shape[-1]).float()
    if gelu:
        v = gelu_tanh(v)
    scale = (v.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(FP8_MIN_SCALE)
    return (v / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many e4m3 values lie between a and b, elementwise, plus one (0: equal; 1: adjacent,
    one rounding apart). e4m3fn codes are sign + magnitude, and the magnitude's order is the
    value's order, so the signed magnitudes are consecutive integers along the real line."""

    def position(t):
        code = t.view(torch.uint8).int()
        return torch.where(code >= 128, -(code - 128), code)

    return (position(a) - position(b)).abs()


def fp8_matmul(q, scale, weight_q, weight_scale, bias, out_dtype) -> torch.Tensor:
    """(q * scale) @ (weight_q * weight_scale).T + bias in out_dtype, one scaled matrix product.

    q [M, K], scale [M, 1]; weight_q [N, K] (row-major, so its transpose is the column-major
    operand the tensor cores read), weight_scale [1, N]; bias [N] in out_dtype or None. The same
    op on CPUs (exact products of the e4m3 values) and on CUDA (bf16 out on sm_89 and later)."""
    return torch._scaled_mm(
        q, weight_q.t(), scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype
    )


# ---------------------------------------------------------------------------
# FP8 attention (inference): QK^T in e4m3, and PV too with `pv`, at twice
# Hopper's bf16 rate. Each scale sits on an axis the product does not sum
# over, so it comes out of the sum exactly: q and k get one per token and head
# (the rows of QK^T), v one per head and channel (the columns of PV). The
# probabilities P (at most 1 after the running max) are multiplied by 2^8 before
# they are rounded, so the small ones of a long window land on e4m3's normal
# range instead of flushing to zero; the sum of P that divides the output is
# taken before the rounding, in fp32.

FP8_P_SCALE = 256.0


def quantize_fp8_heads(x: torch.Tensor, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q or k [B, L, H, D] -> (e4m3 [B, L, H, D], fp32 scales [B, L, H]): one scale per token
    and head (`quantize_fp8_rows` over the head dim); into `out` = (e4m3, scales) where given."""
    q8, scale = quantize_fp8_rows(x)
    q8, scale = q8.view(x.shape), scale.view(x.shape[:-1])
    if out is None:
        return q8, scale
    for t, new in zip(out, (q8, scale)):
        t.copy_(new)
    return out


def fp8_value_scales(v: torch.Tensor) -> torch.Tensor:
    """v [B, L, H, D] -> fp32 [B, H, D]: one e4m3 scale per head and channel, over every token
    (its max / FP8_MAX). Ring attention takes the max over every process's tokens first."""
    amax = torch.linalg.vector_norm(v, float("inf"), dim=1, dtype=torch.float32)
    return (amax / FP8_MAX).clamp_min_(FP8_MIN_SCALE)


def quantize_fp8_values(
    v: torch.Tensor, scale: torch.Tensor | None = None, out: torch.Tensor | None = None, applied=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, L, H, D] -> (e4m3 [B, H, D, L], fp32 scales [B, H, D]), the scales
    `fp8_value_scales(v)` unless given. Transposed so that the keys' axis, the one PV sums over,
    is contiguous: the layout Hopper's FP8 tensor cores read their second operand in.

    Into `out` (a [B, H, D, L] view of a KV cache's buffer, the keys' axis unit-stride) where
    given, and then with `applied` ([B, H, D], the scales `out` holds values of) only the
    channels whose scale is not that one (`KVCache.fp8_values`)."""
    scale = fp8_value_scales(v) if scale is None else scale
    v8 = (v.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).permute(0, 2, 3, 1)
    if out is None:
        return v8.contiguous(), scale
    if applied is not None:  # (on bytes: torch.where has no e4m3 kernel)
        kept = (scale == applied)[..., None]
        v8 = torch.where(kept, out.view(torch.uint8), v8.view(torch.uint8)).view(FP8_DTYPE)
    out.copy_(v8)
    return out, scale


def quantize_fp8_attention(q, k, v, pv: bool, v_scale=None):
    """The inputs of `fp8_attention_quantized`: (q8, q_scale, k8, k_scale, v8, v_scale) with
    q and k per token and head (`quantize_fp8_heads`) and, where `pv`, v per head and channel
    (`quantize_fp8_values`, with `v_scale` if given); else v as it is and v_scale None."""
    q8, q_scale = quantize_fp8_heads(q)
    k8, k_scale = quantize_fp8_heads(k)
    if not pv:
        return q8, q_scale, k8, k_scale, v, None
    return q8, q_scale, k8, k_scale, *quantize_fp8_values(v, v_scale)


def fp8_attention(
    q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, pv: bool = True
) -> torch.Tensor:
    """`attention` with QK^T made of e4m3 values, and PV too where `pv` (scales above; else P and
    v in fp32), the softmax in fp32; out in q's dtype. What the Triton kernel computes, up to its
    online softmax: it rounds P against the running max of the key blocks seen so far, this
    against the row's final max."""
    inputs = quantize_fp8_attention(q, k, v, pv)
    return fp8_attention_quantized(*inputs, block_mask_frames, tokens_per_frame, q.dtype)


def fp8_attention_quantized(
    q8, q_scale, k8, k_scale, v, v_scale, block_mask_frames=None, tokens_per_frame: int = 1,
    dtype=torch.float32, return_lse: bool = False,
):  # fmt: skip
    """`fp8_attention` of inputs from `quantize_fp8_attention`, out in `dtype`; with `return_lse`
    (out in fp32, the rows' log-sum-exp [B, H, Lq] fp32), a partial that ring attention merges."""
    s = torch.einsum("bqhd,bkhd->bhqk", q8.float(), k8.float())
    scale = q_scale.transpose(1, 2)[..., :, None] * k_scale.transpose(1, 2)[..., None, :]
    s = s * (scale / math.sqrt(q8.shape[-1]))
    if block_mask_frames is not None:
        s = s.masked_fill(~frame_mask(*block_mask_frames, tokens_per_frame), float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    p = (s - row_max).exp_()
    total = p.sum(-1, keepdim=True)  # [B, H, Lq, 1]
    if v_scale is not None:
        p8 = (p * FP8_P_SCALE).to(FP8_DTYPE)
        out = torch.einsum("bhqk,bhdk->bhqd", p8.float(), v.float()) * (v_scale[:, :, None, :] / FP8_P_SCALE)
    else:
        out = torch.einsum("bhqk,bkhd->bhqd", p, v.float())
    out = (out / total).transpose(1, 2)
    if return_lse:
        return out, (row_max + total.log()).squeeze(-1)
    return out.to(dtype)


# ---------------------------------------------------------------------------
# Attention


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask_frames: tuple[torch.Tensor, torch.Tensor] | None = None,
    tokens_per_frame: int = 1,
) -> torch.Tensor:
    """Scaled dot-product attention, q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    block_mask_frames=(q_block [Fq], k_block [Fk]): optional per-frame block ids;
    a query frame attends to key frames whose block id is <= its own
    (block-causal over chunks, full attention inside a chunk). Lq may be
    smaller than Lk (a chunk of queries against sink + window + itself).
    """
    mask = None if block_mask_frames is None else frame_mask(*block_mask_frames, tokens_per_frame)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def frame_mask(q_block: torch.Tensor, k_block: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """[Lq, Lk] booleans: a query may see a key whose frame's block id is <= its frame's."""
    allowed = k_block[None, :] <= q_block[:, None]  # [Fq, Fk]
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def attention_reference_math(q, k, v, mask=None):
    """Plain softmax(QK^T/sqrt(d))V in fp32, for testing other backends."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)
