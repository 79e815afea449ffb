"""Motion of the avatar world: per-frame face parameters from phonemes, caption and chance.

Everything here produces a `Motion`: arrays of length T (one value per video frame at
25 fps) that the renderer draws and that the dataset stores as ground truth:

    mouth_open   0 (closed) .. 1 (wide open)
    mouth_width  0 (pursed) .. 1 (spread)
    mouth_round  0 .. 1 (lip rounding, as in "oo")
    yaw, pitch, roll   head pose in radians (yaw > 0: turned to the viewer's right,
                       pitch > 0: chin down)
    blink        0 (eyes open) .. 1 (closed)
    brow         0 neutral, > 0 raised, < 0 lowered
    smile        -1 (frown) .. 1 (broad smile)
    gaze_x, gaze_y  iris offset, in fractions of the eye size

The mouth follows phoneme -> viseme targets blended with Cohen-Massaro style
dominance functions (co-articulation): every phoneme pulls the mouth towards its
target with a weight that decays with distance in time from its centre; bilabials
(p, b, m) dominate strongly so the lips really close. Frame f shows time f / fps,
with no lead or lag, so ground-truth clips are in sync by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

FPS = 25
EXPRESSIONS = ("neutral", "smiling", "serious", "surprised", "nodding")

# viseme targets: (open, width, round, dominance strength)
_REST = (0.0, 0.5, 0.0)
_VISEMES: dict[str, tuple[float, float, float, float]] = {}


def _add(chars: str, target: tuple[float, float, float, float]) -> None:
    for c in chars:
        _VISEMES[c] = target


_add("pbm", (0.0, 0.45, 0.0, 6.0))
_add("fv", (0.08, 0.5, 0.0, 3.0))
_add("θð", (0.18, 0.55, 0.0, 1.5))
_add("tdnlszɹrɾɫɬ", (0.2, 0.55, 0.0, 1.0))
_add("ʃʒɕʑ", (0.15, 0.3, 0.7, 2.0))
_add("kgŋxhɣχʁqɡç", (0.3, 0.5, 0.0, 0.6))
_add("w", (0.1, 0.2, 1.0, 3.0))
_add("jʝ", (0.2, 0.65, 0.0, 1.0))
_add("aɑæʌɐäɒ", (0.95, 0.6, 0.0, 1.0))
_add("eɛ", (0.55, 0.72, 0.0, 1.0))
_add("iɪɨ", (0.3, 0.85, 0.0, 1.0))
_add("yʏ", (0.3, 0.3, 0.9, 1.0))
_add("oɔ", (0.6, 0.35, 0.8, 1.0))
_add("uʊɯ", (0.3, 0.22, 1.0, 1.0))
_add("əɜɚɘ", (0.45, 0.55, 0.0, 0.8))
_add("øœ", (0.45, 0.35, 0.8, 1.0))
_VOWELS = set("aɑæʌɐäɒeɛiɪɨyʏoɔuʊɯəɜɚɘøœ")
_IGNORED = set("ˈˌːˑ̃ ̩̯͡‿-")


@dataclass
class Motion:
    mouth_open: np.ndarray
    mouth_width: np.ndarray
    mouth_round: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    blink: np.ndarray
    brow: np.ndarray
    smile: np.ndarray
    gaze_x: np.ndarray
    gaze_y: np.ndarray

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def __len__(self) -> int:
        return len(self.mouth_open)

    def as_array(self) -> np.ndarray:
        """[T, K] float32 in the order of `names()`."""
        return np.stack([getattr(self, n) for n in self.names()], axis=1).astype(np.float32)

    @classmethod
    def from_array(cls, array: np.ndarray) -> Motion:
        return cls(*[np.asarray(array[:, i], np.float32) for i in range(array.shape[1])])

    def frame(self, t: int) -> dict[str, float]:
        return {n: float(getattr(self, n)[t]) for n in self.names()}

    def slice(self, start: int, stop: int) -> Motion:
        return Motion(*[getattr(self, n)[start:stop] for n in self.names()])


def expression_of(caption: str | None) -> str:
    """The expression keyword found in a free-text caption ("neutral" when none)."""
    text = (caption or "").lower()
    for name, keys in (
        ("smiling", ("smil", "happy", "cheer")),
        ("serious", ("serious", "stern", "frown")),
        ("surprised", ("surpris", "astonish", "amazed")),
        ("nodding", ("nod",)),
    ):
        if any(k in text for k in keys):
            return name
    return "neutral"


def viseme_segments(phonemes) -> list[tuple[float, float, tuple[float, float, float], float]]:
    """Phonemes (symbol, start, end) -> viseme segments (start, end, target, dominance).

    Multi-vowel symbols (diphthongs like "aɪ") are split into equal parts so the mouth
    glides from one vowel to the next; unknown symbols fall back to a neutral mid shape.
    """
    segments = []
    for p in phonemes:
        symbol, start, end = p.symbol, p.start, p.end
        if symbol == "_" or end <= start:
            segments.append((start, end, _REST, 0.8))
            continue
        chars = [c for c in symbol if c not in _IGNORED]
        vowels = [c for c in chars if c in _VOWELS]
        if len(vowels) >= 2:
            step = (end - start) / len(vowels)
            for i, v in enumerate(vowels):
                o, w, r, dom = _VISEMES[v]
                segments.append((start + i * step, start + (i + 1) * step, (o, w, r), dom))
            continue
        target = None
        for c in chars:
            if c in _VISEMES:
                target = _VISEMES[c]
                break
        if target is None:
            target = (0.3, 0.5, 0.0, 0.5)
        segments.append((start, end, target[:3], target[3]))
    return segments


def mouth_curves(phonemes, n_frames: int, fps: int = FPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Co-articulated (open, width, round) per frame."""
    t = np.arange(n_frames) / fps
    segments = viseme_segments(phonemes)
    # a weak, always-present rest target so silence far from speech relaxes the mouth
    num = np.tile(np.array(_REST)[:, None] * 0.05, (1, n_frames))
    den = np.full(n_frames, 0.05)
    for start, end, target, strength in segments:
        centre = 0.5 * (start + end)
        half = max(0.5 * (end - start), 0.02)
        # only frames within 0.6 s matter (exp(-15) beyond), which keeps long streams linear in time
        lo, hi = max(int((start - 0.6) * fps), 0), min(int((end + 0.6) * fps) + 1, n_frames)
        if lo >= hi:
            continue
        # dominance: flat over the segment, exponential fall-off outside it (~ 40 ms scale)
        dist = np.maximum(np.abs(t[lo:hi] - centre) - half * 0.5, 0.0)
        dominance = strength * np.exp(-dist / 0.04)
        num[:, lo:hi] += np.array(target)[:, None] * dominance
        den[lo:hi] += dominance
    out = num / den
    return out[0].astype(np.float32), out[1].astype(np.float32), out[2].astype(np.float32)


