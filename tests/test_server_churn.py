"""Clients on flaky networks: uploads cut short, offers raced by their own DELETE, players that
leave before their answer, sockets that ping without ever starting. Each ends its session and
leaves nothing open."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

import httpx
import pytest
import websockets
from server_helpers import client_peer, created_session, live_server, post_sdp, sessions_gone

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shared_server():
    """One live server for the file's tests, as `serve` starts it: each started its own, a
    second or two of a loaded 2-core machine apiece (its app, its warm-up), for what it checks in
    one session or a few. They leave it as they found it: what they patch on its registry is
    monkeypatched (undone at their end), what they count is counted from where it stood."""
    with live_server() as (url, app):
        yield url, app


@pytest.fixture
def server(shared_server):
    """The shared live server; a test's sessions are gone before the next test (bounded: 10 s)."""
    yield shared_server
    sessions = shared_server[1].state.registry.sessions
    deadline = time.monotonic() + 10
    while sessions and time.monotonic() < deadline:  # (teardowns run on the server's loop)
        time.sleep(0.01)
    assert not sessions, f"sessions left to the next test: {sorted(sessions)}"


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # (closed meanwhile)
            pass
    return count


async def sockets_down_to(count: int, seconds: float = 10.0) -> int:
    """The sockets open once (bounded: `seconds`) there are no more than `count`. A session leaves
    the registry as its close begins, and its peer connection's sockets close in its teardown, after
    it, on the server's loop: a loaded machine had not closed them 0.5 s later."""
    for _ in range(int(seconds * 20)):
        if (now := open_sockets()) <= count:
            return now
        await asyncio.sleep(0.05)
    return open_sockets()


async def recvonly_offer() -> tuple:
    pc = client_peer("video")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def test_an_upload_cut_short_is_one_log_line(server, caplog):
    """Every request body cut off mid-upload logged "Exception in ASGI application" and 69 lines
    of traceback (starlette's ClientDisconnect), for sessions, /control and WHEP alike."""
    caplog.set_level(logging.INFO)
    uvicorn_records = []  # (uvicorn's loggers do not propagate to the root, where caplog listens)
    handler = logging.Handler()
    handler.emit = uvicorn_records.append
    url, app = server
    logging.getLogger("uvicorn.error").addHandler(handler)
    port = int(url.rsplit(":", 1)[1])
    head = (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + b"--b\r\n" + b"x" * 5000)
    for _ in range(50):  # bounded: 5 s for the server to see it
        if any("left during its upload" in r.getMessage() for r in caplog.records):
            break
        time.sleep(0.1)
    logging.getLogger("uvicorn.error").removeHandler(handler)
    assert app.state.registry.sessions == {}
    said = [r.getMessage() for r in caplog.records]
    assert "POST /v1/sessions: the client left during its upload" in said
    assert not [r for r in caplog.records + uvicorn_records if r.exc_info or r.levelno >= logging.ERROR]


async def test_an_offer_raced_by_its_delete_is_a_404_and_leaves_no_socket(server, monkeypatch):
    """A DELETE while the answer was made closed the peer connection mid-negotiation: the offer was
    told its SDP was bad (400 "RTCPeerConnection is closed"), and ICE opened its UDP socket after
    the close, which nothing closed again (7 left open after 20 such races)."""
    from aiortc import RTCPeerConnection

    made = RTCPeerConnection.setLocalDescription
    url, app = server
    registry = app.state.registry

    async def deleted_meanwhile(self, description):  # the DELETE lands mid-negotiation
        for session in list(registry.sessions.values()):
            asyncio.ensure_future(registry.close(session, "deleted by client"))
        await asyncio.sleep(0)
        return await made(self, description)

    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        (await http.get("/readyz")).raise_for_status()
        before = open_sockets()
        for _ in range(3):
            s, headers = await created_session(http)
            pc, offer = await recvonly_offer()
            monkeypatch.setattr(RTCPeerConnection, "setLocalDescription", deleted_meanwhile)
            r = await post_sdp(http, s, headers, offer)
            monkeypatch.setattr(RTCPeerConnection, "setLocalDescription", made)
            await pc.close()
            assert r.status_code == 404 and "deleted by client" in r.json()["message"], r.text
        await sessions_gone(app)
        after = await sockets_down_to(before)
    assert app.state.registry.sessions == {}
    assert after <= before, f"{after - before} sockets left open"


