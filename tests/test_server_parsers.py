"""What a request's bytes come to at the connection level (server/connections.py), the same under
each of uvicorn's HTTP parsers (h11, httptools): over raw sockets to a live server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time

import pytest
from server_helpers import answer_until_closed, connect, live_server, send_each_read_alone

SESSION = b'POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request):
    with live_server(http=request.param, header_timeout_s=2) as (url, app):
        yield int(url.rsplit(":", 1)[1]), app




def test_a_half_closed_request_is_a_client_gone_and_frees_its_session(server, monkeypatch):
    """A client that sent its whole POST and shut its side (SHUT_WR) gets no answer: its FIN is a
    closed page's, which the create-session route must hear to free the session it made (see
    ConnectionLimits.eof_received). Served, the half-closed client would have its session, and a
    reloaded page's would hold a place until the unclaimed limit."""
    import asyncio
    import threading

    from server.connections import ConnectionLimits

    port, app = server
    registry = app.state.registry
    metrics = registry.metrics
    closed_before = metrics.sessions_closed.labels(reason="client left before the answer")._value.get()
    # the session is made once the server has the FIN: on a loaded machine the test's shutdown came
    # after a quick creation's 201, which was then rightly sent (a client that had not yet half-closed)
    fin_came, eof_received, create = threading.Event(), ConnectionLimits.eof_received, registry.create

    ours = {}  # this test's connection (its port): another's FIN (an earlier test's client, closed late on a
    # loaded machine) let the creation go on before ours, and its 201 went out before our FIN was read

    def fin_noted(protocol):
        peer = protocol.transport.get_extra_info("peername")
        if peer is not None and peer[1] == ours.get("port"):
            fin_came.set()
        return eof_received(protocol)

    async def create_after_the_fin(*args):
        for _ in range(200):  # bounded: 10 s
            if fin_came.is_set():
                break
            await asyncio.sleep(0.05)
        return await create(*args)

    monkeypatch.setattr(ConnectionLimits, "eof_received", fin_noted)
    monkeypatch.setattr(registry, "create", create_after_the_fin)
    with connect(port) as sock:
        ours["port"] = sock.getsockname()[1]
        sock.sendall(SESSION)
        sock.shutdown(socket.SHUT_WR)
        assert answer_until_closed(sock) == b""
    assert fin_came.is_set()
    monkeypatch.undo()
    for _ in range(300):  # bounded: 30 s for the session to be made and let go (on a loaded machine)
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


GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
FOLDED = "a header line begins with a space or tab (a value folded onto a line of its own, obs-fold): send each header on one line (RFC 9112, 5.2)"  # fmt: skip
BARE_LF = "a line of the request head ends in a bare LF: end each line with CRLF (RFC 9112, 2.2)"
CONTROL = "the request head has a control character, other than a tab, in its request line or a header (RFC 9110, 5.5)"
SIZE_LINE_BARE_LF = "a chunk's size line ends in a bare LF: end it with CRLF (RFC 9112, 7.1)"
DATA_BARE_LF = "a chunk's data is followed by a bare LF: end it with CRLF (RFC 9112, 7.1)"


NOT_CHUNKED = ("a Transfer-Encoding other than chunked is not taken here: send the body with its Content-Length, "
               "or chunked alone (RFC 9112, 6.1)")  # fmt: skip
CONNECT = "CONNECT asks for a tunnel, a proxy's work: this server is not a proxy"
POST = b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
CHUNKED_BODY = b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"


NOT_HTTP_TARGET = ("a request target of a scheme other than http or https is a proxy's to follow: this server is "
                   "not a proxy")  # fmt: skip
ONE_LENGTH = "a request must have one Content-Length header, its value one number (RFC 9112, 6.3)"
NOT_PARSED = "not a valid HTTP/1.1 request: its request line or a header could not be parsed"
PRI = ("PRI is no HTTP/1.1 method: it begins HTTP/2's connection preface ('PRI * HTTP/2.0', RFC 9113, 3.4), which "
       "this server does not speak: send HTTP/1.1")  # fmt: skip


def unknown_method(name: str) -> str:
    return (f"unknown method {name!r}: methods are case-sensitive, and this server's are GET, HEAD, POST, PATCH, "
            "DELETE and OPTIONS")  # fmt: skip


