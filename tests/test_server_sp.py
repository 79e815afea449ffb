"""`streamgen serve --sp N`: rank 0's model operations replayed on the followers.

Two gloo processes: rank 0 drives a stream through `SequenceParallelHost` (as
the server's inference worker does), rank 1 follows. The frames must be the
single-process stream's, a client error must leave both ranks in step, and
`stop()` must end the follower.
"""

from __future__ import annotations

import gc
import json
import logging
import os

import numpy as np
import pytest
import torch

from tests.server_helpers import free_port
from tests.spawn_helpers import gloo_threads, spawn

SEED, CHUNKS = 7, 3
# what the spawned ranks import: once, in the process they are forked from (each fresh
# interpreter importing torch, the server and the model again took seconds of a 2-core machine)
RANK_IMPORTS = ("server.model_host", "server.sp_host", "streamgen.models", __name__)


def inputs():
    rng = np.random.default_rng(0)
    face = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    speech = (rng.standard_normal(16000 * 4) * 0.1).astype(np.float32)
    return face, speech


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from server.model_host import RemoteStream
    from server.sp_host import SequenceParallelHost, follow

    if rank > 0:
        from server import sp_host

        frozen, freeze = [], sp_host.freeze_loaded_heap

        def counted_freeze():
            freeze()
            frozen.append(gc.get_freeze_count())

        sp_host.freeze_loaded_heap = counted_freeze
        follow("debug", "cpu", 1, world)
        with open(os.path.join(out_dir, f"follower{rank}.json"), "w") as f:
            json.dump({"exited": True, "frozen_objects": frozen, "frozen_at_exit": gc.get_freeze_count()}, f)
        return
    host = SequenceParallelHost.start("debug", "cpu", 1, world)
    face, speech = inputs()
    errors = []
    try:
        RemoteStream(host, face.astype(np.float32), None, None, None, None, None)  # refused on every rank
    except ValueError as e:
        errors.append(str(e))
    stream = RemoteStream(host, face, None, SEED, None, None, None)
    stream.push_audio(speech)
    frames, pending = [], []
    for _ in range(CHUNKS):  # as the scheduler does: the frames, then (published) the re-encode
        frames.append(stream.next_chunk()[0])
        pending.append(host.ops.streams[stream.id].chunk_pending)
        stream.write_pending_chunk()  # in step on every rank
        pending.append(host.ops.streams[stream.id].chunk_pending)
    assert pending == [True, False] * CHUNKS, pending
    stream.close()
    host.stop()
    # the server keeps its host until the interpreter exits: stopped, the host must let go of the
    # model, whose parallel layers hold the process group, so the group's threads end here
    gc.collect()
    threads_after_stop = gloo_threads()
    np.save(os.path.join(out_dir, "frames.npy"), np.concatenate(frames))
    with open(os.path.join(out_dir, "errors.json"), "w") as f:
        json.dump(errors, f)
    with open(os.path.join(out_dir, "rank0.json"), "w") as f:
        json.dump({"gloo_threads_after_stop": threads_after_stop, "host_down": host.down}, f)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_followers_replay_the_stream_of_rank_0(tmp_path):
    from streamgen.models import load_model
    from streamgen.stream import StreamSession

    face, speech = inputs()
    alone = StreamSession(load_model("debug"))
    alone.start(face, seed=SEED)
    alone.push_audio(speech)
    expected = np.concatenate([alone.next_chunk()[0] for _ in range(CHUNKS)])

    spawn(_worker, (2, free_port(), str(tmp_path)), nprocs=2, preload=RANK_IMPORTS)
    got = np.load(tmp_path / "frames.npy")
    assert got.shape == expected.shape
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # fp32 reassociation can flip a rounding
    assert len(json.loads((tmp_path / "errors.json").read_text())) == 1
    follower = json.loads((tmp_path / "follower1.json").read_text())
    assert follower["exited"] and follower["frozen_objects"][0] > 10_000  # its loaded heap (torch, the model)
    # and let go of at its end, the model with it: the model held the process group, whose threads
    # then ran into the interpreter's shutdown (spawn_helpers counts them)
    assert follower["frozen_at_exit"] == 0
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["gloo_threads_after_stop"] in (0, None)  # (None: no /proc to count them)
    assert rank0["host_down"]  # a call after stop is refused (HostDown), not run on a released model


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_a_model_no_rank_can_load_is_one_line(tmp_path):
    """A damaged model folder under `serve --sp 2`: each follower printed its traceback, and the
    launcher said 'rank 0 failed (signal 15)' (rank 0, stopped by torchrun, had its line to give)."""
    import shutil
    import subprocess
    import sys

    from streamgen.models import resolve_model_dir

    folder = tmp_path / "damaged"
    shutil.copytree(resolve_model_dir("tiny-avatar"), folder)
    weights = folder / "dit.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    torchrun_vars = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK")
    env = {**{k: v for k, v in os.environ.items() if k not in torchrun_vars}, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "streamgen", "serve", "--sp", "2", "--model", str(folder), "--port", str(free_port()),
         "--log-level", "warning"],
        env=env, capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("the model did not load: ValueError: ") == 1, r.stderr[-3000:]
    assert "[rank1]" not in r.stderr and "signal 15" not in r.stderr, r.stderr[-3000:]
    assert "failed (exit code 2); the other ranks were stopped" in r.stderr


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_serve_with_sp_streams_and_shuts_down(tmp_path):
    """`streamgen serve --sp 2` under torchrun: ready, a WebSocket session streams, SIGINT ends all ranks."""
    import asyncio
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import websockets

    from tests.test_server_load import HEADER, create, first_frame, ws_url

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgen.cli", "serve", "--sp", "2", "--model", "debug", "--port", str(port),
         "--threads", "1", "--admit-max", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "serve.log"
                ).read_text()
                await asyncio.sleep(0.2)
            s = await create(http, 3)
            async with websockets.connect(ws_url(url, s)) as ws:
                await ws.send(json.dumps({"type": "start", "format": "rgb"}))
                frames = [await first_frame(ws) for _ in range(10)]
                assert len(frames[-1]) == HEADER.size + 64 * 64 * 3
                await ws.send(json.dumps({"type": "stop"}))
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: torchrun passes it on to both ranks
        try:
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    text = (tmp_path / "serve.log").read_text()
    assert rc == 130 and "stopped by SIGINT" in text and "Traceback" not in text, text[-3000:]
    # the follower got the signal too and ended at once: the session's close at the shutdown then
    # found it gone, which is the stop, not the ranks failing ("cannot go on together", CRITICAL)
    assert "CRITICAL" not in text and "cannot go on together" not in text, text[-3000:]
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, "a rank outlived torchrun"
        await asyncio.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# --- lockstep: the ranks' outcomes are compared after every operation (no model, no process group) ---


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


