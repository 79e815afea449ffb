"""The model process (`--model-process`, server/model_host.py): started while the server shuts
down, dead, stuck or reaped late, and its log."""

from __future__ import annotations

import logging
import os
import threading

import pytest
from fastapi.testclient import TestClient
from server_helpers import make_app, server_config

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("started", ["while the worker stops", "after the shutdown"])
def test_a_host_still_starting_at_shutdown_is_stopped_once_started(monkeypatch, started):
    """`--model-process` / `--sp`: a shutdown while the host started left `registry.host` unset, and
    the host that then finished starting (its model, its process or process group) was never
    stopped. Nor may it become the registry's host: the server is gone by then."""
    import threading

    from server import model_host, scheduler

    starting, release, stopped = threading.Event(), threading.Event(), threading.Event()

    class SlowHost:  # ModelHost's interface, its start held until `release`
        down = None

        def __init__(self, *args):
            starting.set()
            release.wait(30)

        def stop(self):
            stopped.set()

    monkeypatch.setattr(model_host, "ModelHost", SlowHost)
    stop = scheduler.InferenceWorker.stop

    def stop_worker(self, timeout=10.0):
        if started == "while the worker stops":
            release.set()
            return stop(self, timeout)
        return stop(self, 0.05)  # gives up on the thread that is still starting the host

    monkeypatch.setattr(scheduler.InferenceWorker, "stop", stop_worker)
    app = make_app(inference_process=True)
    with TestClient(app):
        assert starting.wait(30)
    release.set()
    assert stopped.wait(10)
    assert app.state.registry.host is None and not app.state.registry.ready


async def test_a_model_process_that_dies_with_no_session_is_logged_once(caplog):
    """Killed while idle (the out-of-memory killer), it was in no line of the log: /healthz said
    down and each refused request said why, at INFO."""
    from types import SimpleNamespace

    from server.metrics import ServerMetrics
    from server.registry import SessionRegistry
    from server.scheduler import InferenceWorker

    metrics = ServerMetrics()
    registry = SessionRegistry(server_config(), InferenceWorker(metrics), metrics)
    registry.host = SimpleNamespace(down=None)
    with caplog.at_level("INFO", logger="streamgen.server"):
        await registry.enforce_limits()
        registry.host.down = "the model process exited (code -9: killed by SIGKILL)"
        for _ in range(3):
            await registry.enforce_limits()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "the model is down: the model process exited (code -9" in errors[0], errors


def test_a_stuck_model_process_is_down_as_stuck_while_it_is_killed():
    """The worker killed a stuck model process and then said why: while it waited for the process
    to end, the limits' check (once a second, on the event loop) or /healthz read the host's `down`,
    found a process exited by SIGKILL, and ended every session "host_down: the model process exited
    (code -9: killed by SIGKILL, as the kernel's out-of-memory killer does)", the stuck process's
    own reason ("gave no answer") coming too late. The read here is forced into that wait."""
    import multiprocessing

    from server.model_host import HostDown, ModelHost

    host = object.__new__(ModelHost)  # (no process spawned: one that is killed and waited for)
    host._conn, theirs = multiprocessing.Pipe()  # (shut for writing as it is killed)
    host._down, host._killed_at_stop, host.answer_timeout = None, None, 2.0
    read_meanwhile = []

    class KilledProcess:
        exitcode = None

        def kill(self):
            self.exitcode = -9

        def join(self, timeout=None):  # the event loop reads the host's state while the worker waits here
            read_meanwhile.append(host.down)

    host.process = KilledProcess()
    try:
        with pytest.raises(HostDown) as raised:
            host._stop_stuck("chunk")
    finally:
        host._conn.close()
        theirs.close()
    said = "the model process gave no answer to 'chunk' in 2 s (stuck: it was killed)"
    assert (str(raised.value), host.down, read_meanwhile) == (said, said, [said])