@pytest.mark.parametrize("request_bytes, status, said", [
    (GET.replace(b"GET ", b"get "), 400, {"error": "bad_request", "message": unknown_method("get")}),
    (GET.replace(b"GET ", b"Get "), 400, {"error": "bad_request", "message": unknown_method("Get")}),
    (GET.replace(b"GET ", b"FETCH "), 400, {"error": "bad_request", "message": unknown_method("FETCH")}),
    (GET.replace(b"Connection", b"X-Folded: a\r\n b\r\nConnection"), 400, {"error": "bad_request", "message": FOLDED}),
    (GET.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n X: a\r\n"), 400, {"error": "bad_request", "message": FOLDED}),
    (GET.replace(b"\r\n", b"\n"), 400, {"error": "bad_request", "message": BARE_LF}),
    (GET.replace(b"127.0.0.1\r\n", b"127.0.0.1\n"), 400, {"error": "bad_request", "message": BARE_LF}),
    (GET.replace(b"Connection", b"X-Control: a\x01b\r\nConnection"), 400, {"error": "bad_request", "message": CONTROL}),
    (GET.replace(b"Connection", b"X-Delete: a\x7fb\r\nConnection"), 400, {"error": "bad_request", "message": CONTROL}),
    (POST + b"Transfer-Encoding: gzip\r\n\r\n", 400, {"error": "bad_request", "message": NOT_CHUNKED}),
    (POST + b"Transfer-Encoding: gzip, chunked" + CHUNKED_BODY, 400, {"error": "bad_request", "message": NOT_CHUNKED}),
    (POST + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked" + CHUNKED_BODY, 400,
     {"error": "bad_request", "message": NOT_CHUNKED}),
    (POST + b"Transfer-Encoding: chunked, chunked" + CHUNKED_BODY, 400, {"error": "bad_request", "message": NOT_CHUNKED}),
    (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n", 400, {"error": "bad_request", "message": CONNECT}),
    (b"GET /healthz\r\n\r\n", 505, {"error": "http_version_not_supported",
                                   "message": "HTTP/0.9 is not spoken here: send HTTP/1.1"}),
    (GET.replace(b"HTTP/1.1", b"HTTP/1.2"), 505, {"error": "http_version_not_supported",
                                                  "message": "HTTP/1.2 is not spoken here: send HTTP/1.1"}),
    (GET.replace(b"HTTP/1.1", b"HTTP/2.0"), 505, {"error": "http_version_not_supported",
                                                  "message": "HTTP/2.0 is not spoken here: send HTTP/1.1"}),
    (GET.replace(b"GET ", b"GET\t"), 400, {"error": "bad_request", "message": NOT_PARSED}),
    (POST + b"Content-Length: 2, 2\r\n\r\n{}", 400, {"error": "bad_request", "message": ONE_LENGTH}),
    (POST + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400, {"error": "bad_request", "message": ONE_LENGTH}),
    (POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, {"error": "bad_request", "message": ONE_LENGTH}),
    (POST + b"Content-Length: +2\r\n\r\n{}", 400, {"error": "bad_request", "message": ONE_LENGTH}),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n", 400, {"error": "bad_request", "message": SIZE_LINE_BARE_LF}),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\n{}\n0\n\n", 400, {"error": "bad_request", "message": SIZE_LINE_BARE_LF}),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\n0\r\n\r\n", 400, {"error": "bad_request", "message": DATA_BARE_LF}),
    (GET.replace(b" /healthz", b" http://user@127.0.0.1/healthz"), 400, {"error": "bad_request", "message":
     "the request target's authority 'user@127.0.0.1' is not a host[:port] (RFC 9112, 3.2.2)"}),
    (GET.replace(b" /healthz", b" http:///healthz"), 400, {"error": "bad_request", "message": NOT_PARSED}),
    (GET.replace(b" /healthz", b" http://:80/healthz"), 400, {"error": "bad_request", "message": NOT_PARSED}),
    (GET.replace(b" /healthz", b" ftp://127.0.0.1/healthz"), 400, {"error": "bad_request", "message": NOT_HTTP_TARGET}),
    (GET.replace(b" /healthz", b" http://127.0.0.1/healthz"), 200, {"status": "ok"}),
    (b"GET http://127.0.0.1/healthz HTTP/1.0\r\n\r\n", 200, {"status": "ok"}),  # (RFC 9112 3.2: 1.0 needs no Host)
    (GET.replace(b" /healthz", b" http://127.0.0.1:/healthz"), 200, {"status": "ok"}),
    (GET.replace(b" /healthz", b" http://a_b/healthz"), 200, {"status": "ok"}),
    (GET.replace(b" /healthz", b" http://127.0.0.%31/healthz"), 200, {"status": "ok"}),
    (GET.replace(b" /healthz", b" http://[fe80::1%25eth0]/healthz"), 200, {"status": "ok"}),
    (GET.replace(b" /healthz", b" http://a:b/healthz"), 400, {"error": "bad_request", "message":
     "the request target's authority 'a:b' is not a host[:port] (RFC 9112, 3.2.2)"}),
    (GET.replace(b" /healthz", b" http://[::1/healthz"), 400, {"error": "bad_request", "message":
     "the request target's authority '[::1' is not a host[:port] (RFC 9112, 3.2.2)"}),
    (POST + b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\n[]", 400, {"error": "bad_request",
     "message": "a request must not have both Transfer-Encoding and Content-Length (RFC 9112, 6.1)"}),
    (GET.replace(b"GET ", b"GET  "), 400, {"error": "bad_request", "message": NOT_PARSED}),
    (GET.replace(b" HTTP/1.1", b"  HTTP/1.1"), 400, {"error": "bad_request", "message": NOT_PARSED}),
    (GET.replace(b" /healthz", b" healthz"), 400, {"error": "bad_request", "message": NOT_PARSED}),
    (b"\r\n" + GET, 200, {"status": "ok"}),  # (RFC 9112 2.2: a server SHOULD ignore an empty line before it)
    (GET.replace(b"GET ", b"PRI "), 400, {"error": "bad_request", "message": PRI}),
    (GET.replace(b"GET /healthz", b"PRI *"), 400, {"error": "bad_request", "message": PRI}),
    (GET.replace(b"Connection", b"X-Tab: a\tb\r\nConnection"), 200, {"status": "ok"}),
], ids=["get", "Get", "unknown", "folded", "space-after-request-line", "bare-lf", "one-bare-lf", "control",
        "delete", "gzip", "gzip-chunked", "gzip-then-chunked", "chunked-twice", "connect", "http-0.9", "http-1.2",
        "http-2.0", "tab-after-method", "length-list", "length-twice", "lengths-differ", "length-plus", "chunk-size-bare-lf",
        "chunk-lines-all-bare-lf", "chunk-data-bare-lf", "target-userinfo", "target-no-host", "target-port-alone",
        "target-ftp", "target-absolute", "target-absolute-http-1.0-no-host", "target-empty-port", "target-underscore", "target-percent-host",
        "target-ipv6-zone", "target-port-letters", "target-bracket-open", "identity-and-length", "two-spaces-after-method", "two-spaces-before-version", "target-no-slash",
        "empty-line-first", "pri-path", "pri-asterisk",
        "tab"])  # fmt: skip
