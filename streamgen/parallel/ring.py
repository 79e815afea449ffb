"""Ring attention: keys/values rotate around a ring of processes by point-to-point
sends while each process keeps its own queries; the partial outputs of every
key/value block are merged exactly with their log-sum-exp.

Every process holds the same frames with a shard of each frame's tokens, so
every key/value block has the same frame layout and the per-frame block mask
(block-causal) applies to each block unchanged. Every block contains the
query's own frame, so no row is ever fully masked and every log-sum-exp is
finite.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from streamgen.kernels import attention_backends, needs_autograd, reference


def merge_partials(out, lse, block_out, block_lse):
    """Combine two softmax partials over disjoint key sets; lse [B, H, Lq], out [B, Lq, H, D].

    A row that saw no key of a partial (out 0, lse -inf: `attention_with_lse`) takes nothing from
    it; one that saw none of either stays 0 with -inf, without a NaN, gradients included."""
    if out is None:
        return block_out, block_lse
    top = torch.maximum(lse, block_lse).detach()  # any constant gives the same sums: a stabiliser
    top = torch.where(top.isfinite(), top, 0.0)
    w_old, w_new = torch.exp(lse - top), torch.exp(block_lse - top)
    total = w_old + w_new
    seen = total > 0
    total = torch.where(seen, total, 1.0)
    new_lse = torch.where(seen, top + total.log(), float("-inf"))
    w_old = (w_old / total).transpose(1, 2)[..., None]  # [B, Lq, H, 1]
    w_new = (w_new / total).transpose(1, 2)[..., None]
    return out * w_old + block_out * w_new, new_lse


def _ring_peers(group):
    """Global ranks of the next and previous process in the group's ring."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % size)
    prev = dist.get_global_rank(group, (me - 1) % size)
    return nxt, prev


