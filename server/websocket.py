"""The WebSocket API: /v1/sessions/{id}/stream (wire format in protocol.py, docs in docs/api.md).

One connection drives one session. The receive loop takes audio and control
messages; a sender task takes chunks from the session's latest-chunk slot and
writes one audio-out message and the chunk's frames; a speaker task takes the
socket's speaks and captions one at a time, in the order they came, and answers each.
Every send has a deadline, so a client that stops reading is dropped (4430)
instead of holding memory; any protocol violation closes the socket with a 44xx
code and a reason.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import secrets
import time

import numpy as np
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from . import speech
from .protocol import (
    BROKEN_FRAME_CLOSES,
    MAX_MESSAGE_BURST,
    MAX_MESSAGES_PER_S,
    CloseCode,
    MessageRate,
    MsgType,
    ProtocolError,
    close_reason,
    pack,
    parse_binary,
    parse_control,
)
from .registry import SessionEnded, SessionRegistry, idle_reason
from .session import Session
from .speech import (
    CAPTION_REFUSALS,
    SpeechError,
    caption_refusal,
    not_ready_in_time,
    set_caption,
    speak,
    speak_refusal,
)

log = logging.getLogger("streamgen.server")
router = APIRouter()

# a socket's speaks and captions not handled yet; more are refused (an error for each) until some are.
# The speaks an interrupt dropped do not count (they are answered without a synthesis), up to twice as
# many in all: a client that barges in, an interrupt and its new speak at once, over a full hand was refused
MAX_UNANSWERED = 8


def close_code_for(reason: str) -> CloseCode:
    if reason.startswith("idle"):
        return CloseCode.IDLE
    if reason.startswith("server shutting down"):
        return CloseCode.GOING_AWAY
    return CloseCode.GONE


@router.websocket("/v1/sessions/{session_id}/stream")
async def stream_socket(ws: WebSocket, session_id: str):
    """Drive a session from a program: PCM16 audio in, encoded frames + audio out, JSON control."""
    registry: SessionRegistry = ws.app.state.registry
    await ws.accept()  # accept first: a close code with a reason is only possible on an open socket
    session = registry.get(session_id)
    # either may carry it, as over HTTP (a wrong ?token= beside the right header was a 4403)
    tokens = [t for t in (ws.query_params.get("token"), _bearer(ws.headers.get("authorization"))) if t]
    if session is None:
        ended_token, reason = registry.ended.get(session_id, (None, None))
        accepted = [ended_token] + ([registry.config.token] if registry.config.token else [])
        if ended_token is not None and _accepted(tokens, accepted):
            # (told its client only, as the session's 404 over HTTP: a client that reconnects after its
            # session ended heard "unknown session", a session it had just streamed)
            return await _refuse(ws, CloseCode.NOT_FOUND, f"session ended: {reason}")
        return await _refuse(ws, CloseCode.NOT_FOUND, f"unknown session {session_id[:40]!r}")
    if not tokens:
        return await _refuse(ws, CloseCode.UNAUTHORIZED, "missing session token (?token= or Authorization)")
    accepted = [session.token] + ([registry.config.token] if registry.config.token else [])  # as over HTTP
    if not _accepted(tokens, accepted):
        return await _refuse(ws, CloseCode.FORBIDDEN, "wrong session token")
    if session.transport is not None:
        return await _refuse(ws, CloseCode.CONFLICT, f"session is already streaming over {session.transport}")
    # claimed now, not at its start message: a second socket or a WHEP offer meanwhile gets a conflict
    # (each would end the session when it goes), and the session's end closes this socket
    session.transport = "websocket"
    connection = SocketConnection(ws, session, registry)
    session.on_close(connection.close_for_session)
    await connection.run()


def _accepted(tokens: list[str], accepted: list[str]) -> bool:
    return any(secrets.compare_digest(t.encode(), a.encode()) for t in tokens for a in accepted)


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


async def _refuse(ws: WebSocket, code: CloseCode, reason: str) -> None:
    log.info("websocket refused: %d %s", code, reason)
    await ws.close(int(code), close_reason(reason))


class SocketConnection:
    def __init__(self, ws: WebSocket, session: Session, registry: SessionRegistry):
        self.ws = ws
        self.session = session
        self.registry = registry
        self.config = registry.config
        self.options: dict = {}
        self.credit = 0
        self.credit_changed = asyncio.Event()
        self.sender: asyncio.Task | None = None
        self.receiver: asyncio.Task | None = None
        self.speaker: asyncio.Task | None = None  # started by the first speak or caption
        # [speak or caption, timeline clears when it came, a speak's turn in the session's speech,
        # when its answer is due: speech.SPEAK_ANSWER_S after it came]
        self.requests: asyncio.Queue = asyncio.Queue()
        self.last_request: list | None = None  # the last of them, while it waits its turn
        self.unanswered = 0
        self.speaks: list[list] = []  # the speaks among them (an interrupt since drops those of its `clears`)
        self.late_captions: set[asyncio.Task] = set()  # answered as late, still waiting for the worker
        self.close_sent = False
        # the close this socket gives itself (the client's stop, its protocol error, the idle limit)
        # and the session's reason it stands for: sent by the session's closer once the session has
        # ended for that reason (`close_for_session`, `closing_words`)
        self.own_close: tuple[int, str, str] | None = None
        self.message_rate = MessageRate(MAX_MESSAGES_PER_S, MAX_MESSAGE_BURST)

    async def run(self) -> None:
        reason = "websocket closed by client"
        metrics = self.registry.metrics
        metrics.websockets_open.inc()
        # the receive loop in a task of its own, which the session's end cancels: a client that
        # reads nothing never answers the close frame, and the loop waited for its messages until
        # the idle limit, holding the socket and its unsent buffers that long after the session
        self.receiver = asyncio.ensure_future(self.receive_loop())
        try:
            reason = await self.receiver
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # this handler is cancelled (shutdown)
                # its server has given the socket up: the session's teardown, which runs on in a
                # task of its own, sends nothing on it (a test client's closed stream raised
                # ClosedResourceError, logged as the transport's failure to close)
                self.close_sent = True
                raise
            reason = self.session.close_reason or "session ended"
        except ProtocolError as e:
            log.info("session %s: websocket protocol error %d: %s", self.session.id, e.code, e.reason)
            reason = f"protocol error: {e.reason}"
            self.own_close = (e.code, e.reason, reason)
        except WebSocketDisconnect:
            pass
        finally:
            self.receiver.cancel()  # (cancelled with the handler: it may be reading still)
            if self.sender is not None:
                self.sender.cancel()
            if self.speaker is not None:  # nothing this socket asked for is spoken after it
                self.speaker.cancel()
            for caption in list(self.late_captions):  # (their jobs, on the worker, find the session closed)
                caption.cancel()
            self.give_back_turns()
            try:
                await self.registry.close(self.session, reason)
                if self.own_close is not None:  # (where its closer had run before: said once, at most)
                    await self.close(*self.closing_words())
            finally:
                metrics.websockets_open.dec()
                await self.speaker_ended()

    async def receive_loop(self) -> str:
        idle = self.config.idle_timeout_s
        # a socket has the idle limit to send `start`, pings or not: pinging before it held a
        # session and its place up to --max-duration, streaming nothing
        start_by = time.monotonic() + idle
        while True:
            started = self.session.streaming
            try:
                wait = idle if started else max(0.0, start_by - time.monotonic())
                message = await asyncio.wait_for(self.ws.receive(), timeout=wait)
            except TimeoutError:
                reason = idle_reason(self.session, idle)
                self.own_close = (CloseCode.IDLE, reason, reason)
                return reason
            if message["type"] == "websocket.disconnect":
                fault = BROKEN_FRAME_CLOSES.get(message.get("code"))
                return f"protocol error: {fault}" if fault else "websocket closed by client"
            if self.session.closed:  # (a limit, DELETE) while its close frame goes out: what the client
                # sent meanwhile is not a protocol error. Its audio met "send a start message before
                # audio", logged as the client's 4400 after every max_duration or idle close
                return self.session.close_reason or "session ended"
            if not self.message_rate.take():
                raise ProtocolError(CloseCode.TOO_FAST, f"more than {MAX_MESSAGES_PER_S} messages a second: "
                                    "send audio in messages of 20 ms or more (50 a second)")  # fmt: skip
            if message.get("bytes") is not None:
                self.session.touch()
                self.on_audio(message["bytes"])
            elif message.get("text") is not None:
                msg = parse_control(message["text"])
                if started or msg["type"] != "ping":
                    self.session.touch()
                if await self.on_control(msg):
                    return "stopped by client"

    def on_audio(self, data: bytes) -> None:
        audio = parse_binary(data)
        if not self.session.streaming:
            raise ProtocolError(CloseCode.BAD_MESSAGE, "send a start message before audio")
        dropped = self.session.timeline.append(audio.pcm.astype(np.float32) / 32768.0, source="client", live=True)
        if dropped:
            ahead = self.config.max_audio_ahead_s
            # (the likeliest cause a client cannot see: audio of another rate, 48 kHz taken as 16 kHz
            # runs three times as long as it was sent)
            raise ProtocolError(
                CloseCode.TOO_FAST,
                f"audio is more than {ahead:.0f} s ahead of the video: send 16 kHz mono PCM16 (32000 bytes a second) "
                "in real time",
            )

    async def on_control(self, msg: dict) -> bool:
        """Handle one control message; True when the client asked to stop."""
        kind = msg["type"]
        if kind == "ping":
            await self.send_json({"type": "pong", "id": msg.get("id"), "video_time": self.video_time()})
        elif kind == "stop":  # at any time: a client that hung up before its stream started was
            # closed with 4400, its session's end logged and counted as a protocol error
            self.own_close = (CloseCode.NORMAL, "stopped", "stopped by client")
            return True
        elif kind == "start":
            if self.session.streaming:
                raise ProtocolError(CloseCode.BAD_MESSAGE, "start was already sent")
            self.start(msg)
        elif not self.session.streaming:
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"send a start message before {kind}")
        elif kind == "credit":
            self.credit = min(self.credit + msg["frames"], 10_000)
            self.credit_changed.set()
        elif kind in ("interrupt", "clear"):
            self.session.timeline.clear_ahead()
        elif kind in ("speak", "caption"):
            await self.queue_request(msg)
        return False

    async def queue_request(self, msg: dict) -> None:
        """Hand a speak or a caption to the speaker task. Awaited here, a speak's synthesis (up to
        ~0.1 s, and as long again for each other session's before it: one at a time in a process)
        or a caption's worker job (behind due chunks for up to JOB_PATIENCE, a second) held up
        every message after it, a ping, an interrupt, a stop and the client's live audio.

        A caption that comes while the one before it still waits its turn, with nothing after it,
        replaces it (as the latest caption replaces the one waiting for the worker): a burst of
        captions (a text typed, a slider moved) filled the queue, and its last ones, those the
        client wanted, were refused while the stale ones were applied."""
        last = self.last_request
        if msg["type"] == "caption" and last is not None and last[0]["type"] == "caption":
            last[0] = msg  # (in its place: applied when it would have been)
            return
        clears = self.session.timeline.clears  # (an interrupt over /control drops them too)
        dropped = sum(1 for request in self.speaks if request[1] != clears)
        if self.unanswered - dropped >= MAX_UNANSWERED or self.unanswered >= 2 * MAX_UNANSWERED:
            message = f"{MAX_UNANSWERED} speaks and captions are waiting their turn: send it once one is done"
            if self.unanswered - dropped < MAX_UNANSWERED:
                message = (f"{self.unanswered} speaks and captions, {dropped} of them dropped by an interrupt, "
                           "are waiting to be answered: send it once one is")  # fmt: skip
            await self.send_json(_answering(msg, _refused(msg["type"], message, "hand_full")))
            return
        self.unanswered += 1
        # a speak's turn from now: the session's speech is queued in the order the speaks were
        # accepted, over this socket or over HTTP (a speak posted while this one waits is refused)
        turn = self.session.speech_turns.take() if msg["type"] == "speak" else None
        self.last_request = [msg, clears, turn, time.monotonic() + speech.SPEAK_ANSWER_S]
        self.requests.put_nowait(self.last_request)
        if turn is not None:
            self.speaks.append(self.last_request)
        if self.speaker is None:
            self.speaker = asyncio.create_task(self.answer_in_order(), name=f"speak {self.session.id}")

    async def answer_in_order(self) -> None:
        """Speaker task: the socket's speaks and captions one at a time, in the order they came, so
        that the answers come in that order and a caption sent after a speak is applied once that
        speech is queued, as when the receive loop awaited each. A speak is answered with `speaking`
        or an error, a caption only when it fails. An interrupt drops the speaks that came before it."""
        while True:
            request = await self.requests.get()
            if request is self.last_request:  # (its turn: a caption after it is one of its own)
                self.last_request = None
            msg, clears, turn, due = request
            kind = msg["type"]
            # bounded from when it came: a speak behind one that took long (or a caption the worker
            # did not get to) is answered by its own time as well
            left = max(0.0, due - time.monotonic())
            try:
                if kind == "speak":
                    reply = await self.answer_speak_within(msg, clears, turn, left)
                else:
                    reply = await self.answer_caption_within(msg, left)
            except Exception as e:  # not the client's: logged, answered, and the stream goes on
                log.exception("session %s: %s failed", self.session.id, kind)
                failed = "speech" if kind == "speak" else kind
                reply = _refused(kind, f"{failed} failed: {e}", "internal_error")  # (/control's 500)
            self.unanswered -= 1
            self.speaks = [speak for speak in self.speaks if speak is not request]
            if reply is not None:
                await self.send_json(_answering(msg, reply))

    async def answer_speak(self, msg: dict, clears: int, turn: asyncio.Event) -> dict:
        try:
            language, variant = msg.get("language", "en-us"), msg.get("variant")
            duration = await speak(self.session, msg["text"], language, variant, clears, turn)
        except SpeechError as e:  # the client's: a bad voice, no room, an interrupt
            _, error, retry_after = speak_refusal(e)  # /control's code and Retry-After
            return _refused("speak", str(e), error, retry_after)
        return {"type": "speaking", "duration": round(duration, 3)}

    async def answer_speak_within(self, msg: dict, clears: int, turn: asyncio.Event, seconds: float) -> dict:
        try:
            return await asyncio.wait_for(self.answer_speak(msg, clears, turn), timeout=seconds)
        except TimeoutError:  # cancelled: none of its speech is queued
            self.session.speech_turns.give_back(turn)  # (speak() does, but not if cancelled before it began)
            log.warning("session %s: speak not answered within %g s", self.session.id, speech.SPEAK_ANSWER_S)
            _, error, retry_after = speak_refusal(TimeoutError())
            return _refused("speak", not_ready_in_time(), error, retry_after)

    async def answer_caption_within(self, msg: dict, seconds: float) -> dict | None:
        """A caption's answer, or past `seconds` one that says it is late: it goes on to the worker
        all the same (a caption job is not taken back; cancelled before it began, it never went)."""
        caption = asyncio.ensure_future(self.answer_caption(msg))
        await asyncio.wait([caption], timeout=seconds)
        if caption.done():
            return caption.result()
        self.late_captions.add(caption)
        caption.add_done_callback(self.late_caption_done)
        log.warning("session %s: caption not applied within %g s", self.session.id, speech.SPEAK_ANSWER_S)
        return _refused("caption", f"caption not applied within {speech.SPEAK_ANSWER_S:g} s (the server is "
                        "overloaded): it is applied when the model gets to it", "caption_late")  # fmt: skip

    def late_caption_done(self, caption: asyncio.Task) -> None:
        self.late_captions.discard(caption)
        if not caption.cancelled() and caption.exception() is not None:  # (answered already: logged)
            log.error("session %s: caption failed", self.session.id, exc_info=caption.exception())

    async def answer_caption(self, msg: dict) -> dict | None:
        try:
            await set_caption(self.registry, self.session, msg["text"])
        # a caption the model cannot take, a full queue, the stop; a server without the caption encoder
        # (as POST /v1/sessions and /control say it: it was 'caption failed', a fault with its traceback)
        except CAPTION_REFUSALS as e:
            _, error, retry_after = caption_refusal(self.registry, e)  # /control's code and Retry-After
            return _refused("caption", str(e), error, retry_after)
        return None

    async def speaker_ended(self) -> None:
        """Wait for the cancelled speaker: a synthesis under way finishes on its thread, its speech
        not queued (the session has ended), and the speaks still waiting are dropped with it."""
        if self.speaker is None:
            return
        await asyncio.wait([self.speaker])
        if not self.speaker.cancelled() and self.speaker.exception() is not None:
            log.error("session %s: speaker failed", self.session.id, exc_info=self.speaker.exception())

    def give_back_turns(self) -> None:
        """The turns of the speaks the cancelled speaker will not take up (speak() gives back the
        one under way as it ends): the session's other speaks do not wait for them."""
        while not self.requests.empty():
            turn = self.requests.get_nowait()[2]
            if turn is not None:
                self.session.speech_turns.give_back(turn)

    def start(self, msg: dict) -> None:
        self.options = msg
        self.credit = msg["credit"]
        # the slot first: starting publishes the pre-generated first chunk into it
        slot = self.session.add_slot(on_drop=self.registry.metrics.dropped_chunks.inc)
        try:
            self.registry.start_streaming(self.session, "websocket")
        except SessionEnded as e:  # closed since the socket connected
            raise ProtocolError(CloseCode.GONE, str(e)) from None
        s = self.session
        ready = {
            "type": "ready", "session": s.id, "width": s.width, "height": s.height, "fps": s.fps,
            "frames_per_chunk": s.frames_per_chunk, "format": msg["format"], "flow": msg["flow"],
            "sample_rate": 16000, "playout_delay": round(s.delay, 3),
        }  # fmt: skip
        self.sender = asyncio.create_task(self.send_chunks(slot, json.dumps(ready)))

    def video_time(self) -> float:
        """Where the stream's video has come to: the end of the chunks generated for it, 0 before
        `start`. (Before it, a pong said 0 or a chunk's length by chance: the first chunk is made
        as the session is created, whether or not the socket has started its stream.)"""
        if not self.session.streaming:
            return 0.0
        return self.session.chunk_index * self.session.chunk_seconds

    async def send_chunks(self, slot, ready: str) -> None:
        """Sender task: ready message, then per chunk one audio-out message and its frames."""
        fmt, quality = self.options["format"], self.options["jpeg_quality"]
        seq_audio = seq_video = 0
        try:
            await self.send(ready)
            while (chunk := await slot.take()) is not None:
                if chunk.index == 0:
                    # a client plays the chunks by their pts from the first one's arrival. A session
                    # that joined its lane's schedule starts up to a chunk period later, and its next
                    # chunk comes that much later too: chunk 0 goes no sooner than one delay before it
                    # plays, as every later chunk does
                    s = self.session  # (base is on the session's clock)
                    await s.sleep(max(0.0, s.base - s.delay - s.clock()))
                await self.send(pack(MsgType.AUDIO_OUT, seq_audio, chunk.pts, chunk.audio.tobytes()))
                seq_audio += 1
                i, frames = 0, chunk.frames
                while i < len(frames):
                    # the frames there is credit for now (credit coming meanwhile: the next pass)
                    n = len(frames) - i if self.options["flow"] != "credit" else min(len(frames) - i, self.credit)
                    if n <= 0:
                        self.registry.metrics.dropped_chunks.inc()
                        break  # no credit: skip the rest of this chunk, the next one is newer
                    try:
                        encoded = await _encoded(frames[i : i + n], fmt, quality)
                    except Exception as e:  # (a RuntimeError too: not the socket's, below)
                        raise FramesFailed(f"{type(e).__name__}: {e}") from e
                    for kind, payload in encoded:
                        if self.options["flow"] == "credit":
                            self.credit -= 1  # (only this task takes credit: there is enough)
                        await self.send(pack(kind, seq_video, chunk.pts + i / chunk.fps, payload))
                        seq_video += 1
                        i += 1
        except TimeoutError:
            timeout = self.config.ws_send_timeout_s
            log.info("session %s: websocket client stopped reading", self.session.id)
            # the session's reason first: the close frame waits up to 2 s on the client that does not
            # read, and the idle limit could end the session meanwhile, counted as idle. The frame is
            # the session's closer's (`closing_words`): sent here as the session's close was a task
            # not yet run, it said 4430 only while that task came second; where its teardown came
            # first, the closer said 4410 "slow consumer"
            self.own_close = (CloseCode.SLOW_CONSUMER, f"client did not read for {timeout:.0f} s", "slow consumer")
            await self.registry.close(self.session, "slow consumer")
            await self.close(*self.closing_words())  # (sent by the closer already, but where it had run before)
        except FramesFailed as e:  # the server's fault: the stream went on with no frames, unlogged
            log.exception("session %s: encoding its frames failed", self.session.id)
            await self.registry.close(self.session, f"internal error: encoding frames failed: {e}"[:100])
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass  # the receive loop sees the disconnect and ends the session

    async def send(self, data: bytes | str) -> None:
        send = self.ws.send_bytes(data) if isinstance(data, bytes) else self.ws.send_text(data)
        await asyncio.wait_for(send, timeout=self.config.ws_send_timeout_s)

    async def send_json(self, obj: dict) -> None:
        try:
            await self.send(json.dumps(obj))
        except (TimeoutError, RuntimeError, ConnectionError, WebSocketDisconnect):
            pass

    async def close_for_session(self) -> None:
        """The session's closer. A close of the socket's own is sent here too, once the session has
        ended: sent before (and uvicorn's close waits for the client's answer and the connection's
        end), a client that heard it and at once asked for its session found it alive (200), and
        one that connected again was told it was already streaming (4409)."""
        await self.close(*self.closing_words())
        if self.receiver is not None and not self.receiver.done():
            self.receiver.cancel()  # the session is over whether or not the client answers the close

    def closing_words(self) -> tuple[int, str]:
        """The close frame's code and words: the socket's own where its session ended for it, else
        the session's reason. A DELETE or a limit that ended the session between the socket's own
        end (a stop message read, say) and the session's close had its reason kept, by GET's 404 and
        a reconnect's 4404, while the client was told 1000 "stopped": it is told what ended it."""
        reason = self.session.close_reason or "session ended"
        if self.own_close is not None and self.own_close[2] == reason:
            return self.own_close[0], self.own_close[1]
        return close_code_for(reason), reason

    async def close(self, code: int, reason: str) -> None:
        if self.close_sent or self.ws.application_state != WebSocketState.CONNECTED:
            return
        if self.ws.client_state != WebSocketState.CONNECTED:
            return  # the client's close frame came: its server answers it, and ASGI sends nothing after it
        self.close_sent = True
        try:
            await asyncio.wait_for(self.ws.close(int(code), close_reason(reason)), timeout=2.0)
        except (TimeoutError, RuntimeError, ConnectionError, WebSocketDisconnect):
            pass