def test_a_failure_on_one_follower_takes_the_host_down():
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


def test_a_follower_that_vanished_mid_forward_is_said_so_not_in_gloo_s_words():
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


def test_a_follower_that_vanished_takes_the_host_down():
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
    import time

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
        stopping = threading_start(host.stop)
        deadline = time.monotonic() + 10
        while host.down is None and time.monotonic() < deadline:  # the stop has begun
            time.sleep(0.01)
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
    import time

    rank0, host, caller, results = held_call(monkeypatch, 30.0)
    stopping = threading_start(host.stop)
    deadline = time.monotonic() + 10
    while host.down is None and time.monotonic() < deadline:  # the stop has begun
        time.sleep(0.01)
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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sp", "2", "--model-process"], "cannot be combined"),
        (["--lanes", "3", "--max-sessions", "2"], "--lanes 3 is more than --max-sessions 2"),
        (["--lanes", "2", "--model-process"], "--lanes runs the model in this process"),
        (["--lanes", "2", "--sp", "2"], "--lanes runs the model in this process"),
        (["--attention", "xformers"], "unknown attention backend 'xformers'; choose one of sdpa, flex"),
        (["--fp8", "--device", "cuda"], "--fp8 on a GPU needs --dtype bfloat16"),
        (["--compile", "--sp", "2"], "--compile runs on the CPU in one process"),
        (["--compile", "--device", "cuda"], "--compile runs on the CPU in one process"),
        (["--cache-from", "last_step", "--steps", "1"], "--cache-from last_step needs 2 or more --steps"),
    ],
)
def test_serve_refuses_bad_options_before_launching_anything(extra, message, capsys):
    from streamgen.cli import main

    assert main(["serve", "--model", "debug", "--port", str(free_port()), *extra]) == 2  # before anything is launched or loaded
    assert message in capsys.readouterr().err


def test_a_count_below_one_is_said_before_a_port_in_use(capsys):
    """`serve --sp 0` on a port in use said the port was in use: the count is argparse's to refuse."""
    import socket

    from streamgen.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for option in ("--sp", "--lanes"):
            with pytest.raises(SystemExit) as stopped:
                main(["serve", "--model", "debug", "--host", "127.0.0.1", "--port", str(port), option, "0"])
            assert stopped.value.code == 2
            assert f"argument {option}: '0' is not a positive whole number" in capsys.readouterr().err


def test_cpu_0_is_the_cpu(monkeypatch):
    """`--device cpu:0` was refused with --compile as "a GPU device", and skipped the CPU's
    default of one torch thread."""
    from streamgen.cli import main

    served = []
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run",
                        lambda self: served.append(self.config.app.state.registry.config))  # fmt: skip
    main(["serve", "--model", "debug", "--port", str(free_port()), "--device", "cpu:0", "--compile"])  # (2: nothing started here)
    assert served and served[0].torch_threads == 1


