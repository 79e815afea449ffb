"""`--model-timeout`'s bound on each model operation (server/watchdog.py): one watchdog thread per
host, not a thread per operation, for a model process (server/model_host.py) and for `serve --sp`
(server/sp_host.py); and a send to a model process whose end of the pipe another process holds."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from test_server_model_process import create_in_a_thread

pytestmark = pytest.mark.timeout(120)


class TrivialOps:
    """ModelOps' interface as `_serve_ops` uses it: every operation answers None."""

    def handle(self, op, args):
        return None

    def after_reply(self, op, args):
        pass


class Running:
    """A model process that runs on."""

    exitcode = None


def host_on_pipe(conn, process):
    """A ModelHost on `conn`, its process `process` (no model process spawned)."""
    from server.model_host import ModelHost
    from server.watchdog import DeadlineWatchdog

    host = object.__new__(ModelHost)
    host._conn, host.process = conn, process
    host._down, host._killed_at_stop, host.answer_timeout = None, None, None
    host._calling, host.stopping = threading.Lock(), threading.Event()
    host._watchdog = DeadlineWatchdog("streamgen-model-watchdog")
    return host


def count_thread_starts(monkeypatch) -> list:
    """The threads started from here on, as they start."""
    started = []
    start = threading.Thread.start

    def counted(self):
        started.append(self)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counted)
    return started


def test_a_model_hosts_operations_bounded_by_the_timeout_start_no_thread_each(monkeypatch):
    """With --model-timeout each operation's send ran in a thread of its own (0.4-0.7 ms a call on the
    loaded 2-core machine, on every chunk): one watchdog thread bounds them all."""
    import numpy as np

    from server.model_host import _serve_ops

    ours, theirs = multiprocessing.Pipe()
    model_side = threading.Thread(target=_serve_ops, args=(theirs, TrivialOps()), daemon=True)
    model_side.start()
    host = host_on_pipe(ours, Running())
    host.answer_timeout = 30.0
    started = count_thread_starts(monkeypatch)
    pcm = np.zeros(5120, np.float32)  # (a chunk's request: 0.32 s of 16 kHz audio)
    try:
        for _ in range(20):
            assert host.call("chunk", "a stream", pcm) is None
    finally:
        host._watchdog.stop()
        ours.send(("exit", ()))
        model_side.join(10)
        ours.close()
    assert len(started) <= 1, f"{len(started)} threads started for 20 operations"


def test_a_send_to_a_model_process_whose_pipe_another_process_holds_ends_at_the_timeout():
    """A create larger than the pipe holds, sent to a model process that reads no more, is bounded by
    killing the process, whose end of the pipe then closed: but where another process holds that end
    (one the model process started, which inherited it), the kill closed nothing, and the send waited
    on for good, in a thread left behind. The host's end is shut for writing as the process is
    killed, which ends the send at once."""


    ours, theirs = multiprocessing.Pipe()  # `theirs` is never read, and stays open past the kill

    class KilledButItsPipeHeld:
        exitcode = None

        def kill(self):
            self.exitcode = -9

        def join(self, timeout=None):
            pass

    host = host_on_pipe(ours, KilledButItsPipeHeld())
    host.answer_timeout = 0.5
    before = set(threading.enumerate())
    caller, raised = create_in_a_thread(host)
    try:
        assert not caller.is_alive(), "the create's send still waits 30 s on a process that reads nothing"
        left = [t for t in set(threading.enumerate()) - before if t is not caller and t is not host._watchdog._thread]
        assert left == [], f"{left} left behind (still in the send)"
    finally:
        theirs.close()  # (frees a send left waiting)
        caller.join(10)
        host._watchdog.stop()
        ours.close()
    said = "the model process did not read 'create' in 0.5 s (stuck: it was killed)"
    assert (raised, host.down, host.process.exitcode) == ([said], said, -9)


def test_sequence_parallel_operations_bounded_by_the_timeout_start_no_thread_each(monkeypatch):
    """With --model-timeout each `serve --sp` operation started a threading.Timer: one watchdog thread
    bounds them all, and still takes the host down once one runs past it (test_server_sp_host)."""
    from test_server_sp_host import ScriptedOps, lockstep

    host, followers, codes = lockstep(ScriptedOps(), ScriptedOps())
    host.answer_timeout = 30.0
    started = count_thread_starts(monkeypatch)
    try:
        for _ in range(20):
            assert host.call("chunk", "id", None) == "chunk"
    finally:
        host.stop()
    followers[0].join(10)
    assert codes == {1: 0} and not host.down.startswith("the sequence-parallel ranks cannot")
    assert len(started) <= 1, f"{len(started)} threads started for 20 operations"


def test_a_watchdog_runs_an_overdue_operations_handling_once_and_says_so_as_it_is_disarmed():
    from server.watchdog import DeadlineWatchdog

    watchdog = DeadlineWatchdog("a watchdog")
    ran = []
    try:
        on_time = watchdog.arm(time.monotonic() + 30, lambda: ran.append("on time"))
        assert watchdog.disarm(on_time) is False
        overdue = watchdog.arm(time.monotonic() + 0.05, lambda: ran.append("overdue"))
        for _ in range(200):
            if ran:
                break
            time.sleep(0.05)
        assert watchdog.disarm(overdue) is True and ran == ["overdue"]
        later = watchdog.arm(time.monotonic() + 0.05, lambda: ran.append("disarmed"))
        assert watchdog.disarm(later) is False
        time.sleep(0.2)  # (past its deadline: disarmed, it does not run)
        assert ran == ["overdue"]
    finally:
        watchdog.stop()
    assert not watchdog._thread.is_alive()


def test_a_watchdog_armed_while_it_waits_for_a_later_deadline_runs_the_earlier_one():
    """Arming wakes the thread only where it would sleep past the new deadline: one sleeping until a
    disarmed operation's later deadline is woken for an earlier one."""
    from server.watchdog import DeadlineWatchdog

    watchdog = DeadlineWatchdog("a watchdog")
    ran = threading.Event()
    try:
        watchdog.disarm(watchdog.arm(time.monotonic() + 60, lambda: None))  # (it now sleeps until then)
        soon = watchdog.arm(time.monotonic() + 0.05, ran.set)
        assert ran.wait(30), "an operation bounded by 0.05 s not taken for overdue 30 s later"
        assert watchdog.disarm(soon) is True
    finally:
        watchdog.stop()