def create_in_a_thread(host) -> tuple[threading.Thread, list[str]]:
    """A 512x512 stream's create called on `host` in a thread of its own (a send that waits on a
    process reading nothing must not hold the test), joined for up to 30 s; the HostDown words it
    raised go in the list."""
    import numpy as np

    from server.model_host import HostDown

    raised: list[str] = []

    def create():
        try:
            host.call("create", "a stream", np.zeros((512, 512, 3), np.uint8), None, 0, 512, 512, 2)
        except HostDown as e:
            raised.append(str(e))

    caller = threading.Thread(target=create, daemon=True)
    caller.start()
    caller.join(30)
    return caller, raised


def test_a_model_process_that_reads_no_more_is_stuck_while_an_operation_is_sent():
    """`--model-timeout` ran from the end of the operation's send: a create larger than the pipe
    holds (a 512x512 reference, ~786 KB) sent to a process that read no more (stuck in its
    re-encode after its last answer) waited in the send for good, the worker and every session with
    it, while /healthz said ok. The send is bounded by the same timeout: the process is killed as
    stuck, as one that gives no answer is."""
    import multiprocessing
    import threading

    from server.model_host import ModelHost
    from server.watchdog import DeadlineWatchdog

    host = object.__new__(ModelHost)  # (no process spawned: its end of the pipe held, never read)
    host._conn, theirs = multiprocessing.Pipe()
    host._down, host._killed_at_stop, host.answer_timeout = None, None, 0.5
    host._calling, host.stopping = threading.Lock(), threading.Event()
    host._watchdog = DeadlineWatchdog("streamgen-model-watchdog")

    class ReadingNothing:
        exitcode = None

        def kill(self):  # (the kernel closes a killed process's end of the pipe)
            self.exitcode = -9
            theirs.close()

        def join(self, timeout=None):
            pass

    host.process = ReadingNothing()
    caller, raised = create_in_a_thread(host)
    try:
        assert not caller.is_alive(), "the create's send still waits on a process that reads nothing"
    finally:
        if not theirs.closed:  # (frees a send left waiting)
            theirs.close()
        caller.join(10)
        host._watchdog.stop()
        host._conn.close()
    said = "the model process did not read 'create' in 0.5 s (stuck: it was killed)"
    assert (raised, host.down, host.process.exitcode) == ([said], said, -9)


class ProcessEndingLate:
    """A model process whose pipe has closed and which the kernel reaps `exits_after` seconds of
    joins later (a process killed with a GPU context closes its pipe first and releases its device
    memory after: seconds), or never (None: it closed its pipe itself and hangs in its teardown)."""

    def __init__(self, exits_after: float | None, host):
        self.exits_after, self.waited, self.exitcode, self.killed = exits_after, 0.0, None, False
        self.host, self.read_meanwhile = host, []  # (the host's `down`, read as /healthz reads it while it waits)
        self.sentinel, self.running = os.pipe()  # (read as closed once the process has exited: never here)

    def join(self, timeout=None):
        self.read_meanwhile.append(self.host.down)
        self.waited += timeout
        if self.exitcode is None and self.exits_after is not None and self.waited >= self.exits_after:
            self.exitcode = -9
        self.read_meanwhile.append(self.host.down)

    def kill(self):
        self.killed = True
        self.exitcode = -9


@pytest.mark.parametrize("exits_after", [3.0, None], ids=["reaped_late", "never_exits"])
def test_a_model_process_whose_pipe_closed_before_it_ended_is_not_down_as_code_none(exits_after):
    """After its pipe closed under an operation the host waited 1 s for the process's end and took
    its exit code then, for good: a process not reaped by then (a killed one releasing its device
    memory, one that closed its pipe and hangs) made the host down as "the model process exited
    (code None)", which /healthz and every session's end said. A process reaped within the wait
    is down as its exit; one that is not is killed and said to have been. While it was waited for
    (5 s) the host was not down at all: /healthz and admission said ok, a create was queued for a
    dead pipe. It is down from the pipe's loss, as its exit once that is known."""
    import multiprocessing
    import threading

    from server.model_host import HostDown, ModelHost

    host = object.__new__(ModelHost)  # (no process spawned: its pipe closed, its end not yet seen)
    host._conn, theirs = multiprocessing.Pipe()
    theirs.close()
    host._down, host._killed_at_stop, host.answer_timeout = None, None, None
    host._calling, host.stopping = threading.Lock(), threading.Event()
    host.process = ProcessEndingLate(exits_after, host)
    try:
        with pytest.raises(HostDown) as raised:
            host.call("chunk")
    finally:
        host._conn.close()
        os.close(host.process.sentinel)
        os.close(host.process.running)
    assert "code None" not in str(raised.value) and str(raised.value) == host.down
    closed = "the model process closed its pipe"
    if exits_after is not None:
        assert host.down.startswith("the model process exited (code -9: killed by SIGKILL")
        assert not host.process.killed
        assert host.process.read_meanwhile == [closed, host.down]  # (its exit as soon as it is known)
    else:
        assert host.down == "the model process closed its pipe and had not exited 5 s later (it was killed)"
        assert host.process.killed
        assert host.process.read_meanwhile == [closed, closed, host.down, host.down]  # (the kill's join after)


