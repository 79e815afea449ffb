"""Drive a streamgen avatar over the WebSocket API.

    streamgen serve &                                   # in another terminal
    python examples/ws_client.py --wav speech.wav --out frames/
    python examples/ws_client.py --say "Hello there" --seconds 4

Creates a session, sends 16 kHz PCM16 audio in real time (or asks the server to
speak), and saves the JPEG frames it gets back with their presentation times, up to
--seconds of video (a server slower than real time is read for longer).
A server that is still loading or full (503), for the session or its stream, is asked again for up to
--wait seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import os
import struct
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import websockets

# what --wav streams for past the file's end: the server's playout delay and its last chunk
TAIL_S = 2.0
# how long the end of a stream waits on a server that has stopped answering (its close took 10 s
# and the session's DELETE 30 s: 40 s past --seconds)
CLOSE_S = 3.0
# how long past --seconds the answer to --say is waited for (its synthesis on a busy server)
SPEAK_ANSWER_S = 15.0
# how long a stream that brings nothing is waited on, past --seconds, for the rest of --seconds' video:
# a server slower than real time (a loaded machine) sends its chunks late and seconds apart
QUIET_S = 10.0
FRAME_NAMES = "[0-9]*_[0-9]*ms.jpg"  # the frames saved: sequence_pts
# a ping this often: a run that sends no audio (--say, or neither) is a watch-only socket, which
# the server closes after its --idle-timeout without a message (4408: 60 s by default)
KEEPALIVE_S = 1.0
HEADER = struct.Struct("<BBHIq")  # type, flags, reserved, sequence, pts (microseconds)
AUDIO_IN, VIDEO_JPEG, AUDIO_OUT = 1, 2, 4
SPEAK_MAX_CHARS = 1000  # a speak's text, at most (docs/api.md)


def bad_input(message: str) -> SystemExit:
    """One line for a mistake in what the run was given (a --wav, an --out, an avatar or seed the server
    refuses): exit code 2, as argparse's own and streamgen's commands give; they were 1, as the server's
    and the network's failures still are."""
    print(message, file=sys.stderr)
    return SystemExit(2)


NEED_PCM16 = "need 16 kHz mono 16-bit PCM (e.g. ffmpeg -ar 16000 -ac 1)"
# the WAV formats the client does not take, by their code (a format tag, or the sub-format's code of
# WAVE_FORMAT_EXTENSIBLE)
WAV_FORMATS = {3: "float samples", 6: "A-law samples", 7: "mu-law samples", 0x55: "MP3"}
# WAVE_FORMAT_EXTENSIBLE (0xFFFE: ffmpeg's for more than 2 channels, sox's, Windows') names its samples by
# a sub-format GUID: a format code in its first two bytes, then these 14 (KSDATAFORMAT_SUBTYPE_PCM is
# 00000001-0000-0010-8000-00aa00389b71). Python's wave module refused it ("unknown format: 65534")
# before 3.12.
EXTENSIBLE, GUID_TAIL = 0xFFFE, bytes.fromhex("000000001000800000aa00389b71")