def test_a_head_either_parser_would_refuse_is_answered_the_same_by_both(server, request_bytes, status, said):
    """h11 served a lowercase or unknown method as a 405 ('get is not allowed'), a folded header,
    bare LFs and control characters in a value as a 200, and refused an empty line before the
    request line, where httptools answered a 400 'could not be parsed' (and served that line): a
    client's request was answered by which parser the server had. httptools served a body of a
    coding besides chunked (gzip, chunked) as if it were not coded, h11 refused it as one that did
    not parse; h11 answered CONNECT's authority 404 'nothing at /127.0.0.1:443' and kept the
    connection, and an HTTP/0.9 request line (no version) 400, where httptools said 505 that
    HTTP/0.9 is not spoken; h11 served HTTP/1.2, httptools said 505 without naming the version.
    Each is the same answer under both."""
    with connect(server[0]) as sock:
        sock.sendall(request_bytes)
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer
    assert json.loads(body) == said


def test_content_length_lines_are_counted_across_reads():
    """A head's lines come in any pieces: a second Content-Length split over two reads is still a
    second, and another header whose name ends so (X-Content-Length) or a comma elsewhere is none."""
    from server.request_heads import ContentLengths

    lengths = ContentLengths()
    for piece in (b"POST / HTTP/1.1\r\nHost: a, b\r\nX-Content-Length: 1, 2\r\nContent-Le", b"ngth: 2\r\nConte"):
        assert lengths.refused(piece) is None
    assert lengths.refused(b"nt-length: 2\r\n\r\n") == ContentLengths.REFUSED and not lengths.codings
    lengths = ContentLengths()
    assert lengths.refused(b"POST / HTTP/1.1\r\nTransfer-Enc") is None and not lengths.codings
    assert lengths.refused(b"oding: gzip\r\nContent-Length: 2\r\n") is None and lengths.codings and lengths.lines == 1
    lengths = ContentLengths()
    assert lengths.refused(b"POST / HTTP/1.1\r\nContent-Length: 2,") is None  # (its line not ended yet)
    assert lengths.refused(b" 2\r\n") == ContentLengths.REFUSED


