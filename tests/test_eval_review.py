"""Hand checks of eval's measurements on inputs whose answer is known."""

import numpy as np
import pytest

from streamgen.eval.evaluators import HOP, log_mel


@pytest.mark.parametrize("m", [3, 6, 40])
def test_a_mel_frame_is_centred_where_log_mel_says(m):
    # a click halfway between the centres log_mel gives frames m and m + 1 lands in both alike, and
    # a click at a centre in that frame more than its neighbours
    centre = m * HOP + 96
    audio = np.zeros(16000, np.float32)
    audio[centre + HOP // 2] = 1.0
    energy = log_mel(audio, 25).exp().sum(0).numpy()
    assert energy[m] == pytest.approx(energy[m + 1], rel=1e-4)
    audio[:] = 0
    audio[centre] = 1.0
    energy = log_mel(audio, 25).exp().sum(0).numpy()
    assert energy[m] > 1.5 * max(energy[m - 1], energy[m + 1])
    assert energy[m - 1] == pytest.approx(energy[m + 1], rel=1e-4)


class SlowClips:
    """A clock that the clips' making moves on (`seconds_a_clip` each): the seconds a run takes,
    whatever the machine."""

    def __init__(self, monkeypatch, seconds_a_clip: float, seconds_a_stream: float):
        from types import SimpleNamespace

        from streamgen.data import world
        from streamgen.eval import report
        from tests.test_eval_resume import small_clip

        self.now = 0.0
        real_stream = world.make_stream

        def make_clip(*args):
            self.now += seconds_a_clip
            return small_clip(*args)

        def make_stream(*args, **kwargs):
            self.now += seconds_a_stream
            return real_stream(*args, **kwargs)

        monkeypatch.setattr(world, "make_clip", make_clip)
        monkeypatch.setattr(world, "make_stream", make_stream)
        monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: self.now))


def test_wall_seconds_counts_the_measurements_kept_from_an_earlier_run(tmp_path, monkeypatch):
    # each clip makes two (its own and the real set's draw): 200 s; the stream 50 s. A run of more
    # clips into a finished one's --out reported the seconds of its new clip alone (200, not 650)
    import json

    from streamgen.cli import main

    SlowClips(monkeypatch, 100.0, 50.0)
    argv = ["eval", "--model", "ground-truth", "--size", "32", "--minutes", "0.02", "--out", str(tmp_path)]
    assert main([*argv, "--clips", "2"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["wall_seconds"] == 450
    assert main([*argv, "--clips", "3"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["wall_seconds"] == 650


def test_wall_seconds_counts_a_stopped_streams_time_on_the_frames_it_kept(tmp_path, monkeypatch):
    # stopped once its first frames' scores were kept (50 s in), the stream is made again: 50 s more
    import json

    from streamgen.cli import main
    from streamgen.eval import drift
    from tests.test_eval_resume import stopped_after_saving

    monkeypatch.setattr(drift, "STREAM_SLICE", 8)
    monkeypatch.setattr(drift, "STREAM_KEEP_FRAMES", 16)
    SlowClips(monkeypatch, 100.0, 50.0)
    argv = ["eval", "--model", "ground-truth", "--size", "32", "--minutes", "0.02", "--out", str(tmp_path)]
    with stopped_after_saving(monkeypatch, "stream-0.02-so-far"):
        assert main([*argv, "--clips", "2"]) != 0
    assert main([*argv, "--clips", "2"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["wall_seconds"] == 500
