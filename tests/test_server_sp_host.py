"""`SequenceParallelHost` in lockstep: the ranks' outcomes are compared after every operation (no model,
no process group). A client error keeps the ranks in step, a failure on any rank takes the host down,
and a call still running at stop ends before the model is let go of (the ranks themselves:
test_server_sp)."""

from __future__ import annotations

import logging

import pytest


class ScriptedOps:
    """ModelOps' interface; raises what `fails` says for an operation, returns the op's name otherwise."""

    def __init__(self, fails: dict | None = None):
        self.fails = fails or {}
        self.ran = []

    def handle(self, op, args):
        self.ran.append(op)
        if op in self.fails:
            raise self.fails[op]
        return op

    def close_all(self):
        pass


def lockstep(rank0: ScriptedOps, *followers: ScriptedOps):
    """A SequenceParallelHost on rank0's ops, each follower replaying in a thread over a pipe."""
    import threading
    from multiprocessing import Pipe

    from server.sp_host import SequenceParallelHost, replay

    conns, threads, codes = [], [], {}
    for rank, ops in enumerate(followers, start=1):
        here, there = Pipe()
        t = threading.Thread(
            target=lambda c=there, o=ops, r=rank: codes.__setitem__(r, replay(c, o, r)), daemon=True
        )
        t.start()
        conns.append(here)
        threads.append(t)
    return SequenceParallelHost(rank0, conns), threads, codes


@pytest.fixture
def no_stop_comes(monkeypatch):
    """A follower found gone waits STOP_SIGNAL_WAIT (2 s) for the server's stop before it is a failure:
    where no stop comes, that wait runs out all the same, at once here (the same `stopping.wait` timing
    out, the same failure after it), not after 2 s of each test's time."""
    from server import sp_host

    monkeypatch.setattr(sp_host, "STOP_SIGNAL_WAIT", 0.01)


def test_a_client_error_on_every_rank_keeps_them_in_step():
    from server.model_host import HostDown

    host, threads, codes = lockstep(
        ScriptedOps({"create": ValueError("not a face")}), ScriptedOps({"create": ValueError("x")})
    )
    with pytest.raises(ValueError, match="not a face"):
        host.call("create", "id", None, None, 1)
    assert host.call("chunk", "id", None) == "chunk"
    assert host.down is None
    host.stop()
    threads[0].join(5)
    assert codes == {1: 0}
    host.stop()  # a second stop (a shutdown after a failed start, say) does nothing
    with pytest.raises(HostDown):  # and a call after it is refused, not run on a released model
        host.call("chunk", "id", None)


def test_a_failure_on_one_follower_takes_the_host_down(no_stop_comes):
    from server.model_host import HostDown

    follower = ScriptedOps({"chunk": RuntimeError("CUDA out of memory")})
    host, threads, codes = lockstep(ScriptedOps(), ScriptedOps(), follower)
    with pytest.raises(HostDown, match="rank 0 succeeded, rank 2 raised RuntimeError"):
        host.call("chunk", "id", None)
    threads[1].join(5)
    assert codes[2] == 1  # the failed follower left (under torchrun that ends the group)
    with pytest.raises(HostDown):  # nothing more runs, on any rank
        host.call("chunk", "id", None)
    assert follower.ran == ["chunk"]
    host.stop()


def test_a_failure_on_rank_0_takes_the_host_down_without_waiting_for_the_followers():
    """Rank 0 failed partway through a forward: the followers may wait in a collective it never
    reached, and their outcomes would come only at the group's timeout (30 minutes on gloo)."""
    import threading

    from server.model_host import HostDown
    from server.sp_host import SequenceParallelHost

    for followers in ([ScriptedOps()], [ScriptedOps({"chunk": RuntimeError("oom")})]):
        host, _, _ = lockstep(ScriptedOps({"chunk": RuntimeError("oom")}), *followers)
        with pytest.raises(HostDown, match="chunk failed on rank 0: RuntimeError: oom"):
            host.call("chunk", "id", None)
        host.stop()

    class InACollective:  # a follower that never answers
        def send(self, message):
            pass

        def recv(self):
            threading.Event().wait()

    host = SequenceParallelHost(ScriptedOps({"chunk": RuntimeError("oom")}), [InACollective()])
    failed = []
    caller = threading.Thread(
        target=lambda: failed.append(pytest.raises(HostDown, host.call, "chunk", "id", None))
    )
    caller.daemon = True
    caller.start()
    caller.join(10)
    assert failed and host.down


