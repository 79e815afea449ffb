import numpy as np
import pytest
import torch

from streamgen.eval.evaluators import EvaluatorError, Evaluators, log_mel, mel_windows
from streamgen.eval.metrics import (
    black_frames,
    flicker_frames,
    frechet_distance,
    frozen_frames,
    has_peak,
    slope_per_minute,
    sync_scores,
)


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    assert frechet_distance(a, b) < 0.05
    shifted = b + np.array([2.0, 0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=0.05)
    wide = b * 3  # per dimension (3 - 1)^2 = 4
    assert frechet_distance(a, wide) == pytest.approx(16.0, rel=0.1)


def test_frechet_distance_to_a_constant_set_is_the_closed_form():
    # a constant set's covariance is 0, so the cross term vanishes: |mu_a - c|^2 + tr(cov_a), exactly
    # (the stabilising eps went into the square root's product only, and took 2 sqrt(eps) tr(sqrt(cov_a))
    # off it: 0.1-0.2% here)
    rng = np.random.default_rng(2)
    a = rng.normal(size=(500, 6)) * np.array([0.5, 1, 1, 2, 3, 0.7])
    constant = np.tile(np.array([1.0, -2, 0, 0.5, 3, 1]), (50, 1))
    expected = ((a.mean(0) - constant[0]) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, constant) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(constant, a) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(constant, constant + 1.0) == pytest.approx(6.0, rel=1e-9)


def test_frechet_distance_of_a_scaled_set_is_the_closed_form():
    # b = 3a + s: cov_b = 9 cov_a, sqrt(cov_a cov_b) = 3 cov_a, so FD = |mu_a - mu_b|^2 + 4 tr(cov_a)
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))  # correlated features
    b = 3 * a + np.array([1.0, 0, -1, 2, 0])
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + 4 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_sync_scores_find_the_offset_of_synthetic_embeddings():
    torch.manual_seed(0)
    n, d, k = 60, 16, 4
    stream = torch.nn.functional.normalize(torch.randn(n + 40, d), dim=-1)
    video = stream[20 : 20 + n]
    # audio embeddings for offsets -15..15: audio window t+o shows stream[20 + t + o - k]
    audio = torch.stack([stream[20 + o - k : 20 + o - k + n] for o in range(-15, 16)])
    scores = sync_scores(video, audio)
    assert scores["av_offset_frames"] == k and scores["sync_d"] < 1e-5 and scores["sync_c"] > 1.0


def test_a_flat_sync_curve_has_no_offset():
    # the same audio embedding at every offset (silent audio, a still mouth): equal distances, whose
    # argmin was the first offset searched, -15
    torch.manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(60, 16), dim=-1)
    audio = torch.nn.functional.normalize(torch.randn(60, 16), dim=-1)
    scores = sync_scores(video, audio[None].expand(31, -1, -1))
    assert scores["av_offset_frames"] is None and scores["sync_c"] == pytest.approx(0, abs=1e-6)


def test_a_sync_curve_of_noise_alone_has_no_offset_and_a_dip_in_it_has():
    rng = np.random.default_rng(4)
    for _ in range(20):
        noise = 1.2 + 0.02 * rng.normal(size=31)
        assert not has_peak(noise)
        dipped = noise.copy()
        dipped[18] -= 0.25  # a narrow dip, of an in-sync clip's depth in its curve's noise
        assert has_peak(dipped)
    # a smooth curve's trend is no noise: its one minimum is a peak
    assert has_peak(np.abs(np.arange(31) - 20) * 0.01 + 1.0)


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_a_sync_curve_that_only_rises_or_falls_has_no_offset(direction):
    """A curve whose minimum is at an edge of the offsets searched (it only rises, or only falls,
    over them) read that edge, -15 or +15, as the A/V offset, as if it were a peak, and a noisy one
    an offset next to the edge: nothing beyond the edge shows the curve rising again. A dip near
    the edge, with the curve on both sides of it, is still a peak."""
    trend = np.linspace(1.0, 1.3, 31)
    if direction == "falling":
        trend = trend[::-1].copy()
    # embeddings whose distance moves steadily with the offset: the audio drifting away from the video
    video = torch.zeros(60, 16)
    audio = torch.zeros(31, 60, 16)
    audio[:, :, 0] = torch.from_numpy(trend)[:, None]
    scores = sync_scores(video, audio)
    assert scores["curve"] == pytest.approx(trend.tolist()) and scores["av_offset_frames"] is None
    rng = np.random.default_rng(6)
    edge = 0 if direction == "rising" else 30
    for _ in range(20):
        noisy = trend + 0.01 * rng.normal(size=31)
        assert not has_peak(noisy)
        dipped = noisy.copy()
        dipped[abs(edge - 2)] -= 0.25
        assert has_peak(dipped)


