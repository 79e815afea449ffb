"""The deadline of a request's head and the bound on open connections (server/connections.py),
over raw sockets to a live server on 127.0.0.1, with each of uvicorn's HTTP parsers."""

from __future__ import annotations

import json
import socket
import time

import pytest
from server_helpers import answer_until_closed, connect, free_port, live_server, send_each_read_alone

HEADER_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 3


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request):
    with live_server(http=request.param, header_timeout_s=HEADER_TIMEOUT_S, max_connections=MAX_CONNECTIONS) as (url, app):
        yield int(url.rsplit(":", 1)[1])




def read_response(sock: socket.socket) -> tuple[bytes, dict]:
    """One response with a Content-Length: its head and its JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head, json.loads(body)


def test_headers_that_never_end_are_answered_408_and_closed(server):
    """A client sending its headers a byte at a time, never the blank line, held its connection for good."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        answer = answer_until_closed(sock)  # (a timeout here: held for good)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower(), head
    assert json.loads(body)["error"] == "header_timeout"


def test_a_head_too_large_to_be_one_is_refused_not_taken_in_whole(server):
    """httptools kept a head whole however large: one header of 13 MB was read in without a word."""
    from server.connections import MAX_HEAD_BYTES

    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Large: " + b"a" * (MAX_HEAD_BYTES + 16 * 1024))
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer
    assert json.loads(body)["error"] == "headers_too_large"


def test_a_head_too_large_whose_end_comes_in_a_read_is_refused_by_its_size(server, server_reads):
    """A head past the bound was refused only while it had not all come: one whose end came in the
    read that took it past was served under h11, and a 400 'could not be parsed' under httptools,
    which refuses a URL of 64 KiB or more. (Its URL is what is too long: a 414.) The rest is sent
    once the server has read the first part: a pause alone (0.05 s) let a loaded machine read both
    parts at once, a head whole in one read, and the test passed without its case."""
    from server.connections import MAX_HEAD_BYTES

    head = b"GET /v1/" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    first = head[: MAX_HEAD_BYTES - 1024]  # (the head's end in a later read, past the bound)
    with connect(server) as sock:
        read_before = send_each_read_alone(sock, [first, head[len(first) :]], server_reads)
        answer = answer_until_closed(sock)
    # the first part read whole before the rest was sent: the head's end came in a later read
    assert read_before == [0, len(first)] and len(first) < sum(server_reads), server_reads
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:300]


@pytest.mark.parametrize("at_once", [True, False], ids=["whole", "in-parts"])
def test_a_url_too_long_is_a_414_that_says_so(server, at_once):
    """It was a 431 'request headers larger than 64 KiB', which sent a client looking among headers
    it had not set; a head too large past a short URL is the 431."""
    from server.connections import MAX_HEAD_BYTES

    head = b"GET /healthz?q=" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head if at_once else head[: MAX_HEAD_BYTES + 16])  # (the line not ended: still too long)
        status, _, body = answer_until_closed(sock).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 414 "), status
    assert json.loads(body) == {"error": "uri_too_long", "message": "request target (URL) longer than 64 KiB"}