def test_a_follower_that_vanished_mid_forward_is_said_so_not_in_gloo_s_words(no_stop_comes):
    """A follower killed in a chunk: rank 0's collective fails with gloo's error, which /healthz and
    the sessions' close reasons gave as rank 0's own failure ('Connection reset by peer ... GLHF!')."""
    from server.model_host import HostDown

    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:53939: Connection reset "
        "by peer. This is typically caused by a remote worker hanging or bugs in the application. GLHF!"
    )
    host, _, _ = lockstep(ScriptedOps({"chunk": gloo}), ScriptedOps())
    with pytest.raises(HostDown) as down:
        host.call("chunk", "id", None)
    assert "(chunk: a follower rank is gone)" in str(down.value) and "GLHF" not in host.down, host.down
    host.stop()


def test_a_follower_whose_collective_failed_as_another_rank_ended_says_so_in_one_line(caplog, capsys):
    """Rank 0 killed mid-chunk (the out-of-memory killer): each follower logged gloo's traceback at
    CRITICAL and exited 1, a failure of its own the launcher could name instead of rank 0's."""
    from multiprocessing import Pipe

    from server.sp_host import replay
    from streamgen.parallel.torchrun import ANOTHER_RANK_FAILED

    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4567. This "
        "is typically caused by a remote worker crashing. GLHF!"
    )
    rank0, follower = Pipe()
    rank0.send(("chunk", ("id", None)))
    with caplog.at_level(logging.DEBUG, "streamgen.server"):
        assert replay(follower, ScriptedOps({"chunk": gloo}), 1) == ANOTHER_RANK_FAILED
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [], caplog.text
    assert capsys.readouterr().err == "streamgen serve: rank 1 stopped: another rank failed (see its error above)\n"


def test_a_follower_that_vanished_takes_the_host_down(no_stop_comes):
    from multiprocessing import Pipe

    from server.model_host import HostDown
    from server.sp_host import SequenceParallelHost

    here, there = Pipe()
    there.close()  # as if that rank's process had died
    rank0 = ScriptedOps()
    host = SequenceParallelHost(rank0, [here])
    with pytest.raises(HostDown, match="gone"):
        host.call("chunk", "id", None)
    with pytest.raises(HostDown):
        host.call("chunk", "id", None)
    assert rank0.ran in ([], ["chunk"])  # at most the one operation that found the follower gone
    host.stop()


def test_a_follower_gone_once_the_server_is_stopping_ended_with_the_stop(caplog):
    """Ctrl-C reaches every rank at once: the follower ends, and rank 0's shutdown (the sessions'
    close) found it gone, logged CRITICAL as if the ranks had failed."""
    import threading
    from multiprocessing import Pipe

    from server.model_host import HostDown, HostStopped
    from server.sp_host import SequenceParallelHost

    stopping = threading.Event()
    here, there = Pipe()
    there.close()  # the follower has ended
    stopping.set()  # the signal reached rank 0 too
    host = SequenceParallelHost(ScriptedOps(), [here], stopping)
    with caplog.at_level(logging.INFO, "streamgen.server"), pytest.raises(HostStopped):
        host.call("close", "id")
    assert [r.levelname for r in caplog.records] == ["INFO"], caplog.text
    assert "is gone, as the server stops" in caplog.text and "cannot go on together" not in caplog.text
    with pytest.raises(HostDown):  # nothing more runs
        host.call("close", "id")
    host.stop()
    # mid-forward, gloo's error says it
    host, _, _ = lockstep(ScriptedOps({"chunk": RuntimeError("Connection reset by peer. GLHF!")}), ScriptedOps())
    host.stopping.set()
    with pytest.raises(HostStopped):
        host.call("chunk", "id", None)
    host.stop()


