"""The worker's lanes when their own loop fails, at the server's stop, and under churn: what a
serving user sees of each (the sessions' close reasons, /healthz and /readyz, the creates waiting)."""

from __future__ import annotations

import functools
import json
import logging
import threading
from contextlib import asynccontextmanager, contextmanager

import pytest
from server_helpers import (
    block_lane,
    expect_close,
    new_session,
    ready_client,
    server_config,
    small_model,
    socket_session,
    stream_url,
    until,
)

pytestmark = pytest.mark.timeout(120)


async def a_job_waits_on(worker, lane: int = 0, seconds: float = 5) -> None:
    """Until a job waits on `lane` behind the one it runs (bounded: `seconds`)."""
    await until(lambda: worker._jobs[lane], seconds, failed=f"no job came to wait on lane {lane}")


async def closing_behind_a_chunk(registry, reference):
    """A session of `reference` made, a chunk held under way on its lane (`block_lane`) and its close
    begun behind it: (the session, the chunk's release, the close's task)."""
    import asyncio

    old = await registry.create(reference, None, 0)
    release = await asyncio.to_thread(block_lane, registry.worker, old.lane)
    deleting = asyncio.ensure_future(registry.close(old, "deleted by client"))
    await asyncio.sleep(0)
    return old, release, deleting


@asynccontextmanager
async def a_close_stuck_behind_a_chunk(registry, reference):
    """For the block: a session of `reference` made and its close begun behind a chunk that does not
    end, held on its lane (closing_behind_a_chunk); yields (the session, the close's task). However
    the block ends the chunk is let go; the close is then waited for (bounded)."""
    import asyncio

    old, release, deleting = await closing_behind_a_chunk(registry, reference)
    try:
        yield old, deleting
    finally:
        release.set()
    await asyncio.wait_for(deleting, 30)


async def worker_stopping(worker, seconds: float = 5) -> threading.Thread:
    """The worker's stop begun on a thread of its own (as the app's stop, after the sessions' close),
    once the worker is stopping (bounded: `seconds`); a held lane still runs its chunk."""
    stopping = threading.Thread(target=worker.stop, daemon=True)
    stopping.start()
    await until(lambda: worker._stopping, seconds, failed="the worker's stop did not begin")
    return stopping


@contextmanager
def one_session_registry_counting_streams(monkeypatch, lanes: int = 1):
    """A registry of one session on `lanes` lanes, its worker running, and [streams alive now] and
    [the most alive at once] as StreamSession's start and close count them."""
    from streamgen.stream import StreamSession

    live, most, counting = [0], [0], threading.Lock()  # (the lanes' threads count)
    start, close = StreamSession.start, StreamSession.close

    def counted_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        with counting:
            live[0] += 1
            most[0] = max(most[0], live[0])

    def counted_close(self):
        with counting:
            live[0] -= self.cache is not None
        close(self)

    monkeypatch.setattr(StreamSession, "start", counted_start)
    monkeypatch.setattr(StreamSession, "close", counted_close)
    with running_registry(max_sessions=1, lanes=lanes) as registry:
        yield registry, live, most


@contextmanager
def running_registry(max_sessions: int, lanes: int = 1):
    """A registry of the small model on `lanes` lanes (one by default), its worker running (stopped after)."""
    from server.metrics import ServerMetrics
    from server.registry import SessionRegistry
    from server.scheduler import InferenceWorker

    metrics = ServerMetrics()
    worker = InferenceWorker(metrics, lanes=lanes)
    registry = SessionRegistry(server_config(max_sessions=max_sessions), worker, metrics)
    registry.model, registry.ready = small_model(), True
    worker.start()
    try:
        yield registry
    finally:
        worker.stop()


async def a_lane_failed(worker) -> None:
    """Until a lane's loop has failed (bounded: 5 s)."""
    import asyncio

    for _ in range(500):
        if worker.down:
            return
        await asyncio.sleep(0.01)


