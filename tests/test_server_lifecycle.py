"""The server's life and its sessions': warm-up, capacity, lanes, the worker's queue, sessions that end while they are made or streamed."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient
from server_helpers import auth, block_lane, make_app, new_session, ready_client, server_config, wait_ready

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=3) as c:
        yield c


def test_an_offer_that_arrives_after_its_session_ended_is_a_404(client, monkeypatch):
    """DELETE while the offer was still uploading: the answer was a 201 for the deleted session,
    its peer connection open for good and its stream back in the worker."""
    from server import routes

    registry = client.app.state.registry
    s = new_session(client)

    async def deleted_meanwhile(request):  # the offer's upload, over which the DELETE came
        await request.body()
        await registry.close(registry.get(s["id"]), "deleted by client")
        return "an offer, checked later"

    monkeypatch.setattr(routes, "_read_offer", deleted_meanwhile)
    r = client.post(s["whep"], content=b"v=0\r\n", headers={"content-type": "application/sdp", **auth(s["token"])})
    assert r.status_code == 404 and "deleted by client" in r.json()["message"]
    assert registry.worker.streaming == 0 and s["id"] not in registry.sessions


def test_a_closed_session_never_streams_again(client):
    """Whatever transport reaches `start_streaming` after the session ended (its awaits span a close)."""
    from server.registry import SessionEnded

    registry = client.app.state.registry
    s = new_session(client)
    session = registry.get(s["id"])
    client.delete(s["resource"], headers=auth(s["token"]))
    with pytest.raises(SessionEnded, match="deleted by client"):
        registry.start_streaming(session, "whep")
    assert registry.worker.streaming == 0


def test_a_stream_made_for_a_cancelled_create_is_closed(client, monkeypatch):
    """The caller of create left (its client gone, or shutdown) while the worker made the stream:
    no session holds it, and a model process kept it and its cache for good."""
    import asyncio
    import threading

    registry = client.app.state.registry
    making, made, closed = threading.Event(), threading.Event(), threading.Event()

    class Made:
        def close(self):
            closed.set()

    def slow_new_stream(*args):  # worker thread
        making.set()
        made.wait(10)
        return Made()

    monkeypatch.setattr(registry, "_new_stream", slow_new_stream)
    reference = np.zeros((64, 64, 3), np.uint8)

    async def cancel_while_making():
        task = asyncio.ensure_future(registry.create(reference, None, 0))
        await asyncio.to_thread(making.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        made.set()
        return await asyncio.to_thread(closed.wait, 10)

    sessions_before = set(registry.sessions)
    assert client.portal.call(cancel_while_making)
    assert set(registry.sessions) == sessions_before


def test_capacity_from_measured_chunk_time():
    from server.metrics import ServerMetrics
    from server.scheduler import InferenceWorker

    worker = InferenceWorker(ServerMetrics())
    assert worker.capacity(0.32, limit=8) == 8  # nothing measured yet: the limit
    worker.chunk_time_ema = 0.1
    assert worker.capacity(0.32, limit=8) == 2  # 0.85 * 0.32 / 0.1 = 2.7
    worker.chunk_time_ema = 1.0
    assert worker.capacity(0.32, limit=8) == 1  # never below one
    worker.chunk_time_ema = 0.01
    assert worker.capacity(0.32, limit=8) == 8


def test_the_warm_up_runs_past_the_first_chunk_that_attends_to_a_full_ring(monkeypatch):
    """Every attention length of a stream runs before the server is ready, so that no served
    stream meets one first (on a GPU: cuDNN's plans, the autotuner's timings)."""
    from streamgen.stream import StreamSession

    made, ring_seen = [], []
    next_chunk = StreamSession.next_chunk

    def counting(self, observe=None):
        made.append(self)

        def seeing(stage, fn):
            if stage == "denoise":  # after the last chunk's re-encode: what this chunk attends to
                ring_seen.append(self.cache.ring_tokens_filled())
            return fn()

        return next_chunk(self, seeing)

    monkeypatch.setattr(StreamSession, "next_chunk", counting)
    with TestClient(make_app(warmup_chunks=None)) as c:
        wait_ready(c)
    (stream,) = set(made)
    cfg = stream.cfg
    first_full = stream.chunks_to_full_ring
    assert first_full == -(-cfg.window_frames // cfg.frames_per_chunk) + 1 > 1
    assert len(made) == first_full + 2  # and two more at the steady length: the capacity's chunks
    hp, wp = stream.dit.grid(stream.latent_hw)
    full = cfg.window_frames * hp * wp
    assert ring_seen[first_full - 1] == full and ring_seen[first_full - 2] < full
    assert ring_seen[first_full:] == [full, full]


def test_sessions_spread_over_the_lanes_and_give_theirs_back(monkeypatch):
    """`serve --lanes 2`: the warm-up runs a stream on each lane at once (the capacity counts what
    they take from each other), each new session goes on the lane with the fewest, and its lane
    is free again once it is torn down (its first chunk and its teardown ran there)."""
    import threading
    import time

    from streamgen.stream import StreamSession

    warmed_on = set()
    next_chunk = StreamSession.next_chunk

    def recording(self, observe=None):
        warmed_on.add(threading.current_thread().name)
        return next_chunk(self, observe)

    monkeypatch.setattr(StreamSession, "next_chunk", recording)
    app = make_app(lanes=2)
    with TestClient(app) as c:
        wait_ready(c)
        assert warmed_on == {"inference-worker-0", "inference-worker-1"}
        registry = app.state.registry
        assert registry.worker.lanes == 2
        made = [new_session(c) for _ in range(3)]
        assert sorted(registry.get(s["id"]).lane for s in made) == [0, 0, 1]
        for s in made:
            assert c.delete(s["resource"], headers=auth(s["token"])).status_code in (200, 204)
        deadline = time.monotonic() + 10
        while registry.worker._lane_load != [0, 0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert registry.worker._lane_load == [0, 0]


def test_the_warm_up_imports_the_webrtc_stack_before_the_server_is_ready(monkeypatch):
    """aiortc and PyAV take ~0.25 s to import: the warm-up, not the first viewer's offer, pays it
    (the first WHEP answer measured 190 ms then, 10 ms now)."""
    import importlib

    import server.app

    imported = []
    import_module = importlib.import_module

    def recording(name, *args):
        imported.append(name)
        return import_module(name, *args)

    monkeypatch.setattr(server.app.importlib, "import_module", recording)
    with TestClient(make_app()) as c:
        wait_ready(c)
    assert "server.webrtc" in imported


def test_a_failed_warm_up_reports_its_first_line(monkeypatch):
    """/readyz says why the model is not ready in a line, however long the error (a compiler's
    output runs to pages; the log keeps all of it)."""
    import time

    from streamgen.stream import StreamSession

    def failing(self, observe=None):
        raise RuntimeError("C++ compile error\n" + "g++: fatal error\n" * 500)

    monkeypatch.setattr(StreamSession, "next_chunk", failing)
    with TestClient(make_app()) as c:
        deadline = time.monotonic() + 30
        while "error" not in (ready := c.get("/readyz")).json() and time.monotonic() < deadline:
            time.sleep(0.05)
        # it was healthy to a supervisor, and told clients it was still loading, for ever
        health, created = c.get("/healthz"), c.post("/v1/sessions", json={})
    assert ready.status_code == 503 and ready.json()["error"] == "RuntimeError: C++ compile error"
    assert health.status_code == 503
    assert health.json()["error"] == "the model failed to load: RuntimeError: C++ compile error"
    assert created.status_code == 503
    assert "the model failed to load: RuntimeError" in created.json()["message"]


def test_serve_ends_when_its_model_cannot_load(tmp_path):
    """A model whose weights were cut short: serve kept running, /healthz 200, every session "model
    is still loading", until someone killed it. It ends now, exit code 2, saying why."""
    import shutil
    import subprocess
    import sys

    from streamgen.models import MODELS_DIR

    broken = tmp_path / "broken"
    shutil.copytree(MODELS_DIR / "tiny-avatar", broken)
    weights = broken / "dit.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    served = subprocess.run(
        [sys.executable, "-m", "streamgen", "serve", "--model", str(broken), "--port", "0"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert served.returncode == 2, served.stderr[-2000:]
    last = served.stderr.strip().splitlines()[-1]
    assert last.startswith("streamgen serve: error: the model did not load: ValueError:"), last


def test_what_the_warm_up_loaded_is_kept_out_of_the_collector_while_serving():
    """A full collection over torch, the model and the WebRTC stack took 50-60 ms with the GIL
    held (every thread stalls): frozen at ready, given back at shutdown."""
    import gc

    with TestClient(make_app()) as c:
        wait_ready(c)
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


def test_readyz_says_what_the_warm_up_is_doing(monkeypatch):
    import threading

    from streamgen.stream import StreamSession

    release = threading.Event()
    next_chunk = StreamSession.next_chunk

    def held(self, observe=None):
        release.wait(30)
        return next_chunk(self, observe)

    monkeypatch.setattr(StreamSession, "next_chunk", held)
    with TestClient(make_app()) as c:
        try:
            ready = c.get("/readyz")
            while ready.json().get("stage") == "loading the model":
                ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["stage"] == "warming up a stream"
        finally:
            release.set()
        assert "stage" not in wait_ready(c)


def test_a_session_deleted_while_the_queue_is_full_still_closes_its_stream(client):
    """The teardown's close job met a full queue (a client's burst of captions), dropped the
    stream without closing it on its lane: a batch in progress then failed every session in it,
    and a model process kept the stream for good."""
    import time

    from server.scheduler import WorkerBusy

    registry = client.app.state.registry
    worker = registry.worker
    s = new_session(client)
    stream = registry.get(s["id"]).stream
    release = block_lane(worker, registry.get(s["id"]).lane)
    try:
        for _ in range(worker.max_jobs + 1):
            worker.submit(lambda: None, lane=0)
        raise AssertionError("the queue did not fill")
    except WorkerBusy:
        pass
    submit, queue_full_at_close = worker.submit, []

    def submit_then_release(fn, *args, **kwargs):
        # the DELETE awaits the close job: free the lane once the job is queued, not when the
        # blocking job gives up waiting
        future = submit(fn, *args, **kwargs)
        if fn == stream.close:
            queue_full_at_close.append(worker.waiting() > worker.max_jobs)
            release.set()
        return future

    worker.submit = submit_then_release
    try:
        assert client.delete(s["resource"], headers=auth(s["token"])).status_code == 204
    finally:
        del worker.submit
        release.set()
    assert queue_full_at_close == [True]  # queued past the full queue, not dropped
    for _ in range(200):  # bounded: 10 s
        if stream.cache is None:
            break
        time.sleep(0.05)
    assert stream.cache is None and not stream.started  # closed on its lane, after the queue


def test_the_queue_depth_counts_every_lane_and_the_fps_falls_when_streams_stop(monkeypatch):
    import time

    from server import metrics as metrics_module
    from server.metrics import ServerMetrics
    from server.scheduler import InferenceWorker

    metrics = ServerMetrics()

    def gauge(name: str) -> float:
        line = next(x for x in metrics.render().decode().splitlines() if x.startswith(name + " "))
        return float(line.split()[-1])

    worker = InferenceWorker(metrics, lanes=2)
    worker.start()
    try:
        release = block_lane(worker, lane=0)
        for _ in range(3):
            worker.submit(lambda: None, lane=0)
        # wakes lane 1, which set the gauge to its own 0; waited for (after a 0.2 s sleep, a lane
        # held off the cores 0.3 s had not taken it yet, and the gauge said 4)
        worker.submit(lambda: None, lane=1).result(timeout=10)
        assert gauge("streamgen_queue_depth") == 3
        release.set()
    finally:
        worker.stop()
    metrics.chunk_done(0.1, 12)
    assert gauge("streamgen_generated_fps") == 12 / 5
    later = time.monotonic() + 10
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: later)
    assert gauge("streamgen_generated_fps") == 0  # it kept the last rate for good