def test_detectors_on_made_up_frames():
    rng = np.random.default_rng(1)
    frames = rng.integers(60, 200, size=(10, 16, 16, 3), dtype=np.uint8)
    frames[3] = 0  # black
    frames[6] = frames[5]  # frozen
    frames[8] = np.clip(frames[8].astype(int) + 60, 0, 255)  # one bright flash
    assert np.flatnonzero(black_frames(frames)).tolist() == [3]
    assert np.flatnonzero(frozen_frames(frames)).tolist() == [6]
    flicker = np.flatnonzero(flicker_frames(frames)).tolist()
    assert 8 in flicker and 3 in flicker and 5 not in flicker


def test_slope_per_minute():
    values = 0.9 - 0.1 * np.arange(1500) / 1500  # loses 0.1 over one minute at 25 fps
    assert slope_per_minute(values) == pytest.approx(-0.1, rel=0.01)


def test_audio_windows_are_silent_outside_the_clip():
    audio = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    mel = log_mel(audio, 25)
    assert mel.shape == (40, 100)
    windows = mel_windows(mel, torch.tensor([0, -10, 30]))
    assert windows.shape == (3, 1, 40, 20)
    assert windows[1].max() == windows[1].min()  # entirely before the clip: silence
    assert windows[0].std() > 0.1


