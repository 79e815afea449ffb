"""streamgen.data.pool: a spawn pool's workers started whole before a stop that came as they started."""

import signal

import pytest

from streamgen.cli import Terminated, restore_handlers, terminate_as_exit
from streamgen.data import pool as data_pool


def test_a_stop_as_the_pool_starts_its_workers_is_acted_on_once_they_have_started(monkeypatch):
    """A SIGTERM that came as the pool started its workers raised in the parent between a worker's
    start and the pickled start the parent writes to it: that worker printed "EOFError: Ran out of
    input" and its traceback under "terminated" (eval train-evaluators, in the suite's rehearsal CI).
    The stop is acted on once the pool has started, its workers then terminated."""
    import multiprocessing.context

    events = []
    start_pool = multiprocessing.context.SpawnContext.Pool

    def stopped_as_it_starts(self, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # (as a `kill` would, while the workers start)
        events.append("starting")
        pool = start_pool(self, *args, **kwargs)
        events.append("started")
        return pool

    monkeypatch.setattr(multiprocessing.context.SpawnContext, "Pool", stopped_as_it_starts)
    before = terminate_as_exit()
    try:
        with pytest.raises(Terminated), data_pool.worker_pool(1, "streamgen-test-pool-"):
            events.append("used")  # (not reached: the stop comes first)
    finally:
        restore_handlers(before)
    assert events == ["starting", "started"]
    assert data_pool.pool_processes() == set()  # terminated and joined: none left running


def test_stops_are_held_only_within_and_their_handlers_given_back():
    handler = signal.getsignal(signal.SIGTERM)
    with data_pool.stops_held() as stops:
        signal.raise_signal(signal.SIGTERM)
        assert stops == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is handler
