"""A request's head under its deadline and its bound on size, and the rest of a body answered
unread (server/connections.py): over raw sockets to a live server on 127.0.0.1, with each of
uvicorn's HTTP parsers (`limited_server`, tests/conftest.py)."""

from __future__ import annotations

import json
import time

import pytest
from server_helpers import (
    HEADER_TIMEOUT_S,
    answer_until_closed,
    connect,
    read_response,
    send_each_read_alone,
)


def test_headers_that_never_end_are_answered_408_and_closed(limited_server):
    """A client sending its headers a byte at a time, never the blank line, held its connection for good."""
    with connect(limited_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        answer = answer_until_closed(sock)  # (a timeout here: held for good)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower(), head
    assert json.loads(body)["error"] == "header_timeout"


def test_a_head_too_large_to_be_one_is_refused_not_taken_in_whole(limited_server):
    """httptools kept a head whole however large: one header of 13 MB was read in without a word."""
    from server.connections import MAX_HEAD_BYTES

    with connect(limited_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Large: " + b"a" * (MAX_HEAD_BYTES + 16 * 1024))
        answer = answer_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer
    assert json.loads(body)["error"] == "headers_too_large"


def test_a_head_too_large_whose_end_comes_in_a_read_is_refused_by_its_size(limited_server, server_reads):
    """A head past the bound was refused only while it had not all come: one whose end came in the
    read that took it past was served under h11, and a 400 'could not be parsed' under httptools,
    which refuses a URL of 64 KiB or more. (Its URL is what is too long: a 414.) The rest is sent
    once the server has read the first part: a pause alone (0.05 s) let a loaded machine read both
    parts at once, a head whole in one read, and the test passed without its case."""
    from server.connections import MAX_HEAD_BYTES

    head = b"GET /v1/" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    first = head[: MAX_HEAD_BYTES - 1024]  # (the head's end in a later read, past the bound)
    with connect(limited_server) as sock:
        read_before = send_each_read_alone(sock, [first, head[len(first) :]], server_reads)
        answer = answer_until_closed(sock)
    # the first part read whole before the rest was sent: the head's end came in a later read
    assert read_before == [0, len(first)] and len(first) < sum(server_reads), server_reads
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:300]


@pytest.mark.parametrize("at_once", [True, False], ids=["whole", "in-parts"])
def test_a_url_too_long_is_a_414_that_says_so(limited_server, at_once):
    """It was a 431 'request headers larger than 64 KiB', which sent a client looking among headers
    it had not set; a head too large past a short URL is the 431."""
    from server.connections import MAX_HEAD_BYTES

    head = b"GET /healthz?q=" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connect(limited_server) as sock:
        sock.sendall(head if at_once else head[: MAX_HEAD_BYTES + 16])  # (the line not ended: still too long)
        status, _, body = answer_until_closed(sock).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 414 "), status
    assert json.loads(body) == {"error": "uri_too_long", "message": "request target (URL) longer than 64 KiB"}


def test_a_head_within_the_bound_is_served_by_either_parser(limited_server, server_reads):
    """h11 refused a head over 16 KiB (its own bound) as a request that did not parse, a 400 that
    httptools served: a page's cookies of another site on the same host reach that. (h11's bound is
    on a head not yet complete: one read whole it took; so each part is sent once the server has
    read those before it, as a slow uplink sends it.)"""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: " + b"a" * 40 * 1024 + b"\r\n\r\n"
    parts = [head[at : at + 8 * 1024] for at in range(0, len(head), 8 * 1024)]
    with connect(limited_server) as sock:
        read_before = send_each_read_alone(sock, parts, server_reads)
        answer = read_response(sock)[0]
    # each part read whole before the next was sent: over 16 KiB of the head read before its end
    assert read_before == [sum(map(len, parts[:i])) for i in range(len(parts))], (read_before, server_reads)
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_the_rest_of_a_body_answered_unread_is_not_taken_for_the_next_head(limited_server, server_reads):
    """A request answered before its body was read whole (a 413 from its Content-Length, a route that
    reads none): the rest of that body was counted as the next request's head, a 431 written after
    the answer and the connection closed under a client still uploading. (Its case: the body's rest
    in reads after the answer, each part sent once the server has read those before it.)"""
    from server.connections import MAX_HEAD_BYTES

    body = b"x" * (2 * MAX_HEAD_BYTES)
    parts = [body[at : at + 16 * 1024] for at in range(0, len(body), 16 * 1024)]
    with connect(limited_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
        answered_at = sum(server_reads)
        read_before = send_each_read_alone(sock, parts + [b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
                                           server_reads)  # fmt: skip
        head, said = read_response(sock)
    # each part read whole before the next was sent: past MAX_HEAD_BYTES of the body in reads after the answer
    assert read_before == [answered_at + sum(map(len, parts[:i])) for i in range(len(parts) + 1)], (read_before, server_reads)
    assert head.startswith(b"HTTP/1.1 200 ") and said["ready"], (head, said)


def test_a_chunked_bodys_trailers_are_not_taken_in_without_bound(limited_server):
    """httptools took them in whole, each appended to the request's headers: 20 MB of them grew
    the server by 400 MB in 4 s. Past 64 KiB they are the 431 under both parsers (h11 took them up
    to its own bound of 64 + 256 KiB, then a 400 'could not be parsed')."""
    refused = False
    with connect(limited_server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")  # fmt: skip
        try:
            for _ in range(800):  # 8 MB, more than the socket's buffers hold
                sock.sendall(b"X-Trailer: y\r\n" * 700)
        except OSError:  # (closed, or reset with its bytes unread)
            refused = True
    assert refused, "8 MB of trailers were taken in"
    with connect(limited_server) as sock:  # (its answer: h11's own 400 'could not be parsed' was one past its bound)
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
    with connect(limited_server) as sock:  # a few trailers are served, not taken for headers
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Checksum: 1\r\n\r\n")  # fmt: skip
        assert read_response(sock)[0].startswith(b"HTTP/1.1 201 ")


def test_the_rest_of_a_body_answered_unread_has_a_deadline_too(limited_server):
    """(its bytes ignored as they come, a client trickling them would hold the connection for good)"""
    with connect(limited_server) as sock:
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


def test_a_connection_that_sends_nothing_is_closed(limited_server):
    with connect(limited_server) as sock:
        assert answer_until_closed(sock) == b""


def test_the_next_head_on_a_kept_alive_connection_has_the_same_deadline(limited_server):
    with connect(limited_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert answer_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_head_that_arrived_in_time_is_not_cut_while_its_body_comes(limited_server):
    """The head's deadline ends with the head: its body has the body's (ServerConfig.body_timeout_s)."""
    with connect(limited_server) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2\r\n\r\n")  # fmt: skip
        time.sleep(2 * HEADER_TIMEOUT_S)
        sock.sendall(b"{}")
        head, said = read_response(sock)
    assert head.startswith(b"HTTP/1.1 201 "), (head, said)


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
    # (--port 0: serve binds before uvicorn's run; a port from free_port, let go, could be taken by
    # another test process meanwhile, and serve refused it)
    assert main(["serve", "--model", "debug", "--port", "0", option, "90.5"]) == 0
    assert main(["serve", "--model", "debug", "--port", "0"]) == 0
    assert [getattr(c, field) for c in configs] == [90.5, default]
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", "debug", "--port", "0", f"{option}={given}"])
    assert exit.value.code == 2 and f"argument {option}: {says}" in capsys.readouterr().err
