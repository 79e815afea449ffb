"""Requests that HTTP/1.1 (RFC 9112, RFC 9110) says are refused, or served, whatever uvicorn's
parser took: framing, Host, versions, WebSocket handshakes, request targets. Over raw sockets to a
live server on 127.0.0.1, with each of its HTTP parsers (`limited_server`, tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
from server_helpers import answer_until_closed, connect, read_response


@pytest.mark.parametrize("head", [b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
                                  b"GET /healthz HTTP/1.1\r\nHo st: 127.0.0.1\r\n\r\n"])  # fmt: skip
def test_a_request_that_does_not_parse_is_a_400_in_the_apis_json(limited_server, head):
    """It was uvicorn's text/plain 'Invalid HTTP request received.', where docs/api.md has every error in JSON."""
    with connect(limited_server) as sock:
        sock.sendall(head)
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), answer
    assert json.loads(body)["error"] == "bad_request"


def test_a_request_with_both_transfer_encoding_and_content_length_is_a_400_that_closes(limited_server):
    """h11 read the body by its Transfer-Encoding and kept the connection, so that a proxy in front
    reading it by its Content-Length passed a request smuggled in the body (RFC 9112 6.1); httptools
    refused it as any request that does not parse."""
    from server.connections import BOTH_LENGTHS

    smuggled = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled  # (a proxy by the Content-Length: one body; by the chunks: a request after)
    with connect(limited_server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), answer
    said = json.loads(body)  # (one answer: none to the /readyz)
    assert said == {"error": "bad_request", "message": BOTH_LENGTHS}, answer


@pytest.mark.parametrize("head", [b"GET /healthz HTTP/1.1\r\n\r\n",
                                  b"GET /v1/sessions/x/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                                  b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n"],
                         ids=["request", "websocket", "two-hosts"])  # fmt: skip
def test_a_request_without_one_host_is_a_400_that_says_so(limited_server, head):
    """httptools served an HTTP/1.1 one without, and any with two (h11 refused them as any request
    that does not parse); RFC 9112 3.2: a 400. An HTTP/1.0 one may have none."""
    with connect(limited_server) as sock:
        sock.sendall(head)
        answer = answer_until_closed(sock)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in status.lower(), answer
    said = json.loads(body)
    assert said["error"] == "bad_request" and "must have one Host header" in said["message"], said
    with connect(limited_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert answer_until_closed(sock).startswith(b"HTTP/1.1 200 ")


def test_an_http_1_0_request_with_transfer_encoding_is_a_400_that_closes(limited_server):
    """Either parser read its body by the chunks HTTP/1.0 does not have and served it (RFC 9112 6.1:
    its framing is faulty, and the connection must close)."""
    from server.connections import OLD_CHUNKS

    with connect(limited_server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.0\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n2\r\n{}\r\n0\r\n\r\n")  # fmt: skip
        head, _, body = answer_until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body) == {"error": "bad_request", "message": OLD_CHUNKS}


@pytest.mark.parametrize("host", [b"a b", b"app.example.org/v1", b"user@app.example.org", b"app.example.org:80x"])
def test_a_host_header_that_is_no_host_is_a_400_that_says_so(limited_server, host):
    """Either parser served it as it came (RFC 9112 3.2: a 400); a host as clients write them is served."""
    with connect(limited_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        head, said = read_response(sock)
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower(), (head, said)
    assert said == {"error": "bad_request", "message": f"the Host header {host.decode()!r} is not a host[:port] "
                    "(RFC 9112, 3.2)"}  # fmt: skip
    for good in (b"127.0.0.1:8000", b"[::1]:8000", b"App.Example.org.", b"xn--bcher-kva.example", b""):
        with connect(limited_server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + good + b"\r\n\r\n")
            assert read_response(sock)[0].startswith(b"HTTP/1.1 200 "), good


@pytest.mark.parametrize("head", [b"GET /healthz HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n",
                                  b"GET /healthz HTTP/3.0\r\nHost: 127.0.0.1\r\n\r\n",
                                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], ids=["2.0", "3.0", "h2c-preface"])  # fmt: skip
def test_a_request_of_an_http_version_not_spoken_is_a_505_in_the_apis_json(limited_server, head):
    """h11 served 'GET /healthz HTTP/3.0' as HTTP/1.1, httptools an HTTP/2.0 one, and refused the
    other, and HTTP/2's preface (h2c by prior knowledge), as a request that did not parse; h11 the
    preface as a request of the path '*' (RFC 9110 15.6.6: a 505)."""
    with connect(limited_server) as sock:
        sock.sendall(head)
        head, said = read_response(sock)
    assert head.startswith(b"HTTP/1.1 505 "), (head, said)
    assert said["error"] == "http_version_not_supported" and "is not spoken here: send HTTP/1.1" in said["message"]


WEBSOCKET_HEAD = (b"GET /v1/sessions/x/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("head, status, error, says", [
    (WEBSOCKET_HEAD.replace(b"Version: 13", b"Version: 8"), 400, "bad_request", "invalid Sec-WebSocket-Version header: 8"),
    (WEBSOCKET_HEAD.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), 400, "bad_request",
     "missing Sec-WebSocket-Key header"),
    (WEBSOCKET_HEAD.replace(b"GET ", b"POST "), 405, "method_not_allowed", "unsupported HTTP method: POST"),
], ids=["version", "no-key", "post"])  # fmt: skip
def test_a_websocket_handshake_refused_is_answered_in_the_apis_json(limited_server, head, status, error, says):
    """It was the websockets library's text/plain 'Failed to open a WebSocket connection: ...'."""
    with connect(limited_server) as sock:
        sock.sendall(head)
        answer = answer_until_closed(sock)
    status_line, _, body = answer.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"content-type: application/json" in status_line.lower(), answer
    assert json.loads(body) == {"error": error, "message": f"WebSocket handshake refused: {says}"}


