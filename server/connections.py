"""uvicorn's HTTP protocol with a deadline for each request's head and a bound on open connections.

uvicorn times nothing before a request's head is complete: a client that connected and sent
nothing, or sent its headers a byte at a time and never the blank line that ends them (a
slowloris), held its socket for as long as it liked, and a few hundred of them used up the
process's file descriptors, so that no page, session or health check was answered. Here a
connection whose request head has not all arrived within `ServerConfig.header_timeout_s` (from
its first byte, or from the connection if it sends none) is answered 408 and closed, one larger
than `MAX_HEAD_BYTES` 431 (httptools kept any head whole, however large), one that does not parse
400 in the API's JSON; and while
`ServerConfig.max_connections` connections are open (WebSockets included), a request that
arrives on another is answered 503 with `Retry-After`, in the API's JSON and with the CORS
headers of `serve --cors-origin`, and its connection closed, rather than the server taking on
more than it can hold. The 408, 431 and 400 answer a head that was never parsed whole: an Origin
header among the lines that came is answered with the same CORS headers (`connection_cors`), so
that a page of an allowed origin reads the error, not an opaque network failure. On a TLS server,
a connection's handshake has the head's deadline and counts among the open ones (server/tls_handshake.py).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from http import HTTPStatus

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders

from .chunked_bodies import ChunkedBody
from .origins import ApiCors, cors_options
from .request_heads import (
    LONGEST_METHOD,
    PRI,
    AbsoluteTarget,
    ContentLengths,
    lines_refused,
    method_refused,
    version_refused,
)

log = logging.getLogger("streamgen.server")

RETRY_AFTER_S = 1  # connections come and go by the second: a page's fetches, a health check
# a request head larger than this is answered 431: httptools (uvicorn's parser where it is installed)
# keeps a head whole however large, and one header of 13 MB was taken in without a word. nginx takes
# 32 KiB, a browser sends a few (its cookies at most ~8 KiB on a server that sets none)
MAX_HEAD_BYTES = 64 * 1024
# the time a connection opened past `max_connections` has to send its request (to be answered 503)
PAST_LIMIT_HEAD_S = 1.0
NOT_PARSED = "not a valid HTTP/1.1 request: its request line or a header could not be parsed"
NOT_ONE_HOST = "a request must have one Host header, and an HTTP/1.1 one must have it (RFC 9112, 3.2)"
BOTH_LENGTHS = "a request must not have both Transfer-Encoding and Content-Length (RFC 9112, 6.1)"
NOT_CHUNKED = ("a Transfer-Encoding other than chunked is not taken here: send the body with its Content-Length, "
               "or chunked alone (RFC 9112, 6.1)")  # fmt: skip
OLD_CHUNKS = "an HTTP/1.0 request must not have Transfer-Encoding: send its Content-Length (RFC 9112, 6.1)"
# a Host header's value: uri-host [":" port] (RFC 9110 7.2, RFC 3986 3.2.2), an IP literal in brackets
HOST = re.compile(rb"(\[[0-9A-Za-z:.%~!$&'()*+,;=_-]+\]|[0-9A-Za-z.%~!$&'()*+,;=_-]*)(:[0-9]*)?")
NOT_HTTP_TARGET = ("a request target of a scheme other than http or https is a proxy's to follow: this server is "
                   "not a proxy")  # fmt: skip
# an Origin header's line in a head's bytes, whole (its line ended): a name has no space before its colon
ORIGIN_LINE = re.compile(rb"\norigin:[ \t]*([^\r\n]*?)[ \t]*(?=\r?\n)", re.IGNORECASE)


@functools.lru_cache(maxsize=8)
def connection_cors(cors_origins: tuple[str, ...]) -> ApiCors:
    """The app's CORS (`serve --cors-origin`), for the answers written outside it."""
    return ApiCors(None, **cors_options(list(cors_origins)))