def test_a_head_within_the_bound_is_served_by_either_parser(server, server_reads):
    """h11 refused a head over 16 KiB (its own bound) as a request that did not parse, a 400 that
    httptools served: a page's cookies of another site on the same host reach that. (h11's bound is
    on a head not yet complete: one read whole it took; so each part is sent once the server has
    read those before it, as a slow uplink sends it.)"""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: " + b"a" * 40 * 1024 + b"\r\n\r\n"
    parts = [head[at : at + 8 * 1024] for at in range(0, len(head), 8 * 1024)]
    with connect(server) as sock:
        read_before = send_each_read_alone(sock, parts, server_reads)
        answer = read_response(sock)[0]
    # each part read whole before the next was sent: over 16 KiB of the head read before its end
    assert read_before == [sum(map(len, parts[:i])) for i in range(len(parts))], (read_before, server_reads)
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_the_rest_of_a_body_answered_unread_is_not_taken_for_the_next_head(server, server_reads):
    """A request answered before its body was read whole (a 413 from its Content-Length, a route that
    reads none): the rest of that body was counted as the next request's head, a 431 written after
    the answer and the connection closed under a client still uploading. (Its case: the body's rest
    in reads after the answer, each part sent once the server has read those before it.)"""
    from server.connections import MAX_HEAD_BYTES

    body = b"x" * (2 * MAX_HEAD_BYTES)
    parts = [body[at : at + 16 * 1024] for at in range(0, len(body), 16 * 1024)]
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
        answered_at = sum(server_reads)
        read_before = send_each_read_alone(sock, parts + [b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
                                           server_reads)  # fmt: skip
        head, said = read_response(sock)
    # each part read whole before the next was sent: past MAX_HEAD_BYTES of the body in reads after the answer
    assert read_before == [answered_at + sum(map(len, parts[:i])) for i in range(len(parts) + 1)], (read_before, server_reads)
    assert head.startswith(b"HTTP/1.1 200 ") and said["ready"], (head, said)


def test_a_chunked_bodys_trailers_are_not_taken_in_without_bound(server):
    """httptools took them in whole, each appended to the request's headers: 20 MB of them grew
    the server by 400 MB in 4 s. Past 64 KiB they are the 431 under both parsers (h11 took them up
    to its own bound of 64 + 256 KiB, then a 400 'could not be parsed')."""
    refused = False
    with connect(server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")  # fmt: skip
        try:
            for _ in range(800):  # 8 MB, more than the socket's buffers hold
                sock.sendall(b"X-Trailer: y\r\n" * 700)
        except OSError:  # (closed, or reset with its bytes unread)
            refused = True
    assert refused, "8 MB of trailers were taken in"
    with connect(server) as sock:  # (its answer: h11's own 400 'could not be parsed' was one past its bound)
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")  # fmt: skip
        answer = b""
        for _ in range(100):  # 16 KiB at a time, until answered (more, unread, would reset the answer)
            sock.sendall(b"X-Trailer: y\r\n" * 1170)
            sock.settimeout(0.1)
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                pass
            finally:
                sock.settimeout(10)
        head, _, body = (answer + answer_until_closed(sock)).partition(b"\r\n\r\n")
    # trailers are fields (RFC 9110 6.5): the 431 of a head's, whose message tells its client what to send less of
    assert head.startswith(b"HTTP/1.1 431 "), head
    assert json.loads(body) == {"error": "headers_too_large", "message": "request trailers larger than 64 KiB"}
    with connect(server) as sock:  # a few trailers are served, not taken for headers
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Checksum: 1\r\n\r\n")  # fmt: skip
        assert read_response(sock)[0].startswith(b"HTTP/1.1 201 ")


def test_the_rest_of_a_body_answered_unread_has_a_deadline_too(server):
    """(its bytes ignored as they come, a client trickling them would hold the connection for good)"""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
        for _ in range(100):
            try:
                sock.sendall(b"x")
            except OSError:  # (reset: closed with the byte before unread)
                break
            time.sleep(HEADER_TIMEOUT_S / 5)
        else:
            raise AssertionError("the connection was held while the body's rest trickled in")


@pytest.mark.parametrize("head", [b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
                                  b"GET /healthz HTTP/1.1\r\nHo st: 127.0.0.1\r\n\r\n"])  # fmt: skip
def test_a_request_that_does_not_parse_is_a_400_in_the_apis_json(server, head):
    """It was uvicorn's text/plain 'Invalid HTTP request received.', where docs/api.md has every error in JSON."""
    with connect(server) as sock:
        sock.sendall(head)
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), answer
    assert json.loads(body)["error"] == "bad_request"


def test_a_request_with_both_transfer_encoding_and_content_length_is_a_400_that_closes(server):
    """h11 read the body by its Transfer-Encoding and kept the connection, so that a proxy in front
    reading it by its Content-Length passed a request smuggled in the body (RFC 9112 6.1); httptools
    refused it as any request that does not parse."""
    from server.connections import BOTH_LENGTHS

    smuggled = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled  # (a proxy by the Content-Length: one body; by the chunks: a request after)
    with connect(server) as sock:
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
def test_a_request_without_one_host_is_a_400_that_says_so(server, head):
    """httptools served an HTTP/1.1 one without, and any with two (h11 refused them as any request
    that does not parse); RFC 9112 3.2: a 400. An HTTP/1.0 one may have none."""
    with connect(server) as sock:
        sock.sendall(head)
        answer = answer_until_closed(sock)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in status.lower(), answer
    said = json.loads(body)
    assert said["error"] == "bad_request" and "must have one Host header" in said["message"], said
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert answer_until_closed(sock).startswith(b"HTTP/1.1 200 ")


def test_an_http_1_0_request_with_transfer_encoding_is_a_400_that_closes(server):
    """Either parser read its body by the chunks HTTP/1.0 does not have and served it (RFC 9112 6.1:
    its framing is faulty, and the connection must close)."""
    from server.connections import OLD_CHUNKS

    with connect(server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.0\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n2\r\n{}\r\n0\r\n\r\n")  # fmt: skip
        head, _, body = answer_until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body) == {"error": "bad_request", "message": OLD_CHUNKS}


@pytest.mark.parametrize("host", [b"a b", b"app.example.org/v1", b"user@app.example.org", b"app.example.org:80x"])
def test_a_host_header_that_is_no_host_is_a_400_that_says_so(server, host):
    """Either parser served it as it came (RFC 9112 3.2: a 400); a host as clients write them is served."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        head, said = read_response(sock)
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower(), (head, said)
    assert said == {"error": "bad_request", "message": f"the Host header {host.decode()!r} is not a host[:port] "
                    "(RFC 9112, 3.2)"}  # fmt: skip
    for good in (b"127.0.0.1:8000", b"[::1]:8000", b"App.Example.org.", b"xn--bcher-kva.example", b""):
        with connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + good + b"\r\n\r\n")
            assert read_response(sock)[0].startswith(b"HTTP/1.1 200 "), good


@pytest.mark.parametrize("head", [b"GET /healthz HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n",
                                  b"GET /healthz HTTP/3.0\r\nHost: 127.0.0.1\r\n\r\n",
                                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], ids=["2.0", "3.0", "h2c-preface"])  # fmt: skip
def test_a_request_of_an_http_version_not_spoken_is_a_505_in_the_apis_json(server, head):
    """h11 served 'GET /healthz HTTP/3.0' as HTTP/1.1, httptools an HTTP/2.0 one, and refused the
    other, and HTTP/2's preface (h2c by prior knowledge), as a request that did not parse; h11 the
    preface as a request of the path '*' (RFC 9110 15.6.6: a 505)."""
    with connect(server) as sock:
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
def test_a_websocket_handshake_refused_is_answered_in_the_apis_json(server, head, status, error, says):
    """It was the websockets library's text/plain 'Failed to open a WebSocket connection: ...'."""
    with connect(server) as sock:
        sock.sendall(head)
        answer = answer_until_closed(sock)
    status_line, _, body = answer.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"content-type: application/json" in status_line.lower(), answer
    assert json.loads(body) == {"error": error, "message": f"WebSocket handshake refused: {says}"}


def test_options_star_is_answered_for_the_server_as_a_whole(server):
    """'OPTIONS * HTTP/1.1' (RFC 9112 3.2.4, RFC 9110 9.3.7) was a 404 'nothing at /*'."""
    with connect(server) as sock:
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = answer_until_closed(sock).partition(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 204 "), head
    allow = next(line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("allow:"))
    assert {m.strip() for m in allow.split(",")} == {"GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"}, head
    with connect(server) as sock:  # (the asterisk form is OPTIONS' alone)
        sock.sendall(b"GET * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, said = read_response(sock)
    assert head.startswith(b"HTTP/1.1 400 ") and said["error"] == "bad_request", (head, said)
    assert "the request target '*' is for OPTIONS alone, not GET" in said["message"], said


@pytest.mark.parametrize("target", [b"http://127.0.0.1/healthz", b"HTTP://127.0.0.1:80/healthz?x=1"])
def test_a_request_target_in_the_absolute_form_is_served_by_either_parser(server, target):
    """A server must take 'GET http://host/path' (RFC 9112 3.2.2): h11 gave the whole target as the
    path, a 404 'nothing at /http://127.0.0.1/healthz' of a path httptools served."""
    with connect(server) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = answer_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}'), answer[:300]


def test_a_fragment_sent_in_a_request_target_is_not_taken_for_its_path_or_query(server):
    """A fragment is the client's own (RFC 9110 4.2.5): httptools dropped one sent all the same, h11
    kept it in the path, a 404 'nothing at /healthz%23top', or in the query (a token read as 'T#top')."""
    with connect(server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        made = read_response(sock)[1]
        for target in (b"/healthz#top", b"%s?token=%s#top" % (made["resource"].encode(), made["token"].encode())):
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, said = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 "), (target, head, said)
        sock.sendall(b"DELETE %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n"
                     % (made["resource"].encode(), made["token"].encode()))  # fmt: skip


def test_a_connection_that_sends_nothing_is_closed(server):
    with connect(server) as sock:
        assert answer_until_closed(sock) == b""


def test_the_next_head_on_a_kept_alive_connection_has_the_same_deadline(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert answer_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_head_that_arrived_in_time_is_not_cut_while_its_body_comes(server):
    """The head's deadline ends with the head: its body has the body's (ServerConfig.body_timeout_s)."""
    with connect(server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2\r\n\r\n")  # fmt: skip
        time.sleep(2 * HEADER_TIMEOUT_S)
        sock.sendall(b"{}")
        head, said = read_response(sock)
    assert head.startswith(b"HTTP/1.1 201 "), (head, said)


def test_a_request_past_the_connection_limit_is_a_503_in_json(server):
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # (each makes a request: the server has taken every connection by its answer)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
        with connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = answer_until_closed(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower(), head
        said = json.loads(body)
        assert said["error"] == "unavailable", said
        # (when to try again is Retry-After's: the page says it from there, after this message)
        assert said["message"].endswith(f"connections open, more than its limit of {MAX_CONNECTIONS}"), said
    finally:
        for sock in held:
            sock.close()
    for _ in range(200):  # (the server sees the held ones closed soon after)
        with connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if answer_until_closed(sock).startswith(b"HTTP/1.1 200 "):
                break
        time.sleep(0.05)
    else:
        raise AssertionError("requests were refused after the other connections closed")


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


def test_a_connection_past_the_limit_that_sends_nothing_is_not_held_for_the_heads_whole_time():
    """A flood of connections sending nothing held a descriptor each for the head's whole time
    (ServerConfig.header_timeout_s), the connection limit refusing only requests."""
    with live_server(header_timeout_s=60, max_connections=MAX_CONNECTIONS) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        held = [connect(port) for _ in range(MAX_CONNECTIONS)]
        try:
            for sock in held:  # (answered: the server has taken each, kept alive for 5 s)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
            with connect(port) as past:
                past.settimeout(30)  # (a timeout here: held for the head's whole time)
                assert answer_until_closed(past) == b""
        finally:
            for sock in held:
                sock.close()


def test_serve_takes_a_bound_on_connections_that_leaves_room_for_its_sessions(capsys, monkeypatch):
    import server.app
    from streamgen.cli import main

    configs = []
    monkeypatch.setattr(server.app, "create_app", lambda config: configs.append(config))
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    assert main(["serve", "--model", "debug", "--port", str(free_port()), "--max-connections", "20"]) == 0
    assert main(["serve", "--model", "debug", "--port", str(free_port())]) == 0
    assert main(["serve", "--model", "debug", "--port", str(free_port()), "--max-sessions", "300"]) == 0
    assert [c.max_connections for c in configs] == [20, 256, 600]  # (300 sessions served before the bound)
    assert main(["serve", "--model", "debug", "--port", str(free_port()), "--max-connections", "8"]) == 2
    assert "--max-connections 8 leaves no room for --max-sessions 8's clients" in capsys.readouterr().err


@pytest.mark.parametrize("option, field, default", [("--body-timeout", "body_timeout_s", 30.0),
                                                    ("--header-timeout", "header_timeout_s", 20.0)])  # fmt: skip
@pytest.mark.parametrize("given, says", [("0", "'0' is not a positive finite number"), ("-5", "'-5' is not"),
                                         ("nan", "'nan' is not"), ("1e999", "'1e999' is not")])  # fmt: skip
def test_serve_takes_the_time_a_request_may_take(option, field, default, given, says, capsys, monkeypatch):
    """ServerConfig.body_timeout_s, then header_timeout_s, had no option: a server behind slow uplinks
    could not give more than 30 s (20 s for a request's head)."""
    import server.app
    from streamgen.cli import main

    configs = []
    monkeypatch.setattr(server.app, "create_app", lambda config: configs.append(config))
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run", lambda s: setattr(s, "started", True))
    assert main(["serve", "--model", "debug", "--port", str(free_port()), option, "90.5"]) == 0
    assert main(["serve", "--model", "debug", "--port", str(free_port())]) == 0
    assert [getattr(c, field) for c in configs] == [90.5, default]
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", "debug", "--port", str(free_port()), f"{option}={given}"])
    assert exit.value.code == 2 and f"argument {option}: {says}" in capsys.readouterr().err


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")


def resolving(monkeypatch, name: str, *addresses: str) -> None:
    """`name` resolves to `addresses` (as /etc/hosts may have it: `::1 ip6-localhost`), as getaddrinfo would."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, kind=0, proto=0, flags=0):
        if host != name:
            return real(host, port, family, kind, proto, flags)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]  # fmt: skip

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def serve_on(host: str, port: int, monkeypatch) -> tuple[int, list]:
    """`serve --host HOST --port PORT` up to uvicorn's start: its exit code and the (host, loopback) it served with."""
    import server.app
    from streamgen.cli import main

    served = []
    monkeypatch.setattr(server.app, "create_app", lambda config: config)
    monkeypatch.setattr("server.uvicorn_server.SessionClosingServer.run",
                        lambda s: (served.append((s.config.host, s.config.app.loopback)), setattr(s, "started", True)))  # fmt: skip
    return main(["serve", "--model", "debug", "--host", host, "--port", str(port)]), served


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]", "ip6-localhost"])
def test_serve_listens_on_ipv6_loopback_however_it_is_named(host, monkeypatch):
    """'[::1]', as a URL writes it, and a name of ::1 alone ('ip6-localhost') were refused as
    'Name or service not known' (the name was looked up for IPv4 only)."""
    resolving(monkeypatch, "ip6-localhost", "::1")
    assert serve_on(host, free_port(), monkeypatch) == (0, [(host.strip("[]"), True)])


@needs_ipv6
@pytest.mark.parametrize("host, names_it", [("::1", "[::1]:{port}"), ("[::1]", "[::1]:{port}"),
                                            ("ip6-localhost", "ip6-localhost:{port} ([::1]:{port})"),
                                            ("dual-localhost", "dual-localhost:{port} ([::1]:{port})")])  # fmt: skip
def test_a_port_taken_on_ipv6_loopback_is_refused_before_the_model_loads(host, names_it, capsys, monkeypatch):
    """A name of 127.0.0.1 and ::1 was checked on 127.0.0.1 alone: a server holding the port on ::1
    was found by uvicorn once the model had loaded (exit 3); and ::1's port read as `::1:8000`."""
    resolving(monkeypatch, "ip6-localhost", "::1")
    resolving(monkeypatch, "dual-localhost", "127.0.0.1", "::1")
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_on(host, port, monkeypatch) == (2, [])
    said = capsys.readouterr().err
    assert said == f"streamgen serve: error: cannot listen on {names_it.format(port=port)}: Address already in use\n"


def test_an_address_of_a_family_this_machine_lacks_is_skipped_as_uvicorn_skips_it(monkeypatch):
    """A name of 127.0.0.1 and of an address no socket can be made for here (IPv6 switched off in the
    kernel) was a traceback: asyncio's create_server, uvicorn's, listens on the others."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, kind=0, proto=0, flags=0):
        if host != "odd-localhost":
            return real(host, port, family, kind, proto, flags)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                (socket.AF_INET6, socket.SOCK_STREAM, 254, "", ("::1", port, 0, 0))]  # (254: no such protocol)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(OSError):  # (as this kernel answers the family, here made of a protocol)
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 254)
    assert serve_on("odd-localhost", free_port(), monkeypatch) == (0, [("odd-localhost", True)])


@pytest.mark.parametrize("host, says", [
    ("127.0.0.1:8123", "holds a port: give --host 127.0.0.1 --port 8123"),
    ("[::1]:8123", "holds a port: give --host ::1 --port 8123"),
    ("http://127.0.0.1", "is a URL: give its host alone (e.g. 127.0.0.1), and its port as --port"),
    ("127.0.0.1 ", "holds spaces: give the address or name alone"),
])  # fmt: skip
def test_a_host_with_a_port_a_scheme_or_spaces_is_refused_in_words(host, says, capsys, monkeypatch):
    """They were 'cannot listen on [127.0.0.1:8123]:8000: Name or service not known'."""
    assert serve_on(host, free_port(), monkeypatch) == (2, [])
    assert capsys.readouterr().err == f"streamgen serve: error: --host {host!r} {says}\n"
