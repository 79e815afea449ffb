"""What a request's bytes come to at the connection level (server/connections.py), the same under
each of uvicorn's HTTP parsers (h11, httptools): over raw sockets to a live server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time

import pytest
from server_helpers import live_server

SESSION = b'POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request):
    with live_server(http=request.param, header_timeout_s=2) as (url, app):
        yield int(url.rsplit(":", 1)[1]), app


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def answer_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while part := sock.recv(65536):
        answer += part
    return answer


def test_a_half_closed_request_is_a_client_gone_and_frees_its_session(server):
    """A client that sent its whole POST and shut its side (SHUT_WR) gets no answer: its FIN is a
    closed page's, which the create-session route must hear to free the session it made (see
    ConnectionLimits.eof_received). Served, the half-closed client would have its session, and a
    reloaded page's would hold a place until the unclaimed limit."""
    port, app = server
    metrics = app.state.registry.metrics
    closed_before = metrics.sessions_closed.labels(reason="client left before the answer")._value.get()
    with connect(port) as sock:
        sock.sendall(SESSION)
        sock.shutdown(socket.SHUT_WR)
        assert answer_until_closed(sock) == b""
    for _ in range(100):  # bounded: 10 s for the session to be made and let go
        closed = metrics.sessions_closed.labels(reason="client left before the answer")._value.get()
        if closed > closed_before and not app.state.registry.sessions:
            break
        time.sleep(0.1)
    assert closed == closed_before + 1 and app.state.registry.sessions == {}
    with connect(port) as sock:  # (the same request, its connection kept: answered)
        sock.sendall(SESSION)
        head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 201 "), head
        made = json.loads(body)
        sock.sendall(b"DELETE %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n"
                     % (made["resource"].encode(), made["token"].encode()))  # fmt: skip
        assert sock.recv(65536).startswith(b"HTTP/1.1 204 ")
