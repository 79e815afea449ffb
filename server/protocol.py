"""The WebSocket wire format (documented in docs/api.md).

Binary messages: a 16-byte little-endian header, then the payload.

    offset  size  field
    0       1     type     1 audio in (PCM16 16 kHz mono), 2 video JPEG, 3 video RGB24, 4 audio out (PCM16)
    1       1     flags    0 (reserved)
    2       2     reserved 0
    4       4     sequence number (uint32, per direction and type)
    8       8     presentation time, microseconds on the stream timeline (int64)

Text messages are JSON objects with a "type"; the server answers each speak, with `speaking` or an
`error` for it, within speech.SPEAK_ANSWER_S of its arrival. Everything here is pure (no
I/O), so the parser can be fuzzed on its own; a violation raises
ProtocolError with the close code and reason the connection ends with.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from streamgen.session_limits import MAX_CAPTION_CHARS, text_problem

HEADER = struct.Struct("<BBHIq")
SAMPLE_RATE = 16000
MAX_AUDIO_MESSAGE_BYTES = SAMPLE_RATE * 2 * 2  # two seconds of PCM16 per message
# room for the longest message taken as JSON encoders write it: a speak of 1000 emoji is 12,000 characters
# of \ud83d\ude00 escapes from Python's json.dumps (8192 closed a speak of 700 emoji with 4413, its
# text well within the 1000 characters a speak may hold)
MAX_TEXT_MESSAGE_CHARS = 16384
# what the WebSocket transport takes in one message (uvicorn's ws_max_size; its default, 16 MiB, let
# a client make the server buffer that much before the protocol's 4413): past it, closed with 1009
MAX_WEBSOCKET_MESSAGE_BYTES = 4 * MAX_AUDIO_MESSAGE_BYTES

# the codes uvicorn closes a socket with itself, for a client's frame it could not take; the app
# sees only a disconnect with that code, which was logged and counted as the client's own close
BROKEN_FRAME_CLOSES = {
    1002: "a malformed WebSocket frame (1002)",
    1007: "a text message that is not UTF-8 (1007)",
    1009: f"a message over {MAX_WEBSOCKET_MESSAGE_BYTES} bytes (1009)",
}

MAX_SPEAK_CHARS = 1000
MAX_CREDIT = 10_000
# messages a socket may send a second, over any stretch (20 ms of audio a message is 50), and at
# once beyond that: a backlog a stalled network hands over together (40 s of 20 ms messages, more
# than audio may run ahead). Empty audio messages sent flat out (11,000 a second) slowed every
# session's chunks 3.5-fold, the event loop busy taking them in.
MAX_MESSAGES_PER_S = 500
MAX_MESSAGE_BURST = 2000


class MsgType(IntEnum):
    AUDIO_IN = 1
    VIDEO_JPEG = 2
    VIDEO_RGB = 3
    AUDIO_OUT = 4


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    BAD_MESSAGE = 4400  # malformed header, JSON, unknown type, odd byte count
    UNAUTHORIZED = 4401  # token missing
    FORBIDDEN = 4403  # token wrong
    NOT_FOUND = 4404  # unknown session
    IDLE = 4408  # idle limit
    CONFLICT = 4409  # the session already streams on another transport
    GONE = 4410  # maximum duration reached / session ended
    TOO_BIG = 4413  # message larger than allowed
    UNSUPPORTED = 4415  # sample rate or format the server does not take
    TOO_FAST = 4429  # audio sent too far ahead of the video, or messages too many a second
    SLOW_CONSUMER = 4430  # the client stopped reading


class MessageRate:
    """A token bucket: `take` says whether one more message keeps within `per_s` a second and
    `burst` at once."""

    def __init__(self, per_s: float, burst: int, clock=time.monotonic):
        self.per_s, self.burst, self.clock = per_s, burst, clock
        self.allowance = float(burst)
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.allowance = min(self.burst, self.allowance + (now - self.last) * self.per_s)
        self.last = now
        if self.allowance < 1:
            return False
        self.allowance -= 1
        return True


def close_reason(text: str) -> str:
    """`text` cut to the 123 bytes of UTF-8 a close frame's reason may hold (cut at 120
    characters, a reason that repeats a client's emoji broke the close: no frame, a traceback)."""
    return text.encode()[:123].decode("utf-8", "ignore")