def test_a_lane_whose_loop_fails_ends_its_sessions_and_creates_and_says_the_server_is_down(caplog, monkeypatch):
    """An exception in the lane's loop itself (its planning, not a session's chunk) ended its thread
    in silence: its streaming sessions got no more chunks, the creates queued on it waited for ever,
    and /healthz and /readyz said ok."""
    from server.protocol import CloseCode

    with ready_client(max_sessions=4) as client:
        worker = client.app.state.registry.worker
        s = socket_session(client)
        with client.websocket_connect(stream_url(s)) as ws:
            ws.send_text(json.dumps({"type": "start"}))
            assert json.loads(ws.receive_text())["type"] == "ready"
            release = block_lane(worker, lane=0)
            created = []  # (a daemon thread: one that waits for ever must not hold the test's end)
            creating = threading.Thread(target=lambda: created.append(
                client.post("/v1/sessions", json={"avatar": "sample", "seed": 0})), daemon=True)
            creating.start()
            for _ in range(1000):  # (bounded: until the create's job waits on the lane)
                if worker._jobs[0] or not creating.is_alive():
                    break
                release.wait(0.01)
            assert worker._jobs[0], "the create's job never reached the lane"

            def planner_bug(lane):
                raise RuntimeError("planner bug")

            monkeypatch.setattr(worker, "_next", planner_bug)
            with caplog.at_level(logging.ERROR, logger="streamgen.server"):
                release.set()
                creating.join(30)
                assert created, "the create waited on the failed lane"
                code, reason = expect_close(ws, max_messages=1000)
        assert code == CloseCode.GONE
        failure = "inference lane 0 failed: RuntimeError: planner bug"
        assert reason.startswith(f"generation failed: {failure}"), reason
        assert created[0].status_code == 503 and "inference lane 0 failed" in created[0].json()["message"]
        health = client.get("/healthz")
        assert health.status_code == 503 and "inference lane 0 failed" in health.json()["error"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["capacity"] == 0
        assert "inference lane 0 failed" in ready.json()["error"]
        refused = client.post("/v1/sessions", json={"avatar": "sample", "seed": 0})
        assert refused.status_code == 503 and "inference lane 0 failed" in refused.json()["message"]
        tracebacks = [r for r in caplog.records if r.exc_info and "lane 0" in r.getMessage()]
        assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]
        assert client.app.state.registry.sessions == {}


async def test_a_session_that_starts_streaming_on_a_failed_lane_is_ended_with_its_reason(monkeypatch):
    """Created before its lane failed and attached after (its first chunk made already): it went
    into a lane that generates nothing, to wait for chunks until its idle limit."""
    import asyncio
    from types import SimpleNamespace

    from server.metrics import ServerMetrics
    from server.scheduler import InferenceWorker, LaneDown
    from server.session import Session

    worker = InferenceWorker(ServerMetrics(), lanes=2)
    calls = []

    def planner_bug(lane):
        calls.append(lane)
        raise RuntimeError("planner bug")

    monkeypatch.setattr(worker, "_next", lambda lane: planner_bug(lane) if lane == 0 else (None, None, None))
    worker.start()
    try:
        await a_lane_failed(worker)
        assert worker.down == "inference lane 0 failed: RuntimeError: planner bug" and calls == [0]
        with pytest.raises(LaneDown, match="inference lane 0 failed"):
            worker.submit(lambda: None, lane=0)
        ended = []
        stream = SimpleNamespace(width=8, height=8, frames_per_chunk=8, chunk_seconds=0.32,
                                 audio_lookahead_seconds=0.0)  # fmt: skip
        for lane in (0, 1):
            session = Session(f"s{lane}", stream, asyncio.get_running_loop(), max_audio_ahead_s=30.0)
            session.lane, session.fail_handler = lane, lambda s, reason: ended.append((s.id, reason))
            session.attach("websocket", 0.3, 0.0)
            worker.add(session)
        await asyncio.sleep(0)  # (the failure reaches the session on its event loop)
        assert ended == [("s0", "generation failed: inference lane 0 failed: RuntimeError: planner bug")]
        assert worker.streaming == 1 and [s.id for s in worker.lane_sessions(1)] == ["s1"]
    finally:
        worker.stop()


