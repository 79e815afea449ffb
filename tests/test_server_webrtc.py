"""WebRTC (WHEP) end to end with a pure-Python aiortc client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from server_helpers import live_server
from test_server_webrtc_offers import _only_codec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with live_server(max_sessions=4) as (url, app):
        yield url, app


async def watch(url: str, seconds: float = 2.5, speak: str | None = None, seed: int = 7) -> dict:
    """Create a session, connect over WHEP, collect `seconds` of video (and the audio), hang up."""
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created = (await http.post("/v1/sessions", json={"avatar": "ada", "seed": seed})).json()
        auth = {"Authorization": f"Bearer {created['token']}"}
        if speak:
            r = await http.post(created["resource"] + "/control", json={"type": "speak", "text": speak}, headers=auth)
            assert r.status_code == 200, r.text
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        tracks: dict[str, asyncio.Future] = {k: asyncio.get_running_loop().create_future() for k in ("audio", "video")}
        pc.on("track", lambda track: tracks[track.kind].set_result(track))
        await pc.setLocalDescription(await pc.createOffer())
        posted = time.monotonic()
        r = await http.post(created["whep"], content=pc.localDescription.sdp,
                            headers={"content-type": "application/sdp", **auth})  # fmt: skip
        assert r.status_code == 201, r.text
        assert r.headers["content-type"].startswith("application/sdp")
        assert r.headers["location"] == created["resource"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        video, audio = await asyncio.wait_for(asyncio.gather(tracks["video"], tracks["audio"]), 10)

        frames, samples, first_frame = [], [], None

        async def read_video():
            nonlocal first_frame
            while len(frames) < seconds * 25:
                frame = await video.recv()
                first_frame = first_frame or time.monotonic() - posted
                frames.append(frame.to_ndarray(format="rgb24"))

        async def read_audio():
            while True:
                frame = await audio.recv()
                samples.append(frame.to_ndarray().reshape(-1))

        audio_task = asyncio.ensure_future(read_audio())
        try:
            await asyncio.wait_for(read_video(), seconds + 15)
        finally:
            audio_task.cancel()
        deleted = await http.delete(created["resource"], headers=auth)
        await pc.close()
        status = (await http.get(created["resource"], headers=auth)).status_code
    return {
        "frames": np.stack(frames), "audio": np.concatenate(samples) if samples else np.zeros(0),
        "first_frame_s": first_frame, "deleted": deleted.status_code, "status_after": status,
    }  # fmt: skip


async def test_whep_stream_is_the_avatar_and_carries_the_speech(server):
    url, app = server
    silent = await watch(url)
    frames = silent["frames"]
    assert frames.shape[1:] == (64, 64, 3) and len(frames) >= 50  # 2 s at 25 fps
    assert frames.mean() > 20, "frames are black"
    assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 1, "frames do not change"
    assert silent["deleted"] == 204 and silent["status_after"] == 404

    spoken = await watch(url, speak="Hello, this is the avatar talking to you now.")
    assert np.abs(spoken["audio"].astype(np.float32)).mean() > 300, "the speech is not on the audio track"
    assert np.abs(silent["audio"].astype(np.float32)).mean() < 50, "silence should be silent"
    # (that speech changes the picture is checked exactly, on raw frames, in test_server_ws.py:
    # VP8 noise would hide the small effect the random-weight model's decoder lets through)
    assert spoken["frames"].mean() > 20

    assert app.state.registry.sessions == {}  # both sessions freed


async def test_second_offer_on_a_streaming_session_is_refused(server):
    url, _ = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        auth = {"Authorization": f"Bearer {created['token']}", "content-type": "application/sdp"}
        pcs = []
        for _ in range(2):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            pcs.append(pc)
        first = await http.post(created["whep"], content=pcs[0].localDescription.sdp, headers=auth)
        second = await http.post(created["whep"], content=pcs[1].localDescription.sdp, headers=auth)
        assert first.status_code == 201 and second.status_code == 409
        await http.delete(created["resource"], headers={"Authorization": auth["Authorization"]})
        for pc in pcs:
            await pc.close()


async def test_peer_that_vanishes_frees_its_session(server):
    """Closing the client's peer connection (a closed tab) ends the session on the server."""
    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        got = asyncio.get_running_loop().create_future()
        pc.on("track", lambda t: got.set_result(t))
        await pc.setLocalDescription(await pc.createOffer())
        r = await http.post(created["whep"], content=pc.localDescription.sdp,
                            headers={"content-type": "application/sdp", "Authorization": f"Bearer {created['token']}"})  # fmt: skip
        await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        track = await asyncio.wait_for(got, 10)
        await asyncio.wait_for(track.recv(), 10)
        await pc.close()  # no DELETE
        for _ in range(100):
            if created["id"] not in app.state.registry.sessions:
                break
            await asyncio.sleep(0.1)
        assert created["id"] not in app.state.registry.sessions


