"""examples/ws_client.py against servers that fail it: one not there, one at its connection limit, one
busy until a date, and stand-ins on 127.0.0.1 that drop, freeze, fall mute or refuse the stream. The
client's main runs in the test's process (ws_client_here), but where it waits as the test frees the
connection it waits for."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
from server_helpers import (
    WS_CLIENT,
    a_port_nobody_answers_on,
    assert_one_line_error,
    live_server,
    load_ws_client,
    saved_frames,
    write_wav,
    ws_client_here,
)

pytestmark = pytest.mark.timeout(180)


def test_a_server_that_is_not_there_is_one_line(tmp_path):
    with a_port_nobody_answers_on() as port:  # (held: no other test process's server takes it meanwhile)
        url = f"http://127.0.0.1:{port}"
        r = ws_client_here("--server", url, "--say", "hi", "--out", str(tmp_path))
    assert_one_line_error(r, f"cannot reach {url}")


def test_a_stream_refused_at_the_connection_limit_is_opened_again_after_retry_after(tmp_path):
    """A server at --max-connections answers a WebSocket's upgrade 503 with Retry-After, as any request
    (docs/api.md): the client asked again for its session's POST, but gave up at once on its stream's
    ('cannot open the stream ...: HTTP 503'), the session it had made left to the unclaimed limit. It
    opens the stream again after each Retry-After until --wait is spent."""
    import socket

    with live_server(max_sessions=1, max_connections=2) as (url, app):
        # a connection the server counts (a request's head begun): the client's POST is the second,
        # its stream's upgrade a third, past the limit
        host, port = url.removeprefix("http://").split(":")
        hog = socket.create_connection((host, int(port)))
        hog.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        argv = ["--server", url, "--wait", "30", "--seconds", "1", "--out", str(tmp_path)]
        client = subprocess.Popen([sys.executable, str(WS_CLIENT), *argv], stdout=subprocess.PIPE, text=True)
        try:
            said = client.stdout.readline()  # the client's first answer: busy, or refused and gone
        finally:  # the connection frees once the client waits for it
            hog.close()
        out, _ = client.communicate(timeout=90)
    assert "server busy" in said and "connections open" in said and client.returncode == 0, said + out
    assert saved_frames(tmp_path)


def test_a_busy_server_s_retry_after_as_an_http_date_is_waited_for_not_a_traceback():
    """A 503's Retry-After may be an HTTP date (RFC 9110; a proxy in front of the server sends one):
    float() of it was a ValueError's traceback. A date is the seconds until it, anything else 1 s."""
    import asyncio
    import email.utils
    import time

    import httpx

    client = load_ws_client()
    soon = email.utils.formatdate(time.time() + 3600, usegmt=True)

    class Busy:  # a server answering 503, with a date to come back at
        def __init__(self):
            self.asked = 0

        async def post(self, path, json):
            self.asked += 1
            return httpx.Response(503, json={"message": "at capacity"}, headers={"Retry-After": soon})

    server = Busy()
    with pytest.raises(SystemExit, match="^session refused: 503 at capacity$"):
        asyncio.run(client.create_session(server, {"avatar": "sample"}, 1.0))
    assert server.asked == 2  # (asked again at --wait's end, the date being later)
    assert 3500 < client.retry_after_seconds(soon) <= 3600
    assert client.retry_after_seconds(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0
    assert [client.retry_after_seconds(v) for v in ("2", "0.5", None, "soon", "-3")] == [2, 0.5, 1, 1, 0]


@contextmanager
def server_that(then: str):
    """A stand-in server on 127.0.0.1 that makes a session and then, as `then` says: "refuses" its
    stream (404: the session gone meanwhile), or opens it, sends `ready` and three frames, and
    "drops" the connection (no close frame, as a killed server) or "freezes" (reads nothing and
    answers nothing more, as a stopped or unplugged one); or opens it and is "mute" from then on."""
    import base64
    import contextlib
    import hashlib
    import json
    import socket
    import struct
    import threading

    def frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        return bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n)) + payload

    def wait_for_pong(conn: socket.socket) -> None:
        """Read the client's frames (masked; the start message, audio) until a pong, 10 s at most."""
        conn.settimeout(10)
        data = b""

        def take(n: int) -> bytes:
            nonlocal data
            while len(data) < n:
                if not (more := conn.recv(65536)):
                    raise ConnectionError("the client is gone")
                data += more
            taken, data = data[:n], data[n:]
            return taken

        with contextlib.suppress(OSError):  # (the client gone, or 10 s: the reset all the same)
            while True:
                head = take(2)
                n = head[1] & 0x7F
                n = struct.unpack(">H", take(2))[0] if n == 126 else struct.unpack(">Q", take(8))[0] if n == 127 else n
                take(4 + n)  # the mask and the payload
                if head[0] & 0x0F == 0xA:  # the pong
                    return

    def handle(conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        head = request.split(b"\r\n\r\n")[0].decode()
        if head.startswith("POST"):
            body = json.dumps({"stream": "/v1/sessions/s/ws", "token": "t", "resource": "/v1/sessions/s"})
            conn.sendall(f"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())  # fmt: skip
            conn.close()
            return
        if head.startswith("GET") and then == "refuses":
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
            return
        if head.startswith("GET"):
            key = next(
                h.split(":", 1)[1].strip()
                for h in head.split("\r\n")
                if h.lower().startswith("sec-websocket-key")
            )
            accept = base64.b64encode(
                hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            )
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
            if then == "mute":
                held.append(conn)
                return
            conn.sendall(frame(1, json.dumps({"type": "ready", "fps": 25.0}).encode()))
            for seq in range(3):
                conn.sendall(frame(2, struct.pack("<BBHIq", 2, 0, 0, seq, seq * 40000) + b"jpeg"))
            if then == "drops":
                # a ping, and the reset only once its pong is back: the client has taken the three
                # frames in by then (a reset throws away what the receiver has not read yet: under
                # load, the client saved fewer than three)
                conn.sendall(frame(9, b"p"))
                wait_for_pong(conn)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # a reset: no close frame
                return
        if then in ("drops", "refuses"):  # (the DELETE of the session: gone with it)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
            return
        held.append(conn)  # frozen: the stream's socket, and any DELETE, get no answer

    held: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


def test_a_server_that_drops_the_stream_is_one_line_after_what_was_saved(tmp_path):
    """A server killed mid-stream was "the server closed the stream: ?", the frames saved unsaid."""
    with server_that("drops") as url:
        r = ws_client_here("--server", url, "--seconds", "5", "--out", str(tmp_path))
    assert_one_line_error(r, "the connection to the server was lost")
    assert len(saved_frames(tmp_path)) == 3 and "3 frames (0.1 s of video)" in r.stdout, r.stdout


def test_a_server_that_stops_answering_holds_the_client_little_past_seconds(tmp_path, monkeypatch):
    """A server that froze mid-stream held the client 40 s past --seconds: the socket's close
    waited 10 s for the server's, the session's DELETE 30 s for an answer. Each wait on it past
    --seconds is bounded by CLOSE_S (made small here), and each ran into that bound: the waits'
    bounds and ends are checked, not the run's wall time (a loaded machine's to stretch). (The
    wait for the rest of --seconds' video, on a stream that brings nothing, is QUIET_S: small too.)"""
    import httpx

    client = load_ws_client()
    client.CLOSE_S = client.QUIET_S = 0.5
    sockets, deletes = [], []
    opened = client.open_stream

    async def kept_open_stream(url, wait_s):
        sockets.append(await opened(url, wait_s))
        return sockets[-1]

    delete = httpx.AsyncClient.delete

    async def timed_delete(self, url, **kwargs):
        try:
            return await delete(self, url, **kwargs)
        except httpx.HTTPError as e:
            deletes.append((kwargs.get("timeout"), type(e).__name__))
            raise

    monkeypatch.setattr(client, "open_stream", kept_open_stream)
    monkeypatch.setattr(httpx.AsyncClient, "delete", timed_delete)
    with server_that("freezes") as url:
        wav = str(write_wav(tmp_path / "a.wav", 3.0))
        argv = ["--server", url, "--wav", wav, "--seconds", "1", "--out", str(tmp_path / "f")]
        r = ws_client_here(*argv, client=client)
    assert r.returncode == 0 and len(saved_frames(tmp_path / "f")) == 3, r.stderr
    # the socket's close waited CLOSE_S for the server's, which never came, and then ended it
    (ws,) = sockets
    closed = ws.close_timeout, ws.protocol.close_rcvd, ws.protocol.state.name
    assert closed == (client.CLOSE_S, None, "CLOSED"), closed
    # the DELETE waited CLOSE_S for its answer, which never came
    assert deletes == [(client.CLOSE_S, "ReadTimeout")]


def test_a_server_that_never_answers_the_start_is_one_line_little_past_seconds(tmp_path):
    """A stream opened that never brought its `ready` held the client for good (the test's timeout
    bounds it here: a client that waits for good fails the test, not the suite)."""
    client = load_ws_client()
    # (its bound on each wait for a silent server: the start's answer, past --seconds, then the
    # socket's close and the session's DELETE, which this server answers neither; 3 s took 10 s)
    client.CLOSE_S = 0.5
    with server_that("mute") as url:
        r = ws_client_here("--server", url, "--seconds", "1", "--out", str(tmp_path / "f"), client=client)
    assert_one_line_error(r, "did not answer the stream's start")


def test_a_stream_that_cannot_be_opened_is_one_line(tmp_path):
    """A session gone before its stream opened (or a proxy that takes no WebSocket) was
    websockets' InvalidStatus traceback."""
    with server_that("refuses") as url:
        r = ws_client_here("--server", url, "--seconds", "1", "--out", str(tmp_path))
    assert_one_line_error(r, f"cannot open the stream at {url.replace('http', 'ws')}/v1/sessions/s/ws", "404")
    assert "token=" not in r.stderr


def test_what_was_received_is_said_in_whole_words():
    """One frame was "1 frames"."""
    import runpy

    received = runpy.run_path(str(WS_CLIENT))["Received"]()
    received.frames, received.audio_bytes = 1, 32000
    assert str(received) == "1 frame (0.0 s of video), 1.0 s of audio"
    received.frames = 3
    assert str(received).startswith("3 frames (0.1 s of video)")


def test_a_ctrl_c_as_a_frame_arrives_is_not_lost(tmp_path, monkeypatch):
    """asyncio.wait_for (Python 3.11) swallows its caller's cancellation when what it waits for
    is done by then: a Ctrl-C as a frame came in (25 a second) was lost, and the client streamed
    on to --seconds' end (a flaky test_a_ctrl_c_says_what_was_saved_and_ends_the_session)."""
    import argparse
    import asyncio
    import json

    ws_client = load_ws_client()

    class Socket:  # a stream whose next frame the test hands over
        def __init__(self):
            self.answered_start, self.frame = False, None

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def send(self, data):
            pass

        async def recv(self):
            if not self.answered_start:
                self.answered_start = True
                return json.dumps({"type": "ready", "fps": 25.0})
            self.frame = asyncio.get_running_loop().create_future()
            return await self.frame

    async def run() -> bool:
        ws = Socket()

        async def connect(url, **kwargs):
            return ws

        monkeypatch.setattr(ws_client.websockets, "connect", connect)
        args = argparse.Namespace(seconds=30.0, say=None, wait=0.0)
        task = asyncio.ensure_future(ws_client.stream("ws://x", args, None, tmp_path, ws_client.Received()))
        for _ in range(100):
            if ws.frame is not None:
                break
            await asyncio.sleep(0)
        assert ws.frame is not None, "the client never waited for a frame"
        ws.frame.set_result(ws_client.HEADER.pack(ws_client.VIDEO_JPEG, 0, 0, 0, 0) + b"jpeg")
        task.cancel()  # (asyncio.run's answer to a Ctrl-C), as the frame comes
        for _ in range(100):
            if task.done():
                break
            await asyncio.sleep(0)
        cancelled = task.cancelled()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return cancelled

    assert asyncio.run(run()), "the Ctrl-C was lost: the client streams on"
