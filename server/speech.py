"""Speak mode: text -> espeak-ng speech (the avatar world's speech module) -> the session's audio.

The speech goes onto the session's audio timeline like microphone audio does,
so it drives the lips, and the outgoing audio (WebRTC track or WebSocket audio
messages) plays exactly the samples the lips were generated from.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from streamgen.data.speech import LANGUAGES, SpeechError, Voice, count_phonemes, synthesize
from streamgen.session_limits import CaptionsUnavailable, caption_problem

from .model_host import HostDown
from .scheduler import WorkerBusy
from .session import Session

# Synthesis runs on a thread of its own: in the default pool a burst of long texts held the
# decoding of other clients' uploaded references behind it. One thread for every session loses
# nothing: espeak-ng keeps global state, so the speech module synthesises under one lock per
# process. The longest text a session's queue takes (750 characters, 45 s of speech) took 72-92
# ms here, ~70% of it under that lock; a short text sent just after it was answered after 97-178
# ms with one thread and after 71-90 ms with two (this 2-core CPU): what waits is the lock.
_synthesis = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="speech")
# The fewest milliseconds espeak-ng speaks in, by language, at its default rate (165 words a
# minute): for each unstressed phoneme a part that does not follow the rate and one that does,
# for each stressed vowel, and for each clause closed by a comma, by a full stop (its pause and
# the slower syllables before it), by an abbreviation's dot (espeak's dictionary "Dr.", 10 ms) or
# by a full stop after one word ("Wow! Really?": its pause without a sentence's drawn-out end);
# the last clause's pause is not counted. Abbreviations' dots and prose's full stops counted as
# one, the weight was what the dot takes: English exclamations were estimated at 0.36-0.44 of
# their speech, English prose at 0.71. Phonemes at prose's
# pace (its pauses included) overestimated texts without prose's pauses and stresses, a text
# that fits then refused: 6.5 s for the 4.7 s of "😀 😀 😀" in German at 80 words a minute, 2.9 s
# for the 2.5 s of "the" x 20. Unstressed phonemes run 15-75 ms (a German schwa 29 ms at 165 and
# at 80 alike), stressed vowels 40-350 ms, a full stop's pause 332 ms; emoji names and strings of
# short words are mostly unstressed and pause nowhere. espeak's phoneme pass also ends a clause at
# an abbreviation's dot ("Dr. Smith") that its speech barely pauses at, and a short exclamation's
# pause is shorter than prose's full stop: fitted to prose alone, "Dr. Who? Mr. Bean!" was
# estimated at 1.12 of its speech, German "Hi! Really? Yes." at 1.08 (refused though it fits);
# each now has a count of its own. espeak pauses at German and Italian commas as at others (166
# ms, 442 ms at 80 words a minute), which the fit gave 0 ms while it aimed at prose alone: "die,
# die, ..." was estimated at 0.13 of its speech. An initial's dot ("J. R. R.") and a dictionary's
# replaced abbreviation (Spanish "Sr.") count as abbreviations' dots (8-21 ms of pause), an
# ellipsis as a comma (249 ms). Each pause's weight is at most what espeak pauses there at this
# rate plus 25 ms (a comma 179 ms, a full stop 345): unbounded, the full stop took in what prose
# draws out before it (en-us 708 ms) and "I see. You go. ..." was estimated at 1.10 of its
# speech, "A. B. C. D. E. F." at 1.92. Fitted by bench/speech_room.py (a linear programme over
# 1764 syntheses: prose of 1-6 sentences, digits and abbreviations, emoji alone and together,
# repeated short words, greetings, comma lists of each short word, abbreviations' dots, initials,
# short exclamations and sentences of two words, at 80-450 words a minute and 4 voices) to stay at
# most 90% of each text's speech, as close to it as that allows on prose, digits, exclamations and
# comma lists. On other texts of these kinds: 97% at the most (German "Danke 😎" at 80 words a
# minute); at the default rate prose 62-86% of its speech (the least a German sentence alone),
# digits 67-90%, exclamations 74-85%, sentences of two words 75-90%, comma lists 44-90%, initials
# 30-86%.
SPEECH_FLOOR_MS = {  # (unstressed fixed, unstressed, stressed, comma, full stop, abbreviation dot, one-word clause)
    "en-us": (6.1, 44.5, 123.7, 203.9, 369.9, 80.3, 369.9),
    "en": (4.6, 48.7, 106.7, 203.9, 369.9, 43.3, 369.9),
    "de": (5.9, 22.0, 167.1, 174.5, 369.9, 0.0, 369.9),
    "fr": (4.3, 52.0, 80.0, 163.8, 369.9, 323.5, 369.9),
    "es": (4.2, 45.5, 94.4, 201.9, 369.9, 45.6, 369.9),
    "it": (4.3, 39.5, 114.9, 194.2, 356.8, 0.0, 369.9),
}
DEFAULT_RATE = 165  # words a minute (Voice.rate's default), the rate of SPEECH_FLOOR_MS


def speech_seconds_at_least(text: str, voice: Voice) -> float:
    """About the fewest seconds espeak-ng takes to speak `text` (see SPEECH_FLOOR_MS): what follows
    the rate in proportion to it. Above the default rate its pauses shrink far faster than its
    speech (a full stop's 332 ms at 165 words a minute, 142 ms at 250, 12 ms at 450): counted only
    at the default rate and below. Takes the speech module's lock: not on the event loop."""
    count = count_phonemes(text, voice)
    fixed, unstressed, stressed, comma, stop, dot, short_stop = SPEECH_FLOOR_MS[voice.language]
    slower = DEFAULT_RATE / voice.rate
    ms = count.unstressed * (fixed + unstressed * slower) + count.stressed * stressed * slower
    if voice.rate <= DEFAULT_RATE:
        pauses = count.comma_pauses * comma + count.stop_pauses * stop + count.abbreviation_dots * dot
        ms += (pauses + count.short_stop_pauses * short_stop) * slower
    return ms / 1000


def language_tag(language: str) -> str:
    """A language as espeak-ng names it: language tags are case-insensitive (RFC 5646, 2.1.1), and a
    browser's navigator.language, "en-US", was refused as an unknown language. A tag it does not name
    is looked up without its last subtags (RFC 4647, 3.4): a German browser's "de-DE" was refused too;
    it is German, "en-GB" espeak's "en". One that is not known so stays as it was sent, for the error to
    name it."""
    tag = language.lower()
    while tag not in LANGUAGES and "-" in tag:
        tag = tag.rsplit("-", 1)[0]
    return tag if tag in LANGUAGES else language


log = logging.getLogger("streamgen.server")


def warm_speech() -> None:
    """The speech engine's first use, at the server's start (a thread): espeak-ng's start and the
    import of scipy.signal, which resamples its speech, took 3.1-3.6 s here (a 2-core machine under
    load), much of it holding the GIL. The first speak of each server paid it, its client waiting
    and every stream's frames with it. A machine without espeak-ng is said here, and by each speak."""
    try:
        synthesize("ready", Voice())
    except Exception as e:
        log.warning("speech is not available: %s", e)


# How long a speak may wait for its answer, from the moment it was accepted: its turn behind the
# session's speaks before it, and its synthesis on the process's one speech thread. Past it, none of
# its speech is queued and it is answered as failed: a synthesis that never ended (espeak-ng stuck)
# left a WebSocket client waiting for its answer for good, every later speak and caption of the
# socket behind it. Under the web page's own 20 s for a speak over HTTP (web/app.js), for the page to
# hear why; synthesis takes ~0.1 s, 8 speaks in hand at most a second or two.
SPEAK_ANSWER_S = 15.0


def not_ready_in_time() -> str:
    return (f"speech not ready within {SPEAK_ANSWER_S:g} s (the server is overloaded): none of it was queued; "
            "send it again")  # fmt: skip


def speak_refusal(error: Exception) -> tuple[int, str, int | None]:
    """(HTTP status, error code, Retry-After seconds or None) for a speak refused with `error`: a
    SpeechError, or TimeoutError for speech not ready within SPEAK_ANSWER_S. What /control answers
    with, and a WebSocket's error carries (it said only the message, where a caption's refusal
    carried its code)."""
    if isinstance(error, TimeoutError):  # none of it queued, nor ever will be: send it again
        return 503, "speech_timeout", 1
    if isinstance(error, SpeechBusy):
        return 429, "busy", 1
    if isinstance(error, SpeechForEndedSession):
        return 404, "not_found", None
    if isinstance(error, SpeechInterrupted):  # the session's state changed under it: none of it plays
        return 409, "interrupted", None
    return 422, "bad_speech", None


class SpeechBusy(SpeechError):
    """The session's previous speak is still being synthesised."""


class SpeechForEndedSession(SpeechError):
    """The session ended while its speech was synthesised: nothing was queued."""


class SpeechInterrupted(SpeechError):
    """An interrupt came after the speak was asked for and before its speech was queued."""


async def speak(
    session: Session,
    text: str,
    language: str = "en-us",
    variant: str | None = None,
    clears: int | None = None,
    turn: asyncio.Event | None = None,
) -> float:
    """Queue `text` as speech on the session; returns its duration in seconds. SpeechError for bad
    input, SpeechForEndedSession when the session ended meanwhile. clears: the session timeline's
    `clears` when the speak was asked for (a WebSocket's speaks wait their turn): SpeechInterrupted,
    and nothing queued, once an interrupt has come since, as if it had come after the speech.
    turn: the session's speech turn (`session.speech_turns.take()`) taken when the speak was
    accepted (a WebSocket's), given back here whatever happens; its speech is queued after that of
    the speaks accepted before it. Without one (over HTTP): SpeechBusy while the session has a
    speak in hand, being synthesised or waiting its turn, else a turn of its own."""
    turns = session.speech_turns
    try:
        voice = Voice(language=language_tag(language), variant=variant)
        voice.validate()
        if turn is None:
            if turns.busy:
                raise SpeechBusy("the previous speak is not queued yet: send the next once it is answered")
            turn = turns.take()
        await turn.wait()  # (the speaks accepted before it are done)
        return await _speak_in_turn(session, text, voice, clears)
    finally:
        if turn is not None:
            turns.give_back(turn)


async def _speak_in_turn(session: Session, text: str, voice: Voice, clears: int | None) -> float:
    if clears is not None and session.timeline.clears != clears:  # (not synthesised for nothing)
        raise SpeechInterrupted("interrupted before its speech was queued: none of it was")
    loop = asyncio.get_running_loop()
    at_least = await loop.run_in_executor(_synthesis, speech_seconds_at_least, text, voice)
    room, holds = session.timeline.room_seconds("speech"), session.timeline.max_ahead / 16000
    if at_least > holds:  # no interrupt would make room for it: "full" sent people clearing an empty queue
        raise SpeechError(
            f"text too long: at least {at_least:.1f} s of speech, more than the {holds:.0f} s the speech "
            "queue holds; send it in parts, each once the one before is playing"
        )
    if at_least > room:  # refused before its synthesis, not after
        raise SpeechError(
            f"speech queue is full: {room:.1f} s of room, too little for this text (interrupt to clear it)"
        )
    # synthesis takes ~0.1-1 s
    utterance = await loop.run_in_executor(_synthesis, synthesize, text, voice)
    if session.closed:  # (answered "speaking" for a session DELETEd during the synthesis)
        raise SpeechForEndedSession(f"session ended: {session.close_reason}")
    if clears is not None and session.timeline.clears != clears:
        raise SpeechInterrupted("interrupted during its synthesis: none of its speech was queued")
    dropped = session.timeline.append(utterance.audio, source="speech", whole=True)
    if dropped:
        raise SpeechError(
            f"speech queue is full: the {dropped / 16000:.1f} s of speech do not fit after what is queued, "
            "and none of it was queued (interrupt to clear the queue)"
        )
    session.touch()
    return utterance.duration


async def set_caption(registry, session: Session, text: str) -> None:
    """Change the caption (text conditioning) of a running session, on the worker thread.

    WorkerBusy when the worker has no room for it, or drops it (shutdown). One job per session
    waits in the worker's queue at a time: a caption sent while one waits
    replaces its text (the latest is what the stream gets) rather than queueing another, so one
    client's burst cannot fill the queue all sessions share.

    ValueError for a text that cannot be a caption (a NUL character: as a speak's text is refused)."""
    problem = caption_problem(text)
    if problem:
        raise ValueError(f"caption: {problem}")
    session.caption_wanted = text  # (before the check: a job that has started reads it after)
    job = session.caption_job
    if job is None:
        # the session's mark is in place before the worker can run the job (which clears it)
        job = session.caption_job = concurrent.futures.Future()

        def apply():
            session.caption_job = None  # from here on, a newer caption needs a job of its own
            try:
                stream, wanted = session.stream, session.caption_wanted
                if session.closed:  # closed (or closing) before this job: in a model process, gone
                    pass
                elif hasattr(stream, "set_caption"):  # the model runs in a child process
                    stream.set_caption(wanted)
                elif stream is not None:
                    stream.set_text(wanted or None)
            except BaseException as e:
                job.set_exception(e)
            else:
                job.set_result(None)

        def not_run(submitted: concurrent.futures.Future) -> None:  # e.g. dropped at shutdown
            if not job.done():
                job.cancel() if submitted.cancelled() else job.set_exception(submitted.exception())

        try:
            registry.worker.submit(apply, lane=session.lane).add_done_callback(not_run)
        except BaseException:
            session.caption_job = None
            raise
    # shielded: a caller cancelled (its client gone) would otherwise cancel the job itself, which
    # the session's other callers wait on too (and which its worker then could not complete)
    try:
        await asyncio.shield(asyncio.wrap_future(job))
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not job.cancelled() or (current is not None and current.cancelling()):
            raise  # this caller is cancelled
        # the worker dropped the job (its stop, at shutdown): a failure of this caption, not a
        # cancellation of its caller (it ended the socket's speaker task, which answered no more)
        raise WorkerBusy("server is shutting down") from None  # (as a job submitted then would be)


# what a caption set_caption refused is answered with, over /control and the WebSocket alike: the
# socket's error said only the message, where /control's status, code and Retry-After told a
# client whether to send it again, and when (a 503 `stopping` waits out the stop, not a second)
CAPTION_REFUSALS = (ValueError, CaptionsUnavailable, WorkerBusy, HostDown)


def caption_refusal(registry, error: Exception) -> tuple[int, str, int | None]:
    """(HTTP status, error code, Retry-After seconds or None) for a caption refused with `error`,
    one of CAPTION_REFUSALS."""
    if isinstance(error, ValueError):
        return 422, "bad_caption", None
    if isinstance(error, CaptionsUnavailable):
        return 503, "captions_unavailable", None
    if registry.ended_with_the_stop(error):  # the stop's answer, as a create's refusal at the stop
        # (SessionRegistry.create): a full queue's was busy's (Retry-After 1), a host's model_down's
        return 503, "stopping", 5
    if isinstance(error, WorkerBusy):
        return 503, "busy", 1
    return 503, "model_down", None  # the model process is gone: the session's streams end with it


__all__ = ["CAPTION_REFUSALS", "SpeechBusy", "caption_refusal", "speak_refusal", "SpeechError", "SpeechForEndedSession", "SpeechInterrupted", "speak", "set_caption"]
