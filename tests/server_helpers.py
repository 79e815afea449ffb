"""Shared pieces of the server tests: a small model, an app, a real uvicorn server on 127.0.0.1,
the sessions, requests and sockets of their clients, and examples/ws_client.py run as a user runs it."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
import wave
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from server.app import create_app
from server.config import ServerConfig
from server.protocol import HEADER, MAX_WEBSOCKET_MESSAGE_BYTES, MsgType


@lru_cache(maxsize=1)
def small_model():
    """The `debug` flavor (64x64, milliseconds per chunk) with audio attention switched on.

    Random weights initialise the audio cross-attention output to zero (as training
    does), so untrained frames would ignore the audio; a small random projection
    lets the tests check that speech changes the picture.
    """
    from streamgen.models import load_model

    model = load_model("debug")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.dit.blocks:
            if block.audio_attn is not None:
                w = block.audio_attn.o.weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return model


def server_config(**overrides) -> ServerConfig:
    settings = dict(
        model="debug", warm_text_encoder=False, warmup_chunks=2, max_sessions=4, playout_delay_s=0.3,
        loopback=True, idle_timeout_s=30.0, measure_capacity=False, torch_threads=1,
    )  # fmt: skip
    settings.update(overrides)
    return ServerConfig(**settings)


def make_app(**overrides):
    config = server_config(**overrides)
    # a model in a child process loads there (the plain `debug` flavor); otherwise share one
    return create_app(config, model=None if config.inference_process else small_model())


@contextmanager
def ready_client(**overrides):
    """A test client of `make_app(**overrides)`, its warm-up done (a test file's module client)."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(**overrides)) as client:
        wait_ready(client)
        yield client


# Only an outer bound on a server's warm-up: a fixed 60 s ran out on the loaded 2-core CI machine
# (9 test processes at once) while the warm-up still went on; the waits follow the server instead
# (`wait_ready`, `wait_until_live_server_ready`)
LIVE_SERVER_READY_LIMIT_S = 900.0


def wait_ready(client, timeout: float = LIVE_SERVER_READY_LIMIT_S) -> dict:
    """Polls the test `client`'s /readyz until it answers 200, and returns what it said. Waits as
    long as /readyz says the stage its warm-up is at (under the outer bound `timeout`); fails at
    once with the error of a load or warm-up that failed (it never ends)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        if "error" in r.json():
            raise AssertionError(f"server failed to warm up: /readyz said {r.text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"server not ready in {timeout:.0f} s: /readyz said {r.text}")
        time.sleep(0.05)


def wait_until_live_server_ready(url: str, app, thread: threading.Thread, verify=True) -> None:
    """Polls `url`'s /readyz (`app` served in `thread`) until it answers 200. Waits as long as the
    thread runs and /readyz, once it answers, says the stage its warm-up is at; fails at once with
    the error of a load or warm-up that failed (it never ends), or when the thread ended."""
    import httpx

    deadline, said = time.monotonic() + LIVE_SERVER_READY_LIMIT_S, "nothing (not listening)"
    while True:
        try:
            answer = httpx.get(f"{url}/readyz", timeout=10, verify=verify)
        except httpx.TransportError:
            pass
        else:
            if answer.status_code == 200:
                return
            said = answer.text
            if "error" in answer.json():
                raise AssertionError(f"live server failed to warm up: /readyz said {said}")
        if not thread.is_alive():  # (the server stops itself when its model failed to load)
            error = app.state.registry.load_error
            why = f"the model failed to load: {error}" if error else f"/readyz said {said}"
            raise AssertionError(f"live server stopped before it was ready: {why}")
        if time.monotonic() > deadline:
            raise AssertionError(f"live server not ready in {LIVE_SERVER_READY_LIMIT_S:.0f} s: /readyz said {said}")
        time.sleep(0.05)


def serve_on_a_free_port(log_path: Path, *args: str, new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """`streamgen serve --port 0 ARGS` in a process of its own, its output in `log_path`; returns
    it and its base URL, read from uvicorn's "running on" line once it listens (the model's load
    and warm-up go on after: wait for /readyz). A port chosen before (free_port) and let go until
    serve listened could be taken meanwhile by another test process on a loaded machine. With
    `new_session`, the process leads a process group of its own (one signal reaches an --sp run's
    launcher and ranks: os.killpg). Its "running on" line needs --log-level info or lower."""
    import re

    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamgen.cli", "serve", "--port", "0", *args],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session)  # fmt: skip
    # (its imports and the app's start-up: seconds, a minute or more on a loaded machine; the
    # wait follows the process, under an outer bound)
    deadline = time.monotonic() + LIVE_SERVER_READY_LIMIT_S
    while not (running := re.search(r"Uvicorn running on (https?://\S+)", log_path.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise AssertionError(f"serve did not listen (exit code {proc.returncode}):\n{log_path.read_text()}")
        time.sleep(0.1)
    return proc, running.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def a_port_nobody_answers_on(kind: int = socket.SOCK_STREAM):
    """For the block, a port on 127.0.0.1 held by a socket of ours of `kind` that neither listens
    nor reads: a TCP connection there is refused, a datagram goes unanswered, and no other socket
    can bind it meanwhile (ours has no SO_REUSEADDR). One from free_port, let go, could be taken by
    another test process's server, which would answer."""
    with socket.socket(socket.AF_INET, kind) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@contextmanager