@pytest.mark.parametrize("ended", ["a follower gone at the stop", "the host's own stop"])
def test_an_operation_after_the_host_ended_with_the_stop_ends_as_the_stop(caplog, ended):
    """The operation that found a follower gone at the stop raised HostStopped, but every one after
    it (another lane's chunk, a session's close in the shutdown) raised HostDown: the worker logged
    it at ERROR and ended its sessions as host_down, where the first ended with the stop. As
    ModelHost, once down by the stop (found so, or stopped), an operation raises HostStopped; one down
    by a failure before the stop still raises HostDown (test_a_failure_on_one_follower_takes_the_host_down)."""
    import threading
    from multiprocessing import Pipe

    from server.model_host import HostDown, HostStopped
    from server.sp_host import SequenceParallelHost

    here, there = Pipe()
    stopping = threading.Event()
    host = SequenceParallelHost(ScriptedOps(), [here], stopping)
    stopping.set()  # the signal reached rank 0
    if ended == "a follower gone at the stop":
        there.close()  # the follower has ended with it
        with pytest.raises(HostStopped):
            host.call("chunk", "id", None)
    else:
        host.stop()
    for op, args in (("chunk", ("id", None)), ("close", ("id",))):
        with pytest.raises(HostDown) as refused:
            host.call(op, *args)
        assert type(refused.value) is HostStopped, (op, refused.value)
        assert str(refused.value) == host.down == "the sequence-parallel host has stopped"
    host.stop()
    there.close()


@pytest.mark.parametrize("then", ["the stop is known", "no stop comes"])
def test_a_host_whose_follower_is_found_gone_is_down_while_it_waits_for_the_stop(monkeypatch, then):
    """A follower found gone waits STOP_SIGNAL_WAIT for the server's stop to be known before it is a
    failure; meanwhile `down` said None: /healthz and /readyz said ok and admission took creates for
    a host that could run nothing more. The host is down from the follower's loss, its reason then
    the stop's or the failure's."""
    import threading
    import time
    from multiprocessing import Pipe

    import server.sp_host
    from server.model_host import HostDown, HostStopped
    from server.sp_host import SequenceParallelHost

    class NoStopComes(threading.Event):
        """A stop never known: its wait ends, as its time out would, once `waited_out` is set."""

        waited_out = threading.Event()

        def wait(self, timeout=None):
            self.waited_out.wait(30)
            return False

    monkeypatch.setattr(server.sp_host, "STOP_SIGNAL_WAIT", 3600.0)
    here, there = Pipe()
    there.close()  # the follower has ended
    host = SequenceParallelHost(ScriptedOps(), [here], threading.Event() if then == "the stop is known" else NoStopComes())
    raised = []

    def chunk():
        try:
            host.call("chunk", "id", None)
        except HostDown as e:
            raised.append(e)

    calling = threading_start(chunk)
    for _ in range(500):  # (bounded: 5 s)
        if host.down is not None or raised:
            break
        time.sleep(0.01)
    assert not raised and host.down == "the sequence-parallel host lost a rank (chunk: a follower rank is gone)"
    assert host.awaiting_stop  # (the limits' check leaves its sessions to what follows)
    host.stopping.set() if then == "the stop is known" else host.stopping.waited_out.set()
    calling.join(30)
    assert not calling.is_alive() and len(raised) == 1 and not host.awaiting_stop
    if then == "the stop is known":
        assert type(raised[0]) is HostStopped and host.down == "the sequence-parallel host has stopped"
    else:
        assert type(raised[0]) is HostDown and "cannot go on together (chunk: a follower rank is gone)" in host.down
    host.stop()