def test_serve_refuses_last_step_for_a_model_that_runs_one_step(tmp_path, capsys, monkeypatch):
    """Without --steps, a session runs the model's own steps: `--cache-from last_step` on a 1-step
    student passed serve's check, reached the sessions as the model's own cache_from (through the
    environment) and was quietly turned into a re-encode, where asked for it is an error."""
    from streamgen.cli import main
    from streamgen.model_export import save_model
    from streamgen.models import load_model

    model = load_model("debug")
    model.steps = 1
    save_model(model, tmp_path / "one-step")

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    assert main(["serve", "--port", str(free_port()), "--model", str(tmp_path / "one-step"), "--cache-from", "last_step"]) == 2
    err = capsys.readouterr().err
    assert "--cache-from last_step needs 2 or more --steps" in err and "runs 1 step" in err, err


def test_serve_s_defaults_are_the_model_folder_s_as_its_loader_reads_them(tmp_path, monkeypatch, capsys):
    """serve read model.json itself for the steps a model runs without --steps: the model
    folder's layout now has one reader (streamgen.models.model_settings), which says what
    load_model gives, for an export, an older one that leaves settings out, and a flavor."""
    import json

    from streamgen import models
    from streamgen.cli import main
    from streamgen.model_export import save_model
    from streamgen.models import load_model, model_settings

    for name in (models.ATTENTION_ENV, models.DTYPE_ENV, models.FP8_ENV, models.CACHE_FROM_ENV,
                 models.COMPILE_ENV):  # fmt: skip
        monkeypatch.setenv(name, "")  # unset; restored after the test (serve sets them)
    model = load_model("debug")
    model.steps, model.shift = 1, 3.0
    save_model(model, tmp_path / "one-step")
    older = tmp_path / "older"
    save_model(load_model("debug"), older)
    meta = json.loads((older / "model.json").read_text())
    older_meta = {key: value for key, value in meta.items() if key not in ("steps", "shift")}
    (older / "model.json").write_text(json.dumps(older_meta))
    for name in (str(tmp_path / "one-step"), str(older), "debug", "tiny-avatar-teacher"):
        loaded = load_model(name)
        settings = dict(height=loaded.height, width=loaded.width, shift=loaded.shift, steps=loaded.steps)
        assert model_settings(name) == settings, name
    assert model_settings(str(tmp_path / "one-step"))["steps"] == 1
    assert model_settings(str(older))["steps"] == 4  # (MODEL_META_DEFAULTS)

    served = []

    def serve(server):
        served.append(server.config.app)
        server.started = True

    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", serve)
    assert main(["serve", "--port", str(free_port()), "--model", str(tmp_path / "one-step"), "--cache-from", "last_step"]) == 2
    assert "runs 1 step" in capsys.readouterr().err and served == []
    assert main(["serve", "--port", str(free_port()), "--model", str(older), "--cache-from", "last_step"]) == 0 and len(served) == 1


def test_model_ops_decode_in_the_server_s_decode_dtype():
    """`serve --decode-dtype` reaches the sessions the model host creates (and a bad name is refused)."""
    from server.model_host import ModelOps
    from streamgen.models import load_model

    model = load_model("debug")
    face, _ = inputs()
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ops = ModelOps(model, "cpu", name)
        ops.handle("create", ("s", face, None, 0, None, None, None))
        assert ops.streams["s"].vae.dec_in.weight.dtype == dtype
        ops.close_all()
    with pytest.raises(ValueError, match="decode dtype"):
        ModelOps(model, "cpu", "float16").handle("create", ("s", face, None, 0, None, None, None))


def test_serve_cache_from_reaches_every_session_of_the_models_it_loads(monkeypatch):
    """`serve --cache-from` goes through the environment, as the precision does: every model this
    process, its model process or its ranks load keeps its sessions' KV cache that way."""
    from server.model_host import ModelOps
    from streamgen.models import CACHE_FROM_ENV, load_model, use_cache_from

    monkeypatch.setenv(CACHE_FROM_ENV, "")  # unset for load_model; restored after the test
    assert load_model("debug").meta.get("cache_from") is None
    use_cache_from("last_step")
    assert os.environ[CACHE_FROM_ENV] == "last_step"
    ops = ModelOps(load_model("debug"), "cpu", "float32")
    ops.handle("create", ("s", inputs()[0], None, 0, None, None, None))
    assert ops.streams["s"].cache_from == "last_step"
    with pytest.raises(ValueError, match="cache_from must be one of"):
        use_cache_from("always")