async def recvonly_offer() -> tuple[RTCPeerConnection, asyncio.Future, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    track: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: t.kind == "video" and not track.done() and track.set_result(t))
    await pc.setLocalDescription(await pc.createOffer())
    return pc, track, pc.localDescription.sdp


async def test_any_whep_player_streams_from_one_url(server):
    """`POST /v1/whep?avatar=...`: no session to create first; the answer's Location is the WHEP
    resource the player DELETEs to hang up, with no other credential than that URL."""
    url, app = server
    sdp_headers = {"content-type": "application/sdp"}
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        pc, track, offer = await recvonly_offer()
        r = await http.post("/v1/whep?avatar=ada&seed=3", content=offer, headers=sdp_headers)
        assert r.status_code == 201, r.text
        location = r.headers["location"]
        assert location.startswith("/v1/sessions/") and "?token=" in location
        await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        video = await asyncio.wait_for(track, 10)
        frames = [(await asyncio.wait_for(video.recv(), 10)).to_ndarray(format="rgb24") for _ in range(5)]
        assert frames[-1].shape == (64, 64, 3) and frames[-1].mean() > 20
        status = (await http.get(location)).json()
        assert status["transport"] == "whep" and status["streaming"]
        assert (await http.delete(location)).status_code == 204
        await pc.close()
        assert app.state.registry.sessions == {}
        # refused, and nothing left behind: a bad offer, an unknown avatar, a misspelt parameter
        assert (await http.post("/v1/whep", content="v=0 garbage", headers=sdp_headers)).status_code == 400
        pc, _, offer = await recvonly_offer()
        r = await http.post("/v1/whep?avatar=nobody", content=offer, headers=sdp_headers)
        assert r.status_code == 404
        r = await http.post("/v1/whep?avatr=ada", content=offer, headers=sdp_headers)
        assert r.status_code == 422 and r.json()["error"] == "unknown_field"
        r = await http.post("/v1/whep?avatar=ada&avatar=sample", content=offer, headers=sdp_headers)
        assert r.status_code == 422 and r.json()["error"] == "repeated_field"  # (it streamed the sample)
        await pc.close()
        assert app.state.registry.sessions == {}


async def test_an_answer_the_server_fails_to_finish_ends_its_session(server, monkeypatch):
    """A 500 after the peer connection was made (an ICE server list it could not write): the
    session streamed on to nobody, holding its place until the idle limit."""
    from server import routes

    def broken(servers):
        raise KeyError("credential")

    url, app = server
    monkeypatch.setattr(routes, "link_header", broken)
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        pc, _, offer = await recvonly_offer()
        r = await http.post("/v1/whep?avatar=ada", content=offer, headers={"content-type": "application/sdp"})
        await pc.close()
    assert r.status_code == 500
    for _ in range(50):  # bounded: 5 s for the teardown
        if not app.state.registry.sessions:
            break
        await asyncio.sleep(0.1)
    assert app.state.registry.sessions == {}


async def test_a_peer_that_never_connects_frees_its_session(server, monkeypatch):
    """A tab closed right after its offer, a player that never applied the answer, UDP blocked:
    ICE was never called failed, and the session held its place until the idle limit (60 s)."""
    from server import webrtc

    url, app = server
    monkeypatch.setattr(webrtc, "CONNECT_DEADLINE_S", 1.0)
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        pc, _, offer = await recvonly_offer()
        r = await http.post("/v1/whep?avatar=ada", content=offer, headers={"content-type": "application/sdp"})
        assert r.status_code == 201
        await pc.close()  # (the answer never applied)
        for _ in range(100):  # bounded: 10 s
            if not app.state.registry.sessions:
                break
            await asyncio.sleep(0.1)
        metrics = (await http.get("/metrics")).text
    assert app.state.registry.sessions == {}
    assert 'streamgen_sessions_closed_total{reason="never_connected"} 1.0' in metrics