def test_a_follower_found_gone_as_the_hosts_own_stop_begins_ended_with_the_stop(monkeypatch, caplog):
    """The host's own stop (`stop`, as the server's shutdown or a failed start calls it) began while
    an operation waited to know whether the stop took the follower it found gone: the operation
    waited only for the server's `stopping`, and, that not set, ended as a failure (CRITICAL,
    HostDown). ModelHost counts its own stop as the stop begun (its `stop_begun`); so does this
    host now: the operation ends with the stop, an INFO line, HostStopped."""
    import threading
    from multiprocessing import Pipe

    import server.sp_host
    from server.model_host import HostDown, HostStopped
    from server.sp_host import SequenceParallelHost

    monkeypatch.setattr(server.sp_host, "STOP_SIGNAL_WAIT", 60.0)  # (a failure only after the stop's)
    monkeypatch.setattr(server.sp_host, "STOP_WAIT", 30.0)
    here, there = Pipe()
    there.close()  # the follower has ended
    host = SequenceParallelHost(ScriptedOps(), [here], threading.Event())  # (the server's stop never set)
    raised = []

    def chunk():
        try:
            host.call("chunk", "id", None)
        except HostDown as e:
            raised.append(e)

    with caplog.at_level(logging.INFO, "streamgen.server"):
        calling = threading_start(chunk)
        waiting = threading.Event()
        for _ in range(500):  # (bounded: 5 s)
            if host.awaiting_stop:
                waiting.set()
                break
            waiting.wait(0.01)
        assert waiting.is_set()
        stopping = threading_start(host.stop)
        calling.join(10)
        stopping.join(10)
    assert not calling.is_alive() and not stopping.is_alive()
    assert len(raised) == 1 and type(raised[0]) is HostStopped, raised
    assert host.down == "the sequence-parallel host has stopped"
    assert "CRITICAL" not in [r.levelname for r in caplog.records], caplog.text


