"""`bench server`'s clients (bench/server.py): one session of the served model watched for a
while, over WebRTC (WHEP, as a browser: decoded video, the audio's markers) or over the WebSocket
API with raw RGB frames (next to no cost to the client); each frame's arrival and the stamp the
server put in it."""

from __future__ import annotations

import asyncio
import json
import time
import weakref

import numpy as np

# a model's chunk (tiny-avatar's: 8 frames, 0.32 s; a Wan flavor's: 12 frames) is what the server
# says in a WebSocket session's "ready" message: the session status does not say it
_CHUNK_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def _chunk_shape(http) -> tuple[int, float]:
    """The served model's (frames per chunk, seconds per chunk), from the "ready" message of a
    WebSocket session started for the purpose and ended at once (read once per server)."""
    if http in _CHUNK_SHAPES:
        return _CHUNK_SHAPES[http]
    import websockets

    created, auth = await _create_session(http, seed=0)
    url = str(http.base_url).replace("http", "ws", 1).rstrip("/") + f"{created['stream']}?token={created['token']}"
    async with websockets.connect(url, max_size=None, max_queue=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "rgb"}))
        ready = {}
        while ready.get("type") != "ready":
            message = await asyncio.wait_for(ws.recv(), 30)
            ready = json.loads(message) if isinstance(message, str) else ready
        await http.delete(created["resource"], headers=auth)
    _CHUNK_SHAPES[http] = shape = _shape(ready)
    return shape


def _shape(ready: dict) -> tuple[int, float]:
    return ready["frames_per_chunk"], ready["frames_per_chunk"] / ready["fps"]


async def _create_session(http, seed: int) -> tuple[dict, dict]:
    """A session of the `ada` avatar: its JSON and the header that carries its token."""
    created = (await http.post("/v1/sessions", json={"avatar": "ada", "seed": seed})).json()
    if "id" not in created:
        raise RuntimeError(f"session refused: {created}")
    return created, {"Authorization": f"Bearer {created['token']}"}


async def _end_session(http, created: dict, auth: dict, result: dict) -> None:
    """Record the chunks the server generated for the session (`_generated_fps`), then end it.
    Called while the client is still connected: a WebSocket client's hang-up ends the session."""
    status = await http.get(created["resource"], headers=auth)
    if status.status_code != 200:
        raise RuntimeError(f"session {created['id']} ended before the watch did: {status.text[:200]}")
    figures = status.json()
    result["chunks"], result["playout_delay"] = figures["chunks"], figures["playout_delay"]
    await http.delete(created["resource"], headers=auth)


async def _watch(http, seconds: float, seed: int) -> dict:
    """One WHEP session: per-frame arrival times and stamps, audio marker arrival times."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from server.session import read_stamp

    frames_per_chunk, chunk_seconds = await _chunk_shape(http)
    created, auth = await _create_session(http, seed)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    loop = asyncio.get_running_loop()
    tracks = {"video": loop.create_future(), "audio": loop.create_future()}
    pc.on("track", lambda t: tracks[t.kind].set_result(t))
    await pc.setLocalDescription(await pc.createOffer())
    posted = time.monotonic()
    r = await http.post(created["whep"], content=pc.localDescription.sdp,
                        headers={"content-type": "application/sdp", **auth})  # fmt: skip
    answered = time.monotonic() - posted
    connected = loop.create_future()

    @pc.on("connectionstatechange")
    def on_state():
        if pc.connectionState == "connected" and not connected.done():
            connected.set_result(time.monotonic() - posted)

    await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
    video, audio = await asyncio.wait_for(asyncio.gather(tracks["video"], tracks["audio"]), 20)
    result = {"first_frame": None, "frames": [], "markers": [], "session": created, "answer": answered,
              "connected": connected, "frames_per_chunk": frames_per_chunk, "chunk_seconds": chunk_seconds}  # fmt: skip

    async def read_video():
        end = None
        while end is None or time.monotonic() < end:
            frame = await video.recv()
            now_m, now_w = time.monotonic(), time.time()
            if result["first_frame"] is None:
                result["first_frame"] = now_m - posted
                end = now_m + seconds
            stamp = read_stamp(frame.to_ndarray(format="rgb24"), now_w)
            result["frames"].append((now_m, now_w, stamp))

    async def read_audio():
        loud = False
        while True:
            frame = await audio.recv()
            pcm = frame.to_ndarray().astype(np.float32)
            level = float(np.sqrt((pcm**2).mean()))
            if level > 2000 and not loud:
                result["markers"].append(time.monotonic())
            loud = level > 2000

    audio_task = asyncio.ensure_future(read_audio())
    try:
        await asyncio.wait_for(read_video(), seconds + 30)
    finally:
        audio_task.cancel()
    await _end_session(http, created, auth, result)
    await pc.close()
    return result


async def _watch_ws(http, seconds: float, seed: int) -> dict:
    """One WebSocket session with raw RGB frames: a client that costs next to nothing (no video
    decoding, no WebRTC stack), so the probe measures the server. The frames of a chunk arrive
    together (the client plays them by their pts): `frames` holds their arrival and stamps."""
    import websockets

    from server.protocol import HEADER, MsgType
    from server.session import read_stamp

    created, auth = await _create_session(http, seed)
    url = str(http.base_url).replace("http", "ws", 1).rstrip("/") + f"{created['stream']}?token={created['token']}"
    result = {"first_frame": None, "frames": [], "markers": [], "session": created, "answer": None, "connected": None}
    # an unbounded queue: with a full one the client stops reading, and its close handshake at
    # the end then waits out its 10 s timeout behind the frames the server still sends
    async with websockets.connect(url, max_size=None, max_queue=None) as ws:
        started = time.monotonic()
        await ws.send(json.dumps({"type": "start", "format": "rgb"}))
        size = None
        end = None
        while end is None or time.monotonic() < end:
            message = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(message, str):
                ready = json.loads(message)
                if ready.get("type") == "ready":
                    size = (ready["height"], ready["width"])
                    result["frames_per_chunk"], result["chunk_seconds"] = _shape(ready)
                continue
            if message[0] != MsgType.VIDEO_RGB:
                continue
            now_m, now_w = time.monotonic(), time.time()
            if result["first_frame"] is None:
                result["first_frame"] = now_m - started
                end = now_m + seconds
            frame = np.frombuffer(message, np.uint8, offset=HEADER.size).reshape(*size, 3)
            result["frames"].append((now_m, now_w, read_stamp(frame, now_w)))
        await _end_session(http, created, auth, result)
    return result


WATCH = {"webrtc": _watch, "ws": _watch_ws}  # --transport
