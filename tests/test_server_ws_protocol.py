"""The WebSocket API's wire format as server/protocol.py parses it, without a socket: binary audio
messages, control messages, close reasons and start's defaults (over a socket, and the parsers
fuzzed: test_server_ws)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from server.protocol import CloseCode, MsgType, ProtocolError, pack, parse_binary, parse_control

pytestmark = pytest.mark.timeout(120)


def refused(parse, message) -> tuple[int, str]:
    """The close code and reason `parse` (parse_binary, parse_control) refuses `message` with."""
    with pytest.raises(ProtocolError) as e:
        parse(message)
    return e.value.code, e.value.reason


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
    said, reason = refused(parse_binary, data)
    assert said == code and reason


def test_raw_pcm_without_the_header_is_told_so():
    """PCM sent without the 16-byte header was closed with 'binary message type 37 is not audio in (1)'."""
    pcm = (np.sin(np.arange(1, 321) / 5) * 8000).astype(np.int16)
    for raw in (pcm.tobytes(), np.zeros(320, np.int16).tobytes(), np.full(320, 257, np.int16).tobytes()):
        code, reason = refused(parse_binary, raw)
        assert code == CloseCode.BAD_MESSAGE and reason.endswith("was it sent without one?")
        assert len(reason.encode()) <= 123
    _, reason = refused(parse_binary, pack(MsgType.AUDIO_OUT, 0, 0, b""))  # a type the server sends
    assert reason == "binary message type 4 is not audio in (1)"  # (no header missing)


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
        ("x" * 17000, CloseCode.TOO_BIG),
        # a caption as long as speech may be (1000) was taken, where POST /v1/sessions refuses one
        # over 500 characters: the encoder kept its first 128 tokens
        ('{"type": "caption", "text": "%s"}' % ("x" * 501), CloseCode.TOO_BIG),
        # a field given twice: the last one was taken without a word (over /control too)
        ('{"type": "speak", "text": "hello", "text": "goodbye"}', CloseCode.BAD_MESSAGE),
        ('{"type": "start", "type": "stop"}', CloseCode.BAD_MESSAGE),
    ],
)
def test_bad_control_messages(text, code):
    assert refused(parse_control, text)[0] == code


def test_a_whole_number_written_as_a_float_is_taken_and_a_fraction_refused_in_words():
    """16000.0 (Python's arithmetic, a JSON library's doubles) was refused as 'the wrong type'."""
    msg = parse_control('{"type": "start", "sample_rate": 16000.0, "credit": 25.0, "jpeg_quality": 8e1}')
    assert (msg["sample_rate"], msg["credit"], msg["jpeg_quality"]) == (16000, 25, 80)
    assert all(type(msg[name]) is int for name in ("sample_rate", "credit", "jpeg_quality"))
    assert parse_control('{"type": "credit", "frames": 10.0}')["frames"] == 10
    for text, reason in [
        ('{"type": "start", "sample_rate": 16000.5}', "start: sample_rate must be a whole number, not 16000.5"),
        ('{"type": "credit", "frames": 2.5}', "credit: frames must be a whole number, not 2.5"),
    ]:
        assert refused(parse_control, text) == (CloseCode.BAD_MESSAGE, reason)
    code, reason = refused(parse_control, '{"type": "start", "sample_rate": 48000.0}')  # of another rate
    assert code == CloseCode.UNSUPPORTED and "not 48000 Hz" in reason


def test_the_longest_speak_is_taken_as_json_dumps_escapes_it():
    """A speak of 700 emoji (1000 may be spoken) was closed with 4413: json.dumps writes each as 12
    characters of escapes, and the text message was over 8192 characters."""
    for text in ("\U0001f600" * 1000, "\u00e9" * 1000):
        message = json.dumps({"type": "speak", "text": text, "language": "en-us", "variant": "whisper"})
        assert parse_control(message)["text"] == text


def test_an_optional_field_given_as_null_is_not_given():
    """{"variant": null} (a client's unset option: Python's None) closed the socket as 'the wrong
    type'; POST /v1/sessions takes a null avatar, caption or seed as none."""
    msg = parse_control('{"type": "speak", "text": "hi", "language": null, "variant": null}')
    assert msg == {"type": "speak", "text": "hi"}
    assert parse_control('{"type": "start", "format": null, "sample_rate": null}') == parse_control('{"type": "start"}')
    assert parse_control('{"type": "ping", "id": null}') == {"type": "ping"}
    for text, reason in [  # (required)
        ('{"type": "speak", "text": null}', "speak: text must be a string, not null"),
        ('{"type": "credit", "frames": null}', "credit: frames must be a whole number, not null"),
    ]:
        assert refused(parse_control, text) == (CloseCode.BAD_MESSAGE, reason)


def test_a_field_of_another_type_says_which_type_it_must_be():
    """'start: field 'sample_rate' has the wrong type' left the client to guess what it should be."""
    for text, reason in [
        ('{"type": "start", "sample_rate": "16000"}',
         "start: sample_rate must be a whole number, not the string '16000'"),
        ('{"type": "start", "format": ["jpeg"]}', "start: format must be a string, not an array"),
        ('{"type": "credit", "frames": true}', "credit: frames must be a whole number, not true"),
        ('{"type": "speak", "text": 5}', "speak: text must be a string, not a number"),
        ('{"type": "ping", "id": {}}', "ping: id must be a number or a string, not an object"),
    ]:
        assert refused(parse_control, text) == (CloseCode.BAD_MESSAGE, reason)


def test_a_field_given_twice_says_which():
    with pytest.raises(ProtocolError, match=r"^field 'text' is given more than once$"):
        parse_control('{"type": "speak", "text": "hello", "text": "goodbye"}')


def test_a_close_reason_fits_a_close_frame_whatever_the_client_sent():
    """Reasons that repeat a client's text were cut at 120 characters: over 123 bytes of UTF-8
    with emoji, and the server sent no close frame at all (uvicorn: "control frame too long")."""
    from server.protocol import close_reason

    emoji = "\U0001f600"
    for text in (json.dumps({"type": emoji * 40}), json.dumps({"type": "start", "format": emoji * 40})):
        reason = refused(parse_control, text)[1]
        assert len(reason.encode()) <= 123 and reason.startswith(("unknown", "start"))
    assert close_reason("a" * 200) == "a" * 123 and close_reason(emoji * 40) == emoji * 30


def test_start_defaults():
    msg = parse_control('{"type": "start"}')
    assert msg["format"] == "jpeg" and msg["flow"] == "latest" and msg["sample_rate"] == 16000
