"""The WebSocket API: over a socket, control messages, flow control, bad input (with fuzzing: the
parsers and a socket; the wire format's parsers alone: test_server_ws_protocol)."""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from server_helpers import (
    expect_close,
    read_frames,
    ready_client,
    socket_session,
    started_socket,
    stream_url,
)

from server.protocol import HEADER, CloseCode, MsgType, ProtocolError, pack, parse_binary, parse_control

pytestmark = pytest.mark.timeout(120)


# --- over a socket --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with ready_client(max_sessions=6) as c:
        yield c


def test_a_ping_s_id_may_be_a_fractional_timestamp_and_comes_back_as_sent(client):
    """A client timing its round trips by performance.now() (fractional milliseconds) was closed with 4400."""
    assert parse_control('{"type": "ping", "id": 1234.567}')["id"] == 1234.567
    with pytest.raises(ProtocolError) as e:  # (not JSON, but json.loads takes it; it could not be sent back)
        parse_control('{"type": "ping", "id": NaN}')
    assert (e.value.code, e.value.reason) == (CloseCode.BAD_MESSAGE, "ping: id must be a finite number, not nan")
    s = socket_session(client)
    session = client.app.state.registry.sessions[s["id"]]
    for _ in range(300):  # bounded: 30 s. The first chunk is made as the session is created, and
        # a pong before `start` said 0 or that chunk's length, by whether it was made yet
        if session.chunk_index > 0:
            break
        time.sleep(0.1)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text('{"type": "ping", "id": 1234.567}')  # (before start: answered at any time)
        assert json.loads(ws.receive_text()) == {"type": "pong", "id": 1234.567, "video_time": 0.0}
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_binary_parser(data):
    try:
        msg = parse_binary(data)
    except ProtocolError as e:
        assert 4000 <= e.code < 5000 and e.reason
    else:
        assert len(data) >= HEADER.size and len(msg.pcm) * 2 == len(data) - HEADER.size


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
control_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["start", "speak", "caption", "interrupt", "credit", "ping", "stop", "x"])},
    optional={"text": json_values, "frames": json_values, "format": json_values, "sample_rate": json_values,
              "flow": json_values, "credit": json_values, "id": json_values},  # fmt: skip
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=100), json_values.map(json.dumps), control_like.map(json.dumps)))
def test_fuzz_control_parser(text):
    try:
        msg = parse_control(text)
    except ProtocolError as e:
        assert 4000 <= e.code < 5000 and e.reason and len(e.reason.encode()) <= 123
    else:
        assert msg["type"] in ("start", "speak", "caption", "interrupt", "credit", "ping", "stop")


def test_stream_jpeg_frames_with_headers(client):
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start"}))
        ready = json.loads(ws.receive_text())
        assert ready["type"] == "ready" and ready["width"] == 64 and ready["fps"] == 25.0
        frames, audio = read_frames(ws, 16)
        assert [f[1] for f in frames] == list(range(16))  # sequence numbers
        assert [f[2] for f in frames] == [i * 40_000 for i in range(16)]  # pts in microseconds, 25 fps
        assert all(f[0] == MsgType.VIDEO_JPEG for f in frames)
        img = np.asarray(Image.open(io.BytesIO(frames[0][3])))
        assert img.shape == (64, 64, 3) and img.mean() > 20
        assert audio[0][0] == MsgType.AUDIO_OUT and len(audio[0][3]) == 2 * 5120  # one chunk of PCM16
        ws.send_text(json.dumps({"type": "ping", "id": 3}))
        for _ in range(40):
            msg = ws.receive()
            if msg.get("text"):
                pong = json.loads(msg["text"])
                break
        assert pong["type"] == "pong" and pong["id"] == 3
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL
    assert s["id"] not in client.app.state.registry.sessions


def test_jpeg_frames_are_encoded_off_the_event_loop_and_sent_in_order(client, monkeypatch):
    """Each frame was compressed on the event loop, which every stream's frames and the WebRTC peers
    wait on (1.1-1.3 ms a frame at 512x512): 8 sessions' chunks held it ~80 ms of each 320."""
    import threading

    from server import websocket

    encoders, encode = [], websocket._encode

    def recorded(frame, fmt, quality):
        encoders.append(threading.get_ident())
        return encode(frame, fmt, quality)

    async def loop_thread():
        return threading.get_ident()

    monkeypatch.setattr(websocket, "_encode", recorded)
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start"}))
        ws.receive_text()
        frames, _ = read_frames(ws, 16)
        ws.send_text(json.dumps({"type": "stop"}))
    assert [f[1] for f in frames] == list(range(16))  # sequence numbers
    assert [f[2] for f in frames] == [i * 40_000 for i in range(16)]  # pts, in order
    assert len(encoders) >= 16 and client.portal.call(loop_thread) not in encoders


def test_a_jpeg_frame_compressed_into_a_file_in_memory_is_the_jpeg_pillow_makes():
    """(Into a file descriptor, which Pillow compresses into without the GIL: into a BytesIO it
    holds it, and the event loop waited on the thread as it had on its own compression.)"""
    from server.websocket import _encode

    frame = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=60)
    assert _encode(frame, "jpeg", 60) == (MsgType.VIDEO_JPEG, buf.getvalue())


def test_a_frame_is_sent_when_no_file_in_memory_can_be_made(monkeypatch):
    """A process at its limit of open files (EMFILE) failed the memfd: the sender task ended with
    the OSError, and the stream went on with no frames and not a line in the log."""
    import errno
    import os

    from server.websocket import _encode

    def no_more_files(name, flags=0):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_more_files)
    frame = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=70)
    assert _encode(frame, "jpeg", 70) == (MsgType.VIDEO_JPEG, buf.getvalue())


def test_frames_that_cannot_be_encoded_end_the_session_said_and_logged(client, monkeypatch, caplog):
    """The sender task ended with the exception (a RuntimeError was taken for the socket's and
    passed over): the stream went on with its sound and no frames, the client pinging it alive, and
    the log said nothing until the task was collected."""
    import logging

    from server import websocket

    def broken(frame, fmt, quality):
        raise RuntimeError("the encoder broke")

    monkeypatch.setattr(websocket, "_encode", broken)
    s = socket_session(client)
    with caplog.at_level(logging.ERROR, logger="streamgen.server"):
        with client.websocket_connect(stream_url(s)) as ws:
            ws.send_text(json.dumps({"type": "start"}))
            code, reason = expect_close(ws)
    assert code == CloseCode.GONE and reason.startswith("internal error: encoding frames failed: RuntimeError"), reason
    assert s["id"] not in client.app.state.registry.sessions
    assert any("encoding its frames failed" in r.getMessage() and r.exc_info for r in caplog.records)


def rgb_frames(client, seed, speak=None, n=24, audio_in=None):
    s = socket_session(client, seed)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "format": "rgb"}))
        ws.receive_text()
        if speak:
            ws.send_text(json.dumps({"type": "speak", "text": speak}))
        if audio_in is not None:
            ws.send_bytes(pack(MsgType.AUDIO_IN, 0, 0, audio_in.tobytes()))
        frames, audio = read_frames(ws, n)
        ws.send_text(json.dumps({"type": "stop"}))
    pcm = np.concatenate([np.frombuffer(a[3], np.int16) for a in audio])
    return np.stack([np.frombuffer(f[3], np.uint8).reshape(64, 64, 3) for f in frames]), pcm


def test_frames_react_to_audio_exactly(client):
    """Same avatar and seed: silence twice gives identical frames, speech changes them."""
    from streamgen.data.speech import synthesize

    silent_a, pcm_a = rgb_frames(client, seed=5)
    silent_b, _ = rgb_frames(client, seed=5)
    assert np.array_equal(silent_a, silent_b)
    assert not pcm_a.any()
    speech = (synthesize("Hello there, nice to meet you.").audio * 32767).astype(np.int16)
    spoken, pcm = rgb_frames(client, seed=5, audio_in=speech[:32000])
    assert not np.array_equal(spoken, silent_a)
    assert np.abs(pcm.astype(np.float32)).mean() > 300  # the audio out carries what drove the lips
    said, pcm_said = rgb_frames(client, seed=5, speak="Good morning to you.")
    assert not np.array_equal(said, silent_a) and np.abs(pcm_said.astype(np.float32)).mean() > 300


def test_credit_flow_control(client):
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit", "credit": 3}))
        ws.receive_text()
        kinds = [HEADER.unpack_from(ws.receive_bytes())[0] for _ in range(8)]
        assert kinds.count(MsgType.VIDEO_JPEG) == 3  # then audio only, one message per chunk
        ws.send_text(json.dumps({"type": "credit", "frames": 2}))
        more = []
        while len(more) < 2:
            data = ws.receive_bytes()
            if data[0] == MsgType.VIDEO_JPEG:
                more.append(HEADER.unpack_from(data)[3])
        assert more == [3, 4]  # video sequence numbers continue
        ws.send_text(json.dumps({"type": "stop"}))


@pytest.mark.parametrize(
    "messages, code",
    [
        ([("text", '{"type":"start"}'), ("bytes", pack(MsgType.AUDIO_IN, 0, 0, b"\x01\x02\x03"))], 4400),
        ([("text", '{"type":"start","sample_rate":44100}')], 4415),
        ([("bytes", b"\xde\xad\xbe\xef" * 9)], 4400),
        ([("text", "not json at all")], 4400),
        ([("bytes", pack(MsgType.AUDIO_IN, 0, 0, b"\x00\x00"))], 4400),  # audio before start
        ([("text", '{"type":"speak","text":"hi"}')], 4400),  # control before start
        ([("text", '{"type":"start"}'), ("text", '{"type":"start"}')], 4400),
        ([("text", "{" * 17000)], 4413),
    ],
)
def test_bad_messages_close_with_a_code(client, messages, code):
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        for kind, data in messages:
            ws.send_bytes(data) if kind == "bytes" else ws.send_text(data)
        got, reason = expect_close(ws)
    assert got == code and reason
    assert s["id"] not in client.app.state.registry.sessions


def test_a_stop_before_start_ends_the_session_as_a_stop(client):
    """A client that hung up before its stream started was closed with 4400, its session's end
    counted as a protocol error ('send a start message before stop')."""
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws) == (CloseCode.NORMAL, "stopped")
    r = client.get(s["resource"], headers={"Authorization": f"Bearer {s['token']}"})
    assert r.status_code == 404 and r.json()["message"] == "session ended: stopped by client", r.text


def test_audio_far_ahead_of_the_video_says_what_to_send(client):
    """Audio of another rate (48 kHz, taken as 16 kHz, runs three times as long as it was sent) was
    closed with 'audio is more than 30 s ahead of the video', the cause left to guess."""
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
        ws.receive_text()
        two_seconds = pack(MsgType.AUDIO_IN, 0, 0, np.zeros(32000, np.int16).tobytes())
        for _ in range(16):
            ws.send_bytes(two_seconds)
        code, reason = expect_close(ws)
    assert code == CloseCode.TOO_FAST and len(reason.encode()) <= 123
    assert reason == "audio is more than 30 s ahead of the video: send 16 kHz mono PCM16 (32000 bytes a second) in real time"


def test_messages_sent_flat_out_close_the_socket_saying_how_many_it_may_send(client, monkeypatch):
    """Empty audio messages sent flat out (11,000 a second) were all taken in, slowing every
    session's chunks 3.5-fold. (Bounds this small so that the test's own pace exceeds them.)"""
    import server.websocket

    monkeypatch.setattr(server.websocket, "MAX_MESSAGES_PER_S", 1)
    monkeypatch.setattr(server.websocket, "MAX_MESSAGE_BURST", 20)
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
        ws.receive_text()
        empty = pack(MsgType.AUDIO_IN, 0, 0, b"")
        for _ in range(40):
            ws.send_bytes(empty)
        code, reason = expect_close(ws)
    assert (code, reason) == (CloseCode.TOO_FAST, "more than 1 messages a second: send audio in messages of 20 ms "
                              "or more (50 a second)")  # fmt: skip


def test_a_message_rate_keeps_to_its_rate_past_its_burst():
    from server.protocol import MessageRate

    now = [0.0]
    rate = MessageRate(per_s=50, burst=3, clock=lambda: now[0])
    assert [rate.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.02  # one message's worth
    assert [rate.take() for _ in range(2)] == [True, False]
    now[0] += 60  # no more than the burst after a pause
    assert [rate.take() for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("which, code", [("unknown", 4404), ("missing", 4401), ("wrong", 4403), ("emoji", 4404)])
def test_refused_connections(client, which, code):
    s = socket_session(client)
    url = {"unknown": "/v1/sessions/nope/stream?token=x", "missing": s["stream"],
           "wrong": stream_url(s, "wrong"), "emoji": "/v1/sessions/" + "\U0001f600" * 40 + "/stream"}[which]  # fmt: skip
    with client.websocket_connect(url) as ws:
        got, reason = expect_close(ws)
    assert got == code and len(reason.encode()) <= 123
    client.delete(s["resource"], headers={"Authorization": f"Bearer {s['token']}"})


@pytest.mark.parametrize("path", ["/v1/sessions/x/streams", "/v1/sessions/x/stream/", "/", "/index.html"])
def test_a_socket_to_a_path_that_has_none_is_told_nothing_is_there(client, path):
    """It was starlette's bare 403 before the handshake, which reads as a token problem."""
    with client.websocket_connect(path) as ws:
        code, reason = expect_close(ws)
    assert code == CloseCode.NOT_FOUND and reason.startswith(f"no WebSocket at {path}: "), reason
    # plain HTTP is answered as before: the page, a 404 in the API's JSON, the stream's 426
    assert client.get("/").status_code == 200
    assert client.get("/v1/sessions/x/streams").json()["error"] == "not_found"
    assert client.get("/v1/sessions/x/stream").status_code == 426


def test_a_socket_to_a_session_that_ended_says_why_to_its_client(client):
    """A client reconnecting after its session ended heard 4404 "unknown session" (a session it
    had just streamed) where the session's 404 over HTTP says why it ended; anyone else still
    hears of an unknown session."""
    s = socket_session(client)
    client.delete(s["resource"], headers={"Authorization": f"Bearer {s['token']}"})
    with client.websocket_connect(stream_url(s)) as ws:
        assert expect_close(ws) == (CloseCode.NOT_FOUND, "session ended: deleted by client")
    with client.websocket_connect(stream_url(s, "wrong")) as ws:
        assert expect_close(ws) == (CloseCode.NOT_FOUND, f"unknown session {s['id']!r}")


def test_second_socket_on_a_session_is_refused(client):
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start"}))
        ws.receive_text()
        with client.websocket_connect(stream_url(s)) as ws2:
            assert expect_close(ws2)[0] == CloseCode.CONFLICT
        ws.send_text(json.dumps({"type": "stop"}))


def video_offer() -> bytes:
    """A WHEP player's offer (its ICE candidates are not needed to be refused)."""
    import asyncio

    from aiortc import RTCPeerConnection

    async def offer():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        description = await pc.createOffer()
        await pc.close()
        return description.sdp.encode()

    return asyncio.run(offer())


def test_a_socket_holds_its_session_from_the_moment_it_connects(client):
    """Before, a socket held its session only from its start message: an idle socket let a second one
    (or a WHEP offer) in, then ended that one's stream when it went."""
    s = socket_session(client)
    h = {"Authorization": f"Bearer {s['token']}"}
    with client.websocket_connect(stream_url(s)) as idle:
        with client.websocket_connect(stream_url(s)) as ws2:
            assert expect_close(ws2)[0] == CloseCode.CONFLICT
        offer = client.post(s["whep"], content=video_offer(), headers={"content-type": "application/sdp", **h})
        assert offer.status_code == 409 and "websocket" in offer.json()["message"]
        idle.send_text(json.dumps({"type": "start"}))
        assert json.loads(idle.receive_text())["type"] == "ready"
        idle.send_text(json.dumps({"type": "stop"}))


def test_a_session_deleted_before_its_socket_started_closes_the_socket(client):
    """The socket stayed open, and a start after the DELETE put the deleted session back in the
    worker, streaming for good (`streamgen_sessions_streaming` stuck at 1)."""
    registry = client.app.state.registry
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        r = client.delete(s["resource"], headers={"Authorization": f"Bearer {s['token']}"})
        assert r.status_code == 204
        assert expect_close(ws) == (CloseCode.GONE, "deleted by client")
    assert s["id"] not in registry.sessions and registry.worker.streaming == 0
    assert "streamgen_sessions_streaming 0.0" in client.get("/metrics").text


garbage = st.one_of(
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
    st.text(max_size=64).map(lambda t: ("text", t)),
    control_like.map(lambda d: ("text", json.dumps(d))),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(garbage, min_size=1, max_size=4))
def test_fuzz_socket_other_session_unaffected(client, messages):
    """Malformed traffic on one socket gets a close code; a healthy session on the side keeps streaming."""
    healthy = socket_session(client, seed=1)
    victim = socket_session(client, seed=2)
    with client.websocket_connect(stream_url(healthy)) as good:
        good.send_text(json.dumps({"type": "start", "format": "rgb"}))
        good.receive_text()
        with client.websocket_connect(stream_url(victim)) as ws:
            ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
            ws.receive_text()
            for kind, data in messages:
                ws.send_bytes(data) if kind == "bytes" else ws.send_text(data)
            ws.send_bytes(b"\xff")  # always ends with garbage: every example must close
            code, reason = expect_close(ws, max_messages=1000)
            assert code in (1000, 4400, 4413, 4415, 4429) and reason
        frames, _ = read_frames(good, 3)
        assert len(frames) == 3
        good.send_text(json.dumps({"type": "stop"}))
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("broken", ["too-big", "not-utf8"])
async def test_a_frame_the_transport_refuses_closes_the_session_as_the_client_s_fault(broken, caplog):
    """uvicorn's default took 16 MiB in one message, buffered before the protocol could say 4413:
    the transport refuses it now (1009). A text message that is not UTF-8 it refuses with 1007,
    and logged its own traceback for it. Either session was logged and counted as closed by the
    client; it is a protocol error, in one log line."""
    import logging

    import httpx
    import websockets
    from server_helpers import live_server
    from websockets.frames import Frame, Opcode

    from server.protocol import MAX_WEBSOCKET_MESSAGE_BYTES

    caplog.set_level(logging.INFO)
    uvicorn_records = []  # (uvicorn's loggers do not propagate to the root, where caplog listens)
    uvicorn_log = logging.getLogger("uvicorn.error")
    handler = logging.Handler()
    handler.emit = uvicorn_records.append
    with live_server(max_sessions=1) as (url, app):
        uvicorn_log.addHandler(handler)  # (after uvicorn's Config set its logging up)
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            s = (await http.post("/v1/sessions", json={})).json()
        ws_url = url.replace("http", "ws") + f"{s['stream']}?token={s['token']}"
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start"}))
            if broken == "too-big":
                await ws.send(b"\x00" * (MAX_WEBSOCKET_MESSAGE_BYTES + 1024))
            else:  # (the client library checks what it sends: the frame is written as it is)
                ws.protocol.send_frame(Frame(Opcode.TEXT, b'\xff{"type": "stop"}'))
                ws.send_data()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == {"too-big": 1009, "not-utf8": 1007}[broken]
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            for _ in range(100):  # bounded: 10 s for the session's teardown
                metrics = (await http.get("/metrics")).text
                if "streamgen_sessions_closed_total{" in metrics:
                    break
                await asyncio.sleep(0.1)
        uvicorn_log.removeHandler(handler)
    assert 'streamgen_sessions_closed_total{reason="protocol error"} 1.0' in metrics
    assert not [r for r in caplog.records + uvicorn_records if r.exc_info], "a traceback was logged"
    if broken == "not-utf8":
        assert [r for r in uvicorn_records if "not UTF-8" in r.getMessage()], "uvicorn's line was lost"
    closes = [r.getMessage() for r in caplog.records if "closed: protocol error" in r.getMessage()]
    assert closes and {"too-big": "(1009)", "not-utf8": "(1007)"}[broken] in closes[0]


@pytest.mark.parametrize("client_closed_first", [True, False], ids=["client-closed", "handler-cancelled"])
def test_a_socket_s_closer_sends_nothing_once_its_transport_is_gone(
    client, monkeypatch, caplog, client_closed_first
):
    """The session's teardown (a task of its own) closes its socket. After the client's close
    frame, or once the server had cancelled the socket's handler (its transport gone: a test
    client's exit, a server's shutdown), it sent a close frame all the same; where the transport
    was gone by then it failed: "closing transport failed: ClosedResourceError()" (the test
    client's closed stream). The closer is held here until the transport is gone."""
    import logging
    import threading
    import time

    from server.websocket import SocketConnection

    release, closing, holding = (threading.Event() for _ in range(3))
    sessions = []

    async def wait_for_release():
        for _ in range(400):  # bounded: 20 s
            if release.is_set():
                return
            await asyncio.sleep(0.05)

    close_for_session, on_control = SocketConnection.close_for_session, SocketConnection.on_control

    async def held_close(self):
        sessions.append(self.session)
        closing.set()
        await wait_for_release()
        await close_for_session(self)

    async def held_ping(self, msg):  # the receive loop busy: it reads no close frame meanwhile
        if msg["type"] == "ping" and msg.get("id") == "hold":
            holding.set()
            await wait_for_release()
        return await on_control(self, msg)

    monkeypatch.setattr(SocketConnection, "close_for_session", held_close)
    monkeypatch.setattr(SocketConnection, "on_control", held_ping)
    s = socket_session(client)
    with caplog.at_level(logging.WARNING, logger="streamgen.server"):
        with started_socket(client, s) as ws:
            if client_closed_first:
                ws.close()
                assert closing.wait(20)  # the server read the close frame and ended the session
            else:
                ws.send_text(json.dumps({"type": "ping", "id": "hold"}))
                assert holding.wait(20)
        # the test client's streams are closed: its transport is gone
        assert closing.wait(20)
        release.set()
        for _ in range(400):  # bounded: 20 s
            if sessions[0].teardown.done():  # (its closers run, and any failure logged)
                break
            time.sleep(0.05)
        assert sessions[0].teardown.done()
    failures = [r.getMessage() for r in caplog.records if "closing transport failed" in r.getMessage()]
    assert failures == []
    assert s["id"] not in client.app.state.registry.sessions


async def test_what_a_client_sent_as_its_session_ended_is_no_protocol_error():
    """A session ended by a limit (max_duration, idle) or a DELETE while its client still sent audio:
    the audio that reached the socket before the close frame was taken for audio before `start`,
    and the server logged the client's protocol error 4400 after each such close."""
    from types import SimpleNamespace

    from server.websocket import SocketConnection

    class Socket:  # the client's audio, already on its way when the session was closed
        async def receive(self):
            return {"type": "websocket.receive", "bytes": pack(MsgType.AUDIO_IN, 0, 0, np.zeros(320, np.int16).tobytes())}

    session = SimpleNamespace(closed=True, streaming=False, close_reason="max_duration: session reached 8 s",
                              touch=lambda: None)  # fmt: skip
    registry = SimpleNamespace(config=SimpleNamespace(idle_timeout_s=5.0))
    connection = SocketConnection(Socket(), session, registry)
    assert await asyncio.wait_for(connection.receive_loop(), 5) == "max_duration: session reached 8 s"


@pytest.mark.parametrize("first", ["sockets_frame", "sessions_close"])
def test_a_client_that_stops_reading_is_told_so_whichever_close_comes_first(client, monkeypatch, first):
    """The sender's close frame (4430) went out before the session's close only because the session's
    was a task not yet run as the frame's close began: where the session's teardown came first, its
    closer sent the session's reason with 4410, and the sender's own close found the frame sent."""
    from server import websocket

    send, close = websocket.SocketConnection.send, websocket.SocketConnection.close

    async def stuck_on_frames(self, data):
        if isinstance(data, bytes):  # (the client reads nothing past `ready`)
            raise TimeoutError
        await send(self, data)

    async def after_the_sessions_close(self, code, reason):
        for _ in range(1000):  # (bounded) the sender's close waits for the session's teardown to have had its turn
            teardown = self.session.teardown
            if teardown is asyncio.current_task() or (teardown is not None and (self.close_sent or teardown.done())):
                break
            await asyncio.sleep(0)
        await close(self, code, reason)

    monkeypatch.setattr(websocket.SocketConnection, "send", stuck_on_frames)
    if first == "sessions_close":
        monkeypatch.setattr(websocket.SocketConnection, "close", after_the_sessions_close)
    s = socket_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start"}))
        assert json.loads(ws.receive_text())["type"] == "ready"
        code, reason = expect_close(ws)
    assert (code, reason) == (CloseCode.SLOW_CONSUMER, "client did not read for 5 s")
    assert client.app.state.registry.ended[s["id"]][1] == "slow consumer"
