"""The bound on open connections (server/connections.py, `serve --max-connections`): over raw
sockets to a live server on 127.0.0.1, with each of uvicorn's HTTP parsers (`limited_server`,
tests/conftest.py)."""

from __future__ import annotations

import json
import time

from server_helpers import (
    MAX_CONNECTIONS,
    answer_until_closed,
    connect,
    live_server,
    read_response,
)


def test_a_request_past_the_connection_limit_is_a_503_in_json(limited_server):
    held = [connect(limited_server) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # (each makes a request: the server has taken every connection by its answer)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
        with connect(limited_server) as sock:
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
        with connect(limited_server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if answer_until_closed(sock).startswith(b"HTTP/1.1 200 "):
                break
        time.sleep(0.05)
    else:
        raise AssertionError("requests were refused after the other connections closed")


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
    # (--port 0: serve binds before uvicorn's run; a port from free_port, let go, could be taken by
    # another test process meanwhile, and serve refused it)
    assert main(["serve", "--model", "debug", "--port", "0", "--max-connections", "20"]) == 0
    assert main(["serve", "--model", "debug", "--port", "0"]) == 0
    assert main(["serve", "--model", "debug", "--port", "0", "--max-sessions", "300"]) == 0
    assert [c.max_connections for c in configs] == [20, 256, 600]  # (300 sessions served before the bound)
    assert main(["serve", "--model", "debug", "--port", "0", "--max-connections", "8"]) == 2
    assert "--max-connections 8 leaves no room for --max-sessions 8's clients" in capsys.readouterr().err