def wav_chunks(data: bytes) -> dict[bytes, bytes]:
    """A RIFF WAVE file's chunks up to its samples ("data"), by name (the first of a name)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("no RIFF WAVE header")
    chunks, at = {}, 12
    while at + 8 <= len(data) and b"data" not in chunks:
        name, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        chunks.setdefault(name, data[at + 8 : at + 8 + size])  # (a cut-short data chunk: what there is)
        at += 8 + size + size % 2  # (chunks are padded to an even size)
    if len(chunks.get(b"fmt ", b"")) < 16:
        raise ValueError("no format chunk before its samples")
    if b"data" not in chunks:
        raise ValueError("no data chunk")
    return chunks


def sample_format(fmt: bytes) -> tuple[int | None, str]:
    """The code of the samples a WAV's format chunk names (None: a sub-format that has none) and, for a
    format the client does not take, its name in words."""
    code = int.from_bytes(fmt[:2], "little")
    if code != EXTENSIBLE:
        return code, WAV_FORMATS.get(code, f"format {code}")
    if len(fmt) < 40:
        return None, "WAVE_FORMAT_EXTENSIBLE with its sub-format cut off"
    guid = fmt[24:40]
    if guid[2:] != GUID_TAIL:
        return None, f"WAVE_FORMAT_EXTENSIBLE of sub-format {uuid.UUID(bytes_le=guid)}"
    code = int.from_bytes(guid[:2], "little")
    return code, f"{WAV_FORMATS.get(code, f'format {code}')} (WAVE_FORMAT_EXTENSIBLE)"


def read_wav_16k(path: str) -> np.ndarray:
    """The samples of a 16 kHz mono 16-bit PCM WAV: a plain one, or WAVE_FORMAT_EXTENSIBLE of PCM."""
    try:
        chunks = wav_chunks(Path(path).read_bytes())
    except OSError as e:
        raise bad_input(f"{path}: not a readable WAV file ({e.strerror or e})") from None
    except ValueError as e:
        raise bad_input(f"{path}: not a readable WAV file ({e})") from None
    code, name = sample_format(chunks[b"fmt "])
    if code != 1:  # (float samples, as scipy.io.wavfile writes a float array: not taken)
        raise bad_input(f"{path}: {NEED_PCM16}; this one holds {name}")
    channels, rate, _, _, bits = struct.unpack_from("<HIIHH", chunks[b"fmt "], 2)
    if rate != 16000 or (bits + 7) // 8 != 2 or channels != 1:
        # (what it is, as for another format: "need 16 kHz mono" alone left the file to be looked into)
        layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels} channels")
        raise bad_input(f"{path}: {NEED_PCM16}; this one is {rate} Hz {layout} {bits}-bit")
    samples = chunks[b"data"]
    return np.frombuffer(samples[: len(samples) // 2 * 2], "<i2")


def seconds(text: str) -> float:
    """A positive number of seconds (0, a negative or nan made a session and saved nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def wait_seconds(text: str) -> float:
    """0 or more seconds, inf to ask for good (nan never ran out: a full server was asked forever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 or more seconds")
    return value


def retry_after_seconds(value: str | None) -> float:
    """The seconds a 503's Retry-After asks to wait: a number of them, or an HTTP date (RFC 9110: what a
    proxy in front of the server may send, a ValueError's traceback); 1 where it says neither."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 1.0


def server_url(text: str) -> str:
    """An http:// or https:// URL (one without its scheme, 127.0.0.1:8000, was "cannot reach" and exit 1
    once the --out folder was made; one httpx cannot parse, http://[::1, its InvalidURL traceback)."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"{text!r}: give the server's http:// or https:// URL")
    return text


def refusal_message(body: bytes) -> str:
    """What a refusal's body says: its JSON's message (or a loading server's stage), else its text."""
    try:
        answer = json.loads(body)
        return str(answer.get("message") or answer.get("stage"))
    except (ValueError, AttributeError):  # not JSON, or not an object: what the server said
        return body.decode(errors="replace")[:200]


async def create_session(http: httpx.AsyncClient, body: dict, wait_s: float) -> dict:
    """POST /v1/sessions; a 503 (model loading, or at capacity) is retried after its Retry-After
    until `wait_s` is spent."""
    deadline = time.monotonic() + wait_s
    while True:
        r = await http.post("/v1/sessions", json=body)
        if r.status_code == 201:
            return r.json()
        message = refusal_message(r.content)
        left = deadline - time.monotonic()
        if r.status_code != 503 or left <= 0:
            refused = f"session refused: {r.status_code} {message}"
            raise bad_input(refused) if 400 <= r.status_code < 500 else SystemExit(refused)
        # the last ask at the deadline (a --wait shorter than Retry-After, or just as long, asked once)
        retry_after = min(retry_after_seconds(r.headers.get("Retry-After")), left)
        print(f"server busy ({message}); asking again in {retry_after:.3g} s")
        await asyncio.sleep(retry_after)


def socket_url(server: str, stream_path: str, token: str) -> str:
    """The session's WebSocket URL on `server` (http -> ws, https -> wss). The scheme as httpx reads
    it, in any case: replacing the text "http" left HTTP://HOST as it was, websockets' InvalidURI traceback."""
    base = httpx.URL(server)
    return str(base.copy_with(scheme="wss" if base.scheme == "https" else "ws")) + f"{stream_path}?token={token}"


async def send_audio(ws, pcm: np.ndarray) -> None:
    """20 ms per message, paced in real time."""
    step, start = 320, time.monotonic()
    for seq, i in enumerate(range(0, len(pcm), step)):
        await ws.send(HEADER.pack(AUDIO_IN, 0, 0, seq, 0) + pcm[i : i + step].tobytes())
        await asyncio.sleep(max(0.0, start + (i + step) / 16000 - time.monotonic()))


async def keep_alive(ws) -> None:
    """A ping every KEEPALIVE_S, until the stream ends (its pongs are not printed)."""
    n = 0
    try:
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            await ws.send(json.dumps({"type": "ping", "id": n}))
            n += 1
    except websockets.ConnectionClosed:
        pass  # (the receive loop says how it ended)


class Received:
    """What the stream has brought so far: frames saved, audio-out bytes, the stream's fps."""

    def __init__(self) -> None:
        self.frames, self.audio_bytes, self.fps = 0, 0, 25.0
        self.refused: str | None = None  # why the server refused --say, if it did

    def __str__(self) -> str:
        frames = f"{self.frames} frame{'s' * (self.frames != 1)}"
        return f"{frames} ({self.frames / self.fps:.1f} s of video), {self.audio_bytes / 32000:.1f} s of audio"


async def open_stream(url: str, wait_s: float):
    """The session's WebSocket; a 503 (a server at --max-connections answers an upgrade as any request
    past it) is asked again after its Retry-After until `wait_s` is spent, as the session's POST is."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await websockets.connect(url, max_size=2**22, close_timeout=CLOSE_S)
        except websockets.InvalidStatus as e:
            left = deadline - time.monotonic()
            if e.response.status_code != 503 or left <= 0:
                raise
            retry_after = min(retry_after_seconds(e.response.headers.get("Retry-After")), left)
            print(f"server busy ({refusal_message(e.response.body)}); opening the stream again in {retry_after:.3g} s")
            await asyncio.sleep(retry_after)


async def stream(url: str, args, pcm: np.ndarray | None, out: Path, got: Received) -> None:
    """Save the frames of `args.seconds` of video, and count its audio-out bytes, into `got`."""
    try:  # (a session gone by then, a proxy that takes no WebSocket, a server gone: a traceback)
        ws = await open_stream(url, args.wait)
    except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
        raise SystemExit(f"cannot open the stream at {url.split('?')[0]}: {e or type(e).__name__}") from None
    async with ws:
        await ws.send(json.dumps({"type": "start", "format": "jpeg"}))
        try:  # bounded: a server that answers nothing held the client for good
            async with asyncio.timeout(args.seconds + CLOSE_S):  # (not wait_for: see the loop below)
                ready = json.loads(await ws.recv())
        except TimeoutError:
            raise SystemExit(f"the server did not answer the stream's start in {args.seconds + CLOSE_S:g} s") from None
        print("ready:", ready)
        got.fps = ready.get("fps", got.fps)
        if args.say:
            await ws.send(json.dumps({"type": "speak", "text": args.say}))
        sender = asyncio.create_task(send_audio(ws, pcm)) if pcm is not None else None
        pinger = asyncio.create_task(keep_alive(ws))
        # --seconds of video, by the frames' times: read for --seconds of the client's clock, a server
        # slower than real time had sent part of it by then, and the run saved that part
        deadline = brought = time.monotonic()
        deadline += args.seconds
        end_us, frame_us = round(args.seconds * 1e6), 1e6 / got.fps
        whole = False  # the video's frames up to --seconds are in
        # the answer to --say (its speech's duration, or why not) is waited for past --seconds: on a
        # busy server it came after a short run's end, which then said nothing of the speech
        answered = not args.say
        try:
            while True:
                ends = [] if whole else [max(deadline, brought + QUIET_S)]
                ends += [] if answered else [deadline + SPEAK_ANSWER_S]
                if (left := max(ends, default=0.0) - time.monotonic()) <= 0:
                    break
                try:  # bounded: a stream that goes quiet holds the client QUIET_S at most past --seconds
                    # (asyncio.wait_for, on Python 3.11, dropped a Ctrl-C that came as a message
                    # did: the client streamed on to --seconds' end)
                    async with asyncio.timeout(left):
                        message = await ws.recv()
                except TimeoutError:
                    break
                if isinstance(message, str):
                    answer = json.loads(message)
                    kind = answer.get("type")
                    if kind != "pong":  # (the keep-alive's)
                        print("server:", message)
                    if kind == "error" and answer.get("for") == "speak":
                        got.refused = str(answer.get("message"))
                    answered = answered or kind in ("speaking", "error")
                    continue
                brought = time.monotonic()  # (media: a server that stalls still answers pings)
                kind, _, _, seq, pts_us = HEADER.unpack_from(message)
                if pts_us >= end_us:  # (past --seconds: the frames asked for are saved)
                    whole = whole or kind == VIDEO_JPEG
                    continue
                if kind == VIDEO_JPEG:
                    whole = whole or pts_us + frame_us >= end_us  # (--seconds' last frame)
                    try:  # (a disk that fills up: a traceback, what was saved unsaid)
                        (out / f"{seq:06d}_{pts_us // 1000:08d}ms.jpg").write_bytes(message[HEADER.size :])
                    except OSError as e:
                        print(f"{got} -> {out}/")
                        raise bad_input(f"--out {out}: cannot save a frame ({e.strerror or e})") from None
                    got.frames += 1
                elif kind == AUDIO_OUT:
                    got.audio_bytes += len(message) - HEADER.size
        finally:
            pinger.cancel()
            if sender:
                sender.cancel()
        try:  # (to a server that reads nothing, a send waits for room that never comes)
            await asyncio.wait_for(ws.send(json.dumps({"type": "stop"})), CLOSE_S)
        except TimeoutError:
            pass


async def run(args) -> None:
    """One run of the client: a session made with `args`, its stream saved into --out, the session ended."""
    pcm = read_wav_16k(args.wav) if args.wav else None  # a bad file is refused before a session is made
    if args.say is not None and len(args.say) > SPEAK_MAX_CHARS:  # (the server's 4413 came after a session's start)
        raise bad_input(f"--say of {len(args.say)} characters: a speak holds at most {SPEAK_MAX_CHARS}")
    if args.seconds is None:  # the whole file and its last frames (5 s of any file were kept)
        args.seconds = len(pcm) / 16000 + TAIL_S if pcm is not None else 5.0
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise bad_input(f"--out {out} is a file: give the folder to write the frames into")
    if out.is_dir() and any(out.glob(FRAME_NAMES)):  # (a shorter run left the longer one's last frames)
        raise bad_input(f"--out {out} holds another run's frames: give a new or empty folder")
    try:  # (a path under a file, or where this user may not write: a traceback)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise bad_input(f"--out {out}: cannot make the folder ({e.strerror or e})") from None
    probe = out / f".ws_client_{os.getpid()}"
    try:  # before a session is made: a folder this user may not write to was the first frame's traceback
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise bad_input(f"--out {out}: cannot write into the folder ({e.strerror or e})") from None
    args.server = args.server.rstrip("/")  # (the socket's URL took the slash: ws://host//v1/..., a 403)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    body = {"avatar": args.avatar, "seed": args.seed, **({"caption": args.caption} if args.caption else {})}
    async with httpx.AsyncClient(base_url=args.server, headers=headers, timeout=30) as http:
        try:
            session = await create_session(http, body, args.wait)
        except httpx.TransportError as e:
            raise SystemExit(f"cannot reach {args.server}: {e or type(e).__name__}") from None
        url = socket_url(args.server, session["stream"], session["token"])
        got = Received()
        try:
            await stream(url, args, pcm, out, got)
        except websockets.ConnectionClosed as e:
            print(f"{got} -> {out}/")  # (what was saved before the end went unsaid)
            if e.rcvd is None:  # (a server killed, a network gone: "closed the stream: ?")
                raise SystemExit("the connection to the server was lost (no close from it)") from None
            raise SystemExit(
                f"the server closed the stream: {e.rcvd.code} {e.rcvd.reason}".rstrip()
            ) from None
        except asyncio.CancelledError:  # a Ctrl-C (asyncio.run cancels this task): what was saved
            print(f"{got} -> {out}/")
            raise
        finally:  # the stream's close ends the session; this ends it where the socket never opened
            try:
                await http.delete(
                    session["resource"],
                    headers={"Authorization": f"Bearer {session['token']}"},
                    timeout=CLOSE_S,
                )
            except httpx.HTTPError:
                pass  # the server went away: so did the session
    print(f"{got} -> {out}/")
    if got.refused:  # (the run exited 0 with a silent avatar: as a --say too long for the socket, 4413, does not)
        raise SystemExit(f"the server did not speak --say: {got.refused}")


def parser() -> argparse.ArgumentParser:
    # (its name as `python examples/ws_client.py` gives it, where main is called from another program)
    p = argparse.ArgumentParser(prog="ws_client.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--server", type=server_url, default="http://127.0.0.1:8000", help="server URL (default: %(default)s)"
    )
    p.add_argument("--token", help="the server's token, for a server started with --token")
    p.add_argument("--avatar", default="sample", help="avatar to stream (default: %(default)s)")
    p.add_argument("--caption", help="text conditioning, e.g. 'smiling'")
    p.add_argument("--seed", type=int, default=0, help="the session's seed (default: %(default)s)")
    p.add_argument("--wav", help="16 kHz mono PCM16 WAV to speak with")
    p.add_argument("--say", help="text for the server to speak")
    p.add_argument(
        "--seconds",
        type=seconds,
        help=f"seconds of video to save (default: the --wav file's length and {TAIL_S:g} s, else 5)",
    )
    p.add_argument("--wait", type=wait_seconds, default=30.0, help="seconds to keep asking a busy server (default 30)")
    p.add_argument("--out", default="frames", help="a folder without another run's frames (default: frames)")
    return p


def exit_status(stop: SystemExit) -> int:
    """The exit status of a SystemExit, its message (one that is not a number) said on stderr: what
    the interpreter makes of one that ends the program (None: 0; a message: 1)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """The command line (`argv`, else sys.argv's) run to its end, what it has to say printed as
    `python examples/ws_client.py` prints it: its exit status (2: a mistake in what the run was given;
    1: the server's or the network's failure; 130: a Ctrl-C). A program, a test, may call it in its own
    process."""
    try:
        asyncio.run(run(parser().parse_args(argv)))
    except KeyboardInterrupt:  # (asyncio's traceback; the session was ended on the way out)
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:
        return exit_status(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