async def test_one_url_whep_on_a_server_with_a_token():
    """With --token the player sends the server token, and hangs up with it too (the Location
    without its session token, as a player that keeps only the path would)."""
    with live_server(token="server-secret") as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            pc, _, offer = await recvonly_offer()
            sdp = {"content-type": "application/sdp"}
            assert (await http.post("/v1/whep", content=offer, headers=sdp)).status_code == 401
            wrong = {**sdp, "authorization": "Bearer nope"}
            assert (await http.post("/v1/whep", content=offer, headers=wrong)).status_code == 403
            auth = {"authorization": "Bearer server-secret"}
            r = await http.post("/v1/whep", content=offer, headers={**sdp, **auth})
            assert r.status_code == 201, r.text
            resource = r.headers["location"].split("?")[0]
            assert (await http.delete(resource)).status_code == 401
            assert (await http.delete(resource, headers={"authorization": "Bearer nope"})).status_code == 403
            assert (await http.delete(resource, headers=auth)).status_code == 204
            await pc.close()
        assert app.state.registry.sessions == {}


async def test_an_offer_refused_for_its_codecs_leaves_the_session_to_offer_again(server):
    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        auth = {"Authorization": f"Bearer {created['token']}"}
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        refused = await http.post(created["whep"], content=_only_codec(pc.localDescription.sdp, "audio", "ISAC/16000"),
                                  headers={"content-type": "application/sdp", **auth})  # fmt: skip
        assert refused.status_code == 400 and refused.json()["error"] == "bad_sdp", refused.text
        assert "offers no codec the server takes" in refused.json()["message"]
        assert (await http.get(created["resource"], headers=auth)).status_code == 200  # not ended
        answered = await http.post(created["whep"], content=pc.localDescription.sdp,
                                   headers={"content-type": "application/sdp", **auth})  # fmt: skip
        assert answered.status_code == 201, answered.text
        assert (await http.delete(created["resource"], headers=auth)).status_code == 204
        await pc.close()


class FakeMicTrack:
    """A remote audio track that yields these frames, then ends as aiortc's does (MediaStreamError)."""

    kind = "audio"

    def __init__(self, frames):
        self.frames = list(frames)

    async def recv(self):
        from aiortc.mediastreams import MediaStreamError

        if not self.frames:
            raise MediaStreamError
        frame = self.frames.pop(0)
        if isinstance(frame, Exception):
            raise frame
        return frame


def mic_frames(n: int, fmt: str, layout: str, rate: int, level: float) -> list:
    """n frames of 20 ms, a constant `level` (of full scale) in every channel."""
    import av

    channels, samples = (2 if layout == "stereo" else 1), rate // 50
    frames = []
    for i in range(n):
        if fmt == "s16":  # packed: one plane, channels interleaved
            data = np.full((1, samples * channels), round(level * 32767), np.int16)
        else:  # fltp: a plane per channel
            data = np.full((channels, samples), level, np.float32)
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate, frame.pts = rate, i * samples
        frames.append(frame)
    return frames


def mic_session():
    from types import SimpleNamespace

    from server.session import AudioTimeline

    heard = []
    timeline = AudioTimeline(30.0, on_receive=lambda source, n: heard.append(n))
    return SimpleNamespace(id="mic", timeline=timeline, closed=False, touch=lambda: None), heard


