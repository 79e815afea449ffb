"""uvicorn's server, its shutdown beginning with the sessions.

uvicorn ends its connections before it runs the app's lifespan shutdown: each WebSocket got close
code 1012 with no reason, its session was logged and counted as closed by the client, and only then
did the lifespan close what was left. Here a shutdown stops taking connections, closes every session
as the server's doing (WebSocket 1001 "server shutting down", WebRTC peers hung up, the metrics'
reason "server shutting down"), then goes on as uvicorn does.
"""

from __future__ import annotations

import socket

import uvicorn

# as the app's lifespan says it: websocket.py closes with 1001 for it
SHUTDOWN_REASON = "server shutting down"


class SessionClosingServer(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # no new session while the others close
            server.close()
        # (the app as given: the one `serve` and the tests make, with its session registry)
        await self.config.app.state.registry.close_all(SHUTDOWN_REASON)
        await super().shutdown(sockets)
