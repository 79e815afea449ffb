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

GRID = (2, 4)  # 8 tokens per frame; a ring of 2 holds a row each, and row 1 is not row 0's grid


def ring_groups(rank: int):
    """The degrees and rank a ShardedStreamCache reads of its groups: a ring of 2, no Ulysses."""
    return types.SimpleNamespace(ring_degree=2, ulysses_degree=1, degree=2, ring_rank=rank)


def token_shard(x: torch.Tensor, frames: int, rank: int) -> torch.Tensor:
    """Process `rank`'s tokens of each frame of x [B, frames * S, H, D] (S = 8, 2 processes)."""
    return x.unflatten(1, (frames, -1))[:, :, rank * 4 : (rank + 1) * 4].flatten(1, 2)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("rotate", ["advance", "rotate_ring"])
def test_a_sharded_caches_ring_keys_are_its_tokens_of_the_full_grids(rank, rotate):
    """`rotate_ring` itself, as a restored state's `_put` calls it, and `advance`: the ring's keys on
    process 1 were rotated as the first row of the grid by `rotate_ring` (the local grid, 1 x 4)."""
    cfg = get_config("debug", num_heads=4, dim=64)
    full = StreamCache(cfg, 1, GRID)
    sharded = ShardedStreamCache(cfg, 1, GRID, ring_groups(rank))
    window = cfg.window_frames
    g = torch.Generator().manual_seed(0)
    for mine, theirs in zip(sharded.layers, full.layers):
        theirs.k_ring_raw.copy_(torch.randn(theirs.k_ring_raw.shape, generator=g))
        mine.k_ring_raw.copy_(token_shard(theirs.k_ring_raw, window, rank))
    # written past the window: the slots' positions are rotated by the ring's head
    full.frames_written = sharded.frames_written = window + cfg.frames_per_chunk
    for cache in (full, sharded):
        getattr(cache, rotate)()
    assert sharded.frames_written == full.frames_written
    for mine, theirs in zip(sharded.layers, full.layers):
        expected = token_shard(theirs.k[:, theirs.chunk_end :], window, rank)
        torch.testing.assert_close(mine.k[:, mine.chunk_end :], expected, rtol=0, atol=1e-6)