def test_a_first_chunk_job_after_the_schedule_made_chunk_0_makes_nothing():
    """The job waited behind due chunks while a transport attached and the schedule made chunk 0:
    it then made chunk 1 ahead of its time, before its audio could come (silence in its place)."""
    from types import SimpleNamespace

    from server.registry import SessionRegistry

    made = []
    registry = SimpleNamespace(worker=SimpleNamespace(run_chunk=lambda s: made.append(s.chunk_index) or "chunk"))
    assert SessionRegistry._make_first_chunk(registry, SimpleNamespace(chunk_index=0, closed=False)) == "chunk"
    assert SessionRegistry._make_first_chunk(registry, SimpleNamespace(chunk_index=1, closed=False)) is None
    assert made == [0]


def test_a_session_whose_client_left_while_it_was_made_is_closed(client, monkeypatch):
    """A page reloaded while its POST was answered: no one knew the session, and it held a place
    until the idle limit (a full server refused the reloaded page)."""
    from starlette.requests import Request

    async def gone(self):
        return True

    before = set(client.app.state.registry.sessions)
    monkeypatch.setattr(Request, "is_disconnected", gone)
    r = client.post("/v1/sessions", json={"avatar": "sample"})
    assert r.status_code == 400 and r.json()["error"] == "client_gone"
    assert set(client.app.state.registry.sessions) == before


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