def live_server(http: str = "auto", tls: tuple[str, str] | None = None, loop: str = "auto", **overrides):
    """A real uvicorn server on 127.0.0.1 in a background thread, with uvicorn's `http` protocol and
    event `loop` (on HTTPS with `tls`'s certificate and key files); yields (base_url, app)."""
    import ssl

    import uvicorn

    app = make_app(**overrides)
    # the port is held from its choice until uvicorn listens on it: one let go meanwhile (free_port)
    # may be taken by another test process's server or socket on a loaded machine
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    from server.uvicorn_server import SessionClosingServer

    server = SessionClosingServer(  # as `serve` runs it
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=3,
                       ws_max_size=MAX_WEBSOCKET_MESSAGE_BYTES, http=http, loop=loop,
                       **(dict(ssl_certfile=tls[0], ssl_keyfile=tls[1]) if tls else {}))  # as `serve` runs it # fmt: skip
    )
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[held]), daemon=True)
    thread.start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=tls[0]) if tls else True
    try:
        wait_until_live_server_ready(url, app, thread, verify=trust)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(15)
        held.close()  # (uvicorn's close of its listener closed it, unless it never listened)


TURNSERVER = "/usr/bin/turnserver"  # Debian's coturn (.ci/run installs it where apt can)
TURN_PORT_TRIES = 5


@contextmanager
def turn_server(secret: str | None = None):
    """coturn on 127.0.0.1 with one user, or with a shared secret (the TURN REST API scheme);
    yields its RTCIceServer entry (UDP; with the `secret` in place of a user). Skips the test
    where coturn is not installed."""
    import os
    import shutil
    import tempfile

    import pytest

    if not os.path.exists(TURNSERVER):
        pytest.skip(f"coturn not found at {TURNSERVER}: apt-get install -y coturn")
    state = tempfile.mkdtemp(prefix="streamgen-turn-")
    auth = ["--lt-cred-mech", "--user=streamgen:turn-secret"]
    if secret is not None:
        auth = ["--use-auth-secret", f"--static-auth-secret={secret}"]
    proc = None
    try:
        # coturn takes no port 0 nor a socket of ours: its port is chosen, let go, then bound by it,
        # and a socket of another test process may hold it by then (free_port looks at TCP only,
        # coturn binds UDP too); coturn then retries its bind for good, so another port is tried
        for _ in range(TURN_PORT_TRIES):
            port = free_port()
            proc = _coturn_on(port, auth, state)
            if _coturn_answers(port, proc, f"{state}/turn-{port}.log"):
                break
            proc.kill()
            proc.wait(10)
        else:
            raise AssertionError(f"coturn found its port taken {TURN_PORT_TRIES} times")
        url = f"turn:127.0.0.1:{port}?transport=udp"
        if secret is not None:
            yield {"urls": [url], "secret": secret}
        else:
            yield {"urls": [url], "username": "streamgen", "credential": "turn-secret"}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(state, ignore_errors=True)


