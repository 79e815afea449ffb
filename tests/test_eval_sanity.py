"""The evaluators measure what they claim to (bundled checkpoints, fresh test-split clips)."""

import numpy as np
import pytest

from streamgen.data.motion import plan_motion
from streamgen.data.render import Identity, render_frame
from streamgen.data.world import identity_split, make_clip
from streamgen.eval.evaluators import Evaluators
from streamgen.eval.metrics import csim, frechet_distance, sync_scores

SHIFT = 640  # audio samples per video frame


@pytest.fixture(scope="module")
def ev():
    return Evaluators()


@pytest.fixture(scope="module")
def clips():
    return [make_clip(777, i, "test", 64, 64) for i in range(4)]


def _sync(ev, frames, audio):
    return sync_scores(*ev.sync_embeddings(frames, audio))


@pytest.fixture(scope="module")
def truth(ev, clips):
    return [_sync(ev, c.video, c.audio) for c in clips]


def _delayed(audio, k):
    """Audio k frames late (k > 0) or early (k < 0), same length."""
    out = np.zeros_like(audio)
    if k >= 0:
        out[k * SHIFT :] = audio[: len(audio) - k * SHIFT]
    else:
        out[: len(audio) + k * SHIFT] = audio[-k * SHIFT :]
    return out


def test_ground_truth_is_in_sync_and_beats_shuffled_audio(ev, clips, truth):
    shuffled = [_sync(ev, c.video, clips[(i + 1) % len(clips)].audio) for i, c in enumerate(clips)]
    assert all(abs(s["av_offset_frames"]) <= 1 for s in truth)
    assert np.mean([s["sync_c"] for s in truth]) > 2.0 * np.mean([s["sync_c"] for s in shuffled])
    assert np.mean([s["sync_d"] for s in truth]) < np.mean([s["sync_d"] for s in shuffled])


@pytest.mark.parametrize("k", [5, -4, 10])
def test_audio_shift_of_k_frames_is_reported_as_offset_k(ev, clips, truth, k):
    shifted = [_sync(ev, c.video, _delayed(c.audio, k)) for c in clips]
    assert [s["av_offset_frames"] for s in shifted] == [k] * len(clips)
    # read at offset 0 (where ground truth is best) the shifted audio is far off
    at_zero = np.mean([s["curve"][15] for s in shifted])
    assert at_zero - np.mean([s["sync_d"] for s in truth]) > 0.5 * np.mean([s["sync_c"] for s in truth])


def test_silent_audio_has_no_offset_and_real_audio_has(ev, clips, truth):
    # (silence embeds alike at every offset: a flat curve, which read offset -15)
    silent = [_sync(ev, c.video, np.zeros_like(c.audio)) for c in clips]
    assert [s["av_offset_frames"] for s in silent] == [None] * len(clips)
    assert [s["av_offset_frames"] for s in truth] == [0] * len(clips)


def test_csim_same_identity_far_above_other_identity(ev, clips):
    same, other = [], []
    for i, c in enumerate(clips):
        emb, _ = ev.identity_embeddings(c.video)
        own, _ = ev.identity_embeddings(c.reference[None])
        foreign, _ = ev.identity_embeddings(clips[(i + 1) % len(clips)].reference[None])
        same.append(csim(emb, own).mean())
        other.append(csim(emb, foreign).mean())
    assert min(same) > 0.8
    assert np.mean(same) - np.mean(other) > 0.4


def _faces(split, n, seed):
    """One random-pose, random-mouth frame of each of n identities of the split."""
    rng = np.random.default_rng(seed)
    ids = [i for i in range(10 * n + 10) if identity_split(i) == split][:n]
    frames = []
    for i in ids:
        params = plan_motion(rng, 10, caption=("smiling", "serious", "neutral")[i % 3]).frame(
            int(rng.integers(10))
        )
        params["mouth_open"] = float(rng.random())
        frames.append(render_frame(Identity.from_id(i), params, 64, 64))
    return np.stack(frames)


def test_fid_between_splits_far_below_fid_to_noise(ev):
    # many identities per set: with few, FID is dominated by its small-sample bias
    features = lambda frames: ev.identity_embeddings(frames)[1].numpy()
    train, test = features(_faces("train", 200, 0)), features(_faces("test", 200, 1))
    noise = features(np.random.default_rng(0).integers(0, 256, size=(200, 64, 64, 3), dtype=np.uint8))
    assert frechet_distance(train, test) < 0.1 * frechet_distance(test, noise)
