"""Speak mode on the server (server/speech.py): the speech queue's room, with espeak-ng's own speech."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from server import speech
from server.session import AudioTimeline, SpeechTurns
from streamgen.data.sentences import sample_sentence
from streamgen.data.speech import LANGUAGES, Voice, synthesize

pytestmark = pytest.mark.timeout(120)


def spoken_session(room_s: float) -> SimpleNamespace:
    timeline, turns = AudioTimeline(room_s), SpeechTurns()
    return SimpleNamespace(timeline=timeline, closed=False, speech_turns=turns, touch=lambda: None)


async def test_a_text_the_queue_has_no_room_for_is_refused_before_its_synthesis(monkeypatch):
    """The pre-check assumed 25 characters a second where espeak-ng speaks about 17: this text
    (12 s of speech) passed it for 8 s of room, was synthesised, and then refused for lack of room."""
    text = "The quick brown fox jumps over the lazy dog. " * 4  # 180 characters
    assert synthesize(text).duration > 8.0 and len(text) / 25 < 8.0
    synthesised = []

    def counted(text, voice):
        synthesised.append(text)
        return synthesize(text, voice)

    monkeypatch.setattr(speech, "synthesize", counted)
    with pytest.raises(speech.SpeechError, match="too little for this text"):
        await speech.speak(spoken_session(8.0), text)
    assert synthesised == []  # refused up front, not after a synthesis for nothing


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_room_estimate_is_below_the_speech_of_prose_and_near_it(language):
    """Below: a text that fits is never refused before its synthesis. Near: one that does not fit
    is refused then, mostly, rather than after its synthesis."""
    rng = np.random.default_rng(3)
    for n in (1, 3, 6):
        text = " ".join(sample_sentence(rng, language, "test") for _ in range(n))
        voice = Voice(language=language)
        estimate, actual = speech.speech_seconds_at_least(text, voice), synthesize(text, voice).duration
        assert 0.7 * actual <= estimate <= actual, (text, estimate, actual)
