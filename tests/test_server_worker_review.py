"""The worker's sessions under churn, failures and closes: what a closed session still costs it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("closed, chunk_index, generated", [(True, 0, False), (False, 0, True), (False, 1, False)])
def test_the_first_chunk_of_a_session_closed_before_its_turn_is_not_generated(closed, chunk_index, generated):
    """Created and deleted at once (a page reloaded, a client's retry): its first chunk's job still
    waited on its lane, ahead of its stream's close, and the worker generated a chunk no one would
    see, a whole chunk's time taken from the streaming sessions' next chunks."""
    from server.registry import SessionRegistry

    made = []
    registry = SimpleNamespace(worker=SimpleNamespace(run_chunk=lambda s: made.append(s) or "chunk 0"))
    session = SimpleNamespace(id="s1", closed=closed, chunk_index=chunk_index)
    chunk = SessionRegistry._make_first_chunk(registry, session)
    assert (made == [session]) == generated
    assert (chunk == "chunk 0") == generated


def test_a_chunk_that_arrives_after_its_session_closed_is_dropped_uncounted():
    """Closed while the worker generated its chunk (DELETE, a limit, its socket): the chunk still
    went into its closed slots, where a WebSocket's sender took it and sent it after the session's
    end, and a chunk past its play time was counted in streamgen_late_chunks_total (or a dropped
    chunk, over one not taken) for a session that was gone."""
    import asyncio

    import numpy as np

    from server.session import Chunk, Session

    stream = SimpleNamespace(width=8, height=8, frames_per_chunk=8, chunk_seconds=0.32, audio_lookahead_seconds=0.0)
    now = [100.0]
    session = Session("s", stream, asyncio.new_event_loop(), max_audio_ahead_s=30.0, clock=lambda: now[0])
    session.loop.close()  # only its identity is kept
    late, dropped = [], []
    session.on_late = lambda: late.append(1)
    session.attach("websocket", 0.2, first_delay=0.0)
    slot = session.add_slot(on_drop=lambda: dropped.append(1))
    frames = np.zeros((8, 8, 8, 3), np.uint8)

    def chunk(index: int) -> Chunk:
        return Chunk(frames, index * 0.32, np.zeros(5120, np.int16), 25.0, index, 0.0)

    session.publish(chunk(1))  # not taken yet when the session closes
    session.closed, session.streaming = True, False  # as SessionRegistry.close does, then its closers
    asyncio.run(session.run_closers())
    now[0] += 5.0  # the chunk generated meanwhile arrives well past its play time
    session.publish(chunk(2))
    assert late == [] and dropped == []
    assert slot.take_nowait().index == 1  # chunk 2 never reached the slot


async def test_a_session_the_worker_failed_leaves_its_lane_group_as_a_closed_one_does(monkeypatch):
    """A streaming session whose chunk failed was closed as no longer streaming (the worker had
    said so), so it never left its group: the sessions held back to play later for the batch it
    made bigger (`hold_back`) kept that longer delay for good, the batch smaller without it."""
    import asyncio

    from server.config import ServerConfig
    from server.metrics import ServerMetrics
    from server.registry import SessionRegistry
    from server.scheduler import InferenceWorker
    from server.session import Session

    metrics = ServerMetrics()
    worker = InferenceWorker(metrics)
    registry = SessionRegistry(ServerConfig(), worker, metrics)
    left, closed = [], []
    monkeypatch.setattr(registry, "_leave_lane_group", lambda s: left.append(s.id))
    worker.start()
    try:
        for name, fails in (("deleted", False), ("failed", True)):
            stream = SimpleNamespace(width=8, height=8, frames_per_chunk=8, chunk_seconds=0.32,
                                     audio_lookahead_seconds=0.0, close=lambda name=name: closed.append(name))  # fmt: skip
            session = Session(name, stream, asyncio.get_running_loop(), max_audio_ahead_s=30.0)
            session.fail_handler = lambda s, reason: asyncio.ensure_future(registry.close(s, reason))
            session.lane = worker.take_lane()
            registry.sessions[session.id] = session
            session.attach("websocket", 0.3, 0.0)
            worker.add(session)
            if fails:
                worker._fail([session], RuntimeError("CUDA error: an illegal memory access"))
            else:
                asyncio.ensure_future(registry.close(session, "deleted by client"))
            for _ in range(500):  # (bounded: the close runs on this loop, its stream's on the worker)
                if session.teardown is not None and session.teardown.done():
                    break
                await asyncio.sleep(0.01)
            assert closed[-1] == name and session.close_reason.startswith("generation failed" if fails else "deleted")
        assert left == ["deleted", "failed"]
        assert worker.streaming == 0 and registry.sessions == {} and worker._lane_load == [0]
    finally:
        worker.stop()


def test_sessions_made_and_deleted_at_once_leave_every_count_as_it_was():
    """Churn: sessions created and deleted one right after another, some deleted before their first
    chunk's turn. The registry, the lanes' loads, the gauges and /readyz all come back to none."""
    import time

    from server_helpers import auth, new_session, ready_client

    with ready_client(max_sessions=3, lanes=2) as client:
        registry = client.app.state.registry
        capacity = client.get("/readyz").json()["capacity"]
        for _ in range(3):
            made = [new_session(client) for _ in range(3)]
            for s in made:
                assert client.delete(s["resource"], headers=auth(s["token"])).status_code == 204
        deadline = time.monotonic() + 30  # the teardowns run on the lanes (bounded wait)
        while any(registry.worker._lane_load) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert registry.sessions == {} and registry.worker.streaming == 0
        assert registry.worker._lane_load == [0, 0] and registry.worker._lane_closed == [0, 0]
        metrics = client.get("/metrics").text
        assert "streamgen_sessions_active 0.0" in metrics and "streamgen_sessions_streaming 0.0" in metrics
        assert 'streamgen_sessions_closed_total{reason="deleted by client"} 9.0' in metrics
        ready = client.get("/readyz").json()
        assert ready["sessions"] == 0 and ready["capacity"] == capacity


def test_no_session_is_admitted_once_the_server_has_begun_to_stop():
    """A request on a connection kept alive through the stop (the listening socket closes first, then
    the sessions, for seconds, then the connections) made a session: 201, the worker setting up its
    stream ahead of the others' teardowns, and the session closed as "server shutting down" at once."""
    from server.config import ServerConfig
    from server.metrics import ServerMetrics
    from server.registry import AdmissionError, SessionRegistry
    from server.scheduler import InferenceWorker

    metrics = ServerMetrics()
    registry = SessionRegistry(ServerConfig(max_sessions=2), InferenceWorker(metrics), metrics)
    registry.ready = True
    assert registry.admitting() == 2
    registry.admit()  # room for one
    registry.stopping.set()
    with pytest.raises(AdmissionError, match="shutting down") as refused:
        registry.admit()
    assert refused.value.retry_after >= 1 and registry.admitting() == 0
    assert metrics.sessions_rejected.labels("stopping")._value.get() == 1


def test_readyz_is_not_ready_once_the_server_has_begun_to_stop():
    """/readyz said ready (200) through the stop, with a capacity of 0: a load balancer kept sending
    sessions, each refused with a 503, where a not-ready /readyz would have drained the server."""
    from server_helpers import ready_client

    with ready_client(max_sessions=2) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.registry.stopping.set()
        try:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["ready"] is False and ready.json()["stage"] == "stopping"
            assert ready.json()["capacity"] == 0
        finally:
            client.app.state.registry.stopping.clear()  # (the client's own stop sets it again)