class ProcessReapedByAnotherThread:
    """A model process that ended as its pipe closed (code -9: the out-of-memory killer's), reaped by
    the event loop's read of the host's `down` at the moment the worker's join looked: the join's
    waitpid found no child, and the worker's read of the exit code just after it found none stored
    yet (the reaping thread stores it once it runs again)."""

    def __init__(self):
        self.sentinel, ended = os.pipe()
        os.close(ended)  # (its sentinel reads as closed: it has exited, whoever reaped it)
        self.joined, self.reads_after_join, self.killed = False, 0, False

    @property
    def exitcode(self):
        if not self.joined:
            return None
        self.reads_after_join += 1
        return None if self.reads_after_join == 1 else -9

    def join(self, timeout=None):
        self.joined = True

    def kill(self):
        self.killed = True


def test_a_model_process_reaped_by_another_read_is_not_said_to_have_been_killed():
    """The event loop's status read (`down`) reaped the process while the worker's join waited for
    it: the worker read no exit code, said "closed its pipe and had not exited 5 s later (it was
    killed)" of a process that had exited by itself, and sent SIGKILL to a pid reaped already.
    Whether it has exited is read from its sentinel, which says so whoever reaped it."""
    import multiprocessing
    import threading

    from server.model_host import HostDown, ModelHost

    host = object.__new__(ModelHost)  # (no process spawned: its pipe closed, its end reaped by another)
    host._conn, theirs = multiprocessing.Pipe()
    theirs.close()
    host._down, host._killed_at_stop, host.answer_timeout = None, None, None
    host._calling, host.stopping = threading.Lock(), threading.Event()
    host.process = ProcessReapedByAnotherThread()
    try:
        with pytest.raises(HostDown) as raised:
            host.call("chunk")
    finally:
        host._conn.close()
        os.close(host.process.sentinel)
    assert host.process.joined and not host.process.killed
    assert str(raised.value) == host.down
    assert host.down.startswith("the model process exited (code -9: killed by SIGKILL"), host.down


def test_a_model_process_that_dies_loading_is_one_line_in_the_log(monkeypatch, caplog):
    """It was logged with the traceback of the pipe it died on, which says nothing more."""
    import time

    from server import model_host

    def killed(*args, **kwargs):
        raise model_host.HostDown("the model process exited (code -9: killed by SIGKILL)")

    monkeypatch.setattr(model_host, "ModelHost", killed)
    with caplog.at_level("INFO", logger="streamgen.server"), TestClient(make_app(inference_process=True)) as c:
        deadline = time.monotonic() + 30
        while "error" not in (ready := c.get("/readyz")).json() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ready.json()["error"] == "HostDown: the model process exited (code -9: killed by SIGKILL)"
    failed = [r for r in caplog.records if r.getMessage().startswith("model failed to load")]
    assert len(failed) == 1 and failed[0].exc_info is None
    assert failed[0].getMessage() == "model failed to load: the model process exited (code -9: killed by SIGKILL)"


def test_the_model_process_logs_in_the_servers_format_and_level(capfd):
    """A spawned process starts with no log handler: its warnings came out bare (no time, level or
    logger: "no trained weights for 'debug'; ..."), and its infos not at all."""
    from server.model_host import ModelHost

    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        ModelHost("debug", "cpu", 1).stop()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    err = capfd.readouterr().err
    assert "WARNING streamgen.models: no trained weights for 'debug'" in err, err