def test_a_stop_whose_streams_fail_to_close_still_lets_go_of_the_process_group(monkeypatch):
    """The stop closes the streams, then destroys the process group and lets go of the model: a close
    that raised (a CUDA error is sticky: every later call raises one) skipped both, and the group's
    threads were left to the interpreter's shutdown, where one still freeing a collective's tensors
    aborts the process (docs/parallel.md). The close's error still reaches the stop's caller."""
    from multiprocessing import Pipe

    import server.sp_host

    destroyed = []
    monkeypatch.setattr(server.sp_host.dist, "is_initialized", lambda: not destroyed)
    monkeypatch.setattr(server.sp_host.dist, "destroy_process_group", lambda: destroyed.append(True))

    class FailingClose(ScriptedOps):
        def close_all(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    here, there = Pipe()
    host = server.sp_host.SequenceParallelHost(FailingClose(), [here])
    with pytest.raises(RuntimeError, match="illegal memory access"):
        host.stop()
    assert destroyed == [True] and host.ops is None and host.followers == []
    assert there.recv() == ("exit", ())  # (the follower was told first)
    host.stop()  # (a second stop does nothing)
    assert destroyed == [True]
    there.close()


def test_a_follower_whose_streams_fail_to_close_still_lets_go_of_its_group_and_heap(monkeypatch):
    """A follower's teardown closed its streams, then destroyed the group and unfroze its heap: a close
    that raised skipped both (the group's threads left to the interpreter's shutdown, as rank 0's)."""
    import threading
    from multiprocessing.connection import Listener

    import server.sp_host

    class FailingClose(ScriptedOps):
        def close_all(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    done = []
    listener = Listener(("127.0.0.1", 0), authkey=b"k")
    monkeypatch.setattr(server.sp_host, "load_sharded", lambda *args: (object(), "cpu"))
    monkeypatch.setattr(server.sp_host, "ModelOps", lambda *args: FailingClose())
    monkeypatch.setattr(server.sp_host, "freeze_loaded_heap", lambda: None)
    monkeypatch.setattr(server.sp_host.dist, "broadcast_object_list", lambda box, src: box.__setitem__(
        slice(None), [listener.address, b"k"]))  # fmt: skip
    monkeypatch.setattr(server.sp_host.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(server.sp_host.dist, "destroy_process_group", lambda: done.append("destroyed"))
    monkeypatch.setattr(server.sp_host.gc, "unfreeze", lambda: done.append("unfrozen"))
    rank0 = []
    accepting = threading.Thread(target=lambda: rank0.append(listener.accept()), daemon=True)
    accepting.start()
    try:
        following = threading.Thread(target=lambda: done.append(
            pytest.raises(RuntimeError, server.sp_host.follow, "debug", "cpu", 1, 2)), daemon=True)  # fmt: skip
        following.start()
        accepting.join(10)
        rank0[0].send(("exit", ()))
        following.join(10)
        assert not following.is_alive()
        assert done[:2] == ["destroyed", "unfrozen"] and "illegal memory access" in str(done[2].value)
    finally:
        listener.close()
        for conn in rank0:
            conn.close()


def test_a_follower_gone_just_before_rank_0_knows_the_server_is_stopping_ended_with_the_stop(caplog):
    """The signal reaches every rank at once; the follower ended, and rank 0's worker found it gone
    before rank 0's main thread had run its signal handler (a loaded machine): that was "cannot go
    on together", CRITICAL, at a plain Ctrl-C. A follower found gone waits a moment for the stop."""
    import threading
    from multiprocessing import Pipe

    from server.model_host import HostStopped
    from server.sp_host import SequenceParallelHost

    here, there = Pipe()
    there.close()  # the follower has ended
    host = SequenceParallelHost(ScriptedOps(), [here], threading.Event())
    signal_handled = threading.Timer(0.3, host.stopping.set)  # rank 0's handler, a moment later
    signal_handled.start()
    with caplog.at_level(logging.INFO, "streamgen.server"), pytest.raises(HostStopped):
        host.call("chunk", "id", None)
    assert [r.levelname for r in caplog.records] == ["INFO"], caplog.text
    signal_handled.join()
    host.stop()


@pytest.mark.parametrize(
    "rank0_fails, follower_fails",
    [  # rank 0's collective, in words PEER_GONE does not list (gloo's, for a pair already shut)
        (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:573] Socket closed [127.0.0.1]:4567"), None),
        # rank 0's part was done; a follower's collective met a third rank that had ended with the stop
        (None, RuntimeError("Connection closed by peer [127.0.0.1]:4567. GLHF!")),
    ],
)
def test_a_failure_found_as_the_server_stops_ends_with_the_stop(rank0_fails, follower_fails, caplog):
    """During a stop, an operation's failure in other words than a follower being gone was logged
    CRITICAL ("the sequence-parallel ranks cannot go on together"), as if the ranks had failed."""
    from server.model_host import HostStopped

    host, threads, _ = lockstep(
        ScriptedOps({"chunk": rank0_fails} if rank0_fails else {}),
        ScriptedOps({"chunk": follower_fails} if follower_fails else {}),
    )
    host.stopping.set()  # the signal reached rank 0
    with caplog.at_level(logging.INFO, "streamgen.server"), pytest.raises(HostStopped):
        host.call("chunk", "id", None)
    ours = [r for r in caplog.records if r.name == "streamgen.server" and r.threadName == "MainThread"]
    assert [r.levelname for r in ours] == ["INFO"], caplog.text
    assert "as the server stops" in ours[0].getMessage() and "cannot go on together" not in caplog.text
    host.stop()
    threads[0].join(5)


def test_the_signal_that_stops_the_server_marks_it_stopping_at_once():
    """Not at the shutdown, a tick of uvicorn's loop later: a chunk running meanwhile finds the
    followers, who got the signal too, gone."""
    import signal

    import uvicorn

    from server.uvicorn_server import SessionClosingServer
    from tests.server_helpers import make_app

    app = make_app()
    server = SessionClosingServer(uvicorn.Config(app))
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and app.state.registry.stopping.is_set()


class HeldOps(ScriptedOps):
    """Rank 0's ops whose "chunk" runs until `release`, recording whether they were let go of
    (`close_all`, as the host's stop does) while it ran."""

    def __init__(self):
        super().__init__()
        import threading

        self.running, self.release = threading.Event(), threading.Event()
        self.released_while_running = None
        self.released_on = None  # the thread that let go of them
        self.close_all_error = None  # raised by `close_all`, when set

    def handle(self, op, args):
        if op == "chunk":
            self.running.set()
            self.release.wait(30)
            self.running.clear()
        return super().handle(op, args)

    def close_all(self):
        import threading

        self.released_while_running = self.running.is_set()
        self.released_on = threading.current_thread()
        if self.close_all_error is not None:
            raise self.close_all_error


def held_call(monkeypatch, stop_wait: float, rank0=None, follower=None):
    """A "chunk" call running on lockstep ranks (rank 0's ops held until `release`), the host's
    STOP_WAIT set to `stop_wait`: (rank 0's ops, the host, the calling thread, its results)."""
    from server import sp_host

    monkeypatch.setattr(sp_host, "STOP_WAIT", stop_wait, raising=False)
    rank0 = rank0 or HeldOps()
    host, _, _ = lockstep(rank0, follower or ScriptedOps())
    results = []
    caller = _call_in_a_thread(host, results)
    assert rank0.running.wait(10)
    return rank0, host, caller, results


def stop_begun(host, seconds: float = 10):
    """The host's stop, run in a thread, once it has begun (bounded: `seconds`): the thread."""
    import time

    stopping = threading_start(host.stop)
    deadline = time.monotonic() + seconds
    while host.down is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.down is not None, "the host's stop did not begin"
    return stopping


def _call_in_a_thread(host, results):
    import threading

    def call():
        try:
            results.append(host.call("chunk", "id", None))
        except Exception as e:
            results.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    return caller


@pytest.mark.parametrize("ends", ["within the stop's wait", "after it"])
def test_a_call_still_running_at_stop_ends_before_the_model_is_let_go_of(monkeypatch, ends):
    """The server stops the host after the worker's stop, which waits 10 s for its thread: a
    chunk still running after that met a model the stop had let go of (its streams closed, its
    process group destroyed under a collective). The stop waits a while for the call, and past
    that leaves the letting go to the call, when it ends; it refuses any call after it."""
    from server import sp_host
    from server.model_host import HostDown

    wait = 30.0 if ends == "within the stop's wait" else 0.05
    monkeypatch.setattr(sp_host, "STOP_WAIT", wait, raising=False)
    rank0 = HeldOps()
    host, threads, codes = lockstep(rank0, ScriptedOps())
    results = []
    caller = _call_in_a_thread(host, results)
    assert rank0.running.wait(10)
    if ends == "within the stop's wait":
        stopping = stop_begun(host)
        rank0.release.set()
        stopping.join(10)
        assert not stopping.is_alive()
    else:
        host.stop()  # returns while the call runs
        assert rank0.released_while_running is None  # not let go of yet
        rank0.release.set()
    with pytest.raises(HostDown):
        host.call("chunk", "id", None)
    caller.join(10)
    assert results == ["chunk"]  # the call ran to its end on a model still there
    assert rank0.released_while_running is False  # and the model was let go of after it
    threads[0].join(5)
    assert codes == {1: 0}  # the follower was told to exit


def test_a_call_that_ends_within_the_stops_wait_leaves_the_letting_go_to_the_stop(monkeypatch):
    """The stop raised its flag as it began, not when it gave up waiting: a call ending within the
    wait let go of the model itself (the process group's teardown and a collection) before its
    caller had its result, then the stop found nothing left to do."""
    rank0, host, caller, results = held_call(monkeypatch, 30.0)
    stopping = stop_begun(host)
    rank0.release.set()
    caller.join(10)
    stopping.join(10)
    assert results == ["chunk"]
    assert rank0.released_on is stopping  # let go of by the stop, not by the call


@pytest.mark.parametrize("outcome", ["returns", "raises a client error"])
def test_a_failed_letting_go_after_a_call_keeps_the_calls_own_outcome(monkeypatch, caplog, outcome):
    """A stop that gave up waiting leaves the letting go to the call still running, in its
    `finally`: an error from it there replaced the call's own result or error. The caller gets
    its own outcome; the letting go's error is logged."""
    rank0 = HeldOps()
    if outcome == "raises a client error":  # every rank refuses it alike (ValueError: a client's)
        rank0.fails = {"chunk": ValueError("unknown stream")}
    rank0.close_all_error = RuntimeError("the process group would not go")
    rank0, host, caller, results = held_call(monkeypatch, 0.05, rank0, ScriptedOps(dict(rank0.fails)))
    with caplog.at_level("WARNING", logger="streamgen.server"):
        host.stop()  # gives up waiting
        rank0.release.set()
        caller.join(10)
    assert rank0.released_on is caller
    if outcome == "returns":
        assert results == ["chunk"]
    else:
        assert len(results) == 1 and isinstance(results[0], ValueError), results
    assert "the process group would not go" in caplog.text


def test_the_stops_warning_says_what_happens_if_the_server_exits_before_the_call_ends(monkeypatch, caplog):
    """The server exits soon after the stop returns and its worker threads are daemons: a call
    still running then never ends, so "stops when it ends" was not what happens; the followers
    end as they find rank 0 gone instead."""
    rank0, host, caller, results = held_call(monkeypatch, 0.05)
    with caplog.at_level("WARNING", logger="streamgen.server"):
        host.stop()
    rank0.release.set()
    caller.join(10)
    warning = caplog.text
    assert "still running" in warning and "if the server exits first" in warning, warning


class EndsAsTheWaitTimesOut:
    """The host's `_calling` lock, whose timed acquire (the stop's wait) times out only once the
    call holding it has ended, up to its release: the call ends exactly as the stop gives up."""

    def __init__(self, host, rank0):
        self.lock, self.host, self.rank0 = host._calling, host, rank0

    def acquire(self, blocking=True, timeout=-1):
        import time

        if timeout < 0:
            return self.lock.acquire(blocking)
        self.rank0.release.set()  # the call ends now: its `finally` runs, up to releasing `_calling`
        deadline = time.monotonic() + 10
        while self.host._running and time.monotonic() < deadline:  # till its `finally` has looked
            time.sleep(0.001)
        return False  # and the stop's wait times out

    def release(self):
        self.lock.release()

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def test_a_call_that_ends_as_the_stops_wait_times_out_is_let_go_of_once_by_the_stop(monkeypatch):
    """The call ends as the stop's wait times out: it has seen no "gave up" (not set yet) and
    leaves the letting go, and the stop, which finds no call running under the hand-over lock,
    lets go itself once the call releases `_calling`. Without the check under that lock, the stop
    left it to a call that had already ended, and the model was never let go of."""
    rank0, host, caller, results = held_call(monkeypatch, 0.05)
    released = []
    close_all = rank0.close_all
    rank0.close_all = lambda: (released.append(1), close_all())
    host._calling = EndsAsTheWaitTimesOut(host, rank0)
    stopping = threading_start(host.stop)
    stopping.join(10)
    caller.join(10)
    assert results == ["chunk"] and not stopping.is_alive()
    assert released == [1] and rank0.released_on is stopping and rank0.released_while_running is False


def threading_start(fn):
    import threading

    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_a_follower_alive_but_giving_no_answer_takes_the_host_down_once_the_model_timeout_runs_out():
    """A follower hung in its operation (a driver hang, a deadlock) held rank 0's worker in `recv`,
    and with it every session, for good while /healthz said ok: --model-timeout bounds it, as it
    bounds a model process's answer."""
    import threading
    from multiprocessing import Pipe

    from server.model_host import HostDown
    from server.sp_host import SequenceParallelHost

    here, there = Pipe()  # `there` is never read or answered: the follower is alive, and hung
    host = SequenceParallelHost(ScriptedOps(), [here])
    host.answer_timeout = 0.2
    outcomes = []
    caller = threading.Thread(target=lambda: outcomes.append(pytest.raises(HostDown, host.call, "chunk", "id", None)))
    caller.daemon = True  # (without the bound it waits for good)
    caller.start()
    caller.join(10)
    assert outcomes, "the call still waits for the hung follower's answer after 10 s"
    outcomes[0].match(r"rank 1 gave no answer to 'chunk' in 0\.2 s")
    assert "cannot go on together" in host.down and not host.awaiting_stop
    with pytest.raises(HostDown):  # nothing more runs
        host.call("chunk", "id", None)
    host.stop()
    there.close()


def test_rank_0_held_in_its_own_operation_takes_the_host_down_once_the_model_timeout_runs_out():
    """A follower hung before a collective holds rank 0 in that collective, in its own part of the
    operation, not in `recv`: the bound on the followers' answers never came into play, and /healthz
    said ok for as long as it hung. The host is down once the operation has run for --model-timeout,
    while it still runs, and the operation, should it end, raises as the host is down."""
    import threading

    from server.model_host import HostDown

    released = threading.Event()

    class HeldOps(ScriptedOps):
        def handle(self, op, args):
            if op == "chunk":
                released.wait(30)  # (a collective waiting on a hung rank)
            return super().handle(op, args)

    host, threads, codes = lockstep(HeldOps(), ScriptedOps())
    host.answer_timeout = 0.2
    outcomes = []
    caller = threading.Thread(target=lambda: outcomes.append(pytest.raises(HostDown, host.call, "chunk", "id", None)))
    caller.daemon = True
    caller.start()
    try:
        for _ in range(100):
            if host.down:
                break
            caller.join(0.1)
        assert host.down, "the host is not down 10 s into an operation bounded by 0.2 s"
        assert "gave no answer to 'chunk' in 0.2 s" in host.down and caller.is_alive()
    finally:
        released.set()
    caller.join(10)
    assert outcomes, "the operation did not end once released"
    outcomes[0].match(r"gave no answer to 'chunk' in 0\.2 s")
    with pytest.raises(HostDown):  # nothing more runs
        host.call("chunk", "id", None)
    host.stop()


def test_a_start_whose_accept_fails_closes_its_listener(monkeypatch):
    """A follower's connection refused (a wrong key, say) raised out of `start` with the listener
    still open: its port and socket stayed bound for as long as the process lived."""
    import multiprocessing.connection

    import server.sp_host

    listeners = []

    class RefusingListener(multiprocessing.connection.Listener):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            listeners.append(self)

        def accept(self):
            raise multiprocessing.AuthenticationError("digest received was wrong")

    monkeypatch.setattr(server.sp_host, "load_sharded", lambda *args: (object(), "cpu"))
    monkeypatch.setattr(server.sp_host, "Listener", RefusingListener)
    monkeypatch.setattr(server.sp_host.dist, "broadcast_object_list", lambda box, src: None)
    with pytest.raises(multiprocessing.AuthenticationError):
        server.sp_host.SequenceParallelHost.start("debug", "cpu", None, 2)
    assert listeners and listeners[0]._listener is None, "the listener is still open"
