"""Hot-path ops of the DiT, each with one dispatch function.

The model calls only these functions. On CUDA tensors (when Triton is
importable and not disabled) they run the fused Triton kernels; everywhere else
the PyTorch references in `kernels.reference`. So CPU and GPU run the same
model code. `STREAMGEN_KERNELS=reference` forces the references everywhere.
"""

from __future__ import annotations

import os
import warnings

import torch

from streamgen.kernels import reference
from streamgen.kernels.reference import Rope, rope_angles, rope_inv_freq, rope_split  # noqa: F401


def _forces_reference(setting: str) -> bool:
    """Whether $STREAMGEN_KERNELS (`setting`) forces the references; a value it does not know is
    a warning (a typo, "references" say, had left the kernels on unsaid)."""
    known = setting.strip().lower()
    if known not in ("", "reference"):
        warnings.warn(
            f"$STREAMGEN_KERNELS={setting!r} is not a setting, ignored: 'reference' forces the "
            "PyTorch references everywhere, unset is the kernels where they run",
            stacklevel=2,
        )
    return known == "reference"


_FORCE_REFERENCE = _forces_reference(os.environ.get("STREAMGEN_KERNELS", ""))
# Tests only: route CPU tensors to the Triton kernels too, which then run under the Triton
# interpreter (TRITON_INTERPRET=1), so the whole model can be checked through them on CPU.
_TRITON_ON_CPU = False
_triton = None


def _triton_modules():
    """(triton_ops, triton_attention), imported on first CUDA use (None when unavailable, with a
    warning: only CUDA inputs ask, and there every kernel, `--attention triton`'s too, had run its
    reference unsaid; the reason, e.g. no triton or a broken GPU toolchain, is in the warning)."""
    global _triton
    if _triton is None:
        try:
            from streamgen.kernels import triton_attention, triton_ops

            _triton = (triton_ops, triton_attention)
        except Exception as e:  # the references serve
            _triton = False
            warnings.warn(
                f"Triton kernels unavailable ({type(e).__name__}: {e}); the PyTorch references serve",
                stacklevel=2,
            )
    return _triton or None


def _triton_ops():
    """The Triton kernels of the hot path but attention (None when unavailable)."""
    modules = _triton_modules()
    return modules and modules[0]


def _triton_attention():
    """The Triton attention kernel's module (None when unavailable)."""
    modules = _triton_modules()
    return modules and modules[1]


def needs_autograd(*tensors) -> bool:
    """True when autograd would record through these inputs.

    The Triton kernels are forward-only (inference and the no-grad parts of
    training), so such calls take the references, which differentiate.
    """
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _use_triton(x: torch.Tensor, *others) -> bool:
    # under torch.compile the references: inductor fuses them with their neighbours into kernels
    # of its own, where ours would stand in its graph as opaque calls
    return (
        (x.is_cuda or _TRITON_ON_CPU)
        and not _FORCE_REFERENCE
        and not torch.compiler.is_compiling()
        and not needs_autograd(x, *others)
        and _triton_ops() is not None
    )


def layernorm_modulate(x, shift, scale, eps: float = 1e-6):
    if _use_triton(x, shift, scale):
        return _triton_ops().layernorm_modulate(x, shift, scale, eps)
    return reference.layernorm_modulate(x, shift, scale, eps)


def gated_residual(x, y, gate):
    if _use_triton(x, y, gate):
        return _triton_ops().gated_residual(x, y, gate)
    return reference.gated_residual(x, y, gate)


def gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps: float = 1e-6):
    if _use_triton(x, y, gate, shift, scale):
        return _triton_ops().gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps)
    return reference.gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps)


def layernorm_affine(x, weight, bias, eps: float = 1e-6):
    if _use_triton(x, weight, bias):
        return _triton_ops().layernorm_affine(x, weight, bias, eps)
    return reference.layernorm_affine(x, weight, bias, eps)


def rmsnorm_rope(x, weight, num_heads: int, angles, eps: float = 1e-6):
    if _use_triton(x, weight):
        return _triton_ops().rmsnorm_rope(x, weight, num_heads, angles, eps)
    return reference.rmsnorm_rope(x, weight, num_heads, angles, eps)


def apply_rope(x, angles):
    """Rotate interleaved pairs of x [B, L, H, Dh] by angles [L, Dh/2] (see `reference.apply_rope`)."""
    if _use_triton(x, reference.rope_angle_tensor(angles)):
        return _triton_ops().apply_rope(x, angles)
    return reference.apply_rope(x, angles)