async def test_a_whep_player_that_leaves_before_its_answer_frees_its_session(server):
    """`POST /v1/whep` whose client closed its connection before the answer: the session streamed
    to nobody, holding its place until the idle limit (POST /v1/sessions already let it go)."""
    url, app = server
    closed_before = _closed_reasons(app.state.metrics.render().decode())
    port = int(url.rsplit(":", 1)[1])
    pc, offer = await recvonly_offer()
    body = offer.encode()
    head = (f"POST /v1/whep?avatar=ada HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body)
    await pc.close()
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        for _ in range(50):  # bounded: 5 s for the session to be made and let go
            metrics = (await http.get("/metrics")).text
            if closed_since(closed_before, metrics):
                break
            await asyncio.sleep(0.1)
    sessions = dict(app.state.registry.sessions)
    assert closed_since(closed_before, metrics).get("client left before the answer") == 1.0, metrics
    assert sessions == {}


async def test_a_socket_that_pings_without_starting_is_closed_at_the_idle_limit(server, monkeypatch):
    """Pings before `start` each counted as input: a socket held its session and its place up to
    --max-duration (an hour), streaming nothing."""
    url, app = server
    # (read by each check of the limits, and by a socket as its receive loop starts)
    monkeypatch.setattr(app.state.registry.config, "idle_timeout_s", 1.0)
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        s = (await http.post("/v1/sessions", json={})).json()
    ws_url = url.replace("http", "ws") + f"{s['stream']}?token={s['token']}"
    async with websockets.connect(ws_url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for i in range(40):  # bounded: 8 s of pings
                await ws.send(json.dumps({"type": "ping", "id": i}))
                await asyncio.sleep(0.2)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4408, "idle: no start for 1 s")
    await sessions_gone(app)
    assert app.state.registry.sessions == {}


def _closed_reasons(metrics: str) -> dict[str, float]:
    prefix = 'streamgen_sessions_closed_total{reason="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines() if line.startswith(prefix)}  # fmt: skip


def closed_since(before: dict[str, float], metrics: str) -> dict[str, float]:
    """The sessions closed, by reason, since the shared server's counts stood at `before`."""
    now = _closed_reasons(metrics)
    return {reason: count - before.get(reason, 0.0) for reason, count in now.items() if count != before.get(reason)}


async def test_a_page_gone_as_its_session_was_answered_ends_it_by_its_request_key(server):
    """A page reloaded just as its POST /v1/sessions was answered: the server had written the answer
    on a connection still open (a browser keeps it for its next page), so `is_disconnected` said
    nothing, and the session the page never read held a place for the unclaimed limit (20 s). The
    page's `pagehide` ends it by the key it sent with the POST, knowing no id."""
    key = "k" * 20 + "reload"
    url, app = server
    closed_before = _closed_reasons(app.state.metrics.render().decode())
    port = int(url.rsplit(":", 1)[1])
    body = b"{}"
    head = (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Streamgen-Request-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port)) as s:  # held open, its answer never read
        s.sendall(head + body)
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            for _ in range(100):  # bounded: 10 s for the session to be made
                if app.state.registry.sessions:
                    break
                await asyncio.sleep(0.1)
            assert len(app.state.registry.sessions) == 1
            r = await http.delete("/v1/sessions", headers={"Streamgen-Request-Key": key})
            assert r.status_code == 204, r.text
            again = await http.delete("/v1/sessions", headers={"Streamgen-Request-Key": key})
            metrics = (await http.get("/metrics")).text
    sessions, keys = dict(app.state.registry.sessions), dict(app.state.registry.requests)
    assert again.status_code == 204  # (a page cannot know whether its first one came)
    assert closed_since(closed_before, metrics) == {"client left before the answer": 1.0}
    assert sessions == {} and keys == {}


async def test_a_request_key_abandoned_while_its_session_is_made_ends_it_as_it_is_made(server, monkeypatch):
    """The DELETE by key came while the worker still made the stream (the POST's connection alive):
    the session is closed as it is made, and its POST answered 400 client_gone."""
    import threading

    key = "made-meanwhile-" + "0123456789"
    url, app = server
    registry, release = app.state.registry, threading.Event()
    closed_before = _closed_reasons(app.state.metrics.render().decode())
    make = registry._new_stream

    def slow_stream(*args):  # worker thread: waits for the DELETE
        release.wait(10)
        return make(*args)

    monkeypatch.setattr(registry, "_new_stream", slow_stream)
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        post = asyncio.ensure_future(http.post("/v1/sessions", json={}, headers={"Streamgen-Request-Key": key}))
        for _ in range(100):  # bounded: until the POST holds its key
            if key in registry.requests:
                break
            await asyncio.sleep(0.05)
        r = await http.delete("/v1/sessions", headers={"Streamgen-Request-Key": key})
        release.set()
        answer = await post
        metrics = (await http.get("/metrics")).text
    sessions, keys = dict(registry.sessions), dict(registry.requests)
    assert r.status_code == 204
    assert answer.status_code == 400 and answer.json()["error"] == "client_gone", answer.text
    assert closed_since(closed_before, metrics) == {"client left before the answer": 1.0}
    assert sessions == {} and keys == {}