def _coturn_on(port: int, auth: list[str], state: str) -> subprocess.Popen:
    """coturn started on 127.0.0.1:`port` (UDP and TCP), its log in `state`/turn-PORT.log."""
    with open(f"{state}/turn-{port}.log", "w") as log:
        return subprocess.Popen(
            [TURNSERVER, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
             *auth, "--realm=streamgen", "--no-tls", "--no-dtls", "--no-cli",
             "--allow-loopback-peers", "--min-port=49152", "--max-port=65535", f"--userdb={state}/turndb",
             f"--pidfile={state}/turn.pid", "--log-file=stdout", "--simple-log"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _coturn_answers(port: int, proc: subprocess.Popen, log_path: str) -> bool:
    """Whether coturn (`proc`) answers a STUN binding request on `port`: True once it does, False
    where its log says another socket holds the port (an answer then may be another coturn's);
    an AssertionError where it ended, or neither came within 10 s."""
    from aioice import stun

    def port_taken() -> bool:
        with open(log_path) as log:
            return "Cannot bind" in log.read()

    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while True:
            probe.sendto(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)), ("127.0.0.1", port))
            try:
                probe.recvfrom(2048)
                return not port_taken()
            except OSError:  # a timeout, or ICMP unreachable while it starts
                if port_taken():
                    return False
                assert proc.poll() is None and time.monotonic() < deadline, "coturn did not start"