def test_model_ops_run_in_the_precision_the_model_was_loaded_in(monkeypatch):
    """`serve --dtype bfloat16 --fp8` loads every model that way (the model process and the ranks
    read it from the environment); the sessions follow the loaded DiT."""
    from server.model_host import ModelOps
    from streamgen.model.float8 import float8_layers
    from streamgen.models import DTYPE_ENV, FP8_ENV, load_model

    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    monkeypatch.setenv(FP8_ENV, "1")
    model = load_model("debug")
    assert float8_layers(model.dit) > 0
    face, speech = inputs()
    ops = ModelOps(model, "cpu", "float32")
    ops.handle("create", ("s", face, None, 0, None, None, None))
    frames, _ = ops.handle("chunk", ("s", speech[:16000]))
    assert ops.streams["s"].dtype == torch.bfloat16 and frames.dtype == np.uint8 and len(frames) > 0
    ops.close_all()


def test_model_ops_write_a_chunk_into_the_cache_after_replying_with_its_frames():
    from server.model_host import ModelOps
    from streamgen.models import load_model

    face, _ = inputs()
    ops = ModelOps(load_model("debug"), "cpu", "float32")
    ops.handle("create", ("s", face, None, 0, None, None, None))
    ops.handle("chunk", ("s", np.zeros(0, np.float32)))
    assert ops.streams["s"].chunk_pending  # the frames went back first
    ops.after_reply("chunk", ("s", np.zeros(0, np.float32)))
    assert not ops.streams["s"].chunk_pending
    ops.handle("close", ("s",))
    ops.after_reply("chunk", ("s", np.zeros(0, np.float32)))  # a stream closed in between: nothing to do


def test_a_stream_on_the_sp_ranks_writes_its_chunk_as_one_more_operation():
    # the sequence-parallel ranks run a re-encode's collectives together: the scheduler's
    # write after publishing becomes an operation; a model child process writes on its own
    from types import SimpleNamespace

    from server.model_host import ModelHost, ModelOps, RemoteStream
    from server.sp_host import SequenceParallelHost
    from streamgen.models import load_model

    face, _ = inputs()
    ops = ModelOps(load_model("debug"), "cpu", "float32")
    calls = []

    def call(op, *args):
        calls.append(op)
        return ops.handle(op, args)

    for host_type, writes in ((SequenceParallelHost, ["write_pending"]), (ModelHost, [])):
        host = SimpleNamespace(call=call, writes_chunks_itself=host_type.writes_chunks_itself)
        stream = RemoteStream(host, face, None, 0, None, None, None)
        stream.next_chunk()
        calls.clear()
        stream.write_pending_chunk()
        assert calls == writes and ops.streams[stream.id].chunk_pending == (not writes)
        stream.close()
    ops.handle("write_pending", ("closed meanwhile",))  # nothing to write


def test_a_remote_stream_knows_how_many_chunks_fill_its_ring():
    """The server's warm-up runs past a full ring in a model process too (RemoteStream)."""
    from server.model_host import ModelOps, RemoteStream
    from streamgen.models import load_model

    ops = ModelOps(load_model("debug"), "cpu", "float32")

    class Host:  # the child's side, called in this process
        writes_chunks_itself = False

        def call(self, op, *args):
            return ops.handle(op, args)

    remote = RemoteStream(Host(), inputs()[0], None, 0, None, None, None)
    assert remote.chunks_to_full_ring == ops.streams[remote.id].chunks_to_full_ring == 4


def test_a_follower_stopped_by_ctrl_c_lets_go_of_its_model_and_group(monkeypatch):
    """A terminal's Ctrl-C reaches every rank: a follower waiting for its next command left its
    model and process group to the interpreter's shutdown, which printed 600 lines of triton's
    "nanobind: leaked" (and risks a gloo thread aborting the process: docs/parallel.md)."""
    import contextlib

    from server import sp_host

    let_go = []

    class Ops:
        def __init__(self, loaded, device, lanes):
            pass

        def close_all(self):
            let_go.append("streams")

    def interrupted(conn, ops, rank):
        raise KeyboardInterrupt

    def broadcast(box, src):
        box[:] = [("127.0.0.1", 1), b"key"]

    monkeypatch.setattr(sp_host, "load_sharded", lambda *args: (object(), "cpu"))
    monkeypatch.setattr(sp_host, "ModelOps", Ops)
    monkeypatch.setattr(sp_host, "freeze_loaded_heap", lambda: None)
    monkeypatch.setattr(sp_host, "Client", lambda address, authkey: contextlib.nullcontext())
    monkeypatch.setattr(sp_host, "replay", interrupted)
    monkeypatch.setattr(sp_host.dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(sp_host.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(sp_host.dist, "destroy_process_group", lambda: let_go.append("group"))
    with pytest.raises(KeyboardInterrupt):
        sp_host.follow("debug", "cpu", 1, 2)
    assert let_go == ["streams", "group"]