@pytest.mark.parametrize(
    "first, then",
    [
        (("s16", "stereo", 48000), ("s16", "mono", 8000)),  # Opus, then PCMU (a codec renegotiated)
        (("s16", "stereo", 48000), ("fltp", "stereo", 48000)),  # another decoder's sample format
        (("s16", "mono", 16000), ("s16", "stereo", 48000)),  # a first frame needing no conversion
    ],
    ids=["opus-then-pcmu", "s16-then-fltp", "passthrough-then-opus"],
)
async def test_microphone_frames_that_change_format_mid_stream_keep_reaching_the_avatar(first, then):
    """PyAV's resampler is set up by its first frame: a frame of another format raised ValueError,
    which ended the microphone task for good, with no log line until the session was gone; after a
    first frame it passed through unconverted, later ones came through unconverted too (48 kHz
    stereo read as 16 kHz mono: six times the samples)."""
    from server.webrtc import consume_microphone

    session, heard = mic_session()
    track = FakeMicTrack(mic_frames(25, *first, level=0.0) + mic_frames(25, *then, level=0.5))
    await asyncio.wait_for(consume_microphone(track, session), 10)
    assert not track.frames, "the microphone task stopped before the track ended"
    assert sum(heard) == pytest.approx(2 * 25 * 320, abs=320)  # 1 s at 16 kHz, give or take a frame
    pcm = session.timeline.read(0, sum(heard))
    assert np.abs(pcm[: 20 * 320]).max() < 0.01  # the first half's silence
    assert np.median(pcm[-20 * 320 :]) == pytest.approx(0.5, abs=0.01)  # the second half's level, converted


async def test_a_microphone_frame_or_track_that_fails_is_logged(caplog):
    """An unexpected exception ended the microphone task silently (asyncio reports a task's
    exception only when the task is collected, after the session). A frame that cannot be
    converted is skipped, and the frames after it still reach the avatar."""
    from server.webrtc import consume_microphone

    session, heard = mic_session()
    bad = mic_frames(2, "s16", "stereo", 48000, 0.1)
    for frame in bad:
        frame.sample_rate = 0  # what no resampler can be set up for
    good = mic_frames(5, "s16", "stereo", 48000, 0.1)
    track = FakeMicTrack(good + bad + good + [RuntimeError("decoder broke")] + good)
    with caplog.at_level("ERROR", logger="streamgen.server"):
        await asyncio.wait_for(consume_microphone(track, session), 10)
    assert sum(heard) == pytest.approx(10 * 320, abs=320)  # the good frames before the broken track
    assert len(track.frames) == 5  # it stopped at the failed track
    assert [r.getMessage() for r in caplog.records] == [
        "session mic: a microphone frame could not be converted; skipping such frames",  # once for both
        "session mic: microphone track failed; the avatar no longer hears it",
    ]
    assert "decoder broke" in caplog.text


def client_sockets(pc: RTCPeerConnection) -> list:
    """The UDP sockets of a client's ICE agent (every transceiver's: bundled, they share one)."""
    sockets = {}
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        sockets |= {id(p.transport): p.transport for p in connection._protocols if p.transport is not None}
    return list(sockets.values())


async def streaming_client(url: str, http: httpx.AsyncClient, mic: bool = False):
    """A WHEP client that has decoded a frame: (session id, its peer connection, its video track)."""
    created = (await http.post("/v1/sessions", json={})).json()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    if mic:  # a microphone that is on: 50 RTP packets a second towards the server
        from aiortc.mediastreams import AudioStreamTrack

        pc.addTrack(AudioStreamTrack())
    got = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: t.kind == "video" and not got.done() and got.set_result(t))
    await pc.setLocalDescription(await pc.createOffer())
    r = await http.post(created["whep"], content=pc.localDescription.sdp,
                        headers={"content-type": "application/sdp", "Authorization": f"Bearer {created['token']}"})  # fmt: skip
    assert r.status_code == 201, r.text
    await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
    track = await asyncio.wait_for(got, 10)
    await asyncio.wait_for(track.recv(), 10)
    return created["id"], pc, track


async def test_a_peer_killed_without_a_word_frees_its_session_once_it_falls_silent(server):
    """A killed tab sends no DELETE and no DTLS close: its session held a slot until aioice's ICE
    consent checks gave up, about 30 s (measured 29.8 and 31.3 s after a client was SIGKILLed).
    Now a peer that sent packets (its RTCP receiver reports, its microphone) and then nothing
    for --peer-timeout seconds is closed. The client here stops as a killed process does: its
    sockets close, with nothing sent."""
    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 2.0  # read by each offer
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            session_id, pc, track = await streaming_client(url, http)
            session = registry.sessions[session_id]
            for _ in range(30):  # a while of healthy streaming, past the timeout: it stays
                await asyncio.wait_for(track.recv(), 10)
            await asyncio.sleep(2.5)
            assert not session.closed, session.close_reason
            for sock in client_sockets(pc):
                sock.abort()  # no DTLS close_notify, no consent answers, no RTCP from here on
            for _ in range(200):  # (aioice's consent checks would take 24-36 s)
                if session.closed:
                    break
                await asyncio.sleep(0.1)
            assert session.closed and session.close_reason.startswith("peer_silent"), session.close_reason
            assert session_id not in registry.sessions
            await pc.close()
    finally:
        registry.config.peer_timeout_s = 10.0