def test_options_star_is_answered_for_the_server_as_a_whole(limited_server):
    """'OPTIONS * HTTP/1.1' (RFC 9112 3.2.4, RFC 9110 9.3.7) was a 404 'nothing at /*'."""
    with connect(limited_server) as sock:
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = answer_until_closed(sock).partition(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 204 "), head
    allow = next(line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("allow:"))
    assert {m.strip() for m in allow.split(",")} == {"GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"}, head
    with connect(limited_server) as sock:  # (the asterisk form is OPTIONS' alone)
        sock.sendall(b"GET * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, said = read_response(sock)
    assert head.startswith(b"HTTP/1.1 400 ") and said["error"] == "bad_request", (head, said)
    assert "the request target '*' is for OPTIONS alone, not GET" in said["message"], said


@pytest.mark.parametrize("target", [b"http://127.0.0.1/healthz", b"HTTP://127.0.0.1:80/healthz?x=1"])
def test_a_request_target_in_the_absolute_form_is_served_by_either_parser(limited_server, target):
    """A server must take 'GET http://host/path' (RFC 9112 3.2.2): h11 gave the whole target as the
    path, a 404 'nothing at /http://127.0.0.1/healthz' of a path httptools served."""
    with connect(limited_server) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = answer_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}'), answer[:300]


def test_a_fragment_sent_in_a_request_target_is_not_taken_for_its_path_or_query(limited_server):
    """A fragment is the client's own (RFC 9110 4.2.5): httptools dropped one sent all the same, h11
    kept it in the path, a 404 'nothing at /healthz%23top', or in the query (a token read as 'T#top')."""
    with connect(limited_server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        made = read_response(sock)[1]
        for target in (b"/healthz#top", b"%s?token=%s#top" % (made["resource"].encode(), made["token"].encode())):
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, said = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 "), (target, head, said)
        sock.sendall(b"DELETE %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n"
                     % (made["resource"].encode(), made["token"].encode()))  # fmt: skip
