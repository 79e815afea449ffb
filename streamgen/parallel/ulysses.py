"""Ulysses attention: an all-to-all turns sequence shards into head shards, each
process attends over the whole sequence for its heads, and a second
all-to-all turns the result back into sequence shards.

Layout. Every process holds all frames with a contiguous shard of each frame's
tokens (`[B, F*s, H, D]`, s = S/P tokens per frame). After the all-to-all it
holds all S tokens of every frame, frame-major as the model expects, for H/P
heads: `[B, F*S, H/P, D]`. So block masks, RoPE'd keys and the KV cache work
unchanged; the cache simply holds H/P heads per process (the cache is sharded
by heads, which under Ulysses is the same as following the sequence: each
process keeps the keys/values that its attention reads).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from streamgen.kernels import needs_autograd


def check_heads(num_heads: int, degree: int) -> None:
    if num_heads % degree:
        raise ValueError(
            f"Ulysses needs the number of attention heads ({num_heads}) to be divisible by the "
            f"Ulysses degree ({degree}); choose a degree that divides {num_heads} (or use ring attention)"
        )


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [P, ...] -> [P, ...]: slot j goes to process j, slot j of the result came from process j.
    Differentiable where autograd records (training): the collective writes a new buffer, which
    autograd cannot follow."""
    if needs_autograd(x):
        return _AllToAll.apply(x, group)
    return _exchange(x, group)


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): a permuted x would hand its strides to out
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`_exchange` with gradients. Process i's slot j holds process j's slot i after it, so the
    exchange is its own inverse: the gradient of each slot goes back where the slot came from by
    the same all-to-all."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _exchange(grad_out, ctx.group), None


def sequence_to_heads(x: torch.Tensor, tokens_per_frame: int, group) -> torch.Tensor:
    """[B, F*s, H, D] (token shard) -> [B, F*s*P, H/P, D] (all tokens, head shard)."""
    p = dist.get_world_size(group)
    b, n, h, d = x.shape
    f = n // tokens_per_frame
    check_heads(h, p)
    x = x.reshape(b, f, tokens_per_frame, p, h // p, d).permute(3, 0, 1, 2, 4, 5)
    y = _all_to_all(x, group)  # [P(source token shard), B, F, s, H/P, D]
    return y.permute(1, 2, 0, 3, 4, 5).reshape(b, f * p * tokens_per_frame, h // p, d)


def heads_to_sequence(x: torch.Tensor, tokens_per_frame: int, group) -> torch.Tensor:
    """Inverse of `sequence_to_heads`: [B, F*s*P, H/P, D] -> [B, F*s, H, D]; s = local tokens per frame."""
    p = dist.get_world_size(group)
    b, n, hp, d = x.shape
    f = n // (tokens_per_frame * p)
    x = x.reshape(b, f, p, tokens_per_frame, hp, d).permute(2, 0, 1, 3, 4, 5)
    y = _all_to_all(x, group)  # [P(source head shard), B, F, s, H/P, D]
    return y.permute(1, 2, 3, 0, 4, 5).reshape(b, f * tokens_per_frame, p * hp, d)


def ulysses_attend(attn, group, inner_attention, q, k, v, k_raw, mask, tokens_per_frame, *cache_args):
    """Replacement for `SelfAttention.attend` (bound with functools.partial).

    q/k/v (and k_raw on ring writes) travel in one all-to-all, side by side on
    the last dim (each head's pieces together); the cache (H/P heads) and the attention run on the full
    sequence of this process's heads; `inner_attention` is `kernels.attention`
    (pure Ulysses) or ring attention over the other mesh dimension (hybrid).
    cache_args: (cache, cache_op, ring_filled, ring_index, write_only), passed through. A
    write-only call (the last layer of a cache write) sends no queries and gets no output back:
    it only stores its heads' keys and values.
    """
    p = dist.get_world_size(group)
    write_only = len(cache_args) > 4 and bool(cache_args[4])
    parts = ([] if write_only else [q]) + [k, v] + ([k_raw] if k_raw is not None else [])
    full = sequence_to_heads(torch.cat(parts, dim=-1), tokens_per_frame, group)
    pieces = [t.contiguous() for t in full.split(k.shape[-1], dim=-1)]
    if write_only:  # k stands in for the queries, as SelfAttention.forward does
        pieces.insert(0, pieces[0])
    q_heads, k, v, *rest = pieces
    k_raw = rest[0] if rest else None
    out = type(attn).attend(
        attn, q_heads, k, v, k_raw, mask, tokens_per_frame * p, *cache_args, attention=inner_attention
    )
    if write_only:  # nothing reads a cache write's output
        return q
    return heads_to_sequence(out, tokens_per_frame, group)