def pack_bytes(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """One uint8 buffer holding `parts` (any dtypes), so that a rotation is one message, and the
    layout `unpack_bytes` reads it back with. The parts lie in order of falling element size
    (fp32 scales, then bf16, then e4m3), so that each starts aligned for its dtype's view."""
    order = sorted(range(len(parts)), key=lambda i: -parts[i].element_size())
    buffer = torch.cat([parts[i].contiguous().view(-1).view(torch.uint8) for i in order])
    layout, start = [None] * len(parts), 0
    for i in order:
        nbytes = parts[i].numel() * parts[i].element_size()
        layout[i] = (start, nbytes, parts[i].dtype, parts[i].shape)
        start += nbytes
    return buffer, layout


def unpack_bytes(buffer: torch.Tensor, layout: list) -> list[torch.Tensor]:
    """The parts of a `pack_bytes` buffer, in their order, as views of it."""
    return [buffer[start : start + n].view(dtype).view(shape) for start, n, dtype, shape in layout]


def block_attention(q, k, v, block_mask_frames, tokens_per_frame, backend, group):
    """(this process's keys/values as the parts that rotate, attend(*parts) -> (out, lse)).

    The FP8 backends quantize once here, not per block: q and k per token and head, as a single
    process does, and v per head and channel with each channel's scale taken over every
    process's tokens (one all-reduce of [B, H, D]), so every e4m3 value is the single process's.
    The e4m3 keys and values rotate, half the bytes of bf16. Where FP8 cannot run (a GPU without
    it, gradients) the blocks are exact, as `kernels.attention` falls back to SDPA.
    """
    ops = attention_backends.fp8_ops(q, k, v) if backend in attention_backends.FP8_BACKENDS else None
    if ops is None or k.shape[1] == 0:  # no keys anywhere (every shard's length): the empty sums

        def attend(k_block, v_block):
            return attention_backends.attention_with_lse(
                q, k_block, v_block, block_mask_frames, tokens_per_frame, backend
            )

        return [k, v], attend
    v_scale = None
    if backend == "fp8" and dist.get_world_size(group) > 1:
        v_scale = reference.fp8_value_scales(v)  # monotone in the max: the largest is the max's
        dist.all_reduce(v_scale, dist.ReduceOp.MAX, group=group)
    q8, q_scale, k8, k_scale, v_q, v_scale = ops.quantize_fp8_attention(q, k, v, backend == "fp8", v_scale)
    empty = None  # the rows that see no key: 0 with a log-sum-exp of -inf, as `attention_with_lse`'s
    if block_mask_frames is not None:
        block_mask_frames, empty = attention_backends._seeing_every_key(block_mask_frames, tokens_per_frame)
        empty = empty.to(q.device)

    def attend_fp8(k_scale_block, k8_block, v_block):
        out, lse = ops.fp8_attention_quantized(
            q8, q_scale, k8_block, k_scale_block, v_block, v_scale, block_mask_frames, tokens_per_frame,
            q.dtype, return_lse=True,
        )  # fmt: skip
        if empty is None:
            return out, lse
        return out.masked_fill(empty[:, None, None], 0.0), lse.masked_fill(empty, float("-inf"))

    return [k_scale, k8, v_q], attend_fp8


def ring_attention(
    q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, backend: str = "sdpa", *, group
):
    """Attention of local queries against the keys/values of every process in `group`.

    Same signature as `kernels.attention` (plus the group), so it drops into
    `SelfAttention.attend`. q [B, Lq, H, D]; k/v [B, Lk, H, D] this process's
    shard (every process's shard has the same length and frame layout). Each
    block runs `backend` (`block_attention`). Calls that need gradients run `_RingAttention`
    (the blocks exact, as `kernels.attention` falls back to SDPA for FP8; its backward a second
    ring): the blocks travel as bytes, which autograd cannot follow.
    """
    if dist.get_world_size(group) > 1 and needs_autograd(q, k, v):
        exact = "sdpa" if backend in attention_backends.FP8_BACKENDS else backend
        return _RingAttention.apply(q, k, v, block_mask_frames, tokens_per_frame, exact, group)
    return _ring_forward(q, k, v, block_mask_frames, tokens_per_frame, backend, group)[0].to(q.dtype)


def _rotate(message, nxt, prev, group, tag: int = 0):
    """Start sending `message` to the next process and receiving the previous one's into a new
    buffer: (requests, that buffer). `tag` tells apart two rotations in flight at once."""
    incoming = torch.empty_like(message)
    ops = [
        dist.P2POp(dist.isend, message, nxt, group, tag),
        dist.P2POp(dist.irecv, incoming, prev, group, tag),
    ]
    return dist.batch_isend_irecv(ops), incoming


def _wait(requests) -> None:
    for r in requests:
        r.wait()


def _ring_forward(q, k, v, block_mask_frames, tokens_per_frame, backend, group):
    """(out fp32 [B, Lq, H, D], lse [B, H, Lq]) of q against every process's keys and values."""
    parts, attend = block_attention(q, k, v, block_mask_frames, tokens_per_frame, backend, group)
    size = dist.get_world_size(group)
    if size == 1:
        return attend(*parts)
    nxt, prev = _ring_peers(group)
    message, layout = pack_bytes(parts)  # one message per step
    out = lse = None
    for step in range(size):
        if step + 1 < size:
            # post the next rotation before computing, so the transfer overlaps the math
            requests, incoming = _rotate(message, nxt, prev, group)
        block_out, block_lse = attend(*unpack_bytes(message, layout))
        out, lse = merge_partials(out, lse, block_out, block_lse)
        if step + 1 < size:
            _wait(requests)
            message = incoming
    return out, lse


class _RingAttention(torch.autograd.Function):
    """Ring attention with gradients. Forward: `_ring_forward`. Backward: a second ring, in which
    each key/value block travels with the gradients of its keys and values. Against the merged
    output O and log-sum-exp L, a block's share of the gradients is its own (flash attention's
    backward): P = exp(S - L), dS = P * (dO V^T - rowsum(dO * O)), dq += dS K, dk += dS^T q,
    dv += P^T dO (times the softmax scale for dq and dk). After as many turns as processes every
    block is home with the gradients of every process's queries. In fp32, one block of scores at
    a time (training: the ring's blocks are a P-th of the keys).

    The transfers overlap the math, as the forward's do: the keys and values rotate ahead of
    the block being computed, and the block's gradient sums (which arrive by a rotation of their
    own) are added to and sent on after it, while the next block is computed."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask_frames, tokens_per_frame, backend, group):
        out, lse = _ring_forward(q, k, v, block_mask_frames, tokens_per_frame, backend, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask = None if block_mask_frames is None else (block_mask_frames, tokens_per_frame)
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        scale = 1.0 / math.sqrt(q.shape[-1])
        g = grad_out.float()
        delta = (g * out).sum(-1).transpose(1, 2)[..., None]  # [B, H, Lq, 1]
        lse = torch.where(lse.isfinite(), lse, 0.0)[..., None]  # a row with no key: P = 0
        allowed = None if ctx.mask is None else reference.frame_mask(*ctx.mask[0], ctx.mask[1]).to(q.device)
        qf = q.float()
        dq = torch.zeros_like(qf)
        blocks, block_layout = pack_bytes([k, v])
        # the gradients of the block in hand: they add up in the message that travels with it
        grads, grads_layout = pack_bytes([torch.zeros_like(t, dtype=torch.float32) for t in (k, v)])
        grads_requests = []  # the rotation bringing this block's gradient sums (none: the first)
        nxt, prev = _ring_peers(group)
        size = dist.get_world_size(group)
        for step in range(size):
            if step + 1 < size:  # the next block's keys and values, while this one is computed
                blocks_requests, incoming_blocks = _rotate(blocks, nxt, prev, group, tag=0)
            k_block, v_block = (t.float() for t in unpack_bytes(blocks, block_layout))
            scores = torch.einsum("bqhd,bkhd->bhqk", qf, k_block) * scale
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            p = torch.exp(scores - lse)
            ds = p * (torch.einsum("bqhd,bkhd->bhqk", g, v_block) - delta) * scale
            dq += torch.einsum("bhqk,bkhd->bqhd", ds, k_block)
            dk_block = torch.einsum("bhqk,bqhd->bkhd", ds, qf)
            dv_block = torch.einsum("bhqk,bqhd->bkhd", p, g)
            _wait(grads_requests)
            dk, dv = unpack_bytes(grads, grads_layout)
            dk += dk_block
            dv += dv_block
            # on to the block's next process; the last turn brings it home
            grads_requests, grads = _rotate(grads, nxt, prev, group, tag=1)
            if step + 1 < size:
                _wait(blocks_requests)
                blocks = incoming_blocks
        _wait(grads_requests)
        dk, dv = unpack_bytes(grads, grads_layout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
