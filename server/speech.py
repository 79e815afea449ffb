"""Speak mode: text -> espeak-ng speech (the avatar world's speech module) -> the session's audio.

The speech goes onto the session's audio timeline like microphone audio does,
so it drives the lips, and the outgoing audio (WebRTC track or WebSocket audio
messages) plays exactly the samples the lips were generated from.
"""

from __future__ import annotations

import asyncio

from streamgen.data.speech import SpeechError, Voice, synthesize

from .session import Session


async def speak(session: Session, text: str, language: str = "en-us", variant: str | None = None) -> float:
    """Queue `text` as speech on the session; returns its duration in seconds. SpeechError for bad input."""
    voice = Voice(language=language, variant=variant)
    voice.validate()
    # in a thread: synthesis takes ~0.1-1 s; the speech module serialises calls with its own lock
    utterance = await asyncio.to_thread(synthesize, text, voice)
    if session.closed:
        return 0.0
    dropped = session.timeline.append(utterance.audio, source="speech", whole=True)
    if dropped:
        raise SpeechError(
            f"speech queue is full: the {dropped / 16000:.1f} s of speech do not fit after what is queued, "
            "and none of it was queued (interrupt to clear the queue)"
        )
    session.touch()
    return utterance.duration


async def set_caption(registry, session: Session, text: str) -> None:
    """Change the caption (text conditioning) of a running session, on the worker thread."""

    def apply():
        stream = session.stream
        if session.closed:  # its stream closed (or closing) before this job: in a model process, gone
            return
        if hasattr(stream, "set_caption"):  # the model runs in a child process
            stream.set_caption(text)
        elif stream is not None:
            stream.set_text(text or None)

    await asyncio.wrap_future(registry.worker.submit(apply, lane=session.lane))


__all__ = ["SpeechError", "speak", "set_caption"]