def smooth_noise(rng: np.random.Generator, n: int, fps: int, amplitude: float, max_hz: float) -> np.ndarray:
    """A smooth random signal: a few sinusoids with random frequency and phase."""
    t = np.arange(n) / fps
    out = np.zeros(n)
    for _ in range(4):
        freq = rng.uniform(0.05, max_hz)
        out += rng.normal() * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    return (amplitude * out / 2.0).astype(np.float32)


def blink_curve(rng: np.random.Generator, n: int, fps: int, rate_hz: float = 0.3) -> np.ndarray:
    """Blinks at random times: close in ~70 ms, hold ~40 ms, open in ~130 ms."""
    t = np.arange(n) / fps
    out = np.zeros(n)
    when = rng.uniform(0.2, 1.5)
    while when < n / fps:
        rel = t - when
        closing = np.clip((rel + 0.07) / 0.07, 0, 1) * (rel < 0)
        opening = np.clip(1 - (rel - 0.04) / 0.13, 0, 1) * (rel >= 0)
        out = np.maximum(out, closing + opening)
        when += max(0.6, rng.exponential(1.0 / rate_hz))
    return out.astype(np.float32)


def bumps(times, n: int, fps: int, width: float, heights) -> np.ndarray:
    t = np.arange(n) / fps
    out = np.zeros(n)
    for when, h in zip(times, heights):
        out += h * np.exp(-0.5 * ((t - when - width) / width) ** 2)
    return out.astype(np.float32)


def plan_motion(
    rng: np.random.Generator,
    n_frames: int,
    phonemes=(),
    word_starts=(),
    caption: str | None = None,
    liveliness: float = 1.0,
    fps: int = FPS,
) -> Motion:
    """Per-frame face parameters for one clip (or one long stream)."""
    expression = expression_of(caption)
    n = n_frames
    open_, width, round_ = mouth_curves(phonemes, n, fps)
    yaw = smooth_noise(rng, n, fps, 0.12 * liveliness, 0.4)
    pitch = smooth_noise(rng, n, fps, 0.06 * liveliness, 0.5)
    roll = smooth_noise(rng, n, fps, 0.05 * liveliness, 0.3)
    # speakers bob their head a little on stressed words
    emphasis = [w for w in word_starts if rng.random() < 0.35]
    pitch += bumps(emphasis, n, fps, 0.12, rng.uniform(0.02, 0.05, len(emphasis)) * liveliness)
    brow = bumps(emphasis, n, fps, 0.15, rng.uniform(0.2, 0.6, len(emphasis)))
    smile = np.full(n, 0.1, np.float32) + smooth_noise(rng, n, fps, 0.1, 0.2)
    if expression == "smiling":
        smile += 0.7
    elif expression == "serious":
        smile -= 0.4
        brow -= 0.5
    elif expression == "surprised":
        brow += 0.8
        open_ = np.maximum(open_, 0.15)
        smile -= 0.1
    elif expression == "nodding":
        t = np.arange(n) / fps
        pitch += 0.12 * np.sin(2 * np.pi * rng.uniform(1.2, 1.8) * t).astype(np.float32)
    blink = blink_curve(rng, n, fps)
    gaze_x = smooth_noise(rng, n, fps, 0.15, 0.3)
    gaze_y = smooth_noise(rng, n, fps, 0.08, 0.3)
    f32 = lambda a: np.asarray(a, np.float32)
    return Motion(
        mouth_open=f32(np.clip(open_, 0, 1)),
        mouth_width=f32(np.clip(width + 0.15 * np.clip(smile, 0, 1), 0, 1)),
        mouth_round=f32(round_),
        yaw=f32(yaw),
        pitch=f32(pitch),
        roll=f32(roll),
        blink=f32(blink),
        brow=f32(np.clip(brow, -1, 1.5)),
        smile=f32(np.clip(smile, -1, 1)),
        gaze_x=f32(gaze_x),
        gaze_y=f32(gaze_y),
    )


def neutral_motion(n_frames: int = 1) -> Motion:
    """Frontal, eyes open, mouth closed: the pose of reference images."""
    z = np.zeros(n_frames, np.float32)
    return Motion(z, z + 0.5, z, z, z, z, z, z, z + 0.1, z, z)