@pytest.mark.parametrize("target_host, host, status", [("127.0.0.1:{port}", "other.example", 201),
                                                       ("other.example", "127.0.0.1:{port}", 403),
                                                       ("127.0.0.1:{port}", None, 201),
                                                       ("other.example", None, 403)],
                         ids=["target-ours", "target-other", "http-1.0-no-host-ours", "http-1.0-no-host-other"])
def test_an_absolute_target_names_the_server_in_place_of_host(server, target_host, host, status):
    """RFC 9112 3.2.2: a server takes the host of a request target in absolute form
    (`POST http://host/path`), and ignores its Host header. The origin guard read the Host header:
    a page's POST to this server was refused as a foreign page's where Host named another, and one
    addressed to another server was served where Host named this one. An HTTP/1.0 request needs no
    Host header (RFC 9112 3.2): its target's authority is its host, where none was taken (the POST
    to this server refused as a foreign page's, under both parsers)."""
    port = server[0]
    origin = f"http://127.0.0.1:{port}"
    version, host_line = ("HTTP/1.1", f"Host: {host.format(port=port)}\r\n") if host else ("HTTP/1.0", "")
    request = (f"POST http://{target_host.format(port=port)}/v1/sessions {version}\r\n{host_line}"
               f"Origin: {origin}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}")
    with connect(port) as sock:
        sock.sendall(request.encode())
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer
    if status == 201:
        made = json.loads(body)
        with connect(port) as sock:
            sock.sendall(b"DELETE %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
                         % (made["resource"].encode(), made["token"].encode()))  # fmt: skip
            assert answer_until_closed(sock).startswith(b"HTTP/1.1 204 ")
    else:
        assert json.loads(body)["error"] == "cross_origin", body


KEPT = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # (its connection kept open for the next)


@pytest.mark.parametrize("second, status, said", [
    (KEPT.replace(b"GET ", b"get "), 400, {"error": "bad_request", "message": unknown_method("get")}),
    (KEPT.replace(b"127.0.0.1\r\n", b"127.0.0.1\n"), 400, {"error": "bad_request", "message": BARE_LF}),
    (b"GET /healthz\r\n\r\n", 505, {"error": "http_version_not_supported",
                                   "message": "HTTP/0.9 is not spoken here: send HTTP/1.1"}),
    (KEPT.replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"), 431,
     {"error": "headers_too_large", "message": "request headers larger than 64 KiB"}),
    (GET, 200, {"status": "ok"}),
], ids=["unknown-method", "bare-lf", "http-0.9", "too-large", "served"])  # fmt: skip
def test_a_pipelined_request_has_the_checks_of_a_first_one(server, second, status, said):
    """A second request sent in the same packet as the first (pipelined) went to the parser with
    the first, none of its bytes looked at: h11 served a lowercase method as a 405 and a bare LF as
    a 200, and a head of any size; under httptools one that did not parse was a 400 sent before the
    first request's answer, which was lost. The first is answered, then the second as it would be alone."""
    with connect(server[0]) as sock:
        sock.sendall(KEPT + second)
        answer = answer_until_closed(sock)
    answers = answer.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"%d" % status], answer[:2000]
    assert json.loads(answers[1].partition(b"\r\n\r\n")[2]) == said


def test_a_request_pipelined_after_a_body_has_the_checks_too(server):
    """The next request in the same packet as the last bytes of a body (by its Content-Length)
    went to the parser with them, unlooked at."""
    first = b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"
    with connect(server[0]) as sock:
        sock.sendall(first + KEPT.replace(b"GET ", b"get "))
        answer = answer_until_closed(sock)
    answers = answer.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2 and answers[0][:1] == b"4" and answers[1][:3] == b"400", answer  # ([]: not a session's)
    assert json.loads(answers[1].partition(b"\r\n\r\n")[2]) == {"error": "bad_request", "message": unknown_method("get")}


