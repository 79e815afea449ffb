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


def frame_mask(block_mask_frames, tokens_per_frame: int) -> torch.Tensor | None:
    """Boolean [Lq, Lk] mask from per-frame block ids (True = may attend), as in `kernels.reference`."""
    if block_mask_frames is None:
        return None
    qb, kb = block_mask_frames
    allowed = kb[None, :] <= qb[:, None]
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def attention_with_lse(q, k, v, mask=None):
    """Softmax attention that also returns the log-sum-exp of each query's scores.

    q [B, Lq, H, D], k/v [B, Lk, H, D], mask [Lq, Lk] bool or None ->
    (out [B, Lq, H, D] fp32, lse [B, H, Lq] fp32). On CUDA without a mask it
    uses the fused flash kernel (which returns the log-sum-exp); otherwise it
    computes in fp32 explicitly (one block of scores at a time is small: the
    ring splits the keys P ways).
    """
    if q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )[:2]
        return out.transpose(1, 2).float(), lse.float()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()), lse


def merge_partials(out, lse, block_out, block_lse):
    """Combine two softmax partials over disjoint key sets; lse [B, H, Lq], out [B, Lq, H, D]."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    w_old = torch.exp(lse - new_lse).transpose(1, 2)[..., None]  # [B, Lq, H, 1]
    w_new = torch.exp(block_lse - new_lse).transpose(1, 2)[..., None]
    return out * w_old + block_out * w_new, new_lse


def _ring_peers(group):
    """Global ranks of the next and previous process in the group's ring."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % size)
    prev = dist.get_global_rank(group, (me - 1) % size)
    return nxt, prev


def ring_attention(
    q, k, v, block_mask_frames=None, tokens_per_frame: int = 1, backend: str = "sdpa", *, group
):
    """Attention of local queries against the keys/values of every process in `group`.

    Same signature as `kernels.attention` (plus the group), so it drops into
    `SelfAttention.attend`. q [B, Lq, H, D]; k/v [B, Lk, H, D] this process's
    shard (every process's shard has the same length and frame layout).
    `backend` is accepted for the signature; the blocks use `attention_with_lse`.
    """
    size = dist.get_world_size(group)
    mask = frame_mask(block_mask_frames, tokens_per_frame)
    if size == 1:
        out, _ = attention_with_lse(q, k, v, mask)
        return out.to(q.dtype)
    nxt, prev = _ring_peers(group)
    kv = torch.stack([k, v]).contiguous()  # one message per step instead of two
    out = lse = None
    for step in range(size):
        if step + 1 < size:
            # post the next rotation before computing, so the transfer overlaps the math
            incoming = torch.empty_like(kv)
            ops = [dist.P2POp(dist.isend, kv, nxt, group), dist.P2POp(dist.irecv, incoming, prev, group)]
            requests = dist.batch_isend_irecv(ops)
        block_out, block_lse = attention_with_lse(q, kv[0], kv[1], mask)
        out, lse = merge_partials(out, lse, block_out, block_lse)
        if step + 1 < size:
            for r in requests:
                r.wait()
            kv = incoming
    return out.to(q.dtype)
