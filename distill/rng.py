"""Randomness as a pure function of (seed, step, sample, purpose).

Every random draw of a training step (which clips, crop offsets, noise,
timesteps, dropout, rollout exit steps) comes from a generator seeded by
these keys rather than from a stream that advances. That is what makes resume
exact without replaying anything, and what makes a 2-rank run see the very
same samples and noise as a 1-rank run of the doubled batch: sample i of the
global batch draws the same numbers whichever rank holds it.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch


def _seed(*keys) -> int:
    words = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(*keys) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*keys))


class SampleRandom:
    """Per-sample draws for the samples `ids` (global indices) of one step."""

    def __init__(self, seed: int, step: int, ids: list[int], device=None):
        self.seed, self.step, self.ids = seed, step, list(ids)
        self.device = device

    def _each(self, purpose, fn) -> torch.Tensor:
        out = torch.stack([fn(generator(self.seed, self.step, i, purpose)) for i in self.ids])
        return out.to(self.device) if self.device is not None else out

    def randn(self, purpose: str, *shape) -> torch.Tensor:
        return self._each(purpose, lambda g: torch.randn(shape, generator=g))

    def rand(self, purpose: str, *shape) -> torch.Tensor:
        return self._each(purpose, lambda g: torch.rand(shape, generator=g))

    def randint(self, purpose: str, high: int) -> torch.Tensor:
        return self._each(purpose, lambda g: torch.randint(high, (), generator=g))

    def shared_randint(self, purpose: str, high: int) -> int:
        """One draw for the whole step, the same on every rank (e.g. the rollout's gradient step)."""
        return int(torch.randint(high, (), generator=generator(self.seed, self.step, "shared", purpose)))

    def shared_chance(self, purpose: str, p: float) -> bool:
        """True with probability `p`, for the whole step, the same on every rank. A draw of one of
        10,000 bins alone (`shared_randint(purpose, 10_000) < p * 10_000`, as the coin was first
        drawn) took p for the next multiple of 1e-4 above it: 0.00005 was 0.0001, 0.00001 too. Its
        bins are kept, so that a coin of p a multiple of 1e-4 falls as it did (a run resumed across
        the change draws the same steps); a draw in the bin p ends in is placed inside it by a
        second draw, of 2**53 steps."""
        whole = p * 10_000
        bin_ = self.shared_randint(purpose, 10_000)
        if bin_ != math.floor(whole):
            return bin_ < whole
        return self.shared_randint(f"{purpose}/inside", 2**53) < (whole - bin_) * 2**53
