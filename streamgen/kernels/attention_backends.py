"""Attention backends behind one switch (`backend=` of `kernels.attention`).

- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (the reference,
  the default; a boolean mask for the block-causal variant).
- "flex": FlexAttention with a block mask built from the frame block ids
  (compiled on CUDA, where whole masked key blocks are skipped; eager on CPU,
  which torch supports with an unfused implementation, forward only: calls that need
  gradients use SDPA there). Meant for training.
- "triton": our kernel (`kernels.triton_attention.attention`), CUDA only, forward
  only (calls that need gradients use SDPA).
- "flash": flash-attn 3 (`flash_attn_interface`, Hopper: H100/H200) or 2
  (`flash_attn`) when installed, on sm_80 and later. They take no block mask, nor fp32:
  masked bf16/fp16 calls fall back to the Triton kernel, fp32 calls to SDPA.
- "fp8_qk" and "fp8": QK^T in e4m3, and with "fp8" PV too
  (`reference.fp8_attention`), for inference: our Triton kernel on sm_89 and
  newer; on CPUs the same numerics emulated, to measure their accuracy; calls
  that need gradients use SDPA.
- "cudnn": SDPA with cuDNN's fused attention first in its priority order
  (CUDA, sm80 and newer). Which of SDPA's own kernels is fastest for a chunk
  of queries against a long cache depends on the GPU and the PyTorch build;
  `bench kernels` times each. A call cuDNN cannot serve goes to SDPA's next
  kernel, in SDPA's usual order.

All take and return the layout q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].
A backend that cannot serve a call falls back instead of failing, so the
config switch is always safe; `available_backends` says which run natively.

A query that may see no key (its frame's block id below every key frame's) gets 0 from every
backend, and a log-sum-exp of -inf from `attention_with_lse` (the log of an empty sum, which a
ring merge weighs 0). The backends disagreed: our kernel gave 0, SDPA's math 0 since torch 2.5,
the FP8 emulation NaN, and SDPA's CUDA kernels are not bound to either; a NaN would spread through
the rest of the model. So no backend is handed such a row (`_seeing_every_key`): its frame sees
every key instead and its output is set to 0 after, which also keeps its gradients finite (0 for
its query; nothing from it for the keys and values). A call with no keys at all (Lk = 0, a static
shape: a Python check, no synchronisation) is served those zeros without a backend. The model
makes no such row: every query frame sees its own frame (block-causal), and a cache is read
without a mask.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict

import torch

from streamgen import kernels
from streamgen.kernels import check_attention_backend, needs_autograd, reference


def attention(
    q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, backend: str = "sdpa", kv_cache=None
):  # fmt: skip
    run = _BY_NAME[check_attention_backend(backend)]
    if k.shape[1] == 0 or q.shape[1] == 0:  # (no query: flex's block mask of no rows failed)
        return _attention_of_no_keys(q, k, v)[0].to(q.dtype)
    if kv_cache is not None and backend in FP8_BACKENDS:
        run = functools.partial(run, kv_cache=kv_cache)
    if block_mask_frames is None:
        return run(q, k, v)
    block_mask_frames, empty = _seeing_every_key(block_mask_frames, tokens_per_frame)
    out = run(q, k, v, block_mask_frames, tokens_per_frame)
    return out.masked_fill(empty.to(out.device)[:, None, None], 0.0)


def _seeing_every_key(block_mask_frames, tokens_per_frame: int):
    """(the block ids with each query frame that may see no key frame made to see every key
    frame, the query rows [Lq] of those frames): the caller sets those rows to 0 after. No host
    synchronisation: a few operations on the frames' ids, whatever their device."""
    q_block, k_block = block_mask_frames
    empty = q_block < k_block.min()
    q_block = torch.where(empty, k_block.max().to(q_block.device), q_block)
    return (q_block, k_block), empty.repeat_interleave(tokens_per_frame)


