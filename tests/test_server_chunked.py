"""A chunked request body's framing (server/chunked_bodies.py), the same under each of uvicorn's
HTTP parsers (h11, httptools): over raw sockets to a live server on 127.0.0.1."""

from __future__ import annotations

import json
import time

import pytest
from server_helpers import answer_until_closed, connect, live_server

POST = (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n")  # fmt: skip
GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
NOT_PARSED = ("a chunked body's framing could not be parsed: each chunk is its size in hexadecimal (and its "
              "extensions, ';name=value') and CRLF, its data and CRLF, the last one's size 0, then its trailers "
              "and an empty line (RFC 9112, 7.1)")  # fmt: skip
SIZE_TOO_LARGE = "a chunk's size must be below 2^64, in at most 20 hexadecimal digits (RFC 9112, 7.1)"
SIZE_LINE_BARE_LF = "a chunk's size line ends in a bare LF: end it with CRLF (RFC 9112, 7.1)"
DATA_BARE_LF = "a chunk's data is followed by a bare LF: end it with CRLF (RFC 9112, 7.1)"
TRAILERS_BARE_LF = ("a line of the chunked body's trailers (or the empty line that ends them) ends in a bare LF: "
                    "end each line with CRLF (RFC 9112, 7.1.2)")  # fmt: skip
TRAILER_FOLDED = ("a line of the chunked body's trailers begins with a space or tab (a value folded onto a line of "
                  "its own, obs-fold): send each trailer on one line (RFC 9112, 5.2)")  # fmt: skip
TRAILER_CONTROL = "the chunked body's trailers have a control character, other than a tab (RFC 9110, 5.5)"
SIZE_LINE_TOO_LARGE = "a chunk's size line (with its extensions) longer than 64 KiB: send fewer extensions (RFC 9112, 7.1.1)"


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request):
    with live_server(http=request.param, header_timeout_s=2) as (url, app):
        yield int(url.rsplit(":", 1)[1])


def send(sock, data: bytes, split: bool) -> None:
    """`data`, whole or a byte at a time (each its own write: the server reads them apart, or a few
    together), until the server has closed (a refusal as its bytes come: the rest is not read)."""
    for at in range(0, len(data), 1 if split else len(data)):
        try:
            sock.sendall(data[at : at + 1] if split else data)
        except OSError:  # (closed, or reset with the bytes after the refusal unread)
            return
        time.sleep(0.001)


def answer_of(sock) -> bytes:
    """All the server sent until it closed: a reset (of bytes sent after it refused) ends it too."""
    answer = b""
    try:
        while part := sock.recv(65536):
            answer += part
    except ConnectionResetError:
        pass
    return answer


def answers(answer: bytes) -> list[tuple[int, dict]]:
    """Each response's status and JSON body, of all that came until the connection closed."""
    said = []
    for response in answer.split(b"HTTP/1.1 ")[1:]:
        head, _, body = response.partition(b"\r\n\r\n")
        said.append((int(head[:3]), json.loads(body)))
    return said


