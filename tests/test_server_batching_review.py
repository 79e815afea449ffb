"""A review of the server's batching (server/batching.py) as its callers use it: pulls, holds,
groups joined and left, on a fake clock (test_server_alignment_worker's helpers)."""

import asyncio

import pytest
from test_server_alignment import CS, Stream, times
from test_server_alignment_worker import run_lane, worker_on_a_fake_clock

from server.batching import Due, plan_batch, pull_into_batch


def test_a_pull_does_not_make_a_session_pulled_before_it_late():
    """A batch of one session due at 100.0 that plays at 100.3 (fake clock), a session due at 100.01
    that plays at 100.125 (a short delay) and one due at 100.02 that plays at 100.42; a batch of k
    is published in 0.05 k s. `plan_batch` holds nothing (a batch of 2 at 100.01 misses 100.125 by
    its margin); pulled, the second makes a batch of 2, published at 100.1, in time for it. The
    third was pulled too, checked against the batch's first play time (100.3) alone, not the
    pulled one's: a batch of 3 published at 100.15, and the second's chunk came 25 ms late, every
    period from then on (the three on one schedule). It is left for a batch of its own, and no
    chunk is late."""
    from server.session import Session

    def batch_seconds(k):
        return 0.05 * k

    lane = [Due(100.0, 100.3), Due(100.01, 100.125), Due(100.02, 100.42)]
    estimate = times(k1=batch_seconds(1), k2=batch_seconds(2), k3=batch_seconds(3))
    assert plan_batch(100.0, lane, estimate) == ([0], None)
    pulled = pull_into_batch([0], lane, estimate, CS, 1.0, ready_time=estimate, now=100.0)
    assert pulled == [(1, pytest.approx(0.01))]

    clock, worker = worker_on_a_fake_clock(batch_seconds, 3, 100.0)
    loop = asyncio.new_event_loop()
    try:
        sessions = [Session(f"s{i}", Stream(), loop, 30.0, clock=worker.clock) for i in range(3)]
        for s, due in zip(sessions, lane):
            s.streaming = True
            s.reschedule(due.plays_at, due.plays_at - due.next_due)
            worker.add(s)
        batches = run_lane(worker, clock, 100.0 + 4 * CS, batch_seconds)
    finally:
        loop.close()
    assert [sorted(s.id for s in batch) for _, batch, _ in batches] == [["s0", "s1"], ["s2"]] * 4
    assert not any(late for _, _, late in batches)