class RepeatedField(Exception):
    """A JSON object names a field twice: which one counts is a guess (json.loads takes the last)."""


def once_each(pairs) -> dict:
    """A JSON object's pairs -> dict, or RepeatedField (`json.loads`' object_pairs_hook)."""
    fields = {}
    for name, value in pairs:
        if name in fields:
            raise RepeatedField(name)
        fields[name] = value
    return fields


class ProtocolError(Exception):
    def __init__(self, code: CloseCode, reason: str, too_long: str | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = close_reason(reason)
        # the field whose text is too long, in a message of a size that is taken: over HTTP a 422
        # (a field's value refused), not the 413 of a body too large
        self.too_long = too_long


def pack(kind: MsgType, seq: int, pts_seconds: float, payload: bytes) -> bytes:
    return HEADER.pack(int(kind), 0, 0, seq & 0xFFFFFFFF, round(pts_seconds * 1e6)) + payload


@dataclass
class AudioMessage:
    seq: int
    pts_us: int
    pcm: np.ndarray  # int16


def parse_binary(data: bytes) -> AudioMessage:
    """A client binary message -> AudioMessage; the only binary type clients send is audio in."""
    if len(data) < HEADER.size:
        raise ProtocolError(CloseCode.BAD_MESSAGE, f"binary message of {len(data)} bytes is shorter than the header")
    kind, flags, reserved, seq, pts_us = HEADER.unpack_from(data)
    # (raw PCM sent without the header, a likely slip, read as a header of its first samples: the
    # close said only "type 37 is not audio in (1)")
    no_header = "; each message is a 16-byte header, then PCM16: was it sent without one?"
    if kind != MsgType.AUDIO_IN:
        known = kind in MsgType.__members__.values()
        raise ProtocolError(
            CloseCode.BAD_MESSAGE, f"binary message type {kind} is not audio in (1)" + ("" if known else no_header)
        )
    if flags or reserved:
        raise ProtocolError(CloseCode.BAD_MESSAGE, "header flags and reserved bytes must be 0" + no_header)
    payload = data[HEADER.size :]
    if len(payload) > MAX_AUDIO_MESSAGE_BYTES:
        raise ProtocolError(CloseCode.TOO_BIG, f"audio message of {len(payload)} bytes; at most 2 s per message")
    if len(payload) % 2:
        raise ProtocolError(CloseCode.BAD_MESSAGE, f"audio payload has an odd byte count ({len(payload)}): PCM16")
    return AudioMessage(seq, pts_us, np.frombuffer(payload, "<i2"))


# control messages: type -> {field: (types, required)}
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "start": {
        "format": ((str,), False),
        "flow": ((str,), False),
        "credit": ((int,), False),
        "sample_rate": ((int,), False),
        "jpeg_quality": ((int,), False),
    },
    # `id`: the client's, sent back in the answer for it (a speak refused at once, its hand full,
    # is answered before the speaks in hand, whose answers a client matching them in order took it for)
    "speak": {"text": ((str,), True), "language": ((str,), False), "variant": ((str,), False),
              "id": ((int, float, str), False)},
    "caption": {"text": ((str,), True), "id": ((int, float, str), False)},
    "interrupt": {},
    "clear": {},
    "credit": {"frames": ((int,), True)},
    # (a number of any kind: a client timing its round trips by its clock's fractional
    # milliseconds, performance.now(), was closed with 4400)
    "ping": {"id": ((int, float, str), False)},
    "stop": {},
}


_EXPECTED = {(str,): "a string", (int,): "a whole number", (int, float, str): "a number or a string"}