def delete_session(port: int, made: dict) -> None:
    with connect(port) as sock:
        sock.sendall(b"DELETE %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
                     % (made["resource"].encode(), made["token"].encode()))  # fmt: skip
        assert answer_until_closed(sock).startswith(b"HTTP/1.1 204 ")


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("body, message", [
    (b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n", SIZE_TOO_LARGE),
    (b"10000000000000000\r\n{}\r\n0\r\n\r\n", SIZE_TOO_LARGE),
    (b"000000000000000000002\r\n{}\r\n0\r\n\r\n", SIZE_TOO_LARGE),
    (b"2\r\n{}\r\n0\r\n\n", TRAILERS_BARE_LF),
    (b"2\r\n{}\r\n0\r\nX-Sum: 1\n\r\n", TRAILERS_BARE_LF),
    (b"2\r\n{}\r\n0\r\nX-Sum: 1\r\n 2\r\n\r\n", TRAILER_FOLDED),
    (b"2\r\n{}\r\n0\r\nX-Sum: 1\x012\r\n\r\n", TRAILER_CONTROL),
    (b"2;a\x01\r\n{}\r\n0\r\n\r\n", NOT_PARSED),
    (b"2 ;a=b\r\n{}\r\n0\r\n\r\n", NOT_PARSED),
    (b"0x2\r\n{}\r\n0\r\n\r\n", NOT_PARSED),
    (b"\r\n{}\r\n0\r\n\r\n", NOT_PARSED),
    (b"2\r\n{}XX0\r\n\r\n", NOT_PARSED),
    (b"2\r{}\r\n0\r\n\r\n", NOT_PARSED),
    (b"2\r\n{}\r\n0\r\nX-Sum\r\n\r\n", NOT_PARSED),
    (b"2\n{}\r\n0\r\n\r\n", SIZE_LINE_BARE_LF),
    (b"2\r\n{}\n0\r\n\r\n", DATA_BARE_LF),
], ids=["size-past-64-bits-20-digits", "size-2^64", "size-21-digits", "last-line-bare-lf", "trailer-bare-lf",
        "trailer-folded", "trailer-control", "extension-control", "space-before-extension", "size-0x", "size-empty",
        "data-not-crlf", "size-cr-alone", "trailer-no-colon", "size-bare-lf", "data-bare-lf"])  # fmt: skip
def test_chunked_framing_either_parser_would_refuse_is_answered_the_same_by_both(server, body, message, split):
    """h11 waited on a chunk size past 64 bits for its data until the body's deadline's 408 (30 s and
    more), where httptools refused it at once; h11 took a bare LF ending the trailers, a trailer folded
    or with a control character, and a control character in an extension, which httptools refused, and
    refused a size of 21 digits that httptools took. Each is the same prompt 400 under both, its bytes
    whole or a byte at a time (a read that times out fails the test: 10 s)."""
    with connect(server) as sock:
        sock.sendall(POST + b"\r\n")
        send(sock, body, split)
        assert answers(answer_of(sock)) == [(400, {"error": "bad_request", "message": message})]


@pytest.mark.parametrize("body", [
    b"2\r\n{}\r\n0\r\n\r\n",
    b"1;name=value;flag\r\n{\r\n1;q=\"a \\\" b\"\r\n}\r\n0;last=1\r\n\r\n",
    b"2\r\n{}\r\n0\r\nX-Sum: 1\r\nX-Tab: a\tb\r\n\r\n",
    b"00000000000000000002\r\n{}\r\n0000\r\n\r\n",
    b"A\r\n{" + b" " * 9 + b"\r\n1\r\n}\r\n0\r\n\r\n",
    b"2\r\n{}\r\n0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
], ids=["plain", "extensions", "trailers", "size-20-digits", "upper-hex", "framing-trailers"])  # fmt: skip
@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_valid_chunked_bodies_are_served_under_both(server, body, split):
    """Chunk extensions (a token, a quoted string), trailers and leading zeros are RFC 9112 7.1's:
    served, whole or a byte at a time, and the request pipelined after the body answered after it.
    A trailer of the message's framing (Content-Length, Transfer-Encoding) is dropped as any other
    (RFC 9112 7.1.2), as h11 dropped it: httptools refused it as a head with both, a 400."""
    with connect(server) as sock:
        sock.sendall(POST + b"\r\n")
        send(sock, body + GET, split)
        said = answers(answer_of(sock))
    assert [status for status, _ in said] == [201, 200], said
    delete_session(server, said[0][1])


def test_a_large_chunked_body_over_many_reads_is_served_then_the_next_request(server):
    """3 MB in chunks of 16 KiB (each with an extension), the request pipelined after it in its last write."""
    body = b"{" + b" " * (3 * 1024 * 1024) + b"}"
    chunks = b"".join(b"%x;n=%d\r\n%s\r\n" % (len(body[at : at + 16384]), at, body[at : at + 16384])
                      for at in range(0, len(body), 16384))  # fmt: skip
    data = chunks + b"0\r\nX-Sum: 1\r\n\r\n" + GET
    with connect(server) as sock:
        sock.sendall(POST + b"\r\n")
        for at in range(0, len(data), 64 * 1024):
            sock.sendall(data[at : at + 64 * 1024])
        said = answers(answer_of(sock))
    assert [status for status, _ in said] == [201, 200], said
    delete_session(server, said[0][1])


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_a_request_pipelined_after_a_chunked_body_has_the_checks_of_a_first_one(server, split):
    """The next request in the same read as a chunked body's last bytes went to the parser with them,
    none of its head's checks made: h11 served a lowercase method as a 405, httptools answered a 400
    'could not be parsed' in place of the first request's answer."""
    with connect(server) as sock:
        sock.sendall(POST + b"\r\n")
        send(sock, b"2\r\n[]\r\n0\r\n\r\n" + GET.replace(b"GET ", b"get "), split)
        said = answers(answer_of(sock))
    assert [status for status, _ in said] == [400, 400], said  # ([]: not a session's)
    # (a byte at a time, 'g' alone is no method's beginning: refused as it comes)
    assert said[0][1]["error"] == "bad_json" and said[1][1]["message"].startswith("unknown method 'g"), said


def test_the_framing_is_found_the_same_whatever_its_reads():
    """Where the body ends, and what of it the parser is given (all but its trailers), do not depend
    on how its bytes are split."""
    from server.chunked_bodies import ChunkedBody

    body = b"3;a=\"x\"\r\nabc\r\n10\r\n" + b"d" * 16 + b"\r\n0\r\nX-Sum: 1\r\n\r\n"
    for size in (1, 2, 3, 7, len(body) + 5):
        scanner, taken, given, data = ChunkedBody(1024), 0, b"", body + b"GET /"
        for at in range(0, len(data), size):
            parsed, used, refused = scanner.feed(data[at : at + size])
            assert refused is None
            taken, given = taken + used, given + parsed
            if scanner.done:
                break
        assert scanner.done and taken == len(body) and given == body.replace(b"X-Sum: 1\r\n", b""), size  # (trailers dropped)
    scanner = ChunkedBody(1024)  # (a size past the bounds is refused as it comes, before its line ends)
    assert scanner.feed(b"ffff")[2] is None and scanner.feed(b"ffffffffffff1")[2] is not None
    scanner = ChunkedBody(1024)  # (trailers past the bound: too large)
    assert scanner.feed(b"0\r\n" + b"X-T: 1\r\n" * 100)[2] is None
    assert scanner.feed(b"X-T: 1\r\n" * 100)[2] == "request trailers larger than 1 KiB" and scanner.too_large
    scanner = ChunkedBody(1024)  # (a size line past it: its extensions, which are no header fields)
    assert scanner.feed(b"2" + b";a=b" * 300)[2] == SIZE_LINE_TOO_LARGE.replace("64", "1") and not scanner.too_large


def test_trailers_past_64_kib_are_the_same_431_under_both(server):
    """httptools answered more than 64 KiB of a body's trailers 431, h11 took them up to its own bound
    (64 + 256 KiB: then its 400 'could not be parsed')."""
    with connect(server) as sock:
        sock.sendall(POST + b"\r\n2\r\n{}\r\n0\r\n")
        send(sock, b"X-Trailer: y\r\n" * 5000 + b"\r\n", split=False)  # (70 KB)
        said = answers(answer_of(sock))
    assert said == [(431, {"error": "headers_too_large", "message": "request trailers larger than 64 KiB"})], said


def test_a_chunk_size_line_past_64_kib_is_refused_as_one(server):
    """Its extensions were counted as the body's trailers: a 431 'request trailers larger than 64 KiB'
    sent its client looking among trailers it had not sent."""
    with connect(server) as sock:
        sock.sendall(POST + b"\r\n")
        send(sock, b"2" + b";a=b" * 17000 + b"\r\n{}\r\n0\r\n\r\n", split=False)  # (68 KB)
        said = answers(answer_of(sock))
    assert said == [(400, {"error": "bad_request", "message": SIZE_LINE_TOO_LARGE})], said
