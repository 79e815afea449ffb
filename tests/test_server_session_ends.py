"""Sessions that end while they are made or streamed: deleted under an offer or a full queue,
their create cancelled, their client gone, their first chunk failed."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from server_helpers import auth, block_lane, new_session, ready_client

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