async def test_a_session_closed_as_another_is_made_frees_its_stream_before_that_one_is_made(monkeypatch):
    """Churn: a session's teardown closed its transports first (a peer connection's close takes its
    time) and only then queued its stream's close to the worker, while a session created meanwhile
    (admitted: the closed one no longer counts) had its stream made on the same lane first. Two
    streams' caches lived where the server admits one, more the faster sessions came and went."""
    import asyncio

    from server.avatars import avatar_image

    with one_session_registry_counting_streams(monkeypatch) as (registry, live, most):
        worker = registry.worker
        reference = avatar_image("sample")
        for _ in range(3):
            old = await registry.create(reference, None, 0)
            transport_closed = asyncio.Event()
            old.on_close(transport_closed.wait)  # a transport whose close is under way
            deleting = asyncio.ensure_future(registry.close(old, "deleted by client"))
            await asyncio.sleep(0)
            new = await asyncio.wait_for(registry.create(reference, None, 0), 30)
            transport_closed.set()
            await asyncio.wait_for(deleting, 30)
            await asyncio.wait_for(registry.close(new, "deleted by client"), 30)
        assert live == [0] and most == [1]
        assert worker._lane_load == [0] and registry.sessions == {}


async def test_a_session_closed_on_one_lane_frees_its_stream_before_one_is_made_on_another(monkeypatch):
    """With lanes, a closed session's stream close is ordered before a new stream's making only on
    its own lane: a session created as another closed (admitted, the closed one no longer counted) was
    made at once on an idle lane while the closed one's stream waited for its close behind a chunk on
    its own. Two streams' caches were alive where the server admits one. The create waits for that
    close (a chunk's time), rather than being refused as at capacity (a page reloaded at capacity)."""
    import asyncio

    from server.avatars import avatar_image

    with one_session_registry_counting_streams(monkeypatch, lanes=2) as (registry, live, most):
        worker = registry.worker
        reference = avatar_image("sample")
        old, release, deleting = await closing_behind_a_chunk(registry, reference)  # (a chunk under way on its lane)
        creating = asyncio.ensure_future(registry.create(reference, None, 0))
        for _ in range(100):  # (bounded, 2 s: a stream made meanwhile on the idle lane shows here)
            if most[0] > 1 or creating.done():
                break
            await asyncio.sleep(0.02)
        release.set()  # the chunk ends: the old stream's close runs
        new = await asyncio.wait_for(creating, 30)
        await asyncio.wait_for(deleting, 30)
        assert new.lane != old.lane  # (the idle lane)
        await asyncio.wait_for(registry.close(new, "deleted by client"), 30)
        assert live == [0] and most == [1]
        assert worker._lane_load == [0, 0] and registry.sessions == {}


@pytest.mark.timeout(240)
def test_the_stop_waits_a_bounded_time_for_a_stream_whose_lane_is_stuck_in_a_chunk(monkeypatch):
    """A chunk that never ends (a hung GPU, a deadlock in the model) held the server's stop for ever:
    each closed session's teardown waited for its stream's close, queued behind that chunk on its
    lane, and a SIGTERM never ended the server. The sessions are closed with their reason at once,
    and the stop waits STOP_WAIT_S at most for their streams."""
    import server.registry

    monkeypatch.setattr(server.registry, "STOP_WAIT_S", 0.5)
    serving = ready_client()
    client = serving.__enter__()
    stuck, running = threading.Event(), threading.Event()
    try:
        registry = client.app.state.registry
        # the worker's stop then waits for the stuck lane's thread, its own bound (its `timeout`, 10 s
        # unless given): that wait is the worker's, not the one this test checks, and it ran out in
        # real time at every run; the same join, bounded by 0.5 s
        worker = registry.worker
        monkeypatch.setattr(worker, "stop", functools.partial(type(worker).stop, worker, timeout=0.5))
        s = new_session(client)

        def chunk_that_never_ends():
            running.set()
            stuck.wait(180)  # (bounded: the test's own end)

        registry.worker.submit(chunk_that_never_ends, lane=registry.get(s["id"]).lane)
        assert running.wait(30)
        stopping = threading.Thread(target=serving.__exit__, args=(None, None, None), daemon=True)
        stopping.start()
        stopping.join(90)
        assert not stopping.is_alive(), "the stop waited for the stuck chunk"
        assert registry.ended[s["id"]][1] == "server shutting down" and registry.sessions == {}
    finally:
        stuck.set()