def _attention_of_no_keys(q, k, v):
    """Lk = 0, every row empty: (out 0 [B, Lq, H, Dv] fp32, lse -inf [B, H, Lq] fp32), the empty
    sums (several backends refuse the empty reduction, and the mask's rule takes a minimum over the
    key frames); Lq = 0, no row: both empty. Computed from q, k and v, so that the output is in their graph (gradients 0)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float())  # [B, H, Lq, 0]
    return torch.einsum("bhqk,bkhd->bqhd", scores, v.float()), scores.logsumexp(-1)


def available_backends(device) -> list[str]:
    """Backends that run natively (without falling back) on `device`."""
    device = torch.device(device)
    names = ["sdpa"]
    if _flex_module() is not None:
        names.append("flex")
    if device.type == "cuda":
        if _triton_attention() is not None:
            names.append("triton")
        if _flash_func(device) is not None:
            names.append("flash")
        if _cudnn_attention_supported(device):
            names.append("cudnn")
        if _triton_attention() is not None and _has_fp8_tensor_cores(device):
            names += ["fp8_qk", "fp8"]  # on CPUs they are emulations, for accuracy only
    return names


# ---------------------------------------------------------------------------
# Triton


def _triton_attention():
    from streamgen.kernels import _triton_attention as load

    return load()


def triton_attention(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1):
    # the kernel is forward-only: calls that need gradients take SDPA, which differentiates
    if not kernels._use_triton(q, k, v):
        return reference.attention(q, k, v, block_mask_frames, tokens_per_frame)
    return _triton_attention().attention(q, k, v, block_mask_frames, tokens_per_frame)


# ---------------------------------------------------------------------------
# FlexAttention


try:  # (5 ms, here rather than in a functools.cache: `serve --compile` traces flex's calls, and
    # dynamo warned at every cached function it met that "silent incorrectness" was a risk)
    from torch.nn.attention import flex_attention as _FLEX
except ImportError:  # torch before 2.5
    _FLEX = None


def _flex_module():
    return _FLEX


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_module().flex_attention, dynamic=False)


# One compiled kernel per attention shape: a stream's self-attention sees every ring fill level,
# and there are the sink, the cross- and the audio attention too, well past dynamo's default of
# 8 recompiles per function, after which flex would run unfused (the scores materialised: 6x
# slower per chunk on an H200, bench/results/h200-2026-11-30.json). Raised for these calls only.
_FLEX_RECOMPILE_LIMIT = 64


def _flex_compile_limits():
    import torch._dynamo as dynamo

    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    return dynamo.config.patch({name: max(getattr(dynamo.config, name), _FLEX_RECOMPILE_LIMIT)})


_BLOCK_MASKS: OrderedDict = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 32


def flex_block_mask(q_block, k_block, tokens_per_frame: int, device):
    """FlexAttention BlockMask for the block-causal frame mask, cached by its block ids.

    Key block ids may be any order (e.g. a ring cache's physical slots), so the
    mask reads them from a table rather than assuming causal token order.
    """
    key = (tuple(q_block.tolist()), tuple(k_block.tolist()), tokens_per_frame, str(device))
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]
    q_ids = q_block.to(device=device, dtype=torch.int32)
    k_ids = k_block.to(device=device, dtype=torch.int32)
    s = tokens_per_frame

    def block_causal(b, h, q_idx, kv_idx):
        return k_ids[kv_idx // s] <= q_ids[q_idx // s]

    mask = _flex_module().create_block_mask(
        block_causal, None, None, q_ids.numel() * s, k_ids.numel() * s, device=str(device)
    )
    _BLOCK_MASKS[key] = mask
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def flex_attention(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1):
    mod = _flex_module()
    # eager flex (CPUs) has no backward: calls that record take SDPA, which differentiates
    if mod is None or not q.is_cuda and needs_autograd(q, k, v):
        return reference.attention(q, k, v, block_mask_frames, tokens_per_frame)
    block_mask = None
    if block_mask_frames is not None:
        block_mask = flex_block_mask(*block_mask_frames, tokens_per_frame, q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        with _flex_compile_limits():
            out = _compiled_flex()(qt, kt, vt, block_mask=block_mask)
    else:
        # eager flex refuses inputs that require grad even where nothing records (no_grad):
        # detached, they are the same values
        qt, kt, vt = qt.detach(), kt.detach(), vt.detach()
        with warnings.catch_warnings():  # eager flex warns that it is unfused; on CPU that is the point
            warnings.simplefilter("ignore")
            out = mod.flex_attention(qt, kt, vt, block_mask=block_mask)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------
# flash-attn 2 / 3


@functools.cache
def _flash_func_for(capability_major: int):
    """flash_attn_func of FA3 on Hopper (sm90) when installed, else FA2, else None."""
    if capability_major == 9:
        try:
            from flash_attn_interface import flash_attn_func

            return flash_attn_func
        except ImportError:
            pass
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except ImportError:
        return None


# FlashAttention 2 and 3 run on Ampere and later: on a T4 or V100 flash-attn installs, then
# raises at the first call ("FlashAttention only supports Ampere GPUs or newer")
_FLASH_ATTN_MIN_MAJOR = 8


def _flash_func(device):
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major = torch.cuda.get_device_capability(device)[0]
    return _flash_func_for(major) if major >= _FLASH_ATTN_MIN_MAJOR else None


def _no_flash_reason(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < _FLASH_ATTN_MIN_MAJOR:
        return "flash-attn runs on sm_80 (Ampere) and later GPUs"
    return "flash-attn is not installed (flash_attn_interface or flash_attn)"


@functools.cache
def _warn_no_flash_attn(why: str) -> None:
    warnings.warn(f"flash attention: {why}; our Triton kernel serves instead", stacklevel=3)


def flash_attention(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1):
    func = _flash_func(q.device)  # None off CUDA
    if q.dtype not in (torch.float16, torch.bfloat16):
        # flash-attn has no fp32, and our kernel's exact fp32 dots spill registers on
        # Hopper (docs/kernels.md, `streamgen bench resources`): SDPA serves fp32
        return reference.attention(q, k, v, block_mask_frames, tokens_per_frame)
    if func is None and (q.is_cuda or kernels._TRITON_ON_CPU):
        # (on a GPU the switch said nothing of it: `--attention flash` ran another kernel unsaid)
        _warn_no_flash_attn(_no_flash_reason(q.device))
    if func is None or block_mask_frames is not None:
        # flash-attn has no frame-block mask: our kernel has
        return triton_attention(q, k, v, block_mask_frames, tokens_per_frame)
    out = func(q, k, v)
    # FA2 returns out; FA3 returned (out, softmax_lse) before it returned only out
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------
# cuDNN (through SDPA)


def _cudnn_attention_supported(device) -> bool:
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def cudnn_attention(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # SDPA's own order puts cuDNN last (torch 2.11, 2.13); off CUDA the order changes nothing
    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    try:
        chosen = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch before 2.6 (pyproject allows 2.4): no order of its own to give
        _warn_no_sdpa_priority(torch.__version__)
        chosen = sdpa_kernel(order)  # every kernel allowed: SDPA's own choice
    with chosen:
        return reference.attention(q, k, v, block_mask_frames, tokens_per_frame)


@functools.cache
def _warn_no_sdpa_priority(version: str) -> None:
    warnings.warn(
        f"cudnn attention: torch {version} cannot put cuDNN first in SDPA's order (sdpa_kernel's "
        "set_priority, torch 2.6); SDPA's own order serves",
        stacklevel=3,
    )


# ---------------------------------------------------------------------------
# FP8 (inference)


@functools.cache
def _has_fp8_tensor_cores(device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def _warn_no_fp8_attention(why: str) -> None:
    warnings.warn(f"fp8 attention: {why}; SDPA serves instead", stacklevel=3)


def fp8_ops(q, k, v):
    """Where FP8 attention of these inputs runs: the module whose `quantize_fp8_attention` and
    `fp8_attention_quantized` serve it (`triton_attention` on sm_89+, and under the interpreter in
    tests; `reference`, the numerics emulated, on CPUs, under STREAMGEN_KERNELS=reference and
    while torch.compile traces), or None where SDPA serves instead
    (calls that need gradients; GPUs without FP8 tensor cores or without Triton, with a warning)."""
    if needs_autograd(q, k, v):  # inference only: training differentiates through SDPA
        return None
    if kernels._FORCE_REFERENCE or torch.compiler.is_compiling():
        # STREAMGEN_KERNELS=reference: the references everywhere, this one too (an A/B of the
        # kernel); in a traced graph, the traceable reference, as `kernels._use_triton` does
        return reference
    if not (q.is_cuda or kernels._TRITON_ON_CPU):
        return reference  # CPUs: the same numerics, emulated (exact products of the e4m3 values)
    ops = _triton_attention()  # (only now: a CPU without Triton is no news)
    if q.is_cuda:
        if ops is None:
            _warn_no_fp8_attention("Triton is not available")
        elif not _has_fp8_tensor_cores(q.device):
            _warn_no_fp8_attention("FP8 tensor cores need sm_89 (Ada) or later")
        else:
            return ops
        return None
    return ops or reference  # tests (_TRITON_ON_CPU): the kernel under the interpreter


FP8_BACKENDS = ("fp8_qk", "fp8")


def fp8_attention(
    q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, pv: bool = True, kv_cache=None
):  # fmt: skip
    """`kv_cache`, where given, holds k and v (its prefix) and keeps them in e4m3, as
    `ops.quantize_fp8_attention` would make them (`KVCache.fp8_keys`, `KVCache.fp8_values`)."""
    ops = fp8_ops(q, k, v)
    if ops is None:
        return reference.attention(q, k, v, block_mask_frames, tokens_per_frame)
    if kv_cache is None:
        return ops.fp8_attention(q, k, v, block_mask_frames, tokens_per_frame, pv=pv)
    q8, q_scale = ops.quantize_fp8_heads(q)
    k8, k_scale = kv_cache.fp8_keys(ops, k.shape[1])
    v, v_scale = kv_cache.fp8_values(ops, v.shape[1]) if pv else (v, None)
    return ops.fp8_attention_quantized(
        q8, q_scale, k8, k_scale, v, v_scale, block_mask_frames, tokens_per_frame, q.dtype
    )


def fp8_qk_attention(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, kv_cache=None):
    return fp8_attention(q, k, v, block_mask_frames, tokens_per_frame, pv=False, kv_cache=kv_cache)


# every name in kernels.ATTENTION_BACKENDS (a test checks that none is missing)
_BY_NAME = {
    "sdpa": reference.attention,
    "flex": flex_attention,
    "triton": triton_attention,
    "flash": flash_attention,
    "cudnn": cudnn_attention,
    "fp8_qk": fp8_qk_attention,
    "fp8": fp8_attention,
}


# ---------------------------------------------------------------------------
# Partials with their log-sum-exp (the blocks of ring attention)


def attention_with_lse(q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, backend: str = "sdpa"):
    """Softmax attention that also returns each query's log-sum-exp of its scores: q [B, Lq, H, D],
    k/v [B, Lk, H, D] -> (out [B, Lq, H, D] fp32, lse [B, H, Lq] fp32).

    "triton" runs our kernel (CUDA, forward; any mask). The other exact backends: on CUDA in
    bf16/fp16 without a mask and without gradients SDPA's flash kernel (which returns the
    log-sum-exp, though not its gradient); otherwise
    explicit fp32 math, one block of scores at a time (small: the ring splits the keys P ways).
    The FP8 backends quantize once per ring instead (`fp8_ops`), so they are not served here.
    """
    check_attention_backend(backend)
    if k.shape[1] == 0 or q.shape[1] == 0:
        return _attention_of_no_keys(q, k, v)
    if block_mask_frames is None:
        return _attention_with_lse(q, k, v, None, tokens_per_frame, backend)
    block_mask_frames, empty = _seeing_every_key(block_mask_frames, tokens_per_frame)
    out, lse = _attention_with_lse(q, k, v, block_mask_frames, tokens_per_frame, backend)
    empty = empty.to(out.device)
    return out.masked_fill(empty[:, None, None], 0.0), lse.masked_fill(empty, float("-inf"))


def _attention_with_lse(q, k, v, block_mask_frames, tokens_per_frame: int, backend: str):
    if backend == "triton" and kernels._use_triton(q, k, v):
        return _triton_attention().attention(q, k, v, block_mask_frames, tokens_per_frame, return_lse=True)
    if not needs_autograd(q, k, v) and _flash_lse_serves(q, block_mask_frames):
        return _sdpa_flash_with_lse(q, k, v)  # (its log-sum-exp has no gradient: the math has)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (1.0 / math.sqrt(q.shape[-1]))
    if block_mask_frames is not None:
        scores = scores.masked_fill(
            ~reference.frame_mask(*block_mask_frames, tokens_per_frame), float("-inf")
        )
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()), lse


# SDPA's flash kernel, called directly, has no fallback of its own: it refuses GPUs before sm_80
# ("FlashAttention only supports Ampere GPUs or newer") and heads wider than 256
_FLASH_MIN_CAPABILITY, _FLASH_MAX_HEAD_DIM = (8, 0), 256


def _flash_lse_serves(q, block_mask_frames) -> bool:
    """SDPA's flash kernel returns the log-sum-exp: CUDA on a GPU it runs on (and not switched off,
    `torch.backends.cuda.enable_flash_sdp`), bf16/fp16, no mask. Else the math serves: a ring's
    bf16 blocks failed on a T4 or V100."""
    return (
        q.is_cuda
        and block_mask_frames is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= _FLASH_MAX_HEAD_DIM
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.cuda.get_device_capability(q.device) >= _FLASH_MIN_CAPABILITY
    )


def _sdpa_flash_with_lse(q, k, v):
    """(out fp32, lse fp32) from SDPA's flash kernel (its CPU twin off CUDA). Its log-sum-exp
    carries no gradient (torch marks it so)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    if not q.is_cuda:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[:2]
    return out.transpose(1, 2).float(), lse.float()
