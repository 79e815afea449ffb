"""A WebSocket upgrade's request at the connection level (server/connections.py): the checks every
request's head gets, and the bound on open connections, over raw sockets to a live server on
127.0.0.1, with each of uvicorn's HTTP parsers."""

from __future__ import annotations

import json
import re

import pytest
from server_helpers import connect, live_server

MAX_CONNECTIONS = 3
PAGE = "https://app.example.org"
UPGRADE = (b"GET /v1/sessions/x/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request):
    with live_server(http=request.param, max_connections=MAX_CONNECTIONS, cors_origins=[PAGE]) as (url, app):
        yield int(url.rsplit(":", 1)[1])



def answer_to(port: int, request: bytes) -> tuple[bytes, bytes]:
    """The head and the rest of what the server sends to `request` until it closes, or until the
    close frame of a 101 (the server waits for the client's)."""
    with connect(port) as sock:
        sock.sendall(request)
        answer = b""
        while b"\x88" not in answer.partition(b"\r\n\r\n")[2] and (part := sock.recv(65536)):
            answer += part
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head, rest


@pytest.mark.parametrize("request_head, status, error, says", [
    (UPGRADE.replace(b"Host: 127.0.0.1", b"Host: a b"), 400, "bad_request", "the Host header 'a b' is not a host"),
    (UPGRADE.replace(b"Host: 127.0.0.1", b"Host: app.example.org/v1"), 400, "bad_request", "is not a host[:port]"),
    (UPGRADE.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"), 400, "bad_request",
     "must not have both Transfer-Encoding and Content-Length"),
    (UPGRADE.replace(b"HTTP/1.1", b"HTTP/3.0"), 505, "http_version_not_supported", "send HTTP/1.1"),
    (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"), 400, "bad_request", "a WebSocket handshake must be HTTP/1.1"),
], ids=["host-space", "host-path", "both-lengths", "http-3.0", "http-1.0"])  # fmt: skip
def test_an_upgrade_gets_the_checks_any_request_gets(server, request_head, status, error, says):
    """An upgrade went to the WebSocket protocol before the checks of a request's head: a Host that
    is no host, an HTTP/3.0 (h11's) or 1.0 request line were a 101 (uvicorn rewrote its version as
    1.1), both lengths (h11's) the websockets library's 'invalid request'."""
    head, body = answer_to(server, request_head)
    assert head.startswith(b"HTTP/1.1 %d " % status), (head, body)
    assert b"connection: close" in head.lower(), head
    said = json.loads(body)
    assert said["error"] == error and says in said["message"], said


def test_an_upgrade_past_the_connection_limit_is_a_503_in_json(server):
    """docs/api.md: a request on a connection past --max-connections is answered 503; an upgrade
    was taken (a 101), so a flood of WebSockets went past the bound the others are held to."""
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # (each answered: the server has taken every connection)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        head, body = answer_to(server, UPGRADE.replace(b"\r\n\r\n", b"\r\nOrigin: " + PAGE.encode() + b"\r\n\r\n"))
    finally:
        for sock in held:
            sock.close()
    assert head.startswith(b"HTTP/1.1 503 "), (head, body)
    lowered = head.lower()
    assert b"retry-after: 1" in lowered and b"connection: close" in lowered, head
    assert b"access-control-allow-origin: " + PAGE.encode() in lowered, head
    said = json.loads(body)
    assert said["error"] == "unavailable" and said["reason"] == "too many connections", said  # (as a request's 503)
    assert said["message"].endswith(f"more than its limit of {MAX_CONNECTIONS}"), said  # (Retry-After says when)


def test_an_upgrade_within_the_bound_is_still_taken(server):
    head, rest = answer_to(server, UPGRADE)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"unknown session 'x'" in rest, rest  # (the route's own refusal, as a close frame)


def test_a_live_server_holds_its_port_from_its_choice_until_it_listens(monkeypatch):
    """live_server (the tests' server) chose a free port, let it go and had uvicorn bind it later: a
    socket that took the port meanwhile (another test process's server, on a loaded CI machine) made
    the test's server fail to start, or answered in its place. Here such a server binds the port
    just before uvicorn does: it is refused, the port being held from its choice on."""
    import socket

    import httpx

    from server.uvicorn_server import SessionClosingServer

    others = []
    startup = SessionClosingServer.startup

    async def startup_after_another_took_the_port(self, sockets=None):
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds its own)
        try:
            other.bind(("127.0.0.1", self.config.port))
            other.listen()
        except OSError:  # the port is held
            other.close()
        else:
            others.append(other)
        await startup(self, sockets)

    monkeypatch.setattr(SessionClosingServer, "startup", startup_after_another_took_the_port)
    try:
        with live_server() as (url, app):
            assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    finally:
        for other in others:
            other.close()
    assert others == []


@pytest.fixture
def live_server_clock(monkeypatch):
    """A clock of live_server's own (server_helpers' `time.monotonic`; the server's is the real one)
    that moves 5 s on each reading while `hold` is set, and stands still otherwise."""
    import threading
    import time
    import types

    import server_helpers

    hold, now = threading.Event(), [0.0]

    def monotonic():
        if hold.is_set():
            now[0] += 5.0
        return now[0]

    clock = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    monkeypatch.setattr(server_helpers, "time", types.SimpleNamespace(**{**clock, "monotonic": monotonic}))
    return hold, now


@pytest.fixture
def a_warm_up_past_the_ready_wait(monkeypatch, live_server_clock):
    """The warm-up's first chunk waits until live_server_clock has passed 120 s, twice the 60 s the
    waits for a server gave it; yields the clock's reading ([seconds]). The chunk is let go at the
    test's end, whatever it did (never a hang)."""
    import threading
    import time

    from streamgen.stream import StreamSession

    hold, now = live_server_clock
    next_chunk, released = StreamSession.next_chunk, threading.Event()

    def slow_first_chunk(self, observe=None):
        hold.set()
        give_up = time.monotonic() + 120  # (real time: never a hang, whatever the wait does)
        while now[0] < 120 and not released.is_set() and time.monotonic() < give_up:
            time.sleep(0.01)
        hold.clear()
        return next_chunk(self, observe)

    monkeypatch.setattr(StreamSession, "next_chunk", slow_first_chunk)
    try:
        yield now
    finally:
        released.set()


def test_a_live_server_is_waited_for_while_its_warm_up_goes_on(a_warm_up_past_the_ready_wait):
    """live_server gave the server 60 s to become ready: on the loaded CI machine a warm-up went on
    past it, and the test failed ('live server did not become ready'). Here the warm-up's first
    chunk waits until live_server's clock has passed twice that: it is waited for, /readyz saying
    the warm-up's stage all along."""
    import httpx

    with live_server() as (url, app):
        assert httpx.get(f"{url}/readyz", timeout=10).json()["ready"] is True
    assert a_warm_up_past_the_ready_wait[0] >= 120


def test_a_test_client_is_waited_for_while_its_warm_up_goes_on(a_warm_up_past_the_ready_wait):
    """ready_client's wait (wait_ready) gave the app 60 s to become ready, as live_server did. Here
    the warm-up's first chunk waits until wait_ready's clock has passed twice that: it is waited
    for, /readyz saying the warm-up's stage all along."""
    from server_helpers import ready_client

    with ready_client() as client:
        assert client.get("/readyz").json()["ready"] is True
    assert a_warm_up_past_the_ready_wait[0] >= 120


def test_a_test_client_whose_warm_up_failed_fails_at_once_with_its_error(monkeypatch, live_server_clock):
    """A warm-up that failed never ends: wait_ready waited out its limit, then said 'not ready'."""
    from server_helpers import ready_client

    from streamgen.stream import StreamSession

    def failing(self, observe=None):
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(StreamSession, "next_chunk", failing)
    live_server_clock[0].set()  # (the clock moves: a wait for a deadline ends at once)
    with pytest.raises(AssertionError, match=r"failed to warm up: .*RuntimeError: C\+\+ compile error"):
        with ready_client():
            pass


def test_a_live_server_whose_warm_up_failed_fails_at_once_with_its_error(monkeypatch, live_server_clock):
    """A warm-up that failed never ends: live_server waited out its limit and said only 'did not
    become ready'. It now fails at the first /readyz that says an error, and says it."""
    from streamgen.stream import StreamSession

    def failing(self, observe=None):
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(StreamSession, "next_chunk", failing)
    live_server_clock[0].set()  # (the clock moves: a wait for a deadline ends at once)
    with pytest.raises(AssertionError, match=re.escape("RuntimeError: C++ compile error")):
        with live_server():
            pass