def test_the_access_log_holds_no_session_token():
    """uvicorn logged each request line as it came: every WebSocket's and WHEP resource's
    `?token=` was in the log, for whoever reads it."""
    import logging

    import uvicorn
    from uvicorn.logging import AccessFormatter

    from server.uvicorn_server import SessionClosingServer

    SessionClosingServer(uvicorn.Config(make_app(), log_level="info"))  # (as serve runs it)
    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "DELETE", "/v1/sessions/ab?token=Se-cr_et&x=1", "1.1", 204),
                               None)  # fmt: skip
    socket = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/v1/sessions/ab/stream?token=Se-cr_et"), None)  # fmt: skip
    for record in (access, socket):
        logger = logging.getLogger(record.name)
        assert all(f.filter(record) for f in logger.filters)
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(access)
    assert line == '127.0.0.1:5 - "DELETE /v1/sessions/ab?token=...&x=1 HTTP/1.1" 204 No Content'
    assert socket.getMessage() == '127.0.0.1:5 - "WebSocket /v1/sessions/ab/stream?token=..." [accepted]'


@pytest.mark.parametrize("error, closed", [(RuntimeError("CUDA error: out of memory"), True), ("host", False)])
def test_a_first_chunk_the_model_fails_ends_its_session_and_is_logged(caplog, error, closed):
    """torch's errors are RuntimeErrors, which were taken for a shutdown: unlogged, the session left
    to fail again on its schedule. A model process gone (HostDown) is not this session's to end."""
    import concurrent.futures
    from types import SimpleNamespace

    from server.model_host import HostDown
    from server.registry import SessionRegistry

    error = HostDown("the model process exited") if error == "host" else error
    job = concurrent.futures.Future()
    job.set_exception(error)
    ended = []

    async def close(session, reason):
        ended.append(reason)

    registry = SimpleNamespace(worker=SimpleNamespace(submit=lambda *a, **k: job), close=close,
                               _make_first_chunk=None)  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="streamgen.server"):
        asyncio.run(SessionRegistry._first_chunk(registry, SimpleNamespace(id="s1", lane=0)))
    assert ended == (["generation failed: CUDA error: out of memory"] if closed else [])
    assert ("first chunk failed" in caplog.text) == closed


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
    from server.model_host import HostDown, ModelHost

    host = object.__new__(ModelHost)  # (no process spawned: one that is killed and waited for)
    host._down, host._killed_at_stop, host.answer_timeout = None, None, 2.0
    read_meanwhile = []

    class KilledProcess:
        exitcode = None

        def kill(self):
            self.exitcode = -9

        def join(self, timeout=None):  # the event loop reads the host's state while the worker waits here
            read_meanwhile.append(host.down)

    host.process = KilledProcess()
    with pytest.raises(HostDown) as raised:
        host._stop_stuck("chunk")
    said = "the model process gave no answer to 'chunk' in 2 s (stuck: it was killed)"
    assert (str(raised.value), host.down, read_meanwhile) == (said, said, [said])