async def test_a_peer_that_stalls_for_less_than_the_timeout_keeps_its_session(server):
    """A network hiccup is not a killed tab: a client whose packets stop for a second, then flow
    again, keeps streaming with a 3 s --peer-timeout."""
    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 3.0
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            session_id, pc, track = await streaming_client(url, http, mic=True)
            session = registry.sessions[session_id]
            sockets = client_sockets(pc)
            for sock in sockets:  # every packet the client sends is lost for a second
                sock.sendto = lambda *args, **kwargs: None
            await asyncio.sleep(1.0)
            for sock in sockets:
                del sock.sendto  # (the instance's, over its class's)
            for _ in range(100):  # 4 s of video: past the timeout, counted from the stall
                await asyncio.wait_for(track.recv(), 10)
            assert not session.closed, session.close_reason
            await pc.close()  # (DTLS close: the server closes the session)
            for _ in range(100):
                if session.closed:
                    break
                await asyncio.sleep(0.1)
    finally:
        registry.config.peer_timeout_s = 10.0


async def test_a_live_player_that_sends_no_rtcp_is_not_taken_for_a_silent_one(server, monkeypatch):
    """A player with no RTCP and no microphone sends the server nothing but STUN, which the count
    does not hold: the watch is never armed for it (it stays with ICE consent), so it keeps
    streaming past --peer-timeout. Armed at `connected`, it would be closed while it watches."""
    from aiortc.rtcrtpreceiver import RTCRtpReceiver

    from server.webrtc import packets_received

    async def send_no_rtcp(receiver, packet):
        return None

    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 1.0
    monkeypatch.setattr(RTCRtpReceiver, "_send_rtcp", send_no_rtcp)  # the client's: no receiver reports
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            session_id, pc, track = await streaming_client(url, http)
            session = registry.sessions[session_id]
            counted = await packets_received(session.trickle.pc)
            for _ in range(75):  # 3 s of video: three times the timeout
                await asyncio.wait_for(track.recv(), 10)
            assert await packets_received(session.trickle.pc) == counted  # nothing that arms it
            assert not session.closed, session.close_reason
            await pc.close()
            for _ in range(100):
                if session.closed:
                    break
                await asyncio.sleep(0.1)
    finally:
        registry.config.peer_timeout_s = 10.0


def test_silence_is_counted_in_reads_once_the_peer_has_sent():
    from server.webrtc import SilenceWatch

    watch = SilenceWatch(timeout=3.0, period=1.0)
    # a peer that sends nothing once connected is left to ICE consent
    assert not any(watch.observe(5) for _ in range(10))
    assert not watch.observe(6)  # its first packet arms the watch
    assert [watch.observe(6) for _ in range(3)] == [False, False, True]
    watch = SilenceWatch(timeout=3.0, period=1.0)
    counts = [1, 2, 2, 2, 3, 3, 3, 4]  # still for two reads at a time: never three
    assert not any(watch.observe(c) for c in counts)
    assert SilenceWatch(timeout=2.0, period=0.5).reads_needed == 4


async def test_a_peer_that_reconnects_keeps_one_silence_watch(server, monkeypatch):
    """connected -> disconnected -> connected (a network change ICE recovers from) started a second
    watch while the first, asleep between its reads, had not yet seen the disconnect: two stats
    pollers and two timers for one peer. The watch running then goes on watching."""
    import server.webrtc as webrtc

    started = []

    async def counted_watch(*args):
        started.append(args)
        await original(*args)

    original = webrtc.watch_peer
    monkeypatch.setattr(webrtc, "watch_peer", counted_watch)
    url, app = server
    registry = app.state.registry
    registry.config.peer_timeout_s = 10.0  # (a read a second: the first watch sleeps through the flip)
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        session_id, pc, track = await streaming_client(url, http)
        session = registry.sessions[session_id]
        server_pc = session.trickle.pc
        assert len(started) == 1

        async def flip() -> int:  # on the server's event loop
            for state in ("disconnected", "connected"):
                server_pc._RTCPeerConnection__connectionState = state
                server_pc.emit("connectionstatechange")
                for _ in range(5):  # (the handler is a coroutine: it runs on the loop's next turns)
                    await asyncio.sleep(0)
            return sum(t.get_coro().__name__ == "counted_watch" for t in asyncio.all_tasks() if not t.done())

        running = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(flip(), session.loop))
        assert (running, len(started)) == (1, 1)
        assert not session.closed, session.close_reason
        await pc.close()  # (DTLS close: the server closes the session)
        for _ in range(100):
            if session.closed:
                break
            await asyncio.sleep(0.1)


