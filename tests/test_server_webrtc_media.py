"""The media of a WebRTC (WHEP) session: the microphone the avatar hears (its frames, its format
changes, its failures), and which of an offer's m-lines the answer sends on or receives."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from aiortc import RTCBundlePolicy, RTCSessionDescription
from server_helpers import client_peer, created_session, first_track, live_server, post_offer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with live_server(max_sessions=4) as (url, app):
        yield url, app


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

async def answered_directions(http, created, auth, pc) -> tuple[str, list[str]]:
    """The server's WHEP answer to `pc`'s offer, and the direction of each of its m-lines."""
    r = await post_offer(http, created, auth, pc)
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
        created, auth = await created_session(http)
        pc = client_peer()
        pc.addTransceiver(VideoStreamTrack(), direction="sendrecv")  # the camera, and the avatar back
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")  # a second camera
        got = first_track(pc)
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


def microphones_heard(monkeypatch) -> list:
    """The microphone tracks the server consumes (`webrtc.consume_microphone`), as it takes them."""
    import server.webrtc as webrtc

    heard = []
    original = webrtc.consume_microphone

    async def counted_microphone(track, session):
        heard.append(track)
        await original(track, session)

    monkeypatch.setattr(webrtc, "consume_microphone", counted_microphone)
    return heard


async def test_a_second_microphone_the_player_offers_is_declined(server, monkeypatch):
    """Two audio m-lines that send (a second microphone) were both received, each read by a task
    that put its samples after the "mic" source's last ones: the two moved one cursor, each
    placing its 20 ms after the other's, both spread over twice their time. The first is the microphone; the
    answer takes no audio on the others (sendonly, inactive where no speech goes out on them)."""
    from aiortc.mediastreams import AudioStreamTrack

    heard = microphones_heard(monkeypatch)
    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created, auth = await created_session(http)
        pc = client_peer("video")
        pc.addTransceiver(AudioStreamTrack(), direction="sendrecv")  # the microphone, and the speech back
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")  # a second one
        got = first_track(pc)
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


async def test_the_speech_goes_on_an_audio_m_line_the_player_receives(server, monkeypatch):
    """An offer of a microphone alone (sendonly) and then an audio m-line to hear the avatar on
    (recvonly): aiortc put the speech on the first audio m-line, which the answer could only take
    as recvonly (the microphone), and the second was inactive: the player heard no speech. The
    speech goes on the first audio m-line the player receives; the microphone stays heard."""
    from aiortc.mediastreams import AudioStreamTrack

    heard = microphones_heard(monkeypatch)
    url, _ = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created, auth = await created_session(http)
        # (aiortc's "balanced" bundling loses the second audio m-line's transport: a browser's does not)
        pc = client_peer("video", bundlePolicy=RTCBundlePolicy.MAX_COMPAT)
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")  # the microphone
        pc.addTransceiver("audio", direction="recvonly")  # the avatar's speech
        speech = first_track(pc, "audio")
        answer, directions = await answered_directions(http, created, auth, pc)
        assert directions == ["a=sendonly", "a=recvonly", "a=sendonly"], directions
        assert len(heard) == 1
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        track = await asyncio.wait_for(speech, 10)
        assert pc.getTransceivers()[2].receiver.track is track
        for _ in range(5):  # the speech track's frames (silence: nothing was said) reach the player
            await asyncio.wait_for(track.recv(), 10)
        assert (await http.delete(created["resource"], headers=auth)).status_code == 204
        await pc.close()


async def test_the_speech_goes_on_a_bundle_only_audio_m_line(server):
    """A player that bundles at most (GStreamer's webrtcbin, max-bundle) offers its m-lines after
    the first with port 0 and a=bundle-only (RFC 8843): bundled, not rejected. The speech goes on
    such an audio m-line as on any other that receives."""
    import re

    url, _ = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created, auth = await created_session(http)
        pc = client_peer("video", "audio")

        def bundle_only(offer: str) -> str:
            offer = re.sub(r"m=audio \d+ ([^\r\n]*)\r\n", r"m=audio 0 \1\r\na=bundle-only\r\n", offer)
            assert "m=audio 0 " in offer
            return offer

        r = await post_offer(http, created, auth, pc, edit=bundle_only)
        assert r.status_code == 201, r.text
        directions = [line for line in r.text.splitlines() if line in ("a=sendonly", "a=recvonly", "a=inactive")]
        assert directions == ["a=sendonly", "a=sendonly"], directions
        assert (await http.delete(created["resource"], headers=auth)).status_code == 204
        await pc.close()
