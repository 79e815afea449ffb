"""The playout clock is changed from two threads: the event loop moves it (a late transport, a
late chunk, a delay brought down) while the worker moves each session's next due time (a chunk
made, a session pulled into a batch). A change made from one thread between the other's read of
the clock and its write was lost: the stream's due time no longer matched its clock."""

import threading

import numpy as np
import pytest
from test_server_clock import PER_CHUNK, make_session

from server.session import Session

LOOP_WAIT_S = 0.5  # how long the test lets the loop's change run while the worker is paused


class PausingSession(Session):
    """A session whose `base` (or `delay`), read on the thread `pause_on`, pauses that thread once
    until `resume` is set: the moment between reading the clock and writing what it computed
    (or, `pause_before`, between reading the fields before it and reading it)."""

    pause_field = "base"
    pause_before = False
    pause_skip = 0  # reads of it to let pass first
    pause_on: threading.Thread | None = None

    def __getattribute__(self, name):
        pause = name == object.__getattribute__(self, "pause_field") and threading.current_thread() is (
            object.__getattribute__(self, "pause_on")
        )
        if pause and object.__getattribute__(self, "pause_skip"):
            object.__setattr__(self, "pause_skip", object.__getattribute__(self, "pause_skip") - 1)
            pause = False
        if pause and object.__getattribute__(self, "pause_before"):
            self._pause()
        value = object.__getattribute__(self, name)
        if pause and not self.pause_before:
            self._pause()
        return value

    def _pause(self) -> None:
        self.pause_on = None  # once
        self.paused.set()
        assert self.resume.wait(10)


def pausing_session(field: str, before: bool = False) -> PausingSession:
    s = make_session(delay=0.1)
    s.__class__ = PausingSession
    s.pause_field, s.pause_before, s.paused, s.resume = field, before, threading.Event(), threading.Event()
    return s


def interleave(s: PausingSession, worker_step, loop_step) -> None:
    """Run `worker_step` on a thread of its own, paused at its read of the clock; there, run
    `loop_step` on another (the event loop's part), then let the worker go on. (The two may also
    be the other way round: the loop's step paused, the worker's run in between.)"""
    worker = threading.Thread(target=worker_step)
    s.pause_on = worker
    worker.start()
    assert s.paused.wait(10)
    loop = threading.Thread(target=loop_step)
    loop.start()
    loop.join(LOOP_WAIT_S)  # done unless it waits for the worker's change (then after it)
    s.resume.set()
    worker.join(10)
    loop.join(10)
    assert not worker.is_alive() and not loop.is_alive()


def on_schedule(s: Session) -> float:
    """How far the due time of the next chunk is from where the clock puts it (0: on schedule)."""
    return s.next_due - (s.base - s.delay + s.chunk_index * s.chunk_seconds)


def test_the_clock_moved_while_the_worker_finishes_a_chunk_moves_its_next_due_time():
    """The video waited for a chunk (the loop moves the clock 40 ms) while the worker computed the
    next due time from the clock as it was: the next chunk fell due 40 ms early, before the end
    of its audio could arrive."""
    s = pausing_session("base")
    frames = np.zeros((PER_CHUNK, 32, 32, 3), np.uint8)
    interleave(s, lambda: s.finish_chunk(frames, 0.0, 0.0, False), lambda: s.late_by(0.04, 1))
    assert s.chunk_index == 1
    assert on_schedule(s) == pytest.approx(0.0, abs=1e-9)


def test_a_delay_grown_by_the_loop_while_the_worker_pulls_the_session_sooner_is_kept():
    """The worker pulled the session into a batch 30 ms sooner (`generate_sooner`) while the loop
    grew its delay by 50 ms for a chunk that came late again: one of the two changes was lost."""
    s = pausing_session("delay")
    delay, due = s.delay, s.next_due

    def grow_delay():
        s._last_late = 1  # a chunk came late just before: the next late one grows the delay
        s._chunk_was_late(2, 0.05)

    interleave(s, lambda: s.generate_sooner(0.03), grow_delay)
    assert s.delay == pytest.approx(delay + 0.03 + 0.05)
    assert s.next_due == pytest.approx(due - 0.03 - 0.05)
    assert on_schedule(s) == pytest.approx(0.0, abs=1e-9)