def test_a_head_split_two_bytes_after_a_crlf_is_served(server, server_reads):
    """A read that ended two bytes after a line's CRLF ('...\\r\\nCo', then 'nnection: ...') left the
    next read's look at its bytes without that line's CR: its LF was taken for a bare one, a 400. Each
    of a head's lines here comes so (a slow uplink's pieces), each piece sent once the server has read
    those before it (a 0.05 s pause between them let a loaded machine read several at once)."""
    cuts = [at + 4 for at in range(len(GET)) if GET.startswith(b"\r\n", at) and at + 4 < len(GET)]
    parts = [GET[start:end] for start, end in zip([0, *cuts], [*cuts, len(GET)])]
    with connect(server[0]) as sock:
        read_before = send_each_read_alone(sock, parts, server_reads)
        answer = answer_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert read_before == [sum(map(len, parts[:i])) for i in range(len(parts))], (read_before, server_reads)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "in-pieces"])
@pytest.mark.parametrize("target, query", [
    (b"http://127.0.0.1?x=1", b"x=1"),
    (b"http://127.0.0.1", b""),
    (b"HTTP://127.0.0.1:{port}?x=1", b"x=1"),
    (b"http://127.0.0.1:?x=1", b"x=1"),
    (b"http://[::1]?x=1", b"x=1"),
    (b"http://127.0.0.1#top", b""),
], ids=["query", "no-query", "port", "empty-port", "ipv6", "fragment"])  # fmt: skip
def test_an_absolute_target_without_a_path_is_served_at_the_root(server, server_reads, monkeypatch, target, query, split):
    """RFC 9112 3.2.2 (RFC 9110 4.2.3): the path of `GET http://host?x=1` is '/'. llhttp refused a
    target in absolute form without a path as a request that did not parse (a 400), where h11 served
    it: the page, as `GET /?x=1`. Served as that under both, its bytes whole or a few at a time."""
    from server.app import WebFiles

    asked, get_response = [], WebFiles.get_response

    async def noted(files, path, scope):
        asked.append((scope["path"], scope["query_string"]))
        return await get_response(files, path, scope)

    monkeypatch.setattr(WebFiles, "get_response", noted)
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % target.replace(
        b"{port}", b"%d" % server[0])
    # in pieces: each sent once the server has read those before it (a 0.01 s pause between them let
    # a loaded machine read several at once, or the request whole)
    parts = [request[at : at + 3] for at in range(0, len(request), 3)] if split else [request]
    with connect(server[0]) as sock:
        read_before = send_each_read_alone(sock, parts, server_reads)
        answer = answer_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"<!doctype html>" in answer, answer[:300]
    assert asked == [("/", query)]
    assert read_before == [sum(map(len, parts[:i])) for i in range(len(parts))], (read_before, server_reads)


def test_an_absolute_target_is_taken_apart_the_same_whatever_its_reads():
    """The parser is given its path and query ('/' where it has none) however the request line is
    split, its scheme and authority kept (an empty port's ':' dropped); another target goes as it came."""
    from server.request_heads import AbsoluteTarget

    given = {b"GET http://h?x HTTP/1.1\r\n": (b"GET /?x HTTP/1.1\r\n", b"http", b"h"),
             b"GET HTTP://h:80 HTTP/1.1\r\n": (b"GET / HTTP/1.1\r\n", b"HTTP", b"h:80"),
             b"GET http://[::1]:#f HTTP/1.1\r\n": (b"GET /#f HTTP/1.1\r\n", b"http", b"[::1]"),
             b"GET http://h:/a HTTP/1.1\r\n": (b"GET /a HTTP/1.1\r\n", b"http", b"h"),
             b"GET ftp://u@h/a?b HTTP/1.1\r\n": (b"GET /a?b HTTP/1.1\r\n", b"ftp", b"u@h"),
             b"GET http:///a HTTP/1.1\r\n": (b"GET /a HTTP/1.1\r\n", b"http", b"")}  # fmt: skip
    for line in (b"GET /a?b HTTP/1.1\r\n", b"GET * HTTP/1.1\r\n", b"GET http:/a HTTP/1.1\r\n", b"GET h:80 HTTP/1.1\r\n",
                 b"GET\r\n"):  # fmt: skip
        given[line] = (line, None, None)
    for line, (parsed, scheme, authority) in given.items():
        for size in range(1, len(line) + 1):
            target = AbsoluteTarget()
            assert b"".join(target.feed(line[at : at + size]) for at in range(0, len(line), size)) == parsed, size
            assert (target.scheme, target.authority) == (scheme, authority), size