async def answered_directions(http, created, auth, pc) -> tuple[str, list[str]]:
    """The server's WHEP answer to `pc`'s offer, and the direction of each of its m-lines."""
    await pc.setLocalDescription(await pc.createOffer())
    r = await http.post(created["whep"], content=pc.localDescription.sdp,
                        headers={"content-type": "application/sdp", **auth})  # fmt: skip
    assert r.status_code == 201, r.text
    directions = ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive")
    return r.text, [line for line in r.text.splitlines() if line in directions]


async def test_a_camera_the_player_offers_is_declined_not_decoded_into_a_pile(server):
    """A player that offers its camera (a sendrecv video m-line, or a second one that sends) had it
    received: aiortc decoded every frame into the track's queue, which nothing read, a frame's
    pixels at a time (640x480: 460 kB, 30 a second) for as long as the session lasted. The
    answer now takes no video: the avatar's m-line is sendonly, any other video one inactive."""
    from aiortc.mediastreams import VideoStreamTrack

    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        auth = {"Authorization": f"Bearer {created['token']}"}
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(VideoStreamTrack(), direction="sendrecv")  # the camera, and the avatar back
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")  # a second camera
        got = asyncio.get_running_loop().create_future()
        pc.on("track", lambda t: t.kind == "video" and not got.done() and got.set_result(t))
        answer, directions = await answered_directions(http, created, auth, pc)
        assert directions == ["a=sendonly", "a=inactive"], directions
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        track = await asyncio.wait_for(got, 10)
        for _ in range(25):  # a second of the avatar, while the camera would send
            await asyncio.wait_for(track.recv(), 10)
        server_pc = app.state.registry.sessions[created["id"]].trickle.pc
        queued = [t.receiver.track._queue.qsize() for t in server_pc.getTransceivers()]
        assert queued == [0, 0], queued
        assert (await http.delete(created["resource"], headers=auth)).status_code == 204
        await pc.close()


async def test_a_second_microphone_the_player_offers_is_declined(server, monkeypatch):
    """Two audio m-lines that send (a second microphone) were both received, each read by a task
    that put its samples after the "mic" source's last ones: the two moved one cursor, each
    placing its 20 ms after the other's, both spread over twice their time. The first is the microphone; the
    answer takes no audio on the others (sendonly, inactive where no speech goes out on them)."""
    from aiortc.mediastreams import AudioStreamTrack

    import server.webrtc as webrtc

    heard = []

    async def counted_microphone(track, session):
        heard.append(track)
        await original(track, session)

    original = webrtc.consume_microphone
    monkeypatch.setattr(webrtc, "consume_microphone", counted_microphone)
    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        auth = {"Authorization": f"Bearer {created['token']}"}
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver(AudioStreamTrack(), direction="sendrecv")  # the microphone, and the speech back
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")  # a second one
        got = asyncio.get_running_loop().create_future()
        pc.on("track", lambda t: t.kind == "video" and not got.done() and got.set_result(t))
        answer, directions = await answered_directions(http, created, auth, pc)
        assert directions == ["a=sendonly", "a=sendrecv", "a=inactive"], directions
        assert len(heard) == 1
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        track = await asyncio.wait_for(got, 10)
        for _ in range(25):  # a second of the avatar, while both microphones would send
            await asyncio.wait_for(track.recv(), 10)
        server_pc = app.state.registry.sessions[created["id"]].trickle.pc
        assert server_pc.getTransceivers()[2].receiver.track._queue.qsize() == 0
        assert (await http.delete(created["resource"], headers=auth)).status_code == 204
        await pc.close()
