"""Drive a streamgen avatar over the WebSocket API.

    streamgen serve &                                   # in another terminal
    python examples/ws_client.py --wav speech.wav --out frames/
    python examples/ws_client.py --say "Hello there" --seconds 4

Creates a session, sends 16 kHz PCM16 audio in real time (or asks the server to
speak), and saves the JPEG frames it gets back with their presentation times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import websockets

HEADER = struct.Struct("<BBHIq")  # type, flags, reserved, sequence, pts (microseconds)
AUDIO_IN, VIDEO_JPEG, AUDIO_OUT = 1, 2, 4


def read_wav_16k(path: str) -> np.ndarray:
    with wave.open(path) as w:
        if w.getframerate() != 16000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"{path}: need 16 kHz mono 16-bit PCM (e.g. ffmpeg -ar 16000 -ac 1)")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


async def send_audio(ws, pcm: np.ndarray) -> None:
    """20 ms per message, paced in real time."""
    step, start = 320, time.monotonic()
    for seq, i in enumerate(range(0, len(pcm), step)):
        await ws.send(HEADER.pack(AUDIO_IN, 0, 0, seq, 0) + pcm[i : i + step].tobytes())
        await asyncio.sleep(max(0.0, start + (i + step) / 16000 - time.monotonic()))


async def main(args) -> None:
    async with httpx.AsyncClient(base_url=args.server) as http:
        r = await http.post("/v1/sessions", json={"avatar": args.avatar, "seed": 0})
        if r.status_code != 201:  # e.g. 503 at capacity: retry after r.headers["Retry-After"] seconds
            raise SystemExit(f"session refused: {r.status_code} {r.json().get('message')}")
        session = r.json()
    url = args.server.replace("http", "ws", 1) + f"{session['stream']}?token={session['token']}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    async with websockets.connect(url, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "start", "format": "jpeg"}))
        print("ready:", await ws.recv())
        if args.say:
            await ws.send(json.dumps({"type": "speak", "text": args.say}))
        sender = asyncio.create_task(send_audio(ws, read_wav_16k(args.wav))) if args.wav else None
        frames, audio_bytes, deadline = 0, 0, time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            message = await ws.recv()
            if isinstance(message, str):
                print("server:", message)
                continue
            kind, _, _, seq, pts_us = HEADER.unpack_from(message)
            if kind == VIDEO_JPEG:
                (out / f"{seq:06d}_{pts_us // 1000:08d}ms.jpg").write_bytes(message[HEADER.size :])
                frames += 1
            elif kind == AUDIO_OUT:
                audio_bytes += len(message) - HEADER.size
        if sender:
            sender.cancel()
        await ws.send(json.dumps({"type": "stop"}))
    print(f"{frames} frames ({frames / args.seconds:.1f} fps), {audio_bytes / 32000:.1f} s of audio -> {out}/")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--avatar", default="sample")
    p.add_argument("--wav", help="16 kHz mono PCM16 WAV to speak with")
    p.add_argument("--say", help="text for the server to speak")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", default="frames")
    asyncio.run(main(p.parse_args()))