def origin_in_head(head: bytes) -> str | None:
    """The Origin a head's bytes so far name: None for none, or for two (which to answer?)."""
    origins = ORIGIN_LINE.findall(head.partition(b"\r\n\r\n")[0])
    return origins[0].decode("latin-1") if len(origins) == 1 else None


class NotOneHost(ValueError):
    """A request with two Host headers, or an HTTP/1.1 one without: h11 refuses it, httptools took it."""


class ConnectionLimits:
    """A mixin before uvicorn's HTTP protocol (httptools' or h11's) in the MRO: both parse what
    `data_received` is given, make `self.cycle` anew for each request whose head is complete, hand
    the transport to the WebSocket protocol on an upgrade, and take the app to run from `self.app`.
    Whether the parser is in a request's body, `_request_body_pending`, is each parser's own
    (`HttpToolsBodyState`, `H11BodyState`)."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = config.app.state.config  # (the app as `serve` and the tests make it)
        self.header_timeout_s = settings.header_timeout_s
        self.max_connections = settings.max_connections
        self.cors_origins = settings.cors_origins
        self.awaiting_head = True
        self.head_bytes = 0  # of the request head awaited now
        self.head_tail = b""  # its last 3 bytes so far
        self.request_line_bytes = None  # its request line's length, once it has ended
        self.request_line_spaces = 0  # the spaces in it so far: one, an HTTP/0.9 request line's (no version)
        self.request_line_tail = b""  # its last bytes so far (its version, once it has ended)
        self.head_seen = bytearray()  # its bytes so far, for its Origin (only with --cors-origin)
        self.method_seen = b""  # its first bytes, to its method's end
        self.content_lengths = ContentLengths()  # its Content-Length lines
        self.target = AbsoluteTarget()  # its request line for the parser
        self.pipelined = bytearray()  # the next request's bytes, held while the one before it runs
        self.body_left = None  # of the request's body by its Content-Length, to be read (None: chunked, or none)
        self.chunks = None  # its ChunkedBody, where it is chunked
        self.head_timer = None
        self.handshake = None  # its TlsHandshake (server/tls_handshake.py), on a TLS server

    # --- the head's deadline ------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        if self.handshake is not None:  # (counted while it was under way: this protocol counts itself now)
            self.connections.discard(self.handshake)
        super().connection_made(transport)
        if self.max_connections and len(self.connections) > self.max_connections:
            # its request is answered 503 as soon as it comes: one past the bound that sends none
            # held a descriptor for the whole head's time, and a flood of them used them all up
            self.header_timeout_s = min(self.header_timeout_s, PAST_LIMIT_HEAD_S)
        self._arm_head_timer()  # (a client that never sends a byte)

    def data_received(self, data: bytes) -> None:
        if self._next_request_pipelined():
            return self._hold_pipelined(data)
        head_end = None  # where the head ends in `data`, if it ends there
        if self.awaiting_head and self.head_bytes == 0:
            self._arm_head_timer()  # from the head's first byte
            self.head_tail = b""
            self.head_seen.clear()
            self.request_line_bytes = None
            self.request_line_spaces, self.request_line_tail = 0, b""
            self.method_seen = b""
            self.content_lengths = ContentLengths()
            self.target = AbsoluteTarget()
        if self.awaiting_head:
            if not self.method_seen:  # (RFC 9112 2.2: empty lines before a request line are skipped, as
                # httptools skips them; h11 refused them. They count among the head's bytes and time)
                self.head_bytes += len(data) - len(data := data.lstrip(b"\r\n"))
                if not data:
                    return
            if self.cors_origins and len(self.head_seen) <= MAX_HEAD_BYTES:  # (past it: a 431 below)
                self.head_seen += data
            line_ended = False
            if self.request_line_bytes is None:
                line_end = data.find(b"\n")
                line_end, line_ended = (line_end, True) if line_end >= 0 else (len(data), False)
                self.request_line_spaces += data.count(b" ", 0, line_end)
                self.request_line_tail = (self.request_line_tail + data[max(0, line_end - 16) : line_end])[-16:]
                if line_ended:
                    self.request_line_bytes = self.head_bytes + line_end
            seen = self.head_tail + data
            end = seen.find(b"\r\n\r\n")
            if end >= 0 and self.head_bytes - len(self.head_tail) + end + 4 > MAX_HEAD_BYTES:
                # a head whose end came in this read: either parser took one of any size whole (h11),
                # or refused its URL past 64 KiB as one that did not parse (httptools)
                return self._refuse_head_too_large()
            head_data = data[: end + 4 - len(self.head_tail)] if end >= 0 else data  # (not a body's bytes after it)
            if (refused := self._head_bytes_refused(seen[: end + 4] if end >= 0 else seen, head_data)) is not None:
                return self._answer_and_close(b"400 Bad Request", "bad_request", refused)
            if line_ended and self.request_line_spaces > 2:  # (httptools served 'GET  /healthz', h11 refused it)
                return self._answer_and_close(b"400 Bad Request", "bad_request", NOT_PARSED)
            if line_ended and (refused := version_refused(self.request_line_tail, self.request_line_spaces)):
                return self._answer_and_close(b"505 HTTP Version Not Supported", "http_version_not_supported", refused)
            if line_ended and self.method_seen.startswith(b"PRI "):  # (one of HTTP/2.0, the preface's: its 505 above)
                return self._answer_and_close(b"400 Bad Request", "bad_request", PRI)
            self.head_tail = seen[-3:]  # (the blank line that ends a head may come split)
            self.head_bytes += len(data)
            head_end = len(head_data) if end >= 0 else None
        cycle = self.cycle
        if not self.awaiting_head:  # (a body's bytes)
            return self._body_received(data)
        if parsed := self.target.feed(data if head_end is None else data[:head_end]):  # (h11 takes b'' for an EOF)
            super().data_received(parsed)
        if self.cycle is not cycle or self.transport.get_protocol() is not self:  # a head complete, or an upgrade
            self.awaiting_head = False
            self._cancel_head_timer()
            self.head_seen.clear()
            self.body_left = self._content_length() if self._request_body_pending() else None
            self.chunks = ChunkedBody(MAX_HEAD_BYTES) if self._body_chunked() else None
            if head_end is not None and (rest := data[head_end:]) and self.transport.get_protocol() is self:
                self._body_received(rest)  # (its body's bytes, or where it has none the next request's)
        elif self.awaiting_head and self.head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            # (all of it the head's, which is not complete: a body's first bytes came after a head)
            self._refuse_head_too_large()

    def _body_received(self, data: bytes) -> None:
        """Bytes after a request's head: its body's to the parser; those after it, the next request's
        (pipelined), held until its answer is complete, or taken as its head's where it is already."""
        after = b""
        if self.body_left is not None:  # (by its Content-Length: the next request may come in the same read)
            data, after = data[: self.body_left], data[self.body_left :]
            self.body_left -= len(data)
        elif self.chunks is not None and not self.chunks.done:  # (by its framing, looked at as it comes)
            parsed, body_end, refused = self.chunks.feed(data)
            if refused is not None:
                return self._refuse_chunks(refused)
            data, after = parsed, data[body_end:]
        if self._next_request_pipelined():
            return self._hold_pipelined(data + after)
        if data:
            super().data_received(data)
        self._await_next_head(arm=True)  # (the rest of a body answered unread may have ended here)
        if after and self.transport.get_protocol() is self and not self.transport.is_closing():
            if self._next_request_pipelined():
                self._hold_pipelined(after)
            elif self.awaiting_head:
                self.data_received(after)
            else:
                super().data_received(after)

    def _body_chunked(self) -> bool:
        return self._request_body_pending() and any(name == b"transfer-encoding" for name, _ in self.headers)

    def _refuse_chunks(self, refused: str) -> None:
        """A chunked body whose framing is refused (server/chunked_bodies.py): answered, and closed."""
        if self.cycle is not None and self.cycle.response_complete:  # (answered before its body: closed)
            return self.transport.close()
        if self.chunks.too_large:
            log.info("%s sent over %d bytes of a body's trailers: answered 431 and closed", self._who(), MAX_HEAD_BYTES)
            return self._answer_and_close(b"431 Request Header Fields Too Large", "headers_too_large", refused)
        self._answer_and_close(b"400 Bad Request", "bad_request", refused)

    def _content_length(self) -> int | None:
        """The body's Content-Length (each parser has refused one that is not a number), None for a
        chunked one."""
        if any(name == b"transfer-encoding" for name, _ in self.headers):
            return None
        return next((int(value) for name, value in self.headers if name == b"content-length"), None)

    def _head_bytes_refused(self, lines: bytes, data: bytes) -> str | None:
        """Why a head's bytes that came now (`lines`, with the few before them) are refused, the same
        under either parser (server/request_heads.py), or None."""
        if b" " not in self.method_seen:
            self.method_seen += data[: LONGEST_METHOD + 1]
            method, space, _ = self.method_seen.partition(b" ")
            if (refused := method_refused(method, whole=bool(space))) is not None:
                return NOT_PARSED if refused == "not_parsed" else refused
        return self.content_lengths.refused(data) or lines_refused(lines, looked_at=len(self.head_tail))

    def _next_request_pipelined(self) -> bool:
        """Whether bytes that come now are the next request's, sent before this one's answer: its
        body read whole, its answer not yet complete."""
        running = self.cycle is not None and not self.cycle.response_complete
        return running and not self.awaiting_head and not self._request_body_pending() and not self.transport.is_closing()

    def _hold_pipelined(self, data: bytes) -> None:
        """The next request's bytes, held until this one is answered and then taken as a head's
        (`on_response_complete`). Given to the parser, which read them at once (httptools) or when
        this one was answered (h11), they had none of the checks above: a head too large, an unknown
        method, a bare LF; and under httptools a second request that did not parse was answered 400
        before the first, whose answer was lost."""
        self.pipelined += data
        if len(self.pipelined) > MAX_HEAD_BYTES:  # (uvicorn reads again once this answer is complete; a 431 then)
            self.flow.pause_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn's keep-alive timeout closes the connection if nothing comes; the first byte of a
        # head starts its clock
        self._await_next_head(arm=False)
        if self.pipelined and self.awaiting_head and not self.transport.is_closing():
            held, self.pipelined = bytes(self.pipelined), bytearray()
            self.data_received(held)

    def _await_next_head(self, arm: bool) -> None:
        """The next head is awaited once the request before it is answered and its body read whole
        (a request answered before its body, a 413 or a route that reads none: the rest of that body
        is the parser's to drop, not a head's bytes; `header_timeout_s` is all it is given)."""
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        if self.cycle is not None and not self.cycle.response_complete:  # (one runs: pipelined, say)
            return
        if self._request_body_pending():
            if self.head_timer is None:  # (each of its bytes put uvicorn's keep-alive timeout off)
                self._arm_head_timer()
            return
        self.awaiting_head, self.head_bytes = True, 0
        if arm:  # (its keep-alive timeout put off by the body's bytes: this one closes an idle connection)
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        """The client's end of its stream (a FIN) closes the connection, its request unanswered,
        even one whose body came whole before it (a client that sent its POST and `shutdown(SHUT_WR)`).

        A FIN is all the server hears of a client that closed its socket (a page reloaded or left,
        a program killed) and of one that only half-closed it: the two differ only once the server
        writes (the closed one answers with a reset), and a session's creation has nothing to write
        until it is done. `POST /v1/sessions` and `POST /v1/whep` close the session they made for a
        client gone (`request.is_disconnected()`, from this close) rather than let it hold its place
        for the unclaimed limit: keeping a half-closed connection open to answer it would keep every
        closed one open too, and that signal would be lost. So, as nginx does (its 499 for a client
        that closed while it proxied), a half-close is a client gone (docs/api.md says so)."""
        return None  # (falsy: the transport closes)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if not self.awaiting_head:  # the rest of a body answered unread: it has had its time
            if self.cycle is not None and self.cycle.response_complete:
                self.transport.close()
            return
        if not self.head_bytes:  # (a connection that sent nothing is closed without a word, as a keep-alive one)
            self.transport.close()
            return
        log.info("%s sent %d bytes of a request head in %g s: answered 408 and closed",
                 self._who(), self.head_bytes, self.header_timeout_s)  # fmt: skip
        self._answer_and_close(b"408 Request Timeout", "header_timeout",
                               f"request headers not received within {self.header_timeout_s:g} s")  # fmt: skip

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused (a bad Content-Length, a space in a header's name): uvicorn's
        text/plain "Invalid HTTP request received.", where every other error is the API's JSON.
        Both parsers call this as they handle their error, which tells why (uvicorn's `msg` does not)."""
        refused = sys.exc_info()[1]
        # (h11's: 'Missing mandatory Host: header', 'Found multiple Host: headers')
        not_one_host = isinstance(refused and refused.__context__, NotOneHost) or "Host: header" in str(refused)
        both_lengths = "Content-Length can't be present with Transfer-Encoding" in str(refused)  # (httptools')
        both_lengths = both_lengths or (self.content_lengths.lines > 0 and self.content_lengths.codings)  # (h11's)
        # (httptools': HTTP/3.0, say, or HTTP/2's preface 'PRI * HTTP/2.0' of a client of h2c by prior knowledge)
        if "Invalid HTTP version" in str(refused) or "Pause on PRI" in str(refused):
            # (named where the line so far has it: llhttp refuses it as its last digit comes, before the line's end)
            said = version_refused(self.request_line_tail, 2) or "its HTTP version is not spoken here: send HTTP/1.1"
            return self._answer_and_close(b"505 HTTP Version Not Supported", "http_version_not_supported", said)
        # (h11's 'Only Transfer-Encoding: chunked is supported', httptools' 'Request has invalid `Transfer-Encoding`')
        not_chunked = not both_lengths and "Transfer-Encoding" in str(refused)
        # (httptools': 'Duplicate Content-Length', 'Invalid character in Content-Length'; h11's: 'bad
        # Content-Length', 'conflicting Content-Length headers')
        not_one_length = not both_lengths and "Content-Length" in str(refused)
        message = (NOT_ONE_HOST if not_one_host else BOTH_LENGTHS if both_lengths else NOT_CHUNKED if not_chunked
                   else ContentLengths.REFUSED if not_one_length else NOT_PARSED)  # fmt: skip
        self._answer_and_close(b"400 Bad Request", "bad_request", message)

    def _refuse_head_too_large(self) -> None:
        if self.request_line_bytes is None or self.request_line_bytes > MAX_HEAD_BYTES:
            # its URL (a query string built of a whole upload, say): 'request headers larger than
            # 64 KiB' sent its client looking among headers it had not set (RFC 9110 15.5.15)
            log.info("%s sent a request line of over %d bytes: answered 414 and closed", self._who(), MAX_HEAD_BYTES)
            return self._answer_and_close(b"414 URI Too Long", "uri_too_long",
                                          f"request target (URL) longer than {MAX_HEAD_BYTES // 1024} KiB")  # fmt: skip
        log.info("%s sent a request head of over %d bytes: answered 431 and closed", self._who(), MAX_HEAD_BYTES)
        self._answer_and_close(b"431 Request Header Fields Too Large", "headers_too_large",
                               f"request headers larger than {MAX_HEAD_BYTES // 1024} KiB")  # fmt: skip

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _answer_and_close(self, status: bytes, error: str, message: str, headers=(), **fields) -> None:
        """An error in the API's JSON, written as it is (the request it answers was never parsed
        whole, or is an upgrade's), and the connection closed."""
        headers = self.server_state.default_headers + list(headers) + self._cors_headers()
        # (RFC 9110 9.3.2: none to a HEAD, as uvicorn leaves the app's out; this one's body was written)
        head_only = self.method_seen.startswith(b"HEAD ")
        self.transport.write(error_answer(status, error, message, headers, head_only=head_only, **fields))
        self.transport.close()

    def _cors_headers(self) -> list[tuple[bytes, bytes]]:
        """The CORS headers the app gives a request of the Origin the head being refused names,
        if `serve --cors-origin` allows it (none for another: a page of it cannot read the answer,
        as it cannot read the app's)."""
        if not self.cors_origins:
            return []
        if self.awaiting_head:  # (its lines so far)
            origin = origin_in_head(self.head_seen)
        else:  # (a head parsed whole, its body refused by the parser: a bad chunk, say)
            origins = [value for name, value in self.headers or () if name == b"origin"]
            origin = origins[0].decode("latin-1") if len(origins) == 1 else None
        cors = connection_cors(tuple(self.cors_origins))
        if origin is None or not cors.is_allowed_origin(origin):
            return []
        message = {"headers": []}
        headers = MutableHeaders(scope=message)
        headers.update(cors.simple_headers)
        if not cors.allow_all_origins:  # (as CORSMiddleware.send: the page's own origin, not '*')
            cors.allow_explicit_origin(headers, origin)
        return message["headers"]

    # --- the bound on connections ---------------------------------------------------------------------------
    @property
    def app(self):
        """The app a request whose head is complete runs: a refusal of a head neither parser refused,
        or while too many connections are open."""
        refusal = None
        if (refused := self._head_or_version_refused()) is not None:
            status, error, message = refused
            refusal = functools.partial(self._refuse_head, message, status=status, error=error)
        elif self._over_limit():
            refusal = self._refuse_over_limit
        if refusal is None:
            return self._app
        if not self.cors_origins:
            return refusal
        # (outside the app, so outside its CORS: a page of an allowed origin could not read the answer)
        return ApiCors(refusal, **cors_options(self.cors_origins))

    @app.setter
    def app(self, app) -> None:
        self._app = app

    def _over_limit(self) -> bool:
        return bool(self.max_connections) and len(self.connections) > self.max_connections

    def _head_or_version_refused(self) -> tuple[int, str, str] | None:
        """(status, error, message) of a head parsed whole that is refused, or None."""
        if not (version := self.scope["http_version"]).startswith("1."):  # (h11 served HTTP/3.0 as 1.1)
            return 505, "http_version_not_supported", f"HTTP/{version[:10]} is not spoken here: send HTTP/1.1"
        if (message := self._head_refused()) is not None:
            return 400, "bad_request", message
        return None

    def handle_websocket_upgrade(self, *event) -> None:
        """A WebSocket's request goes to the WebSocket protocol (and the app) without `self.app`:
        it had none of the checks above. A Host that is no host, an HTTP/3.0 request line (h11's)
        or an HTTP/1.0 one (each rewritten as 1.1 by uvicorn) were a 101, and an upgrade past
        `max_connections` was taken: docs/api.md has any request on such a connection a 503, and
        `--max-connections` is made more than `--max-sessions` so that each session's socket has
        its room within the bound, not past it. Each is answered here as a request's is, and closed."""
        refused = self._head_or_version_refused()
        if refused is None and self.scope["http_version"] == "1.0":
            # (RFC 6455 4.1; uvicorn wrote it as 1.1 for the websockets library, which refuses a 1.0)
            refused = 400, "bad_request", "a WebSocket handshake must be HTTP/1.1 (RFC 6455, 4.1)"
        headers, fields = [], {}
        if refused is None and self._over_limit():  # (as _refuse_over_limit answers a request)
            refused = 503, "unavailable", self._over_limit_message("a WebSocket upgrade")
            headers, fields = [(b"retry-after", str(RETRY_AFTER_S).encode())], {"reason": "too many connections"}
        if refused is None:
            return super().handle_websocket_upgrade(*event)
        status, error, message = refused
        if status != 503:  # (logged as a warning by _over_limit_message)
            log.info("a WebSocket upgrade -> %d: %s", status, message)
        self.awaiting_head = False  # (its CORS headers are those of its headers, parsed whole)
        status_line = b"%d %s" % (status, HTTPStatus(status).phrase.encode())
        self._answer_and_close(status_line, error, message, headers, **fields)

    def _head_refused(self) -> str | None:
        """Why a head parsed whole (`self.headers`) is refused, or None."""
        names = [name for name, _ in self.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            # h11 read the body by its Transfer-Encoding and kept the connection: where a proxy in
            # front reads it by its Content-Length, the rest is a request of the client's smuggled
            # past the proxy (RFC 9112 6.1: the connection must close). httptools refused it.
            return BOTH_LENGTHS
        if b"transfer-encoding" in names and self.scope["http_version"] == "1.0":
            # (read by its chunks, where HTTP/1.0 has none: a proxy of 1.0 in front reads it otherwise)
            return OLD_CHUNKS
        codings = [c.strip().lower() for name, value in self.headers if name == b"transfer-encoding"
                   for c in value.split(b",")]  # fmt: skip
        if codings and codings != [b"chunked"]:
            # (httptools read 'gzip, chunked' by its chunks and gave the app the body still coded, as if
            # it were not; h11 refused it)
            return NOT_CHUNKED
        host = next((value for name, value in self.headers if name == b"host"), None)
        if host is not None and not HOST.fullmatch(host):
            # (served as it came: the origin guard and the routes read it; RFC 9112 3.2: a 400)
            return f"the Host header {host.decode('latin-1')[:80]!r} is not a host[:port] (RFC 9112, 3.2)"
        return self._target_refused()

    def _target_refused(self) -> str | None:
        """Why a request target is refused, or None. One in origin form must begin with '/' (h11 took
        'GET healthz' for '/healthz', httptools refused it). One in absolute form (`GET http://host/path`,
        as to a proxy: taken apart before the parser, request_heads.AbsoluteTarget) has its authority
        taken for the request's Host, as RFC 9112 3.2.2 has a server take it (the Host header ignored;
        an HTTP/1.0 request's, which needs none, given one: it had no host, a page's POST a foreign one's).
        The origin guard and the routes read the Host header, which named another server than the
        target's; h11 served an empty authority ('http:///healthz') that httptools refused, and both a
        userinfo ('http://user@host/', RFC 9110 4.2.4: an error) and another scheme than HTTP's."""
        target, authority = self._request_target(), self.target.authority
        if authority is None:
            return None if target.startswith(b"/") or target == b"*" else NOT_PARSED
        if self.target.scheme.lower() not in (b"http", b"https"):  # (h11: a 404 'nothing at /ftp://...', httptools: served)
            return NOT_HTTP_TARGET
        if not (host := HOST.fullmatch(authority)) or not host[1]:
            if host:  # (no host: 'http:///healthz', 'http://:80/', which llhttp refused as it parsed them)
                return NOT_PARSED
            authority = authority.decode("latin-1")[:80]
            return f"the request target's authority {authority!r} is not a host[:port] (RFC 9112, 3.2.2)"
        self.headers[:] = [(name, value) for name, value in self.headers if name != b"host"] + [(b"host", authority)]
        return None

    async def _refuse_head(self, message: str, scope, receive, send, status=400, error="bad_request") -> None:
        log.info("%s %s -> %d: %s", scope["method"][:20], scope["path"][:80], status, message)
        response = JSONResponse({"error": error, "message": message}, status_code=status,
                                headers={"Connection": "close"})  # fmt: skip
        await response(scope, receive, send)

    def _over_limit_message(self, request: str) -> str:
        """The 503's message past `max_connections`, logged as a warning for `request`. When to try
        again is its Retry-After's to say, as the server's other 503s leave it (the page adds 'try again
        in 1 s' from it, which followed this message's own 'try again shortly')."""
        open_now = len(self.connections)
        log.warning("%s -> 503: %d connections open, the limit is %d", request, open_now, self.max_connections)
        return f"the server has {open_now} connections open, more than its limit of {self.max_connections}"

    async def _refuse_over_limit(self, scope, receive, send) -> None:
        message = self._over_limit_message(f"{scope['method']} {scope['path'][:80]}")
        response = JSONResponse({"error": "unavailable", "message": message, "reason": "too many connections"},
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})  # fmt: skip
        await response(scope, receive, send)


def error_answer(status: bytes, error: str, message: str, headers: list[tuple[bytes, bytes]], head_only=False,
                 **fields) -> bytes:
    """A response of an error in the API's JSON (with its other `fields`), with `headers`, that closes
    its connection; `head_only`: its head alone (a HEAD's, its Content-Length the body's)."""
    # (as the app's JSONResponse writes it: a request one parser refuses here, the other in the app)
    body = json.dumps({"error": error, "message": message, **fields}, ensure_ascii=False, separators=(",", ":")).encode()
    head = [b"HTTP/1.1 " + status + b"\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in headers]
    head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
             b"connection: close\r\n\r\n"]  # fmt: skip
    return b"".join(head) + (b"" if head_only else body)


class HttpToolsBodyState:
    """httptools tells of a request's body by its callbacks: between its head's end and its own.
    It takes an HTTP/1.1 request without a Host header, or any with two, which h11 refuses (a
    proxy and the routes could each read another): raised here, in its callback, it is a parser
    error, answered 400 as h11's is.

    It took a chunked body's trailers without bound, each appended to the request's headers (20 MB
    of them grew the server by 400 MB in 4 s; h11 keeps 64 + 256 KiB of them, and drops them): they
    are bounded and dropped before either parser (server/chunked_bodies.py)."""

    body_pending = False

    def on_headers_complete(self) -> None:
        hosts = sum(name == b"host" for name, _ in self.headers)
        if hosts > 1 or (hosts == 0 and self.parser.get_http_version() == "1.1"):
            raise NotOneHost(NOT_ONE_HOST)
        self.body_pending = True
        # as h11 reads it (RFC 9110 10.1.1): a 100-continue in the Expect list, an HTTP/1.0 request's ignored.
        # uvicorn sent an HTTP/1.0 client a 100 it cannot read, and none for one in a list ('x, 100-continue')
        expected = [e.strip().lower() for name, value in self.headers if name == b"expect" for e in value.split(b",")]
        self.expect_100_continue = b"100-continue" in expected and self.parser.get_http_version() == "1.1"
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.body_pending = False
        super().on_message_complete()

    def _request_body_pending(self) -> bool:
        return self.body_pending

    def _request_target(self) -> bytes:
        return self.url


class H11BodyState:
    """h11 keeps the client's state: SEND_BODY until a request's body has all been read."""

    def _request_body_pending(self) -> bool:
        import h11

        return self.conn.their_state is h11.SEND_BODY

    def _request_target(self) -> bytes:
        return self.scope["raw_path"]  # (uvicorn's: the target to its '?', as it came)


def limited_protocol(base: type) -> type:
    """`base` (uvicorn's HTTP protocol class: httptools' or h11's) under `ConnectionLimits`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body_state = H11BodyState if issubclass(base, H11Protocol) else HttpToolsBodyState
    return type(f"Limited{base.__name__}", (ConnectionLimits, body_state, base), {})