# --- HTTP clients -------------------------------------------------------------------------------
def png_bytes(w=96, h=96, color=(200, 150, 120)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def new_session(client, **json):
    r = client.post("/v1/sessions", json=json or {"avatar": "sample", "seed": 0})
    assert r.status_code == 201, r.text
    return r.json()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def block_lane(worker, lane: int = 0):
    """A job that holds `lane` until the returned event is set."""
    release, running = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(30)

    worker.submit(hold, lane=lane)
    assert running.wait(30)
    return release


# --- WebSocket clients --------------------------------------------------------------------------
def socket_session(client, seed=11):
    """A session of the avatar `bo` for the WebSocket tests."""
    r = client.post("/v1/sessions", json={"avatar": "bo", "seed": seed})
    assert r.status_code == 201, r.text
    return r.json()


def stream_url(s, token=None):
    return f"{s['stream']}?token={token if token is not None else s['token']}"


def expect_close(ws, max_messages=200) -> tuple[int, str]:
    for _ in range(max_messages):
        try:
            message = ws.receive()
        except WebSocketDisconnect as e:
            return e.code, e.reason
        if message["type"] == "websocket.close":
            return message["code"], message.get("reason", "")
    raise AssertionError("socket was not closed")


def read_frames(ws, n_frames: int):
    """(header, payload) of binary messages until `n_frames` video frames arrived; also the audio."""
    frames, audio = [], []
    while len(frames) < n_frames:
        message = ws.receive()
        assert message["type"] == "websocket.send", message
        if message.get("bytes") is None:
            continue  # a JSON reply (speaking, pong)
        data = message["bytes"]
        kind, _, _, seq, pts_us = HEADER.unpack_from(data)
        (audio if kind == MsgType.AUDIO_OUT else frames).append((kind, seq, pts_us, data[HEADER.size :]))
    return frames, audio


def next_json(ws, max_messages=500) -> dict:
    """The next JSON message, past the binary ones (a chunk's audio every 0.32 s without credit)."""
    for _ in range(max_messages):
        message = ws.receive()
        assert message["type"] == "websocket.send", message
        if message.get("text") is not None:
            return json.loads(message["text"])
    raise AssertionError(f"no JSON message in {max_messages} messages")


@contextmanager
def started_socket(client, s):
    """A socket on session `s`, started with credit flow control and its `ready` read."""
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
        next_json(ws)
        yield ws


# The raw-socket tests' server (`limited_server`, tests/conftest.py): a short deadline on a
# request's head and few connections, so that the tests reach them in well under a second
HEADER_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 3


def connect(port: int) -> socket.socket:
    """A raw connection to the live server on 127.0.0.1:`port` (10 s a read)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def answer_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (bounded by the socket's timeout)."""
    answer = b""
    while part := sock.recv(65536):
        answer += part
    return answer


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


def send_each_read_alone(sock: socket.socket, parts: list[bytes], reads: list[int]) -> list[int]:
    """Sends each part once the server has read all sent before it (bounded wait, 10 s a part);
    returns the bytes the server had read before each part was sent, for the test to check."""
    read_before = []
    sent = sum(reads)
    for part in parts:
        for _ in range(1000):  # bounded: 10 s
            if sum(reads) >= sent:
                break
            time.sleep(0.01)
        read_before.append(sum(reads))
        sock.sendall(part)
        sent += len(part)
    return read_before


async def sessions_gone(app, *ids: str, seconds: float = 10.0) -> None:
    """Waits (bounded: `seconds`) for the sessions `ids`, or every session where none is named, to
    be gone from the registry of `app` (a live server's): a teardown runs on the server's loop."""
    sessions = app.state.registry.sessions

    def left() -> set[str]:
        return sessions.keys() & set(ids) if ids else set(sessions)

    try:
        await until(lambda: not left(), seconds)
    except AssertionError:  # (which are left is known only once the wait has run out)
        raise AssertionError(f"sessions not gone after {seconds} s: {sorted(left())}") from None


async def until(check, seconds: float = 10.0, failed: str = "timed out") -> None:
    """Waits (bounded: `seconds`) on the running event loop until `check()` holds: what other tasks or
    threads do, which a fixed sleep took for done by then (on a loaded machine, not always)."""
    import asyncio

    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(failed)
        await asyncio.sleep(0.01)


# --- WebRTC (WHEP) clients ----------------------------------------------------------------------
async def created_session(http, **json) -> tuple[dict, dict]:
    """A session made through `http` (an httpx.AsyncClient of a live server), and its token's header."""
    r = await http.post("/v1/sessions", json=json)
    assert r.status_code == 201, r.text
    created = r.json()
    return created, auth(created["token"])


def client_peer(*receives: str, **configuration):
    """An aiortc peer connection that receives the media of each kind in `receives` (a recvonly
    transceiver each); no ICE servers by default, as there is nothing to reach from 127.0.0.1."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(**{"iceServers": [], **configuration}))
    for kind in receives:
        pc.addTransceiver(kind, direction="recvonly")
    return pc


def first_track(pc, kind: str = "video"):
    """A future of the first remote track of `kind` that `pc` gets."""
    import asyncio

    got = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track.kind == kind and not got.done() and got.set_result(track))
    return got


async def post_sdp(http, created: dict, headers: dict, sdp: str):
    """The offer `sdp` posted to the WHEP endpoint of the session `created`, with the `headers` of
    its token: the server's answer, as it is."""
    return await http.post(created["whep"], content=sdp,
                           headers={"content-type": "application/sdp", **headers})  # fmt: skip


async def post_offer(http, created: dict, headers: dict, pc, edit=lambda sdp: sdp):
    """`pc`'s offer, as `edit` makes it, posted as `post_sdp` does: the server's answer."""
    await pc.setLocalDescription(await pc.createOffer())
    return await post_sdp(http, created, headers, edit(pc.localDescription.sdp))


async def streaming_peer(http, pc=None, **json) -> tuple[dict, dict, object, object]:
    """A session made through `http` and a WHEP peer on it (`pc`, or one that receives video) that
    has decoded a frame: (the session, its token's header, the peer connection, its video track)."""
    import asyncio

    from aiortc import RTCSessionDescription

    created, headers = await created_session(http, **json)
    pc = pc or client_peer("video")
    video = first_track(pc)
    r = await post_offer(http, created, headers, pc)
    assert r.status_code == 201, r.text
    await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
    track = await asyncio.wait_for(video, 10)
    await first_frame_of(pc, track)
    return created, headers, pc, track


# Only an outer bound on a WHEP peer's first frame: a fixed 10 s ran out on the loaded 2-core CI
# machine (the ICE checks, the DTLS handshake, the first chunk and its VP8 encoding and decoding
# all wait for the cores), and the wait follows the peer's connection instead (`first_frame_of`)
FIRST_FRAME_LIMIT_S = 180.0


async def first_frame_of(pc, track):
    """The first frame `track` of the peer connection `pc` decodes: waited for while the connection
    is on its way or up; fails at once when it failed or closed."""
    import asyncio

    receiving = asyncio.ensure_future(track.recv())
    deadline = asyncio.get_running_loop().time() + FIRST_FRAME_LIMIT_S
    try:
        while not receiving.done():
            await asyncio.wait({receiving}, timeout=0.2)
            if not receiving.done() and pc.connectionState in ("failed", "closed"):
                raise AssertionError(f"the peer's connection {pc.connectionState} before its first frame")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no first frame in {FIRST_FRAME_LIMIT_S:.0f} s, the peer {pc.connectionState}")
        return receiving.result()
    finally:
        receiving.cancel()


@contextmanager
def relay_listener(on_connection):
    """The front of a TCP relay (the browser tests put one between a page and the live server): a
    listener on 127.0.0.1 whose every connection goes to `on_connection(client)` on a thread of its
    own; yields its port."""

    def accept(listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener closed
                return
            threading.Thread(target=on_connection, args=(client,), daemon=True).start()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        threading.Thread(target=accept, args=(listener,), daemon=True).start()
        yield listener.getsockname()[1]


# examples/ws_client.py, the example client of the WebSocket API, run as a user runs it
WS_CLIENT = Path(__file__).resolve().parents[1] / "examples" / "ws_client.py"


def ws_client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WS_CLIENT), *args], capture_output=True, text=True, timeout=timeout
    )


