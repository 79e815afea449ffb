"""Metrics on evaluator outputs and raw frames (numpy / torch, no training here).

Sync (as in the SyncNet evaluation protocol): for every offset o in [-15, 15] frames,
the mean over video windows t of dist(video_t, audio_{t+o}); Sync-D is the minimum of
that curve, Sync-C its median minus its minimum, and the A/V offset is the o at the
minimum (None, "no sync", where the minimum is no peak above the curve's noise on both sides of
it, as at an edge of the offsets: `has_peak`).
Sign: o = +k means the audio runs k frames late (the sound of frame t is heard at frame t + k);
ground truth is 0.

CSIM: mean cosine similarity of each generated frame's identity embedding to the
reference image's.

Frechet distance between Gaussians fitted to two feature sets (FID on per-frame
identity features; FVD on clip-level features).

Drift: a least-squares slope per minute of a per-frame series (CSIM, mean colour).
Detectors: black frames (mean luma < 16/255 with little texture), frozen frames (no
pixel moved by more than 1 level from the previous frame), flicker (the frame's mean
luma jumps away from both neighbours in opposite directions by > 12 levels).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from .evaluators import MAX_OFFSET

# how far the curve's minimum must stand below its median, in its noise's standard deviations, to be
# a peak: the minimum of 31 offsets of white noise is about 2 sigma down, 5 in well under 1% of curves;
# the bundled evaluators' in-sync clips stand 10-31 down (10 test and 10 train clips)
PEAK_SIGMAS = 5.0


def sync_scores(video_emb: torch.Tensor, audio_emb: torch.Tensor) -> dict:
    """video_emb [N, D], audio_emb [2*MAX_OFFSET+1, N, D] -> Sync-D, Sync-C, offset, curve.
    The offset is None ("no sync") where the curve has no peak above its noise: a flat curve
    (silent audio, a still mouth) read the first offset searched, -15, as the argmin of equal values,
    and one that only rises or falls over the offsets read the edge, -15 or +15."""
    dists = (audio_emb - video_emb[None]).norm(dim=-1).mean(dim=1).numpy().astype(np.float64)
    best = int(np.argmin(dists))
    return {
        "sync_d": float(dists[best]),
        "sync_c": float(np.median(dists) - dists[best]),
        "av_offset_frames": best - MAX_OFFSET if has_peak(dists) else None,
        "curve": dists.tolist(),
    }


def has_peak(curve: np.ndarray) -> bool:
    """Whether the curve's minimum stands PEAK_SIGMAS of its noise below the curve on both sides of
    it (the median of each side's values): a minimum at an edge of the offsets searched, or on the
    slope of a curve that only rises or falls, is no peak (such a curve read -15 or +15, the edge,
    or an offset next to it, as the A/V offset; nothing beyond the edge shows the curve rising
    again). The noise is the robust spread (1.4826 MAD) of its second differences over sqrt(6): a
    smooth curve's trend and its one dip leave it alone, white noise of sigma gives sigma.
    Differences within float rounding of the curve's level are no peak."""
    curve = np.asarray(curve, np.float64)
    best = int(np.argmin(curve))
    before, after = curve[:best], curve[best + 1 :]
    if not len(before) or not len(after):
        return False
    depth = min(np.median(before), np.median(after)) - curve[best]
    bends = np.diff(curve, 2)
    noise = 1.4826 * np.median(np.abs(bends - np.median(bends))) / np.sqrt(6) if len(bends) else 0.0
    return bool(depth > PEAK_SIGMAS * noise and depth > 1e-6 * max(np.abs(curve).max(), 1e-30))


def csim(frame_emb: torch.Tensor, reference_emb: torch.Tensor) -> np.ndarray:
    """Per-frame cosine similarity to the reference, [T]."""
    return (frame_emb @ reference_emb.reshape(-1)).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, F] and b [M, F]:
    |mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A B)^1/2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Frechet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * _trace_sqrt_product(cov_a, cov_b)
    return float(max(value, 0.0))