@pytest.mark.parametrize("version, expect, continued", [
    (b"1.1", b"100-continue", True),
    (b"1.1", b"100-Continue", True),
    (b"1.1", b"x-trace, 100-continue", True),
    (b"1.0", b"100-continue", False),
], ids=["expect", "case", "in-a-list", "http-1.0"])  # fmt: skip
def test_an_expected_100_continue_is_sent_the_same_by_both(server, version, expect, continued):
    """RFC 9110 10.1.1: an Expect of 100-continue, in a list too, is answered 100 before the body is
    read, one of an HTTP/1.0 request ignored (its client cannot read a 1xx). httptools sent its 100 to
    an HTTP/1.0 client and none where the expectation was in a list, where h11 does as the RFC has it."""
    request = (b"POST /v1/sessions HTTP/%s\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nExpect: %s\r\n"
               b"Content-Length: 2\r\nConnection: close\r\n\r\n[]" % (version, expect))  # fmt: skip
    with connect(server[0]) as sock:
        sock.sendall(request)  # (its body with it: each parser still answers 100 as the route reads it)
        answer = answer_until_closed(sock)
    statuses = [response[:3] for response in answer.split(b"HTTP/1.1 ")[1:]]
    assert statuses == ([b"100", b"400"] if continued else [b"400"]), answer  # ([]: not a session's)


@pytest.mark.parametrize("version", [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/3.0"])
def test_an_http_version_not_spoken_is_named_when_its_line_comes_in_pieces(server, version):
    """llhttp refuses the version as its last digit comes, before the line's end, where the server
    names it: its 505 said 'its HTTP version is not spoken here' where h11's (and httptools' for the
    line whole) said 'HTTP/1.2 is not spoken here'."""
    request = GET.replace(b"HTTP/1.1", version)
    with connect(server[0]) as sock:
        for at in range(len(request)):
            try:
                sock.sendall(request[at : at + 1])
            except OSError:  # (refused as it came: the rest is not read)
                break
            time.sleep(0.002)  # (each byte its own read, or a few together)
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 "), answer
    assert json.loads(body) == {"error": "http_version_not_supported",
                                "message": f"{version.decode()} is not spoken here: send HTTP/1.1"}  # fmt: skip


@pytest.mark.parametrize("request_bytes, status", [
    (GET.replace(b"GET /healthz", b"HEAD healthz"), 400),
    (GET.replace(b"GET /healthz", b"HEAD http:/healthz"), 400),
    (GET.replace(b"GET /healthz HTTP/1.1", b"HEAD /healthz HTTP/1.2"), 505),
    (GET.replace(b"GET ", b"HEAD ").replace(b"127.0.0.1\r\n", b"127.0.0.1\n"), 400),
    (GET.replace(b"GET ", b"HEAD ").replace(b"Host: 127.0.0.1\r\n", b""), 400),
], ids=["target-no-slash", "target-scheme-alone", "http-1.2", "bare-lf", "no-host"])  # fmt: skip
def test_a_refused_head_request_is_answered_without_a_body(server, request_bytes, status):
    """RFC 9110 9.3.2: no content answers a HEAD. The refusals written by the connection had their
    JSON body all the same, which the app's (uvicorn's) leave out: a HEAD whose target one parser
    refused as it parsed it (httptools: 'HEAD healthz') had a body, under h11 none."""
    with connect(server[0]) as sock:
        sock.sendall(request_bytes)
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"content-length: " in head.lower(), answer
    assert body == b"", answer


@pytest.mark.parametrize("request_bytes, said", [
    (GET.replace(b" /healthz", b" http:/healthz"), {"error": "bad_request", "message": NOT_PARSED}),
    (POST + b"Transfer-Encoding: ,chunked\r\n\r\n", {"error": "bad_request", "message": NOT_CHUNKED}),
], ids=["target-scheme-alone", "codings-list"])  # fmt: skip
def test_a_refusal_is_the_same_bytes_whether_the_connection_or_the_app_writes_it(server, request_bytes, said):
    """A request one parser refuses as it parses it (the connection's answer) and the other serves to
    the app's refusal had the same JSON in other bytes: the connection's spaced (', ', ': '), the
    app's compact, so its Content-Length differed too. Each is the app's JSON (non-ASCII in UTF-8)."""
    with connect(server[0]) as sock:
        sock.sendall(request_bytes)
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body == json.dumps(said, ensure_ascii=False, separators=(",", ":")).encode(), answer
    assert b"content-length: %d\r\n" % len(body) in head.lower() + b"\r\n", head
