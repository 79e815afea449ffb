"""Distillation settings honoured as given: the self-correction coin's probability, the critic's start."""

from __future__ import annotations

import pytest

from distill.rng import SampleRandom


def _chance_over_draws(monkeypatch, p: float, inside_draws: int = 1000) -> float:
    """The probability that shared_chance(p) says True, over every first draw (one of 10,000 bins)
    and `inside_draws` second draws spread evenly over theirs: to within one of those (1e-7)."""
    rnd = SampleRandom(seed=0, step=0, ids=[])
    scripted: dict[str, int] = {}
    monkeypatch.setattr(rnd, "shared_randint", lambda purpose, high: scripted[purpose])
    true = 0
    for bin_ in range(10_000):
        scripted["coin"] = bin_
        for k in range(inside_draws if bin_ == int(p * 10_000) else 1):
            scripted["coin/inside"] = -(-k * 2**53 // inside_draws)  # (the k-th of them, rounded up)
            weight = 1 / inside_draws if bin_ == int(p * 10_000) else 1
            true += weight * rnd.shared_chance("coin", p)
    return true / 10_000


@pytest.mark.parametrize("p", [0.00005, 0.00001, 0.12345, 0.5, 0.0, 1.0, 0.0051])
def test_the_self_correction_coin_falls_with_the_configured_probability(monkeypatch, p):
    """chunk.p_self_correct was drawn as one of 10,000 bins, `draw < p * 10_000`: a probability
    between two multiples of 1e-4 was the one above it, without a word (0.00005 was 0.0001,
    0.12345 was 0.1235), and 0.0051 (51.00000000000001 bins) was 0.0052."""
    assert _chance_over_draws(monkeypatch, p) == pytest.approx(p, abs=1 / (10_000 * 1000))


def test_a_coin_of_a_multiple_of_1e_4_falls_as_it_did_before():
    """Its bins are kept: a chunk run resumed across the change draws the same contexts."""
    for p in (0.5, 0.25, 0.0003):
        for step in range(300):
            rnd = SampleRandom(seed=7, step=step, ids=[0, 1])
            assert rnd.shared_chance("self_correct", p) == (rnd.shared_randint("self_correct", 10_000) < p * 10_000)

