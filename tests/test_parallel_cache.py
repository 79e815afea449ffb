"""A sequence-parallel process's KV cache (streamgen/parallel/apply.py's ShardedStreamCache) holds its
shard of every frame's tokens; its ring's keys must carry the rotations those tokens have in the
full frame grid, as the single process's cache gives them, however the ring comes to be rotated."""

from __future__ import annotations

import types

import pytest
import torch

from streamgen.model import get_config
from streamgen.model.cache import StreamCache
from streamgen.parallel.apply import ShardedStreamCache

GRID = (2, 4)  # 8 tokens per frame: each of a ring of 2's processes holds a row


def groups(ring: int, ulysses: int, ring_rank: int):
    """The degrees and rank a ShardedStreamCache reads of its groups."""
    return types.SimpleNamespace(
        ring_degree=ring, ulysses_degree=ulysses, degree=ring * ulysses, ring_rank=ring_rank
    )


def shard(x: torch.Tensor, frames: int, ring: int, ring_rank: int, heads: int) -> torch.Tensor:
    """A process's part of x [B, frames * S, H, D] (S = 8): its ring shard of each frame's tokens, of
    the first `heads` heads (under Ulysses a process keeps every token of its heads)."""
    tokens = 8 // ring
    part = x.unflatten(1, (frames, -1))[:, :, ring_rank * tokens : (ring_rank + 1) * tokens]
    return part.flatten(1, 2)[:, :, :heads]


# (ring degree, Ulysses degree, ring rank): a ring of 2's processes, whose second holds the grid's
# second row, and a Ulysses pair's, which hold every token of half the heads (the local grid 1 x 8)
LAYOUTS = [(2, 1, 0), (2, 1, 1), (1, 2, 0)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "ring{}x{}-rank{}".format(*x))
@pytest.mark.parametrize("rotate", ["advance", "rotate_ring"])
def test_a_sharded_caches_ring_keys_are_its_tokens_of_the_full_grids(layout, rotate):
    """`rotate_ring` itself, as a restored state's `_put` calls it, and `advance`: `rotate_ring` gave
    the ring's keys the local grid's angles (1 x 4: the grid's first row; 1 x 8: a frame as one row),
    which are others for ring process 1 and the Ulysses processes."""
    ring, ulysses, ring_rank = layout
    cfg = get_config("debug", num_heads=4, dim=64)
    full = StreamCache(cfg, 1, GRID)
    sharded = ShardedStreamCache(cfg, 1, GRID, groups(ring, ulysses, ring_rank))
    heads = cfg.num_heads // ulysses
    window = cfg.window_frames
    g = torch.Generator().manual_seed(0)
    for mine, theirs in zip(sharded.layers, full.layers):
        theirs.k_ring_raw.copy_(torch.randn(theirs.k_ring_raw.shape, generator=g))
        mine.k_ring_raw.copy_(shard(theirs.k_ring_raw, window, ring, ring_rank, heads))
    # written past the window: the slots' positions are rotated by the ring's head
    full.frames_written = sharded.frames_written = window + cfg.frames_per_chunk
    for cache in (full, sharded):
        getattr(cache, rotate)()
    assert sharded.frames_written == full.frames_written
    for mine, theirs in zip(sharded.layers, full.layers):
        expected = shard(theirs.k[:, theirs.chunk_end :], window, ring, ring_rank, heads)
        torch.testing.assert_close(mine.k[:, mine.chunk_end :], expected, rtol=0, atol=1e-6)
