"""The connection's own refusals (server/connections.py: the 503 past the connection limit, the
408, 431 and 400 written outside the app) carry the app's CORS headers, for a page of a
--cors-origin to read."""

from __future__ import annotations

import json

import pytest
from server_helpers import (
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    answer_until_closed,
    connect,
    live_server,
    read_response,
)


def test_a_page_of_an_allowed_origin_can_read_the_503_past_the_connection_limit():
    """The 503 was written outside the app and its CORS: a page of a --cors-origin could not read it."""
    page = "https://app.example.org"
    with live_server(max_connections=MAX_CONNECTIONS, cors_origins=[page]) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        held = [connect(port) for _ in range(MAX_CONNECTIONS)]
        try:
            for sock in held:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
            with connect(port) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: " + page.encode() + b"\r\n\r\n")
                head, said = read_response(sock)
        finally:
            for sock in held:
                sock.close()
    assert head.startswith(b"HTTP/1.1 503 ") and said["error"] == "unavailable", head
    assert b"access-control-allow-origin: " + page.encode() in head.lower(), head
    assert b"retry-after" in head.lower().split(b"access-control-expose-headers: ")[1].split(b"\r\n")[0], head


PAGE = "https://app.example.org"


@pytest.fixture(scope="module", params=["httptools", "h11"])
def cors_server(request):
    with live_server(http=request.param, header_timeout_s=HEADER_TIMEOUT_S, cors_origins=[PAGE]) as (url, app):
        yield int(url.rsplit(":", 1)[1])


def refused_heads(origin: bytes) -> dict[str, bytes]:
    """A head of each kind refused before it reaches the app, naming `origin`, by its answer's status."""
    from server.connections import MAX_HEAD_BYTES

    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: " + origin + b"\r\n"
    return {"408": start + b"X-Slow: ", "431": start + b"X-Large: " + b"a" * (MAX_HEAD_BYTES + 16 * 1024),
            "400": start.replace(b"GET ", b"POST ") + b"Content-Length: -1\r\n\r\n",
            "400 in the body": start.replace(b"GET /healthz", b"POST /v1/sessions") +  # (the head parsed whole)
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"}  # fmt: skip


@pytest.mark.parametrize("case", ["408", "431", "400", "400 in the body"])
def test_a_page_of_an_allowed_origin_can_read_the_connections_own_refusals(cors_server, case):
    """The 408, 431 and 400 written outside the app had none of its CORS headers: a page of a
    --cors-origin saw a network error, not the JSON that says what was wrong."""
    with connect(cors_server) as sock:
        sock.sendall(refused_heads(PAGE.encode())[case])
        head, _, body = answer_until_closed(sock).partition(b"\r\n\r\n")
    status = case.split()[0].encode()
    assert head.startswith(b"HTTP/1.1 %s " % status), head
    assert b"access-control-allow-origin: " + PAGE.encode() in head.lower(), head
    assert b"retry-after" in head.lower().split(b"access-control-expose-headers: ")[1].split(b"\r\n")[0], head
    assert json.loads(body)["error"]
    with connect(cors_server) as sock:  # (a page of another origin: nothing, as the app answers it)
        sock.sendall(refused_heads(b"https://evil.example")[case])
        head = answer_until_closed(sock).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 %s " % status) and b"access-control-" not in head.lower(), head
