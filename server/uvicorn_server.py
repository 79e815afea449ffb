"""uvicorn's server, its shutdown beginning with the sessions.

uvicorn ends its connections before it runs the app's lifespan shutdown: each WebSocket got close
code 1012 with no reason, its session was logged and counted as closed by the client, and only then
did the lifespan close what was left. Here a shutdown stops taking connections, closes every session
as the server's doing (WebSocket 1001 "server shutting down", WebRTC peers hung up, the metrics'
reason "server shutting down"), then goes on as uvicorn does. It also logs a client's text
message that is not UTF-8 in one line rather than uvicorn's traceback (`BrokenTextFrameLog`), and
drops the connection of a WebSocket client that stopped reading (`StuckClientDroppingProtocol`),
and times each request's head (and each TLS handshake) and bounds the connections open
(server/connections.py).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct

import uvicorn

try:  # uvicorn's WebSocket protocol on the `websockets` library (uvicorn >= 0.35: "auto" picks it)
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover - an older uvicorn: its own protocol, without the drop below
    WebSocketsSansIOProtocol = None

# as the app's lifespan says it: websocket.py closes with 1001 for it
SHUTDOWN_REASON = "server shutting down"


class BrokenTextFrameLog(logging.Filter):
    """uvicorn logs a client's text message that is not UTF-8 with its own traceback, as if the
    server had failed: it is the client's mistake, answered with close code 1007. One line here."""

    MESSAGE = "Invalid UTF-8 sequence received from client."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.MESSAGE and record.exc_info:
            record.msg = "a WebSocket client sent a text message that is not UTF-8: closed with 1007"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class TokenRedactingLog(logging.Filter):
    """The access log's request lines without their `?token=` (a WebSocket's, a WHEP resource's):
    logged as they came, every session's token was in the log for whoever reads it."""

    # the name as the server reads it: percent-encoded letters too (`?%74oken=` is a token)
    TOKEN = re.compile(r"((?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)=)[^&\s\"']+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        # in the arguments, where they are: uvicorn's access formatter reads its five of them
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = self._redact(record.msg)
        return True

    def _redact(self, text: str) -> str:
        return self.TOKEN.sub(r"\1...", text) if "=" in text else text


if WebSocketsSansIOProtocol is not None:
    from websockets.server import ServerProtocol

    class JsonRefusingServerProtocol(ServerProtocol):
        """websockets' refusals of a handshake (a Sec-WebSocket-Version it does not speak, no
        Sec-WebSocket-Key, a POST) were text/plain 'Failed to open a WebSocket connection: ...',
        where docs/api.md has every error in the API's JSON."""

        ERRORS = {400: "bad_request", 403: "forbidden", 405: "method_not_allowed", 426: "upgrade_required",
                  500: "internal_error"}  # fmt: skip

        def reject(self, status, text: str):
            response = super().reject(status, text)
            said = text.strip().removeprefix("Failed to open a WebSocket connection: ").rstrip(".")
            message = f"WebSocket handshake refused: {said or response.reason_phrase}"
            body = json.dumps({"error": self.ERRORS.get(response.status_code, "http_error"), "message": message})
            response.body = body.encode()
            for name, value in (("Content-Length", str(len(response.body))), ("Content-Type", "application/json")):
                del response.headers[name]
                response.headers[name] = value
            return response


    class StuckClientDroppingProtocol(WebSocketsSansIOProtocol):
        """uvicorn's WebSocket protocol, dropping the connection of a client that stopped reading
        once the app is done with it.

        uvicorn ends a connection with `transport.close()`, which first waits for the send buffer to
        drain: a client that never reads again (the session closed as a "slow consumer") kept its
        socket, and the ~3 MB of frames in its buffers, until it went away itself. A connection the
        app has finished with that still has unsent bytes `DROP_AFTER_S` later is reset (no linger:
        a plain close would leave the kernel retrying its full buffer for minutes). The wait is
        uvicorn's close handshake timeout: a client that is reading has its last frames and the
        close frame well before then. Its refusals of a handshake are in the API's JSON
        (`JsonRefusingServerProtocol`)."""

        DROP_AFTER_S = 10.0

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.conn.__class__ = JsonRefusingServerProtocol  # (made by uvicorn, with its own arguments)

        async def run_asgi(self) -> None:
            await super().run_asgi()
            if not self.disconnected:
                self.loop.call_later(self.DROP_AFTER_S, self.drop_if_stuck)

        def drop_if_stuck(self) -> None:
            if self.disconnected or self.transport.get_write_buffer_size() == 0:
                return
            log = "dropped the WebSocket connection of %s: the client stopped reading"
            self.logger.info(log, self.client)
            if (sock := self.transport.get_extra_info("socket")) is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()


class SessionClosingServer(uvicorn.Server):
    """Also ends once the app's model failed to load (`load_error`): a server that can never make a
    stream kept running, healthy to a supervisor, telling clients it was still loading."""

    def __init__(self, config: uvicorn.Config, listeners: list[socket.socket] | None = None) -> None:
        super().__init__(config)
        self.load_error: str | None = None
        # sockets listening already (`serve` holds its port from its check): served on by `run`
        self.listeners = listeners
        if config.ws == "auto" and WebSocketsSansIOProtocol is not None:
            config.ws = StuckClientDroppingProtocol
        if isinstance(config.http, str) and config.http in ("auto", "h11", "httptools"):
            from uvicorn.config import HTTP_PROTOCOLS
            from uvicorn.importer import import_from_string

            from .connections import MAX_HEAD_BYTES, limited_protocol

            config.http = limited_protocol(import_from_string(HTTP_PROTOCOLS[config.http]))
            if config.h11_max_incomplete_event_size is None:
                # h11 refused a head over 16 KiB as one that did not parse (a 400), which httptools
                # serves: the bound is MAX_HEAD_BYTES's 431, which h11's must not come before (a
                # read, up to 256 KiB, is all parsed before that bound is looked at)
                config.h11_max_incomplete_event_size = MAX_HEAD_BYTES + 256 * 1024
        for name, kinds in (("uvicorn.error", (BrokenTextFrameLog, TokenRedactingLog)),
                            ("uvicorn.access", (TokenRedactingLog,))):  # fmt: skip
            log = logging.getLogger(name)
            for kind in kinds:
                if not any(isinstance(f, kind) for f in log.filters):
                    log.addFilter(kind())

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        return super().run(self.listeners if sockets is None else sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self._start(sockets)
        if sockets is not None and self.started:
            # (uvicorn says where it listens only on the sockets it opened itself: `serve` hands it
            # those it held from its check of the address, and said nothing of where it served)
            self._log_started_message(sockets)

    async def _start(self, sockets: list[socket.socket] | None) -> None:
        import asyncio

        from .connections import ConnectionLimits
        from .tls_handshake import TlsHandshake, loop_tls_takes_over

        self.tls = self.config.ssl
        http = self.config.http_protocol_class
        if self.tls is None or not (isinstance(http, type) and issubclass(http, ConnectionLimits)):
            return await super().startup(sockets)
        if not loop_tls_takes_over(asyncio.get_running_loop(), self.tls):
            return await super().startup(sockets)
        # the loop listens for plain TCP: each connection's handshake is timed and counted (TlsHandshake)
        self.config.http_protocol_class = TlsHandshake.factory(http, self.tls)
        self.config.ssl = None
        try:
            await super().startup(sockets)
        finally:
            self.config.ssl = self.tls

    def _log_started_message(self, listeners) -> None:
        self.config.ssl = self.tls  # (its line says https://, as it did)
        super()._log_started_message(listeners)

    async def on_tick(self, counter: int) -> bool:
        if (error := self.config.app.state.registry.load_error) and not self.load_error:
            self.load_error = error
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame) -> None:
        # now, as the signal arrives, not at the shutdown a tick later: `serve --sp`'s followers got
        # it too, and a chunk running meanwhile finds them gone (SequenceParallelHost._gone)
        self.config.app.state.registry.stopping.set()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.config.app.state.registry.stopping.set()
        for server in self.servers:  # no new session while the others close
            server.close()
        # (the app as given: the one `serve` and the tests make, with its session registry)
        await self.config.app.state.registry.close_all(SHUTDOWN_REASON)
        await super().shutdown(sockets)