def _json_kind(value) -> str:
    """What a JSON value is, in JSON's words: a sample_rate of "16000" is 'the string '16000''."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"the string {value[:20]!r}"
    return "an array" if isinstance(value, list) else "an object"


def parse_control(text: str) -> dict:
    """A client text message -> validated dict with defaults filled in."""
    if len(text) > MAX_TEXT_MESSAGE_CHARS:
        raise ProtocolError(CloseCode.TOO_BIG, f"text message of {len(text)} characters; at most {MAX_TEXT_MESSAGE_CHARS}")
    try:
        msg = json.loads(text, object_pairs_hook=once_each)
    except (ValueError, RecursionError):
        raise ProtocolError(CloseCode.BAD_MESSAGE, "text message is not valid JSON") from None
    except RepeatedField as e:  # (`{"type": "speak", "text": "a", "text": "b"}` spoke "b")
        raise ProtocolError(CloseCode.BAD_MESSAGE, f"field {str(e.args[0])[:40]!r} is given more than once") from None
    if not isinstance(msg, dict):
        raise ProtocolError(CloseCode.BAD_MESSAGE, "control message must be a JSON object")
    if "type" not in msg:  # (it was said to be of "unknown control message type 'None'")
        raise ProtocolError(CloseCode.BAD_MESSAGE, "control message has no 'type' field (speak, caption, ...)")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(CloseCode.BAD_MESSAGE, f"unknown control message type {str(kind)[:40]!r}")
    fields = _FIELDS[kind]
    for name, value in list(msg.items()):
        if name == "type":
            continue
        if name not in fields:
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"{kind}: unknown field {name[:40]!r}")
        types, required = fields[name]
        if value is None and not required:
            # not given, as in POST /v1/sessions: a client's unset option ({"variant": null}, Python's
            # None) closed the socket as 'the wrong type'
            del msg[name]
            continue
        if types == (int,) and isinstance(value, float):
            # JSON has numbers, not integers: many clients (Python's arithmetic, a JSON library's
            # doubles) write 16000.0, which was refused as 'the wrong type' while 16000 was taken
            if not value.is_integer():
                raise ProtocolError(CloseCode.BAD_MESSAGE, f"{kind}: {name} must be a whole number, not {value!r}")
            msg[name] = value = int(value)
        if not isinstance(value, types) or isinstance(value, bool):  # (it said only 'has the wrong type')
            expected = f"{kind}: {name} must be {_EXPECTED[types]}"
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"{expected}, not {_json_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # (json.loads takes NaN, JSON has none)
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"{kind}: {name} must be a finite number, not {value!r}")
    for name, (_, required) in fields.items():
        if required and name not in msg:
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"{kind}: missing field {name!r}")
    return _check_values(kind, msg)


def _check_values(kind: str, msg: dict) -> dict:
    if kind == "start":
        msg.setdefault("format", "jpeg")
        msg.setdefault("flow", "latest")
        msg.setdefault("credit", 0)
        msg.setdefault("sample_rate", SAMPLE_RATE)
        msg.setdefault("jpeg_quality", 80)
        if msg["format"] not in ("jpeg", "rgb"):
            raise ProtocolError(CloseCode.UNSUPPORTED, f"start: format must be 'jpeg' or 'rgb', not {msg['format'][:20]!r}")
        if msg["flow"] not in ("latest", "credit"):
            raise ProtocolError(CloseCode.BAD_MESSAGE, "start: flow must be 'latest' or 'credit'")
        if msg["sample_rate"] != SAMPLE_RATE:
            raise ProtocolError(
                CloseCode.UNSUPPORTED, f"start: audio must be 16000 Hz PCM16 mono, not {msg['sample_rate']} Hz"
            )
        if not 0 <= msg["credit"] <= MAX_CREDIT:
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"start: credit must be in [0, {MAX_CREDIT}]")
        if not 10 <= msg["jpeg_quality"] <= 95:
            raise ProtocolError(CloseCode.BAD_MESSAGE, "start: jpeg_quality must be in [10, 95]")
    elif kind == "credit" and not 0 <= msg["frames"] <= MAX_CREDIT:
        raise ProtocolError(CloseCode.BAD_MESSAGE, f"credit: frames must be in [0, {MAX_CREDIT}]")
    elif kind in ("speak", "caption"):
        longest = MAX_SPEAK_CHARS if kind == "speak" else MAX_CAPTION_CHARS
        if len(msg["text"]) > longest:
            raise ProtocolError(CloseCode.TOO_BIG, f"{kind}: text longer than {longest} characters", too_long=kind)
        if kind == "speak" and not msg["text"].strip():
            raise ProtocolError(CloseCode.BAD_MESSAGE, "speak: text is empty")
        problem = text_problem(msg["text"])
        if problem:
            raise ProtocolError(CloseCode.BAD_MESSAGE, f"{kind}: {problem}")
    return msg