def test_missing_evaluator_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluatorError, match="missing evaluator checkpoint .*syncnet.safetensors"):
        Evaluators(tmp_path)
    (tmp_path / "syncnet.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluatorError, match="unreadable evaluator checkpoint"):
        Evaluators(tmp_path)


def test_the_reported_offset_is_one_some_clip_had():
    from streamgen.eval.report import median_offset

    assert median_offset([-3, 4]) == -3 and median_offset([2, 0, 1]) == 1 and median_offset([1, 1, 5, 5]) == 1
    # clips with no sync (None) are left out, and of none with one there is none
    assert median_offset([None, 3, None, -1, 2]) == 2 and median_offset([None, None]) is None


def test_an_evaluator_checkpoint_whose_config_does_not_make_its_network_is_one_line(tmp_path):
    """Its config missing, not JSON or naming other settings were tracebacks (KeyError,
    JSONDecodeError, TypeError); weights of another shape (evaluators of another version) were
    torch's message of a line per tensor."""
    import json

    from safetensors.torch import load_file, save_file

    from streamgen.eval.evaluators import DEFAULT_DIR, load_checkpoint

    state = load_file(str(DEFAULT_DIR / "syncnet.safetensors"))
    for meta, says in (
        ({"kind": "syncnet"}, "has no config"),
        ({"kind": "syncnet", "config": "{dim"}, "config is not"),
        ({"kind": "syncnet", "config": json.dumps({"dim": 64, "depth": 3})}, "config is not"),
        ({"kind": "syncnet", "config": json.dumps({"dim": 32, "width": 16})}, "does not fit its config"),
    ):
        path = tmp_path / "syncnet.safetensors"
        save_file(state, str(path), metadata=meta)
        with pytest.raises(EvaluatorError, match=says) as error:
            load_checkpoint(path, "syncnet")
        assert str(path) in str(error.value) and len(str(error.value).splitlines()) == 1, error.value


def test_evaluators_given_a_checkpoint_file_instead_of_its_folder_say_so(tmp_path):
    """It said the file/syncnet.safetensors was missing and to train the evaluators."""
    from streamgen.eval.evaluators import DEFAULT_DIR

    with pytest.raises(EvaluatorError, match="is a file, not the folder of the evaluator checkpoints"):
        Evaluators(DEFAULT_DIR / "syncnet.safetensors")


def test_a_stream_scored_chunk_by_chunk_scores_as_the_whole_stream():
    """The --minutes stream was held whole to be scored (10x its frames' bytes for a student's: an
    hour at 128x128 was refused); chunk by chunk, each detector and series comes out the same,
    across chunk boundaries (a frozen frame, a flicker) and the frames held before a 1 + 4k stream."""
    from streamgen.eval.evaluators import Evaluators
    from streamgen.eval.metrics import (
        StreamScores,
        black_frames,
        colour_stats,
        csim,
        flicker_frames,
        frozen_frames,
    )

    rng = np.random.default_rng(0)
    frames = rng.integers(40, 200, (40, 32, 32, 3), dtype=np.uint8)
    frames[:3] = frames[3]  # held before the first frame (lead 3): not frozen
    frames[9] = frames[8]  # frozen across the boundary of two chunks (8 | 9)
    frames[20] = 0  # black, and a flicker at a boundary (20 | 21)
    frames[21] = 255
    frames[30:33] = frames[29]  # frozen inside a chunk
    ev = Evaluators()
    reference = frames[5]
    scores = StreamScores(ev, reference, lead=3)
    for start, end in ((0, 2), (2, 9), (9, 21), (21, 33), (33, 40)):
        scores.add(frames[start:end])
    got = scores.result()
    emb, _ = ev.identity_embeddings(frames)
    np.testing.assert_allclose(got["csim"], csim(emb, ev.identity_embeddings(reference[None])[0]), atol=1e-5)
    np.testing.assert_array_equal(got["colour"], colour_stats(frames))
    whole = [black_frames(frames).sum(), frozen_frames(frames[3:]).sum(), flicker_frames(frames).sum()]
    assert got["counts"].tolist() == [int(n) for n in whole] and whole[1] == 4 and whole[2] >= 1
    # stopped after any chunk and restored (from its state, kept in partial/), the same counts
    for stop in (1, 2, 3):
        first = StreamScores(ev, reference, lead=3)
        bounds = ((0, 2), (2, 9), (9, 21), (21, 33), (33, 40))
        for start, end in bounds[:stop]:
            first.add(frames[start:end])
        again = StreamScores(ev, reference, lead=3)
        assert again.restore(first.state()) and again.seen == bounds[stop - 1][1]
        for start, end in bounds[stop:]:
            again.add(frames[start:end])
        resumed = again.result()
        assert resumed["counts"].tolist() == got["counts"].tolist()
        np.testing.assert_array_equal(resumed["csim"], got["csim"])
    # an add cut short (a Ctrl-C inside it) has no state to go on from; another lead's is refused
    first.csim.append(first.csim[-1])
    assert first.state() is None and not StreamScores(ev, reference, lead=0).restore(scores.state())


def test_a_report_without_an_offset_says_no_sync():
    """A report whose clips had no sync peak (av_offset_frames null) is said so, not "None"."""
    from streamgen.eval.cli import _summary_value
    from streamgen.eval.outputs import markdown

    report = {"model": "m", "split": "test", "clips": 2, "size": 64, "drift_source": "mean over clips",
              **dict.fromkeys(["sync_c", "sync_d", "csim", "fid", "fvd", "drift_slope", "colour_drift_slope",
                               "seconds", "wall_seconds"], 0.5),
              **dict.fromkeys(["black_frames", "frozen_frames", "flicker_frames"], 0), "av_offset_frames": None}  # fmt: skip
    assert "| av_offset_frames | no sync |" in markdown(report)
    assert _summary_value("av_offset_frames", None) == "none (no sync)" and _summary_value("fvd", None) == "None"
    assert _summary_value("av_offset_frames", 3) == "3" and _summary_value("csim", 0.25) == "0.250"