def rmsnorm_rope_positions(x, weight, num_heads: int, frame_pos, grid_hw, eps: float = 1e-6, theta=10000.0):
    """`rmsnorm_rope` with the RoPE angles computed from positions (in the kernel on CUDA).

    frame_pos: int tensor [F] of frame positions, or an int start frame;
    grid_hw: (Hp, Wp). Equal to `rmsnorm_rope(x, ..., rope_angles(frame_pos, grid_hw, Dh))`
    but builds no [L, Dh/2] angle table and never recompiles for a new chunk.
    """
    if _use_triton(x, weight):
        return _triton_ops().rmsnorm_rope_positions(x, weight, num_heads, frame_pos, grid_hw, eps, theta)
    return reference.rmsnorm_rope_positions(x, weight, num_heads, frame_pos, grid_hw, eps, theta)


def gelu_tanh(x):
    if _use_triton(x):
        return _triton_ops().gelu_tanh(x)
    return reference.gelu_tanh(x)


def quantize_fp8_rows(x, gelu: bool = False):
    """x [..., K] -> (float8_e4m3fn [M, K], fp32 scales [M, 1]), one scale per row, of
    gelu_tanh(x) where `gelu` (see `reference.quantize_fp8_rows`)."""
    if _use_triton(x):
        return _triton_ops().quantize_fp8_rows(x, gelu)
    return reference.quantize_fp8_rows(x, gelu)


def fp8_linear(x, weight_q, weight_scale, bias=None, gelu: bool = False):
    """A linear layer in FP8: x [..., K] quantized row by row (after gelu_tanh where `gelu`),
    times the e4m3 weight [N, K] with its per-output-channel scales [1, N], plus bias [N]; out
    [..., N] in x's dtype. One scaled matrix product (`reference.fp8_matmul`): on CUDA it needs
    sm_89 or later and bf16, on CPUs it runs at any float dtype (tests, accuracy)."""
    q, scale = quantize_fp8_rows(x, gelu)
    out = reference.fp8_matmul(q, scale, weight_q, weight_scale, bias, x.dtype)
    return out.view(*x.shape[:-1], weight_q.shape[0])


def rmsnorm_channels(x, gamma, bias=None, eps: float = 1e-12, silu: bool = False):
    """The Wan VAE's RMSNorm over channels, x [B, C, ...], and the SiLU after it where `silu`
    (see `reference.rmsnorm_channels`).

    On CUDA one kernel reads x twice (its tile's second read from L2) and writes once; diffusers'
    module makes six passes, three of them in fp32, and its SiLU two more (the decoder's glue:
    bench gpu's `decoder`)."""
    same_dtype = gamma.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)  # else torch promotes
    if same_dtype and _use_triton(x, gamma, bias):
        return _triton_ops().rmsnorm_channels(x, gamma, bias, eps, silu)
    return reference.rmsnorm_channels(x, gamma, bias, eps, silu)


ATTENTION_BACKENDS = ("sdpa", "flex", "triton", "flash", "cudnn", "fp8_qk", "fp8")


def check_attention_backend(name: str) -> str:
    """`name`, or a ValueError naming the backends there are (the config, the command line and
    the dispatch all refuse an unknown one with this message)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return name


def attention(
    q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, backend: str = "sdpa", kv_cache=None
):  # fmt: skip
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    block_mask_frames=(q_block [Fq], k_block [Fk]) selects block-causal
    attention over frames (see `reference.attention`); None is full attention.
    `backend` is the model config's switch; backends that are unavailable on
    this device fall back to SDPA. `kv_cache`: the KVCache that k and v are views of, which
    keeps them in e4m3 for the FP8 backends (`KVCache.fp8_keys`, `fp8_values`); the others
    ignore it.

    A query that may see no key gets 0, whatever the backend (`attention_backends`).
    """
    check_attention_backend(backend)
    exact = backend == "sdpa" or not (q.is_cuda or _TRITON_ON_CPU) and backend in ("triton", "flash")
    if exact and block_mask_frames is None and k.shape[1]:  # (no keys at all: the dispatch's zeros)
        return reference.attention(q, k, v)
    from streamgen.kernels import attention_backends

    return attention_backends.attention(q, k, v, block_mask_frames, tokens_per_frame, backend, kv_cache)