async def test_a_session_whose_stream_is_made_as_the_stop_begins_is_refused_and_its_stream_closed(monkeypatch):
    """Admitted just before the stop, its stream made on its lane as the stop began: the client had a
    201 for a session the stop then closed at once (or, made after the stop's close_all, none
    closed), its stream made ahead of the others' teardowns."""
    import asyncio

    from server.avatars import avatar_image
    from server.registry import AdmissionError
    from streamgen.stream import StreamSession

    closed, close = [], StreamSession.close
    monkeypatch.setattr(StreamSession, "close", lambda self: closed.append(self) or close(self))
    with running_registry(max_sessions=2) as registry:
        worker, metrics = registry.worker, registry.metrics
        release = await asyncio.to_thread(block_lane, worker)
        creating = asyncio.ensure_future(registry.create(avatar_image("sample"), None, 0))
        await a_job_waits_on(worker)  # (its stream's job)
        registry.stopping.set()
        release.set()
        with pytest.raises(AdmissionError, match="shutting down"):
            await asyncio.wait_for(creating, 30)
        for _ in range(500):  # (bounded: its stream's close runs on the lane)
            if closed and worker._lane_load == [0]:
                break
            await asyncio.sleep(0.01)
        assert len(closed) == 1 and closed[0].cache is None
        assert registry.sessions == {} and worker._lane_load == [0] and registry._creating == 0
        assert metrics.sessions_rejected.labels("stopping")._value.get() == 1


async def test_a_create_whose_stream_waits_on_its_lane_as_the_worker_stops_is_refused_as_the_stop():
    """The server's stop cancels the jobs still queued on the lanes (the worker's stop, after the
    sessions' close): a create whose stream waited there behind a chunk had its await cancelled, and
    the CancelledError went out of the handler (POST /v1/sessions, a WHEP offer) where a client is
    told 503 'server is shutting down'."""
    import asyncio

    from server.avatars import avatar_image
    from server.registry import AdmissionError

    with running_registry(max_sessions=2) as registry:
        worker, metrics = registry.worker, registry.metrics
        release = await asyncio.to_thread(block_lane, worker)
        creating = asyncio.ensure_future(registry.create(avatar_image("sample"), None, 0))
        await a_job_waits_on(worker)  # (its stream's job)
        registry.stopping.set()  # (as the app's stop: its sessions closed, then the worker stopped)
        stopping = await worker_stopping(worker)
        release.set()  # the lane sees the stop and cancels the stream's job
        with pytest.raises(AdmissionError, match="server is shutting down") as refused:
            await asyncio.wait_for(creating, 30)
        assert refused.value.retry_after == 5
        await asyncio.to_thread(stopping.join, 30)
        assert registry.sessions == {} and worker._lane_load == [0] and registry._creating == 0
        assert metrics.sessions_rejected.labels("stopping")._value.get() == 1


async def test_a_session_waiting_for_its_client_on_a_failed_lane_is_ended_at_the_next_limits_check(monkeypatch):
    """Created on a lane that failed after its first chunk was made, and not streaming yet: it was
    left for its client to find (GET /v1/sessions/{id} said it lived) until its unclaimed limit."""
    import asyncio
    from types import SimpleNamespace

    from server.metrics import ServerMetrics
    from server.registry import SessionRegistry
    from server.scheduler import InferenceWorker
    from server.session import Session

    metrics = ServerMetrics()
    worker = InferenceWorker(metrics, lanes=2)
    registry = SessionRegistry(server_config(max_sessions=2), worker, metrics)
    monkeypatch.setattr(worker, "_next", lambda lane: (None, None, None) if lane else 1 / 0)
    worker.start()
    try:
        await a_lane_failed(worker)
        stream = SimpleNamespace(width=8, height=8, frames_per_chunk=8, chunk_seconds=0.32,
                                 audio_lookahead_seconds=0.0, close=lambda: None)  # fmt: skip
        for lane in (0, 1):
            session = Session(f"s{lane}", stream, asyncio.get_running_loop(), max_audio_ahead_s=30.0)
            session.lane = worker.take_lane()
            registry.sessions[session.id] = session
        assert [s.lane for s in registry.sessions.values()] == [0, 1]
        await registry.enforce_limits()
        assert list(registry.sessions) == ["s1"]
        failure = "inference lane 0 failed: ZeroDivisionError: division by zero"
        assert registry.ended["s0"][1] == f"generation failed: {failure}"
        assert worker._lane_load == [0, 1]
    finally:
        worker.stop()