class ProcessEndingLate:
    """A model process whose pipe has closed and which the kernel reaps `exits_after` seconds of
    joins later (a process killed with a GPU context closes its pipe first and releases its device
    memory after: seconds), or never (None: it closed its pipe itself and hangs in its teardown)."""

    def __init__(self, exits_after: float | None, host):
        self.exits_after, self.waited, self.exitcode, self.killed = exits_after, 0.0, None, False
        self.host, self.read_meanwhile = host, []  # (the host's `down`, read as /healthz reads it while it waits)

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


def test_a_token_whose_name_is_percent_encoded_is_not_in_the_log_either():
    """`?%74oken=` is read as `token` (the query's names are decoded): it was logged as it came."""
    from starlette.datastructures import QueryParams

    from server.uvicorn_server import TokenRedactingLog

    for query in ("%74oken=Se-cr_et", "to%6Ben=Se-cr_et", "%74%6F%6B%65%6E=Se-cr_et"):
        assert QueryParams(query).get("token") == "Se-cr_et"
        record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                                   ("127.0.0.1:5", f"/v1/sessions/ab/stream?{query}"), None)  # fmt: skip
        assert TokenRedactingLog().filter(record)
        assert "Se-cr_et" not in record.getMessage() and "=..." in record.getMessage(), record.getMessage()
