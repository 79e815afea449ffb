"""WebRTC (WHEP) end to end with a pure-Python aiortc client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from server_helpers import (
    client_peer,
    created_session,
    first_track,
    live_server,
    post_offer,
    post_sdp,
    sessions_gone,
    streaming_peer,
)
from test_server_webrtc_offers import _only_codec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with live_server(max_sessions=4) as (url, app):
        yield url, app


async def watch(url: str, seconds: float = 2.5, speak: str | None = None, seed: int = 7) -> dict:
    """Create a session, connect over WHEP, collect `seconds` of video (and the audio), hang up."""
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created, auth = await created_session(http, avatar="ada", seed=seed)
        if speak:
            r = await http.post(created["resource"] + "/control", json={"type": "speak", "text": speak}, headers=auth)
            assert r.status_code == 200, r.text
        pc = client_peer("video", "audio")
        tracks = {kind: first_track(pc, kind) for kind in ("audio", "video")}
        posted = time.monotonic()
        r = await post_offer(http, created, auth, pc)
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
        created, auth = await created_session(http)
        pcs = [client_peer("video"), client_peer("video")]
        first = await post_offer(http, created, auth, pcs[0])
        second = await post_offer(http, created, auth, pcs[1])
        assert first.status_code == 201 and second.status_code == 409
        await http.delete(created["resource"], headers=auth)
        for pc in pcs:
            await pc.close()


async def test_peer_that_vanishes_frees_its_session(server):
    """Closing the client's peer connection (a closed tab) ends the session on the server."""
    url, app = server
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        created, _, pc, _ = await streaming_peer(http)
        await pc.close()  # no DELETE
        await sessions_gone(app, created["id"])
        assert created["id"] not in app.state.registry.sessions


async def recvonly_offer() -> tuple[RTCPeerConnection, asyncio.Future, str]:
    pc = client_peer("video")
    track = first_track(pc)
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
    await sessions_gone(app)
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
        await sessions_gone(app)
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
        created, auth = await created_session(http)
        pc = client_peer("video", "audio")
        refused = await post_offer(http, created, auth, pc,
                                   edit=lambda sdp: _only_codec(sdp, "audio", "ISAC/16000"))  # fmt: skip
        assert refused.status_code == 400 and refused.json()["error"] == "bad_sdp", refused.text
        assert "offers no codec the server takes" in refused.json()["message"]
        assert (await http.get(created["resource"], headers=auth)).status_code == 200  # not ended
        answered = await post_sdp(http, created, auth, pc.localDescription.sdp)  # the same offer, whole
        assert answered.status_code == 201, answered.text
        assert (await http.delete(created["resource"], headers=auth)).status_code == 204
        await pc.close()
