"""A TLS server's connections (`serve --ssl-certfile`) until each one's handshake is done: timed, and
counted among the open ones (server/connections.py bounds them and times each request's head)."""

from __future__ import annotations

import asyncio
import logging
import re

from .connections import PAST_LIMIT_HEAD_S, error_answer

log = logging.getLogger("streamgen.server")


class TlsHandshake(asyncio.Protocol):
    """A TLS server's connection (`serve --ssl-certfile`) until its handshake is done, when its HTTP
    protocol (a `ConnectionLimits`) is given the TLS transport.

    The loop's TLS gave a handshake a minute of its own, and the HTTP protocol heard of the
    connection only once it was done: a client that connected and sent no ClientHello, or stopped
    in the middle of one, held a socket for 60 s that `max_connections` did not count, and a
    flood of them used up the descriptors as slowloris heads had. Here the loop listens for plain
    TCP; a connection counts among the open ones from its accept, its first bytes have
    `header_timeout_s` to come (`PAST_LIMIT_HEAD_S` past the bound) and its handshake as long from
    them, on the loop's own TLS protocol. A plain HTTP request to the port, which the loop's TLS
    closed without a word ('Empty reply from server'), is answered 400 saying to use https://."""

    HANDSHAKE_RECORD = 0x16  # the first byte of a TLS record of the handshake (a ClientHello's)
    PLAIN_REQUEST = re.compile(rb"[A-Z]{3,20} [^ ]")  # a request line's method and target

    def __init__(self, http, context) -> None:
        self.http, self.context = http, context
        self.connections = http.server_state.connections
        self.transport = self.first_bytes_timer = None
        self.timeout_s = http.header_timeout_s

    @classmethod
    def factory(cls, http_protocol_class: type, context):
        """uvicorn's `http_protocol_class`, as it calls it: each connection's protocol."""
        return lambda **kwargs: cls(http_protocol_class(**kwargs), context)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.connections.add(self)
        if self.http.max_connections and len(self.connections) > self.http.max_connections:
            self.timeout_s = min(self.timeout_s, PAST_LIMIT_HEAD_S)  # (as a head's past the bound)
        self.http.handshake = self
        # (one that sends nothing is closed without a word, as a plain one)
        self.first_bytes_timer = self.http.loop.call_later(self.timeout_s, transport.abort)

    def data_received(self, data: bytes) -> None:
        """The connection's first bytes: a ClientHello's, the TLS protocol's from here; or a plain request's."""
        self.first_bytes_timer.cancel()
        if data[0] != self.HANDSHAKE_RECORD:
            return self._refuse_plain_http(data)
        loop = self.http.loop
        handshake = loop.create_future()  # (done when the handshake is, or the connection gone)
        # (the close too: a client that never answers the server's close_notify held its connection,
        # and its place among max_connections, for the loop's 30 s after its answer)
        tls = tls_protocol_class(loop)(loop, self.http, self.context, handshake, server_side=True,
                                       ssl_handshake_timeout=self.timeout_s, ssl_shutdown_timeout=self.timeout_s)  # fmt: skip
        handshake.add_done_callback(self._handshake_done)
        self.transport.set_protocol(tls)
        tls.connection_made(self.transport)
        unread = memoryview(data)
        while unread:  # (as the transport gives a TLS protocol its bytes: BufferedProtocol's calls)
            buffer = tls.get_buffer(len(unread))
            size = min(len(buffer), len(unread))
            buffer[:size] = unread[:size]
            tls.buffer_updated(size)
            unread = unread[size:]

    def _refuse_plain_http(self, data: bytes) -> None:
        if not self.PLAIN_REQUEST.match(data):  # (neither TLS nor HTTP: nothing to say it in)
            self.transport.abort()
            return
        log.info("%s sent a plain HTTP request to the HTTPS port: answered 400", self._who())
        message = "this port speaks HTTPS: send the request to https://, not http://"
        head_only = data.startswith(b"HEAD ")  # (RFC 9110 9.3.2: no content to a HEAD)
        self.transport.write(error_answer(b"400 Bad Request", "https_required", message, [], head_only=head_only))
        self.transport.close()

    def eof_received(self) -> None:
        return None  # (before a byte: the transport closes)

    def connection_lost(self, exc) -> None:  # (before its first bytes; once TLS, its TLS protocol's)
        self.first_bytes_timer.cancel()
        self.connections.discard(self)

    def _handshake_done(self, handshake: asyncio.Future) -> None:
        self.connections.discard(self)
        failed = None if handshake.cancelled() else handshake.exception()
        if failed is None:  # (done: its HTTP protocol counts itself; or the client left as it ended)
            return
        if isinstance(failed, ConnectionAbortedError) and "longer than" in str(failed):
            log.info("%s did not finish its TLS handshake in %g s: closed", self._who(), self.timeout_s)
        else:  # (a protocol it does not speak, a reset: the loop's TLS says it at debug too)
            log.debug("%s: TLS handshake failed: %r", self._who(), failed)
        if not self.transport.is_closing():
            self.transport.abort()

    def _who(self) -> str:
        peer = self.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client"

    def shutdown(self) -> None:
        """(uvicorn's, of each open connection as the server stops)"""
        self.transport.abort()


def loop_tls_takes_over(loop, context) -> bool:
    """Whether this loop's TLS protocol can be built as `TlsHandshake` builds it. Its class and
    arguments are the loop's own (asyncio's `sslproto`, uvloop's `loop.SSLProtocol`), not a public
    API: a version that changed them would leave a TLS server answering no one, so the server keeps
    the loop's TLS (and its own handshake minute) then, saying so."""
    try:
        tls_protocol_class(loop)(loop, asyncio.Protocol(), context, loop.create_future(), server_side=True,
                                 ssl_handshake_timeout=1.0)  # fmt: skip
    except Exception as e:  # (ImportError, TypeError, AttributeError: whichever a change makes)
        log.warning("TLS handshakes keep the event loop's own time limit, not --header-timeout: "
                    "its TLS protocol could not be built here (%r)", e)  # fmt: skip
        return False
    return True


def tls_protocol_class(loop) -> type:
    """The TLS protocol `loop` makes a server's connections TLS with: uvloop's own, or asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is uvicorn[standard]'s
        uvloop = None
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        from uvloop.loop import SSLProtocol

        return SSLProtocol
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol
