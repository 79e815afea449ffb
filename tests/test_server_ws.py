"""The WebSocket API: wire format, control messages, flow control, bad input (with fuzzing)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from server_helpers import make_app, wait_ready
from starlette.websockets import WebSocketDisconnect

from server.protocol import HEADER, CloseCode, MsgType, ProtocolError, pack, parse_binary, parse_control

pytestmark = pytest.mark.timeout(120)


# --- the pure parser ----------------------------------------------------------------------------------
def test_pack_and_parse_audio_roundtrip():
    pcm = (np.sin(np.arange(320) / 5) * 8000).astype(np.int16)
    msg = parse_binary(pack(MsgType.AUDIO_IN, 7, 1.25, pcm.tobytes()))
    assert msg.seq == 7 and msg.pts_us == 1_250_000 and np.array_equal(msg.pcm, pcm)


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", CloseCode.BAD_MESSAGE),
        (b"\x01\x00", CloseCode.BAD_MESSAGE),  # shorter than the header
        (pack(MsgType.VIDEO_JPEG, 0, 0, b"xx"), CloseCode.BAD_MESSAGE),  # not a client type
        (pack(MsgType.AUDIO_IN, 0, 0, b"\x00\x01\x02"), CloseCode.BAD_MESSAGE),  # odd byte count
        (pack(MsgType.AUDIO_IN, 0, 0, b"\x00" * 70000), CloseCode.TOO_BIG),
        (struct.pack("<BBHIq", 1, 1, 0, 0, 0), CloseCode.BAD_MESSAGE),  # flags set
    ],
)
def test_bad_binary_messages(data, code):
    with pytest.raises(ProtocolError) as e:
        parse_binary(data)
    assert e.value.code == code and e.value.reason


@pytest.mark.parametrize(
    "text, code",
    [
        ("{", CloseCode.BAD_MESSAGE),
        ("[]", CloseCode.BAD_MESSAGE),
        ('{"type": "dance"}', CloseCode.BAD_MESSAGE),
        ('{"type": "start", "sample_rate": 48000}', CloseCode.UNSUPPORTED),
        ('{"type": "start", "format": "png"}', CloseCode.UNSUPPORTED),
        ('{"type": "start", "credit": -1}', CloseCode.BAD_MESSAGE),
        ('{"type": "start", "extra": 1}', CloseCode.BAD_MESSAGE),
        ('{"type": "speak"}', CloseCode.BAD_MESSAGE),
        ('{"type": "speak", "text": 5}', CloseCode.BAD_MESSAGE),
        ('{"type": "speak", "text": "   "}', CloseCode.BAD_MESSAGE),
        ('{"type": "credit", "frames": true}', CloseCode.BAD_MESSAGE),
        ("x" * 9000, CloseCode.TOO_BIG),
    ],
)
def test_bad_control_messages(text, code):
    with pytest.raises(ProtocolError) as e:
        parse_control(text)
    assert e.value.code == code


def test_a_close_reason_fits_a_close_frame_whatever_the_client_sent():
    """Reasons that repeat a client's text were cut at 120 characters: over 123 bytes of UTF-8
    with emoji, and the server sent no close frame at all (uvicorn: "control frame too long")."""
    from server.protocol import close_reason

    emoji = "\U0001f600"
    for text in (json.dumps({"type": emoji * 40}), json.dumps({"type": "start", "format": emoji * 40})):
        with pytest.raises(ProtocolError) as e:
            parse_control(text)
        assert len(e.value.reason.encode()) <= 123 and e.value.reason.startswith(("unknown", "start"))
    assert close_reason("a" * 200) == "a" * 123 and close_reason(emoji * 40) == emoji * 30


def test_start_defaults():
    msg = parse_control('{"type": "start"}')
    assert msg["format"] == "jpeg" and msg["flow"] == "latest" and msg["sample_rate"] == 16000


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


# --- over a socket --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(max_sessions=6)) as c:
        wait_ready(c)
        yield c


def new_session(client, seed=11):
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


def test_stream_jpeg_frames_with_headers(client):
    s = new_session(client)
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


def rgb_frames(client, seed, speak=None, n=24, audio_in=None):
    s = new_session(client, seed)
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
    s = new_session(client)
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
        ([("text", "{" * 10000)], 4413),
    ],
)
def test_bad_messages_close_with_a_code(client, messages, code):
    s = new_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        for kind, data in messages:
            ws.send_bytes(data) if kind == "bytes" else ws.send_text(data)
        got, reason = expect_close(ws)
    assert got == code and reason
    assert s["id"] not in client.app.state.registry.sessions


@pytest.mark.parametrize("which, code", [("unknown", 4404), ("missing", 4401), ("wrong", 4403), ("emoji", 4404)])
def test_refused_connections(client, which, code):
    s = new_session(client)
    url = {"unknown": "/v1/sessions/nope/stream?token=x", "missing": s["stream"],
           "wrong": stream_url(s, "wrong"), "emoji": "/v1/sessions/" + "\U0001f600" * 40 + "/stream"}[which]  # fmt: skip
    with client.websocket_connect(url) as ws:
        got, reason = expect_close(ws)
    assert got == code and len(reason.encode()) <= 123
    client.delete(s["resource"], headers={"Authorization": f"Bearer {s['token']}"})


def test_second_socket_on_a_session_is_refused(client):
    s = new_session(client)
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
    s = new_session(client)
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
    s = new_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        r = client.delete(s["resource"], headers={"Authorization": f"Bearer {s['token']}"})
        assert r.status_code == 204
        assert expect_close(ws) == (CloseCode.GONE, "deleted by client")
    assert s["id"] not in registry.sessions and registry.worker.streaming == 0
    assert "streamgen_sessions_streaming 0.0" in client.get("/metrics").text


def test_speak_errors_are_reported_not_fatal(client):
    s = new_session(client)
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
        ws.receive_text()
        ws.send_text(json.dumps({"type": "speak", "text": "hi", "language": "klingon"}))
        for _ in range(50):
            msg = ws.receive()
            if msg.get("text"):
                break
        err = json.loads(msg["text"])
        assert err["type"] == "error" and "language" in err["message"]
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))  # the debug model takes no captions
        for _ in range(50):
            msg = ws.receive()
            if msg.get("text"):
                break
        assert json.loads(msg["text"])["for"] == "caption"
        ws.send_text(json.dumps({"type": "stop"}))


garbage = st.one_of(
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
    st.text(max_size=64).map(lambda t: ("text", t)),
    control_like.map(lambda d: ("text", json.dumps(d))),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(garbage, min_size=1, max_size=4))
def test_fuzz_socket_other_session_unaffected(client, messages):
    """Malformed traffic on one socket gets a close code; a healthy session on the side keeps streaming."""
    healthy = new_session(client, seed=1)
    victim = new_session(client, seed=2)
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


async def test_the_transport_refuses_a_message_far_past_the_protocol_s_largest():
    """uvicorn's default took 16 MiB in one message, buffered before the protocol could say 4413."""
    import httpx
    import websockets
    from server_helpers import live_server

    from server.protocol import MAX_WEBSOCKET_MESSAGE_BYTES

    with live_server(max_sessions=1) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            s = (await http.post("/v1/sessions", json={})).json()
        ws_url = url.replace("http", "ws") + f"{s['stream']}?token={s['token']}"
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.send(b"\x00" * (MAX_WEBSOCKET_MESSAGE_BYTES + 1024))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big


# --- speak off the receive loop -----------------------------------------------------------------------
@pytest.fixture
def held_synthesis(monkeypatch):
    """Synthesis that waits for `release` (at most 10 s, so that a test of a loop that waits for it
    fails instead of hanging); `started` and `finished` mark each text's synthesis."""
    import threading
    from types import SimpleNamespace

    from server import speech

    held = SimpleNamespace(release=threading.Event(), has_started=threading.Event(), started=[], finished=[])

    def synthesize(text, voice):
        held.started.append(text)
        held.has_started.set()
        held.release.wait(10)
        held.finished.append(text)
        return SimpleNamespace(audio=np.zeros(160 * len(text), np.float32), duration=len(text) / 100)

    monkeypatch.setattr(speech, "synthesize", synthesize)
    yield held
    held.release.set()  # (a failed test's synthesis does not hold the speech thread up for the next)


def next_json(ws, max_messages=500) -> dict:
    """The next JSON message, past the binary ones (a chunk's audio every 0.32 s without credit)."""
    for _ in range(max_messages):
        message = ws.receive()
        assert message["type"] == "websocket.send", message
        if message.get("text") is not None:
            return json.loads(message["text"])
    raise AssertionError(f"no JSON message in {max_messages} messages")

@contextlib.contextmanager
def started_socket(client, s):
    """A socket on session `s`, started with credit flow control and its `ready` read."""
    with client.websocket_connect(stream_url(s)) as ws:
        ws.send_text(json.dumps({"type": "start", "flow": "credit"}))
        next_json(ws)
        yield ws



def test_a_speak_being_synthesised_holds_up_no_other_message(client, held_synthesis):
    """The receive loop awaited each speak's synthesis: meanwhile it read nothing, a ping or the
    client's live audio included."""
    s = new_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        pong = next_json(ws)
        assert pong["type"] == "pong" and held_synthesis.finished == []  # answered during the synthesis
        held_synthesis.release.set()
        assert next_json(ws) == {"type": "speaking", "duration": 0.12}
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def speaker_tasks(client) -> list[str]:
    async def names():
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("speak ")]

    return client.portal.call(names)


def test_a_socket_closes_during_a_synthesis_and_leaves_no_speaker_behind(client, held_synthesis):
    s = new_session(client)
    session = client.app.state.registry.get(s["id"])
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        ws.send_text(json.dumps({"type": "speak", "text": "And a second time."}))
        # the stop during the first one's synthesis (sent at once, it could end the speaker first)
        assert held_synthesis.has_started.wait(10)
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws) == (CloseCode.NORMAL, "stopped")
        assert held_synthesis.finished == []  # closed while the first was synthesised
    assert s["id"] not in client.app.state.registry.sessions
    assert speaker_tasks(client) == []
    assert not session.speech_turns.busy  # both speaks' turns given back, the one never taken up too
    held_synthesis.release.set()
    assert held_synthesis.started == ["Hello there."]  # the second one was never synthesised


def test_speaks_are_answered_in_order_and_an_interrupt_drops_those_asked_before_it(client, held_synthesis):
    """An interrupt is read during a synthesis now: the speaks sent before it, the one being
    synthesised and those waiting, are answered with an error and none of their speech is queued,
    as when the interrupt was read after them. Too many unanswered speaks are refused at once."""
    from server.websocket import MAX_UNANSWERED

    s = new_session(client)
    timeline = client.app.state.registry.get(s["id"]).timeline
    queued, append = [], timeline.append

    def queue(pcm, source="client", **kwargs):
        queued.append((source, len(pcm)))
        return append(pcm, source, **kwargs)

    timeline.append = queue
    with started_socket(client, s) as ws:
        texts = [f"Number {i}." for i in range(MAX_UNANSWERED + 1)]
        for text in texts:
            ws.send_text(json.dumps({"type": "speak", "text": text}))
        refused = next_json(ws)  # the last one, at once, during the first one's synthesis
        assert refused["type"] == "error" and refused["for"] == "speak" and "waiting" in refused["message"]
        assert held_synthesis.finished == []
        ws.send_text(json.dumps({"type": "interrupt"}))
        ws.send_text(json.dumps({"type": "ping", "id": 2}))
        assert next_json(ws)["type"] == "pong"  # the interrupt was read: now let the synthesis end
        held_synthesis.release.set()
        for _ in texts[:-1]:
            reply = next_json(ws)
            assert reply["type"] == "error" and reply["for"] == "speak" and "interrupted" in reply["message"]
        ws.send_text(json.dumps({"type": "speak", "text": "After the interrupt."}))
        assert next_json(ws) == {"type": "speaking", "duration": 0.2}
        assert held_synthesis.started == ["Number 0.", "After the interrupt."]
        assert queued == [("speech", 160 * len("After the interrupt."))]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_speak_that_fails_on_the_servers_side_is_answered_logged_and_the_stream_goes_on(
    client, monkeypatch, caplog
):
    from server import speech

    def broken(text, voice):
        raise RuntimeError("the synthesiser broke")

    monkeypatch.setattr(speech, "synthesize", broken)
    s = new_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        assert next_json(ws) == {"type": "error", "for": "speak", "message": "speech failed: the synthesiser broke"}
        ws.send_text(json.dumps({"type": "ping", "id": 4}))
        assert next_json(ws)["type"] == "pong"
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL
    assert any("speak failed" in r.getMessage() and r.exc_info for r in caplog.records)


# --- captions off the receive loop, in order with the speaks ------------------------------------------
@pytest.fixture
def held_caption_jobs(client, monkeypatch):
    """Caption jobs that wait on the worker's thread for `release` (at most 10 s, so that a test of
    a loop that waits for them fails instead of hanging) before they apply; `ran` counts those run."""
    import threading
    from types import SimpleNamespace

    worker = client.app.state.registry.worker
    held = SimpleNamespace(release=threading.Event(), ran=[])
    submit = worker.submit

    def holding(fn, *args, **kwargs):
        if fn.__name__ != "apply":  # (server/speech.py's caption job)
            return submit(fn, *args, **kwargs)

        def held_apply():
            held.release.wait(10)
            held.ran.append(1)
            return fn()

        return submit(held_apply, *args, **kwargs)

    monkeypatch.setattr(worker, "submit", holding)
    yield held
    held.release.set()


def test_a_caption_waiting_for_the_worker_holds_up_no_other_message(client, held_caption_jobs):
    """The receive loop awaited each caption's worker job, which waits behind due chunks for up to a
    second: meanwhile it read nothing, a ping, an interrupt, a stop or the client's audio."""
    s = new_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong" and held_caption_jobs.ran == []  # during the caption's wait
        held_caption_jobs.release.set()
        reply = next_json(ws)  # the debug model takes no captions: answered as before, with an error
        assert reply["type"] == "error" and reply["for"] == "caption" and "text features" in reply["message"]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_caption_after_a_speak_waits_for_it_and_an_interrupt_drops_only_the_speak(client, held_synthesis):
    """Speaks went to the speaker task while captions were handled at once: a caption sent after a
    speak overtook it (applied, and answered, before the speak's speech was queued)."""
    s = new_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "Hello there."}))
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"
        held_synthesis.release.set()
        assert next_json(ws) == {"type": "speaking", "duration": 0.12}
        assert next_json(ws)["for"] == "caption"  # its error (the debug model's), after the speak's answer
        held_synthesis.release.clear()
        ws.send_text(json.dumps({"type": "speak", "text": "Dropped."}))
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "interrupt"}))
        ws.send_text(json.dumps({"type": "ping", "id": 2}))
        assert next_json(ws)["type"] == "pong"
        held_synthesis.release.set()
        dropped, caption = next_json(ws), next_json(ws)
        assert dropped["for"] == "speak" and "interrupted" in dropped["message"]
        assert caption["for"] == "caption" and "text features" in caption["message"]  # still applied
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_burst_of_captions_ends_with_the_latest_applied(client, held_caption_jobs):
    """Each caption took a place in the speaker's queue: a burst (a caption typed, a slider moved)
    while the worker was busy filled it, and its last captions, those the client wanted, were
    refused while the stale ones before them were applied. A caption that comes while the one
    before it still waits its turn replaces it."""
    import time

    s = new_session(client)
    applied = []
    with started_socket(client, s) as ws:
        stream = client.app.state.registry.get(s["id"]).stream
        stream.set_text = applied.append  # (the debug model takes no captions: what each job applied)
        for i in range(12):
            ws.send_text(json.dumps({"type": "caption", "text": f"caption {i}"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"  # and no error before it: none was refused
        held_caption_jobs.release.set()
        for _ in range(200):
            if applied[-1:] == ["caption 11"]:
                break
            time.sleep(0.05)
        # the one under way, then the latest (only the latest where the speaker took none before
        # the burst had come: the receive loop can read buffered messages without a pause)
        assert applied in (["caption 0", "caption 11"], ["caption 11"]), applied
        ws.send_text(json.dumps({"type": "speak", "text": "Hello."}))  # the queue is free again
        assert next_json(ws)["type"] == "speaking"
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


# --- speaks over the socket and over HTTP, on one session ---------------------------------------------
def queued_speech(client, s) -> list[int]:
    """The lengths of the speech queued onto session `s`'s timeline from now on, in order."""
    timeline = client.app.state.registry.get(s["id"]).timeline
    queued, append = [], timeline.append

    def queue(pcm, source="client", **kwargs):
        if source == "speech":
            queued.append(len(pcm))
        return append(pcm, source, **kwargs)

    timeline.append = queue
    return queued


def test_a_speak_posted_while_the_socket_s_speak_waits_its_turn_does_not_overtake_it(
    client, held_synthesis, held_caption_jobs
):
    """The socket's order covered its own requests only: a speak posted over HTTP while the socket's
    waited behind a caption was synthesised and queued at once, before the one accepted first."""
    held_synthesis.release.set()  # (synthesis at once: what is held is the socket's caption)
    s = new_session(client)
    queued = queued_speech(client, s)
    h = {"Authorization": f"Bearer {s['token']}"}
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "speak", "text": "From the socket."}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"  # the socket's speak was accepted: it waits its turn
        r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Over HTTP."}, headers=h)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
        held_caption_jobs.release.set()
        assert next_json(ws)["for"] == "caption"  # (the debug model takes no captions)
        assert next_json(ws) == {"type": "speaking", "duration": 0.16}
        assert queued == [160 * len("From the socket.")]
        r = client.post(s["resource"] + "/control", json={"type": "speak", "text": "Over HTTP."}, headers=h)
        assert r.status_code == 200 and queued == [160 * len("From the socket."), 160 * len("Over HTTP.")]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_socket_s_speak_during_a_posted_one_s_synthesis_waits_for_it(client, held_synthesis):
    """It was refused (`the previous speak is still being synthesised`), though the socket had no
    speak of its own unanswered; now it is queued after the posted one, accepted before it."""
    from concurrent.futures import ThreadPoolExecutor

    s = new_session(client)
    queued = queued_speech(client, s)
    h = {"Authorization": f"Bearer {s['token']}"}
    with started_socket(client, s) as ws, ThreadPoolExecutor(1) as pool:
        speak = {"type": "speak", "text": "Over HTTP."}
        posted = pool.submit(client.post, s["resource"] + "/control", json=speak, headers=h)
        assert held_synthesis.has_started.wait(10)
        ws.send_text(json.dumps({"type": "speak", "text": "From the socket."}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong"  # (no error before it)
        held_synthesis.release.set()
        assert posted.result(10).json() == {"type": "speaking", "duration": 0.1}
        assert next_json(ws) == {"type": "speaking", "duration": 0.16}
        assert held_synthesis.started == ["Over HTTP.", "From the socket."]
        assert queued == [160 * len("Over HTTP."), 160 * len("From the socket.")]
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


def test_a_caption_job_dropped_by_the_worker_is_answered_and_the_speaker_goes_on(client, monkeypatch):
    """At shutdown the worker cancels the jobs still queued: a caption's CancelledError ended the
    socket's speaker task, which answered nothing more, the caption nor anything sent after it."""
    import concurrent.futures

    worker = client.app.state.registry.worker
    dropped, submit = [], worker.submit

    def dropping(fn, *args, **kwargs):
        if fn.__name__ != "apply":  # (server/speech.py's caption job)
            return submit(fn, *args, **kwargs)
        dropped.append(concurrent.futures.Future())  # queued: cancelled below, as the worker's stop does
        return dropped[-1]

    monkeypatch.setattr(worker, "submit", dropping)
    s = new_session(client)
    with started_socket(client, s) as ws:
        ws.send_text(json.dumps({"type": "caption", "text": "smiling"}))
        ws.send_text(json.dumps({"type": "ping", "id": 1}))
        assert next_json(ws)["type"] == "pong" and len(dropped) == 1
        assert dropped[0].cancel()
        ws.send_text(json.dumps({"type": "speak", "text": "Hello."}))
        reply = next_json(ws, max_messages=40)  # (an audio message a chunk, 0.32 s: 13 s at most)
        assert reply["type"] == "error" and reply["for"] == "caption" and "shutting down" in reply["message"]
        assert next_json(ws, max_messages=40)["type"] == "speaking"  # the speaker went on
        ws.send_text(json.dumps({"type": "stop"}))
        assert expect_close(ws)[0] == CloseCode.NORMAL


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
    s = new_session(client)
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