async def test_a_stream_made_for_a_create_whose_client_left_is_closed_before_the_next_one_is_made(monkeypatch):
    """Churn again: a page reloaded while its session was made (its POST cancelled) left the stream
    being made on its lane, its close queued only once it was made, behind the stream of the
    reloaded page's next POST: two caches where the server admits one."""
    import asyncio

    from server.avatars import avatar_image

    with one_session_registry_counting_streams(monkeypatch) as (registry, live, most):
        worker = registry.worker
        reference = avatar_image("sample")
        making, made = threading.Event(), threading.Event()
        new_stream = registry._new_stream

        def held_new_stream(*args):  # the first one held while it is being made
            if not making.is_set():
                making.set()
                made.wait(30)
            return new_stream(*args)

        monkeypatch.setattr(registry, "_new_stream", held_new_stream)
        left = asyncio.ensure_future(registry.create(reference, None, 0))
        assert await asyncio.to_thread(making.wait, 30)
        left.cancel()  # its client went away while its stream was being made
        with pytest.raises(asyncio.CancelledError):
            await left
        creating = asyncio.ensure_future(registry.create(reference, None, 0))  # (admitted: none counted)
        await a_job_waits_on(worker)  # (its stream's job)
        made.set()
        session = await asyncio.wait_for(creating, 30)
        await asyncio.wait_for(registry.close(session, "deleted by client"), 30)
        for _ in range(500):  # (bounded: the left stream's close, if it came last)
            if live == [0]:
                break
            await asyncio.sleep(0.01)
        assert live == [0] and most == [1]
        assert worker._lane_load == [0] and registry.sessions == {}


async def test_a_close_queued_on_a_lane_as_it_fails_ends_its_session_without_an_error(monkeypatch):
    """The stream's close job failed with the lane (LaneDown), and the session's close raised it to
    its caller (a DELETE's 500)."""
    import asyncio
    from types import SimpleNamespace

    from server.metrics import ServerMetrics
    from server.registry import SessionRegistry
    from server.scheduler import InferenceWorker
    from server.session import Session

    metrics = ServerMetrics()
    worker = InferenceWorker(metrics)
    registry = SessionRegistry(server_config(max_sessions=2), worker, metrics)
    worker.start()
    try:
        stream = SimpleNamespace(width=8, height=8, frames_per_chunk=8, chunk_seconds=0.32,
                                 audio_lookahead_seconds=0.0, close=lambda: None)  # fmt: skip
        session = Session("s", stream, asyncio.get_running_loop(), max_audio_ahead_s=30.0)
        session.lane = worker.take_lane()
        registry.sessions[session.id] = session
        release = await asyncio.to_thread(block_lane, worker)
        closing = asyncio.ensure_future(registry.close(session, "deleted by client"))
        await a_job_waits_on(worker)  # (its stream's close)
        monkeypatch.setattr(worker, "_next", lambda lane: 1 / 0)
        release.set()
        await asyncio.wait_for(closing, 30)  # (no LaneDown)
        assert worker.down and registry.ended["s"][1] == "deleted by client" and worker._lane_load == [0]
    finally:
        worker.stop()


