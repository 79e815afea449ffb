"""Counting a call's work for `bench floor` (bench/floor.py): its FLOPs by kind (PyTorch's FLOP
counter, a multiply-add counting two), the weights it reads once per forward of the transformer,
and the KV cache its forwards attend to."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from streamgen.model.model import DiT

KINDS = ("linear", "fp8_linear", "attention", "fp8_attention", "convolution")


class WeightReads(TorchDispatchMode):
    """The weights (parameters) the ops under it use: each counted once per forward of the
    transformer (each of a chunk's denoising steps reads every weight it uses again: a 1.3B
    model's weights do not stay in a GPU's cache, but a step that reuses the audio's
    cross-attention keys and values reads none of their weights), and once outside them. A
    weight that only a Triton kernel reads is not seen (on a GPU: the q/k RMSNorm scales, 0.01%
    of the bytes)."""

    def __init__(self):
        super().__init__()
        self.forwards: list[dict[int, int]] = [{}]

    def new_forward(self, module, args):  # (a forward pre-hook of every module)
        if isinstance(module, DiT):
            self.forwards.append({})

    def total_bytes(self) -> int:
        return sum(sum(seen.values()) for seen in self.forwards)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves(args):
            if isinstance(t, nn.Parameter):
                self.forwards[-1][id(t)] = t.numel() * t.element_size()
        return func(*args, **(kwargs or {}))


def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts SDPA's CUDA kernels but not its CPU one: the same formula, so CPU counts match
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop}


def kv_read_bytes(cache, layers: int | None = None) -> int:
    """Bytes of keys and values one cached forward attends to (sink, chunk and the filled ring),
    in its first `layers` layers (None: all)."""
    tokens = cache.layers[0].chunk_end + cache.ring_tokens_filled()
    attending = cache.layers[:layers]
    return sum(2 * tokens * layer.k[0, 0].numel() * layer.k.element_size() for layer in attending)


def count(fn, forwards: int = 1, cache=None, kv_layers: int | None = None):
    """(fn(), its work): FLOPs by kind, the weights it reads (`WeightReads`), the KV cache its
    forwards read.

    `forwards`: how many times fn runs the model against `cache` one after the other (the
    denoising steps), each attending to it in its first `kv_layers` layers (None: all)."""
    # read before fn runs: a re-encode advances the ring it attended to
    kv = forwards * kv_read_bytes(cache, kv_layers) if cache is not None else 0
    flops, weights = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION), WeightReads()
    hook = register_module_forward_pre_hook(weights.new_forward)
    try:
        with flops, weights:
            result = fn()
    finally:
        hook.remove()
    by_kind = dict.fromkeys(KINDS, 0.0)
    for op, n in flops.get_flop_counts().get("Global", {}).items():
        by_kind[_kind(str(op))] += n / 1e12
    work = {
        "tflop": flops.get_total_flops() / 1e12,
        "weights_gb": weights.total_bytes() / 1e9,
        "kv_gb": kv / 1e9,
        "tflop_by_kind": by_kind,
    }
    return result, work


def _kind(op: str) -> str:
    if "convolution" in op:
        return "convolution"
    if "_scaled_mm" in op:  # FP8 products (streamgen.model.float8), at their own rate
        return "fp8_linear"
    # SDPA's own kernels, or on meta its math decomposition (batched products)
    return "attention" if "attention" in op or "bmm" in op else "linear"