async def test_a_request_key_is_checked_and_its_session_lives_on_without_its_delete(server):
    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        bad = await http.post("/v1/sessions", json={}, headers={"Streamgen-Request-Key": "short"})
        missing = await http.delete("/v1/sessions")
        unknown = await http.delete("/v1/sessions", headers={"Streamgen-Request-Key": "nobody-" * 4})
        key = {"Streamgen-Request-Key": "a-random-key-" * 2}
        made = await http.post("/v1/sessions", json={}, headers=key)
        twice = await http.post("/v1/sessions", json={}, headers=key)
        held = dict(app.state.registry.requests)
        s = made.json()
        await http.delete(s["resource"], headers={"Authorization": f"Bearer {s['token']}"})
    sessions, keys = dict(app.state.registry.sessions), dict(app.state.registry.requests)
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request_key"
    assert missing.status_code == 400 and missing.json()["error"] == "bad_request_key"
    assert unknown.status_code == 204
    assert made.status_code == 201 and list(held) == ["a-random-key-" * 2]
    assert twice.status_code == 409, twice.text
    assert sessions == {} and keys == {}  # (its key let go with it)


async def test_a_client_that_heard_its_socket_close_finds_its_session_ended(server, monkeypatch):
    """A socket closed on the server's side (the client's `stop`, its protocol error, the idle
    limit) sent its close frame first and ended its session only once the close was over: uvicorn's
    close waits for the client's answer and the connection's end. A client that heard the close and
    at once asked for its session found it alive (200), or, connecting again, was told it was
    already streaming over a socket (4409). The wait after the close frame, made longer here (the
    round trip of a far client, a loaded server), puts the client's questions inside it."""
    from server.websocket import SocketConnection

    close = SocketConnection.close

    async def close_then_wait_for_the_answer(self, code, reason):
        await close(self, code, reason)
        await asyncio.sleep(0.5)

    monkeypatch.setattr(SocketConnection, "close", close_then_wait_for_the_answer)
    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        for sent, heard, ended in (
            ({"type": "stop"}, (1000, "stopped"), "stopped by client"),
            ({"type": "speak", "text": "hi"}, (4400, "send a start message before speak"),
             "protocol error: send a start message before speak"),
        ):  # fmt: skip
            s, headers = await created_session(http)
            stream = url.replace("http", "ws") + f"{s['stream']}?token={s['token']}"
            closed = await close_heard_after(stream, sent)
            assert (closed.rcvd.code, closed.rcvd.reason) == heard
            asked = await http.get(s["resource"], headers=headers)
            async with websockets.connect(stream) as again:
                with pytest.raises(websockets.ConnectionClosed) as refused:
                    await asyncio.wait_for(again.recv(), 10)
            assert (asked.status_code, asked.json().get("message")) == (404, f"session ended: {ended}"), asked.text
            assert (refused.value.rcvd.code, refused.value.rcvd.reason) == (4404, f"session ended: {ended}")


@pytest.mark.parametrize(
    "sent, own_reason",
    [
        ({"type": "stop"}, "stopped by client"),
        ({"type": "speak", "text": "hi"}, "protocol error: send a start message before speak"),
    ],
    ids=["stop", "protocol_error"],
)
async def test_a_socket_closing_itself_as_a_delete_ends_its_session_is_told_the_delete(server, monkeypatch, sent, own_reason):
    """A socket that closes itself (the client's `stop`, its protocol error) ends its session after
    its receive loop has returned: a DELETE (or a limit) that closed the session in between ended it
    with its own reason, which GET's 404 and a reconnect's 4404 say, while the socket's closer sent
    the socket's own close (1000 "stopped"): the client was told one end and the server kept another.
    The DELETE is put in between here: the registry's close, asked for the socket's reason, first
    ends the session as the DELETE does. The client now hears the reason its session ended with."""
    url, app = server
    registry = app.state.registry
    close = registry.close
    raced = []

    async def deleted_first(session, reason):
        if reason == own_reason:  # the DELETE came between the socket's message and its close
            raced.append(reason)
            await close(session, "deleted by client")
        await close(session, reason)

    monkeypatch.setattr(registry, "close", deleted_first)
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        s, headers = await created_session(http)
        closed = await close_heard_after(url.replace("http", "ws") + f"{s['stream']}?token={s['token']}", sent)
        asked = await http.get(s["resource"], headers=headers)
    assert raced == [own_reason]
    assert (asked.status_code, asked.json().get("message")) == (404, "session ended: deleted by client"), asked.text
    assert (closed.rcvd.code, closed.rcvd.reason) == (4410, "deleted by client")


async def close_heard_after(stream: str, sent: dict) -> websockets.ConnectionClosed:
    """The close a socket to `stream` hears after it sends `sent` (bounded: 10 messages, 10 s each)."""
    async with websockets.connect(stream) as ws:
        await ws.send(json.dumps(sent))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(10):  # the close comes first
                await asyncio.wait_for(ws.recv(), 10)
    return closed.value
