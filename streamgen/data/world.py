"""The avatar world: one call makes a clip (speech + face video + ground truth) from integers.

`make_clip(seed, index, split, ...)` is a pure function of its arguments: the same
seed and index give the same clip byte for byte. A clip's identity and sentence
are drawn from its split only; identities are split by `identity_split(id)` and
sentences by `sentences.sentence_split(text)`, so train, val and test share
neither faces nor sentences.

Each identity has its own voice (variant, pitch, intonation range); a clip picks a
language, a speaking rate, an expression caption and the speech's start time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import SPLITS
from .motion import EXPRESSIONS, FPS, Motion, plan_motion
from .render import Identity, render_clip, render_reference
from .sentences import sample_sentence
from .speech import LANGUAGES, SAMPLE_RATE, VARIANTS, Phoneme, Voice, synthesize

# variants that still sound like speech and are spread over both registers
_WORLD_VARIANTS = tuple(v for v in VARIANTS if v not in ("whisper", "croak"))
CAPTIONS = ("neutral",) * 3 + EXPRESSIONS[1:]


def identity_split(identity_id: int) -> str:
    bucket = int(identity_id) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def clip_split(index: int) -> str:
    """Which split the dataset's clip `index` belongs to (10% test, 10% val)."""
    return identity_split(index)


def sample_identity_id(rng: np.random.Generator, split: str, n_identities: int) -> int:
    if split not in SPLITS:  # (no identity would ever be drawn for it)
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    if n_identities < 10:
        raise ValueError(f"need at least 10 identities so every split has some, got {n_identities}")
    while True:
        i = int(rng.integers(n_identities))
        if identity_split(i) == split:
            return i


def identity_voice(identity_id: int, rng: np.random.Generator) -> Voice:
    """The identity's own voice; language and rate vary from clip to clip."""
    own = np.random.default_rng([0x70CE, int(identity_id)])
    return Voice(
        language=LANGUAGES[int(rng.integers(len(LANGUAGES)))],
        variant=_WORLD_VARIANTS[int(own.integers(len(_WORLD_VARIANTS)))],
        pitch=int(own.integers(25, 76)),
        rate=int(rng.integers(140, 196)),
        pitch_range=int(own.integers(30, 81)),
    )


@dataclass
class Clip:
    video: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray  # float32 [T * 640]
    reference: np.ndarray  # uint8 [H, W, 3]
    caption: str
    motion: Motion
    meta: dict = field(default_factory=dict)


def _place_speech(utterance, offset: float, n_samples: int):
    """Speech audio starting at `offset` seconds in a window of n_samples, with shifted phonemes."""
    audio = np.zeros(n_samples, np.float32)
    start = int(round(offset * SAMPLE_RATE))
    if start < n_samples:
        piece = utterance.audio[: n_samples - start]
        audio[start : start + len(piece)] = piece
    end_time = n_samples / SAMPLE_RATE
    phonemes = [
        Phoneme(p.symbol, p.start + offset, min(p.end + offset, end_time))
        for p in utterance.phonemes
        if p.start + offset < end_time
    ]
    words = [w.start + offset for w in utterance.words if w.start + offset < end_time]
    return audio, phonemes, words


def make_clip(
    seed: int,
    index: int,
    split: str | None = None,
    height: int = 64,
    width: int = 64,
    seconds: float = 4.0,
    n_identities: int = 500,
) -> Clip:
    """Clip `index` of the world with `seed` (split defaults to `clip_split(index)`)."""
    split = split or clip_split(index)
    rng = np.random.default_rng([int(seed), int(index), 0xC11])
    identity_id = sample_identity_id(rng, split, n_identities)
    identity = Identity.from_id(identity_id)
    voice = identity_voice(identity_id, rng)
    text = sample_sentence(rng, voice.language, split)
    utterance = synthesize(text, voice)
    n_frames = int(round(seconds * FPS))
    n_samples = n_frames * SAMPLE_RATE // FPS
    offset = float(rng.uniform(0.1, 0.5))
    audio, phonemes, word_starts = _place_speech(utterance, offset, n_samples)
    caption = str(CAPTIONS[int(rng.integers(len(CAPTIONS)))])
    motion = plan_motion(rng, n_frames, phonemes, word_starts, caption, identity.liveliness)
    meta = {
        "index": int(index),
        "seed": int(seed),
        "split": split,
        "identity_id": identity_id,
        "text": text,
        "voice": asdict(voice),
        "speech_offset": offset,
        "phonemes": [(p.symbol, round(p.start, 4), round(p.end, 4)) for p in phonemes],
    }
    return Clip(
        video=render_clip(identity, motion, height, width),
        audio=audio,
        reference=render_reference(identity, height, width),
        caption=caption,
        motion=motion,
        meta=meta,
    )


def make_stream(
    seed: int,
    identity_id: int,
    minutes: float,
    height: int = 64,
    width: int = 64,
    caption: str = "neutral",
    render: bool = True,
) -> Clip:
    """One long take of one identity talking, sentence after sentence with pauses (for drift).
    `render=False`: no video (None), for a caller that renders `motion` a slice at a time."""
    rng = np.random.default_rng([int(seed), int(identity_id), 0x57E])
    identity = Identity.from_id(identity_id)
    split = identity_split(identity_id)
    n_frames = int(round(minutes * 60 * FPS))
    n_samples = n_frames * SAMPLE_RATE // FPS
    audio = np.zeros(n_samples, np.float32)
    phonemes: list[Phoneme] = []
    word_starts: list[float] = []
    voice = identity_voice(identity_id, rng)
    t = float(rng.uniform(0.2, 0.6))
    while t < n_samples / SAMPLE_RATE:
        utterance = synthesize(sample_sentence(rng, voice.language, split), voice)
        piece, ph, ws = _place_speech(utterance, 0.0, len(utterance.audio))
        start = int(round(t * SAMPLE_RATE))
        piece = piece[: max(n_samples - start, 0)]
        audio[start : start + len(piece)] = piece
        phonemes += [Phoneme(p.symbol, p.start + t, p.end + t) for p in ph]
        word_starts += [w + t for w in ws]
        t += utterance.duration + float(rng.uniform(0.3, 1.5))
    motion = plan_motion(rng, n_frames, phonemes, word_starts, caption, identity.liveliness)
    return Clip(
        video=render_clip(identity, motion, height, width) if render else None,
        audio=audio,
        reference=render_reference(identity, height, width),
        caption=caption,
        motion=motion,
        meta={"identity_id": int(identity_id), "seed": int(seed), "split": split, "voice": asdict(voice)},
    )