def load_ws_client():
    """examples/ws_client.py as a module, for its pieces."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ws_client", WS_CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OneThreadsOutput:
    """Stands in for sys.stdout or sys.stderr: keeps what one thread writes (the client's) and passes
    what the others write (a live_server's threads, in the same process) to the stream it stands in for."""

    def __init__(self, stream, thread: int):
        self.stream, self.thread, self.kept = stream, thread, io.StringIO()

    def write(self, text: str) -> int:
        return (self.kept if threading.get_ident() == self.thread else self.stream).write(text)

    def flush(self) -> None:
        if threading.get_ident() != self.thread:
            self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def ws_client_here(*args: str, client=None) -> subprocess.CompletedProcess:
    """What ws_client(*args) gives, the client's main run in this process and thread (`client`: the
    module, as load_ws_client gives it, with a test's stand-ins in it): its exit status, and what it
    printed. ws_client's interpreter imports httpx, numpy and websockets anew, ~1 s of a loaded 2-core
    machine's wall a run; it stays for what the command line itself does (a signal, the interpreter's
    exit)."""
    client = client or load_ws_client()
    thread = threading.get_ident()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err = OneThreadsOutput(saved[0], thread), OneThreadsOutput(saved[1], thread)
    try:
        code = client.main(list(args))
    finally:
        sys.stdout, sys.stderr = saved
    said = out.kept.getvalue(), err.kept.getvalue()
    return subprocess.CompletedProcess([str(WS_CLIENT), *args], code, *said)


def write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes())
    return path


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str, code: int | None = None) -> None:
    """`code`: 2 for a mistake in what the run was given, as argparse's and streamgen's; else any but 0."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert code is None or r.returncode == code, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


def saved_frames(out: Path) -> list[tuple[int, int]]:
    """(sequence, milliseconds) of the frames ws_client saved, in order."""
    return sorted(tuple(int(p) for p in f.stem.replace("ms", "").split("_")) for f in out.glob("*.jpg"))
