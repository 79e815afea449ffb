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
    until `resume` is set: the moment between reading the clock and writing what it computed."""

    pause_field = "base"
    pause_on: threading.Thread | None = None

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if name == object.__getattribute__(self, "pause_field") and threading.current_thread() is (
            object.__getattribute__(self, "pause_on")
        ):
            self.pause_on = None  # once
            self.paused.set()
            assert self.resume.wait(10)
        return value


def pausing_session(field: str) -> PausingSession:
    s = make_session(delay=0.1)
    s.__class__ = PausingSession
    s.pause_field, s.paused, s.resume = field, threading.Event(), threading.Event()
    return s


def interleave(s: PausingSession, worker_step, loop_step) -> None:
    """Run `worker_step` on a thread of its own, paused at its read of the clock; there, run
    `loop_step` on another (the event loop's part), then let the worker go on."""
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