class FramesFailed(Exception):
    """A chunk's frames could not be encoded (the server's fault, not the socket's)."""


def _refused(kind: str, message: str, error: str, retry_after: int | None = None) -> dict:
    """A speak's or caption's refusal: its message, its code (/control's for it, where /control has
    the refusal) and the seconds of /control's Retry-After where it sends one."""
    reply = {"type": "error", "for": kind, "error": error, "message": message}
    return reply if retry_after is None else {**reply, "retry_after": retry_after}


def _answering(msg: dict, reply: dict) -> dict:
    """The answer to a speak or caption, with its `id` if it had one."""
    return reply if "id" not in msg else {**reply, "id": msg["id"]}


async def _encoded(frames: np.ndarray, fmt: str, quality: int) -> list[tuple[MsgType, bytes]]:
    """Frames as their messages' payloads, in order. JPEG off the event loop, which every stream's
    frames and the WebRTC peers wait on: 1.1-1.3 ms a frame at 512x512, 0.4 ms at 256x256, a chunk's
    8 frames at a time. Raw RGB is a copy, made here."""
    if fmt == "rgb":
        return [_encode(frame, fmt, quality) for frame in frames]
    return await asyncio.to_thread(lambda: [_encode(frame, fmt, quality) for frame in frames])


def _encode(frame: np.ndarray, fmt: str, quality: int) -> tuple[MsgType, bytes]:
    if fmt == "rgb":
        return MsgType.VIDEO_RGB, np.ascontiguousarray(frame).tobytes()
    from PIL import Image

    image = Image.fromarray(frame)
    # into a file in memory: Pillow compresses into a file descriptor without the GIL, and into a
    # BytesIO holding it, the event loop's thread waiting on it as if it compressed on the loop
    try:
        file = open(os.memfd_create("frame"), "w+b")  # (closed below)
    except (AttributeError, OSError):  # not Linux; no descriptor left (EMFILE): the frame all the same
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        return MsgType.VIDEO_JPEG, buf.getvalue()
    with file:
        image.save(file, format="JPEG", quality=quality)
        file.seek(0)
        return MsgType.VIDEO_JPEG, file.read()