async def test_a_create_waiting_for_a_closing_stream_as_the_worker_stops_is_refused_as_the_stop():
    """A create that waited for a closed session's stream to be freed on another lane (its close
    queued behind a chunk there) went on to the worker once the stop had cancelled that close: the
    worker, stopped, refused its stream's job, and the client was told 'server is shutting down'
    with Retry-After 1, counted as `busy` in /metrics, where every other refusal at the stop is
    `stopping` with Retry-After 5."""
    import asyncio

    from prometheus_client import generate_latest

    from server.avatars import avatar_image
    from server.registry import AdmissionError

    with running_registry(max_sessions=1, lanes=2) as registry:
        worker, metrics = registry.worker, registry.metrics
        reference = avatar_image("sample")
        old, release, deleting = await closing_behind_a_chunk(registry, reference)  # (a chunk under way on its lane)
        creating = asyncio.ensure_future(registry.create(reference, None, 0))
        await until(lambda: registry._creating == 1, failed="the create did not begin")
        assert not creating.done()  # (waiting for the old stream's close)
        registry.stopping.set()  # (as the app's stop: its sessions closed, then the worker stopped)
        stopping = await worker_stopping(worker)
        release.set()  # the lane sees the stop and cancels the old stream's close
        with pytest.raises(AdmissionError, match="^server is shutting down$") as refused:
            await asyncio.wait_for(creating, 30)
        assert refused.value.retry_after == 5
        await asyncio.wait_for(deleting, 30)
        await asyncio.to_thread(stopping.join, 30)
        assert registry.sessions == {} and worker._lane_load == [0, 0] and registry._creating == 0
        rejected = [line for line in generate_latest(metrics.registry).decode().splitlines()
                    if line.startswith("streamgen_sessions_rejected_total{")]  # fmt: skip
        assert rejected == ['streamgen_sessions_rejected_total{reason="stopping"} 1.0']


async def test_a_create_waiting_for_a_stream_closing_on_a_stuck_lane_is_refused_in_bounded_time(monkeypatch):
    """A create that needs a closed session's stream freed on another lane first (at capacity, a page
    reloaded) waited for that close with no limit: where the lane hung in a chunk (a stuck GPU), the
    POST hung until its client gave up. It waits CLOSING_STREAM_WAIT_S, then is refused 503 saying
    why, its lane and its place in the count given back; once the lane frees, a create is made."""
    import asyncio

    import server.registry
    from server.avatars import avatar_image
    from server.registry import AdmissionError

    monkeypatch.setattr(server.registry, "CLOSING_STREAM_WAIT_S", 0.3)
    with running_registry(max_sessions=1, lanes=2) as registry:
        worker, metrics = registry.worker, registry.metrics
        reference = avatar_image("sample")
        async with a_close_stuck_behind_a_chunk(registry, reference) as (old, deleting):
            with pytest.raises(AdmissionError) as refused:
                await asyncio.wait_for(registry.create(reference, None, 0), 20)
            assert refused.value.reason == (
                f"server is busy: a closed session's stream is still held on inference lane {old.lane} "
                "(its close waited 0.3 s behind a chunk there)"
            )
            assert refused.value.retry_after == 1
            assert metrics.sessions_rejected.labels("busy")._value.get() == 1
            assert registry._creating == 0 and registry.sessions == {}
            assert worker._lane_load[old.lane] == 1 and worker._lane_load[1 - old.lane] == 0  # (the old's alone)
            assert not deleting.done()
        new = await asyncio.wait_for(registry.create(reference, None, 0), 30)  # (the lane freed: room again)
        await asyncio.wait_for(registry.close(new, "deleted by client"), 30)
        assert registry.sessions == {} and worker._lane_load == [0, 0] and registry._creating == 0