def test_the_worker_plans_from_one_reading_of_a_sessions_clock():
    """The loop grew a due session's delay by 100 ms (a chunk late again: the delay longer, the
    next chunk due as much sooner, its play time unchanged) between the worker's reads of its due
    time and its delay: the due time read before and the delay after put its play time 100 ms
    later than either clock did, and the worker held the session's chunk for another one due 60
    ms later, past the play time (the chunk late again). From either clock, both are generated
    now, the other pulled into the batch (server/batching.py)."""
    import server.scheduler as scheduler
    from server.metrics import ServerMetrics

    worker = scheduler.InferenceWorker(ServerMetrics(), clock=lambda: 100.0)
    for times in (worker.batch_times, worker.ready_times):
        times.observe(2, 0.05)  # held for, the batch of two would be published at 100.05 + 1.2 x 0.05
    due_now, due_soon = pausing_session("delay", before=True), make_session()
    for s, name, next_due, delay in ((due_now, "now", 99.99, 0.1), (due_soon, "soon", 100.05, 0.3)):
        s.id, s.next_due, s.delay = name, next_due, delay
        s.base = next_due + delay - s.chunk_index * s.chunk_seconds
        worker.add(s)

    def grow_delay():
        due_now._last_late = 1  # a chunk came late just before: the next late one grows the delay
        due_now._chunk_was_late(2, 0.1)

    planned = []
    interleave(due_now, lambda: planned.append(worker._next(0)), grow_delay)
    assert due_now.delay == pytest.approx(0.2) and on_schedule(due_now) == pytest.approx(0.0, abs=1e-9)
    job, batch, wait = planned[0]
    assert wait == 0.0 and batch == [due_now, due_soon]


def test_a_group_session_held_back_for_a_joiner_while_the_worker_pulls_it_sooner_keeps_its_floor():
    """A session starts streaming and joins a lane's group whose bigger batch needs a longer delay:
    the group's session is held back by the difference between that delay and its own, read
    before the change. The worker pulled it 30 ms sooner into a batch between that read and the
    change: the grown delay (30 ms more) was taken into the floor the delay comes back down to,
    and the session played 30 ms later than it needed for good, its chunks early every time."""
    import asyncio

    from server_helpers import server_config
    from test_server_alignment import Stream, timed_worker

    from server.batching import playout_delay
    from server.registry import SessionRegistry

    worker = timed_worker(k1=0.06, k2=0.09)
    worker.chunk_time_ema = 0.06
    registry = SessionRegistry(server_config(playout_delay_s=None), worker, worker.metrics)
    loop = asyncio.new_event_loop()
    try:
        group, joiner = pausing_session("delay"), Session("joiner", Stream(), loop, 30.0)
        # its third read (the first is the lane's clocks): the one the held-back seconds are computed from
        group.pause_skip = 2
        group.lane, group.id = 0, "group"
        worker.add(group)
        joined = playout_delay(0.09)  # the batch of two's
        assert group.delay < joined

        def join():  # the loop's step, paused; the worker pulls the group's session meanwhile
            registry.start_streaming(joiner, "websocket")

        interleave(group, join, lambda: group.generate_sooner(0.03))
    finally:
        loop.close()
    assert joiner.delay == pytest.approx(joined) and on_schedule(group) == pytest.approx(0.0, abs=1e-9)
    assert group.start_delay == pytest.approx(joined)  # the floor: what the batch needs
    for _ in range(Session.SLACK_WINDOW):  # its chunks all come with time to spare
        group._lower_delay_when_early(0.3)
    assert group.delay == pytest.approx(joined)