def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((A B)^1/2) of two covariances, as the sum of the square roots of the eigenvalues of
    A^1/2 B A^1/2 (the same eigenvalues as A B, of a symmetric positive semi-definite matrix):
    exact for singular covariances (a constant set's is 0), where sqrtm of the product needed an eps
    added to both, which went into this term and not into the traces (FID to a constant set read
    2 sqrt(eps) tr(A^1/2) low)."""
    w, u = linalg.eigh(cov_a)
    root_a = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    middle = root_a @ cov_b @ root_a
    return float(np.sqrt(np.clip(linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())


def clip_features(frame_features: np.ndarray, sync_video_emb: np.ndarray) -> np.ndarray:
    """One vector per clip for the FVD analogue: appearance (mean identity features) and
    motion (temporal std of identity features and of mouth-window embeddings)."""
    return np.concatenate(
        [frame_features.mean(0), frame_features.std(0), np.asarray(sync_video_emb).std(0) * 4]
    )


def slope_per_minute(values: np.ndarray, fps: int = 25) -> float:
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return 0.0
    t = np.arange(len(values)) / fps / 60.0
    return float(np.polyfit(t, values, 1)[0])


def luma(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, H, W] float luma in 0..255."""
    return frames[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def black_frames(frames: np.ndarray) -> np.ndarray:
    y = luma(frames)
    return (y.mean(axis=(1, 2)) < 16) & (y.std(axis=(1, 2)) < 8)


def frozen_frames(frames: np.ndarray) -> np.ndarray:
    """True for frames identical (within 1 level) to the previous frame; frame 0 is never frozen."""
    out = np.zeros(len(frames), bool)
    if len(frames) > 1:
        diff = np.abs(frames[1:].astype(np.int16) - frames[:-1].astype(np.int16)).max(axis=(1, 2, 3))
        out[1:] = diff <= 1
    return out


def flicker_frames(frames: np.ndarray, threshold: float = 12.0) -> np.ndarray:
    return flicker_from_means(luma(frames).mean(axis=(1, 2)), threshold)


def flicker_from_means(m: np.ndarray, threshold: float = 12.0) -> np.ndarray:
    """`flicker_frames` from the frames' mean luma [T] (a stream's, gathered chunk by chunk)."""
    out = np.zeros(len(m), bool)
    if len(m) > 2:
        before, after = m[1:-1] - m[:-2], m[1:-1] - m[2:]
        out[1:-1] = (
            (np.abs(before) > threshold) & (np.abs(after) > threshold) & (np.sign(before) == np.sign(after))
        )
    return out


def colour_stats(frames: np.ndarray) -> np.ndarray:
    """Per-frame mean R, G, B and luma std, [T, 4], in 0..255."""
    means = frames.reshape(len(frames), -1, 3).mean(1)
    return np.concatenate([means, luma(frames).std(axis=(1, 2))[:, None]], axis=1)


class StreamScores:
    """A stream scored chunk by chunk, the frames dropped as they are scored: per-frame CSIM to the
    reference and colour statistics, and the detectors' counts as over the whole stream (the frozen
    detector from frame `lead` on: the frames a 1 + 4k stream holds before its first are copies)."""

    def __init__(self, evaluators, reference: np.ndarray, lead: int = 0):
        self.ev, self.lead = evaluators, lead
        self.reference = evaluators.identity_embeddings(reference[None])[0]
        self.csim, self.colour, self.means = [], [], []
        self.black = self.frozen = self.seen = 0
        self.previous = None  # the last frame scored for frozen (from `lead` on)
        self.last = None  # the last frame scored (a resumed stream made again is checked against it)

    def add(self, frames: np.ndarray) -> None:
        emb, _ = self.ev.identity_embeddings(frames)
        self.csim.append(csim(emb, self.reference))
        self.colour.append(colour_stats(frames))
        self.means.append(luma(frames).mean(axis=(1, 2)))
        self.black += int(black_frames(frames).sum())
        held = frames[max(0, self.lead - self.seen) :]
        if len(held):
            if self.previous is not None:
                held = np.concatenate([self.previous, held])
            # (the first is the previous chunk's last: frozen_frames never counts a first frame)
            self.frozen += int(frozen_frames(held).sum())
            self.previous = held[-1:]
        self.last = frames[-1:]
        self.seen += len(frames)  # (last: `state` takes an add cut short before this for none)

    def state(self) -> dict | None:
        """What it has scored so far, as arrays (kept in partial/ for a stopped stream to go on
        from, `restore`); None before the first frame, or where an add was cut short midway (a
        Ctrl-C): its lists and counts are not of the same frames."""
        lists = (self.csim, self.colour, self.means)
        if not self.seen or any(sum(len(a) for a in part) != self.seen for part in lists):
            return None
        return {
            "seen": np.array(self.seen), "lead": np.array(self.lead),
            "csim": np.concatenate(self.csim), "colour": np.concatenate(self.colour),
            "means": np.concatenate(self.means), "black": np.array(self.black),
            "frozen": np.array(self.frozen), "last": self.last,
            "previous": self.previous if self.previous is not None else self.last[:0],
        }  # fmt: skip

    def restore(self, state: dict) -> bool:
        """Go on from a `state` of the same stream (False, and nothing changed, where it is not
        one: another lead, or arrays of other lengths)."""
        try:
            seen, lead = int(state["seen"]), int(state["lead"])
            lists = [state["csim"], state["colour"], state["means"]]
            if lead != self.lead or seen < 1 or any(len(a) != seen for a in lists) or len(state["last"]) != 1:
                return False
            previous = state["previous"] if len(state["previous"]) else None
            black, frozen, last = int(state["black"]), int(state["frozen"]), state["last"]
        except (KeyError, TypeError, ValueError):
            return False
        self.csim, self.colour, self.means = [[a] for a in lists]
        self.black, self.frozen, self.seen, self.previous, self.last = black, frozen, seen, previous, last
        return True

    def result(self) -> dict:
        means = np.concatenate(self.means)
        return {
            "csim": np.concatenate(self.csim),
            "colour": np.concatenate(self.colour),
            "counts": np.array([self.black, self.frozen, int(flicker_from_means(means).sum())]),
        }