async def test_a_create_waiting_for_a_stuck_lane_is_refused_as_the_stop_as_soon_as_it_begins(monkeypatch):
    """The stop began while the create waited for a closing stream on a stuck lane: the create went
    on waiting out CLOSING_STREAM_WAIT_S (5 s of a stop's time, its client held) before it was given
    the stop's answer. The stop's beginning wakes it: refused as the stop at once (the wait made
    an hour here, the bound below only a guard against a hang)."""
    import asyncio

    import server.registry
    from server.avatars import avatar_image
    from server.registry import AdmissionError

    monkeypatch.setattr(server.registry, "CLOSING_STREAM_WAIT_S", 3600.0)
    with running_registry(max_sessions=1, lanes=2) as registry:
        reference = avatar_image("sample")
        async with a_close_stuck_behind_a_chunk(registry, reference) as (old, _):
            creating = asyncio.ensure_future(registry.create(reference, None, 0))
            await asyncio.sleep(0.05)
            assert not creating.done() and registry._creating == 1  # (waiting for the old stream's close)
            registry.stopping.set()  # (as the app's stop begins)
            await asyncio.wait([creating], timeout=10)  # (a guard against a hang, within block_lane's 30 s hold)
            assert creating.done(), "the create still waits for the stuck lane after the stop began"
            with pytest.raises(AdmissionError, match="^server is shutting down$") as refused:
                creating.result()
            assert refused.value.retry_after == 5 and registry._creating == 0
            assert registry.metrics.sessions_rejected.labels("stopping")._value.get() == 1
            # (not woken by the old stream's close: it still waits behind the stuck chunk)
            assert [on for on, close in registry._streams_closing if not close.done()] == [old.lane]
        assert registry.worker._lane_load == [0, 0]


def test_the_stop_begins_from_a_signal_handler_that_interrupted_a_waits_registration():
    """uvicorn sets the stop from its signal handler (signal.signal: run on the main thread between
    two bytecodes), which may interrupt the event loop inside StopBegun's own bookkeeping: a plain
    lock held there was taken again by the handler, and the server hung at its Ctrl-C."""
    import asyncio
    import threading

    from server.stop_event import StopBegun

    stopping, loop = StopBegun(), asyncio.new_event_loop()
    try:
        waiter = loop.create_future()
        stopping.wake_at_set(waiter)
        interrupted = threading.Thread(target=lambda: [stopping._waiters_lock.acquire(), stopping.set()], daemon=True)
        interrupted.start()  # (one thread: holding the lock, as the loop's frame was, it sets the stop)
        interrupted.join(10)
        assert not interrupted.is_alive(), "set() waited for the lock its own thread held"
        loop.run_until_complete(asyncio.wait_for(waiter, 10))  # woken
    finally:
        loop.close()


def test_the_stop_begins_from_a_signal_handler_that_interrupted_the_events_own_set():
    """A second Ctrl-C (or a SIGTERM after it) runs uvicorn's handler again, on the main thread, and
    may interrupt the first set() of the stop (or the shutdown's, on the event loop) inside the
    Event's own lock: held by the thread the handler runs on, a plain lock hung the server there."""
    import threading

    from server.stop_event import StopBegun

    stopping = StopBegun()
    interrupted = threading.Thread(target=lambda: [stopping._cond.acquire(), stopping.set()], daemon=True)
    interrupted.start()  # (one thread: holding the Event's lock, as the first set() was, it sets the stop)
    interrupted.join(10)
    assert not interrupted.is_alive(), "set() waited for the Event's lock its own thread held"
    assert stopping.is_set()


async def test_a_create_whose_wait_for_a_stuck_lane_runs_out_during_the_stop_is_refused_as_the_stop(monkeypatch):
    """The stop began while the create waited for a closing stream on a stuck lane: its refusal is the
    stop's ('server is shutting down', Retry-After 5, `stopping`), not busy's 'try again in a second'."""
    import asyncio

    import server.registry
    from server.avatars import avatar_image
    from server.registry import AdmissionError

    monkeypatch.setattr(server.registry, "CLOSING_STREAM_WAIT_S", 0.3)
    with running_registry(max_sessions=1, lanes=2) as registry:
        reference = avatar_image("sample")
        async with a_close_stuck_behind_a_chunk(registry, reference):
            creating = asyncio.ensure_future(registry.create(reference, None, 0))
            await asyncio.sleep(0)
            registry.stopping.set()
            with pytest.raises(AdmissionError, match="^server is shutting down$") as refused:
                await asyncio.wait_for(creating, 20)
            assert refused.value.retry_after == 5 and registry._creating == 0
            assert registry.metrics.sessions_rejected.labels("stopping")._value.get() == 1
            assert registry.metrics.sessions_rejected.labels("busy")._value.get() == 0
        assert registry.worker._lane_load == [0, 0]
