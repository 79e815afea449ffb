"""`streamgen eval` stopped midway and run again goes on from the clips it had scored (kept in
OUT/partial), to the same report; a finished evaluation run again measures nothing."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from streamgen.cli import main
from streamgen.data import world
from streamgen.eval import partial


def small_clip(seed, index, split, height, width, *args):
    """A 12-frame clip of its own for (seed, index): the evaluation's arithmetic, in a moment."""
    rng = np.random.default_rng([seed, index])
    video = rng.integers(0, 256, (12, height, width, 3), dtype=np.uint8)
    audio = rng.standard_normal(12 * 640).astype(np.float32) * 0.1
    return world.Clip(video, audio, video[0].copy(), "neutral", None, {"identity_id": index})


@pytest.fixture
def made(monkeypatch):
    """The (seed, index) of every clip made."""
    calls = []

    def make_clip(seed, index, *args):
        calls.append((seed, index))
        return small_clip(seed, index, *args)

    # (shards binds world's make_clip as it is imported: first imported under this stand-in, it
    # kept it for the rest of the worker's tests, and test_files' latent caches got clips of None)
    import streamgen.data.shards  # noqa: F401

    monkeypatch.setattr(world, "make_clip", make_clip)
    return calls


def evaluate(out, *extra):
    return main(
        ["eval", "--model", "ground-truth", "--clips", "3", "--size", "32", "--out", str(out), *extra]
    )


@pytest.fixture(scope="module")
def whole_report(tmp_path_factory):
    """The report of `evaluate(OUT, *extra)` never stopped (with `made`'s clips), by `extra`, made
    once for the module: the tests that stop an evaluation each made the same one whole first. Into
    one folder, as a test did for its two (the second goes on from the first's clips)."""
    import streamgen.data.shards  # noqa: F401  (see `made`)

    out = tmp_path_factory.mktemp("whole")
    reports = {}

    def report(*extra: str) -> dict:
        if extra not in reports:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(world, "make_clip", small_clip)
                assert evaluate(out, *extra) == 0
            reports[extra] = json.loads((out / "report.json").read_text())
        return reports[extra]

    return report


def without_wall_time(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "wall_seconds"}


@contextmanager
def stopped_after_saving(monkeypatch, clip: str | None = None):
    """A Ctrl-C (KeyboardInterrupt) once `clip`'s results are saved in partial/ (any one's where
    None) inside the block; saved as usual after it."""
    real_save = partial.Measured.save

    def stopped(self, name, arrays):
        real_save(self, name, arrays)
        if clip is None or name == clip:
            raise KeyboardInterrupt

    monkeypatch.setattr(partial.Measured, "save", stopped)
    try:
        yield
    finally:
        monkeypatch.setattr(partial.Measured, "save", real_save)


def test_a_stopped_eval_run_again_scores_only_the_clips_left(tmp_path, made, monkeypatch, capsys, whole_report):
    whole = whole_report()
    out = tmp_path / "cut"
    capsys.readouterr()
    with stopped_after_saving(monkeypatch, "clip-00001"):  # (Ctrl-C once the second clip is scored)
        assert evaluate(out) == 130
    assert not (out / "report.json").exists()
    # ("interrupted" alone: whether the clips were lost was left to its user to find out)
    assert capsys.readouterr().err.replace("\r", "\n").splitlines()[-2:] == [
        f"streamgen eval: stopped: 2 clips scored kept in {out / partial.FOLDER}: run the same command "
        "again to go on from them",
        "interrupted",
    ]
    made.clear()
    assert evaluate(out) == 0
    assert "resuming: the clips already scored" in capsys.readouterr().err
    assert {index for seed, index in made} == {2}  # clips 0 and 1 were not made (nor scored) again
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)
    assert sorted(p.name for p in (out / partial.FOLDER).iterdir()) == [
        "clip-00000.npz", "clip-00001.npz", "clip-00002.npz", "settings.json"
    ]
    # run again once finished: nothing made, the report as it was
    made.clear()
    assert evaluate(out, "--json") == 0
    printed = capsys.readouterr()
    assert "nothing measured again" in printed.err and printed.out.startswith("already finished:")
    assert made == [] and json.loads(printed.out.splitlines()[-1]) == json.loads(
        (out / "report.json").read_text()
    )


def test_a_full_disk_says_which_clips_are_kept(tmp_path, made, monkeypatch, capsys):
    """A full disk as the third clip's measurements were written was said of a temp file,
    "No space left on device: OUT/partial/.clip-00002.npz....tmp", not of the two clips kept."""
    import errno

    real = partial.write_atomically

    def full(path, write):
        if path.name == "clip-00002.npz":
            raise OSError(errno.ENOSPC, "No space left on device", str(path.parent / ".clip-00002.npz.x.tmp"))
        return real(path, write)

    monkeypatch.setattr(partial, "write_atomically", full)
    out = tmp_path / "e"
    assert evaluate(out) == 2
    assert capsys.readouterr().err.replace("\r", "\n").splitlines()[-1] == (
        f"streamgen eval: error: cannot write into {out}: No space left on device (2 clips scored kept in "
        f"{out / partial.FOLDER}: run the same command again to go on from them)"
    )


def test_a_clip_file_in_partial_without_its_measurements_is_measured_again(
    tmp_path, made, monkeypatch, whole_report
):
    """A file of something else where a clip's measurements belong (it reads, but holds none of
    them) ended the evaluation in a KeyError's traceback."""
    whole = whole_report()
    out = tmp_path / "cut"
    with stopped_after_saving(monkeypatch, "clip-00001"):
        assert evaluate(out) == 130
    np.savez(out / partial.FOLDER / "clip-00000.npz", other=np.zeros(3))
    made.clear()
    assert evaluate(out) == 0
    assert {index for seed, index in made} == {0, 2}  # clip 0 measured again, 1 kept
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)
    # the --minutes stream's likewise
    assert evaluate(out, "--minutes", "0.01") == 0
    np.savez(out / partial.FOLDER / "stream-0.01.npz", other=np.zeros(3))
    (out / "report.json").unlink()
    assert evaluate(out, "--minutes", "0.01") == 0
    whole = whole_report("--minutes", "0.01")
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)


def test_a_finished_eval_asked_for_more_clips_measures_only_the_new_ones(tmp_path, made, monkeypatch, capsys):
    """Its clips went with its report: `--clips 24` after `--clips 8` measured all 24 again. They
    stay; so does the stream's result, its progress files go."""
    from streamgen.data import render
    from streamgen.eval import drift

    monkeypatch.setattr(drift, "STREAM_SLICE", 8)
    monkeypatch.setattr(drift, "STREAM_KEEP_FRAMES", 16)
    rendered = []
    real_render = render.render_frame
    monkeypatch.setattr(render, "render_frame", lambda *a: rendered.append(a[1]) or real_render(*a))
    argv = ["eval", "--model", "ground-truth", "--size", "32", "--minutes", "0.02"]
    assert main([*argv, "--clips", "5", "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "grown"
    assert main([*argv, "--clips", "3", "--out", str(out)]) == 0
    assert not list((out / partial.FOLDER).glob("*-so-far*")) and (out / partial.FOLDER / "stream-0.02.npz").exists()
    made.clear()
    rendered.clear()
    capsys.readouterr()
    assert main([*argv, "--clips", "5", "--out", str(out)]) == 0
    assert "replacing" in capsys.readouterr().err
    # clips 3 and 4 (each made twice: its clip and the real set's draw), and no frame of the stream
    assert sorted({index for seed, index in made}) == [3, 4] and rendered == []
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)


def test_another_evaluation_into_the_out_of_a_stopped_one_scores_its_own_clips(
    tmp_path, made, monkeypatch, capsys
):
    out = tmp_path / "e"
    with stopped_after_saving(monkeypatch):
        assert evaluate(out, "--split", "val") == 130
    made.clear()
    capsys.readouterr()
    assert evaluate(out) == 0  # the test split: the val split's clip is not taken for its own
    err = capsys.readouterr().err
    assert f"removing the 1 clip an evaluation of other settings (split) left in {out}" in err, err
    assert {index for seed, index in made} == {0, 1, 2}
    assert json.loads((out / "report.json").read_text())["split"] == "test"


def test_clips_beside_a_settings_json_that_does_not_read_are_not_said_to_be_of_other_settings(
    tmp_path, made, monkeypatch, capsys
):
    """A settings.json cut short was said to be "an evaluation of other settings (eval_version,
    evaluators, model, size, split)": every key, whatever the clips were of."""
    out = tmp_path / "e"
    with stopped_after_saving(monkeypatch):
        assert evaluate(out) == 130
    (out / "partial" / "settings.json").write_text('{"eval_ver')
    capsys.readouterr()
    assert evaluate(out) == 0
    err = capsys.readouterr().err
    assert f"removing the 1 clip an evaluation whose settings.json does not read left in {out}" in err, err


def test_clips_beside_a_settings_json_the_system_will_not_read_are_kept(tmp_path, monkeypatch):
    """No permission (another user's folder), too many open files or an I/O error on
    partial/settings.json was taken for a settings.json that does not read: every clip measured
    beside it was removed, hours of measuring to do again for a limit or a disk to look at."""
    import errno
    from pathlib import Path

    settings = {"model": "debug", "eval_version": 1}
    measured = partial.Measured(tmp_path / "e", settings)
    assert measured.open() == 0
    measured.save("clip-00000", {"per_clip": np.zeros(3)})
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "settings.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(partial.MeasuredFolderError, match=r"^cannot read .*settings\.json: Permission denied"):
        partial.Measured(tmp_path / "e", settings).open()
    monkeypatch.undo()
    assert partial.Measured(tmp_path / "e", settings).open() == 1  # (kept)


def test_only_the_clips_samples_png_shows_keep_frames(tmp_path, made, monkeypatch):
    """Every clip's results in partial/ kept 16 of its frames for samples.png, which shows the first
    four: 12 MB a clip at 512x512, gigabytes for an evaluation of hundreds of clips."""
    out = tmp_path / "e"
    with stopped_after_saving(monkeypatch, "clip-00004"):
        assert evaluate(out, "--clips", "6") == 130
    kept = partial.Measured(out, {})
    assert "sample_generated" in kept.load("clip-00003")
    assert "sample_generated" not in kept.load("clip-00004")


def test_a_stopped_eval_run_again_without_its_stream_goes_on_from_its_clips(tmp_path, made, monkeypatch):
    """The clips' results are not a function of --minutes: a run asked again without the drift
    stream (or with another length) scored every clip again."""
    out = tmp_path / "e"
    with stopped_after_saving(monkeypatch, "clip-00001"):
        assert evaluate(out, "--minutes", "0.01") == 130
    made.clear()
    assert evaluate(out) == 0
    assert {index for seed, index in made} == {2}


def test_a_finished_report_of_other_eval_code_is_measured_again(tmp_path, made, monkeypatch, capsys):
    """report.json was reused by the same command run after a change to what eval measures: its
    settings named the model, the weights and the options, not the code that measured them."""
    from streamgen.eval import report

    out = tmp_path / "e"
    assert evaluate(out) == 0
    made.clear()
    capsys.readouterr()
    monkeypatch.setattr(report, "EVAL_VERSION", getattr(report, "EVAL_VERSION", 0) + 1, raising=False)
    assert evaluate(out) == 0
    assert {index for seed, index in made} == {0, 1, 2}
    printed = capsys.readouterr()
    assert f"replacing {out / 'report.json'}, an evaluation of other settings (eval_version)" in printed.err
    assert printed.out.startswith("wrote")
    assert json.loads((out / "report.json").read_text())["settings"]["eval_version"] == report.EVAL_VERSION


def test_clips_spoken_by_another_speech_engine_are_measured_again(tmp_path, made, monkeypatch, capsys):
    """Eval's clips are spoken by espeak-ng, the pip package's library or the system's: the clips
    of a run stopped before espeak-ng changed were taken by the same command run after it, beside
    clips spoken otherwise, and the report of such a run was kept as this one's."""
    from streamgen.data import speech

    out = tmp_path / "e"
    with stopped_after_saving(monkeypatch, "clip-00001"):
        assert evaluate(out) == 130
    made.clear()
    capsys.readouterr()
    monkeypatch.setattr(speech, "engine_version", lambda: "espeak-ng 1.49 (espeakng-loader not installed)")
    assert evaluate(out) == 0
    assert {index for seed, index in made} == {0, 1, 2}
    assert f"removing the 2 clips an evaluation of other settings (speech) left in {out / 'partial'}" in (
        capsys.readouterr().err
    )


def test_a_finished_report_of_a_model_json_since_edited_is_measured_again(tmp_path, made, capsys):
    """The same weights under an edited model.json (its default steps, its shift) make other frames:
    the report of the model.json before was taken for the edited one's."""
    import shutil

    from streamgen.models import resolve_model_dir

    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir("tiny-avatar"), model)
    # its default steps 1, then 2 (not its 4, then 1): the same edit of model.json, for 3 denoising
    # steps a frame where there were 5
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**meta, "steps": 1}))
    out = tmp_path / "e"
    argv = ["eval", "--model", str(model), "--clips", "1", "--size", "32", "--out", str(out)]
    assert main(argv) == 0
    (model / "model.json").write_text(json.dumps({**meta, "steps": 2}))
    made.clear()
    capsys.readouterr()
    assert main(argv) == 0
    assert {index for seed, index in made} == {0}
    assert "an evaluation of other settings (model_meta)" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["settings"]["model_meta"] is not None


class Killed(BaseException):
    """The process killed where it is (SIGKILL, a power cut): nothing of it runs after."""


@contextmanager
def scoring_stopped_at(monkeypatch, frames: int, error):
    """`error` raised by the drift stream's scoring once `frames` of its frames are scored, inside
    the block; scored as usual after it."""
    from streamgen.eval import metrics

    real_add = metrics.StreamScores.add

    def stopped(self, scored):
        if self.seen >= frames:
            raise error
        real_add(self, scored)

    monkeypatch.setattr(metrics.StreamScores, "add", stopped)
    try:
        yield
    finally:
        monkeypatch.setattr(metrics.StreamScores, "add", real_add)


def test_a_stopped_drift_stream_goes_on_from_the_frames_it_had_scored(
    tmp_path, made, monkeypatch, capsys, whole_report
):
    """A Ctrl-C in the --minutes stream (up to an hour of video) lost all of it: the same command run
    again made and scored it from its start."""
    from streamgen.data import render
    from streamgen.eval import drift

    monkeypatch.setattr(drift, "STREAM_SLICE", 8)  # (30 frames: slices of 8, their scores kept each 16)
    monkeypatch.setattr(drift, "STREAM_KEEP_FRAMES", 16)
    rendered = []
    real_render = render.render_frame
    monkeypatch.setattr(render, "render_frame", lambda *a: rendered.append(a[1]) or real_render(*a))
    # (the stream's scores do not depend on the slices they were scored in: the module's report,
    # scored in the default's, is the one each stopped run here must come to)
    whole = whole_report("--minutes", "0.02")
    out = tmp_path / "cut"
    with scoring_stopped_at(monkeypatch, 24, KeyboardInterrupt):  # (a Ctrl-C: 16 kept on the way, then 24)
        assert evaluate(out, "--minutes", "0.02") == 130
    rendered.clear()
    capsys.readouterr()
    assert evaluate(out, "--minutes", "0.02") == 0
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    # (on a line of its own: it was printed after the clips' bar, on its line)
    assert "resuming: the drift stream's first 24 of 30 frames are already scored" in lines, lines
    assert len(rendered) == 1 + 6  # its reference image and frames 24 to 29, not the 30
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)
    # killed there (no Ctrl-C to keep the scores at): it goes on from those kept on the way, at 16
    # (not SystemExit: a SIGTERM's, which keeps them as a Ctrl-C does)
    out = tmp_path / "killed"
    with scoring_stopped_at(monkeypatch, 24, Killed), pytest.raises(Killed):
        evaluate(out, "--minutes", "0.02")
    capsys.readouterr()
    assert evaluate(out, "--minutes", "0.02") == 0
    assert "resuming: the drift stream's first 16 of 30 frames are already scored" in capsys.readouterr().err
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)


def test_a_stop_that_failed_an_import_in_the_drift_stream_keeps_what_it_had_scored(
    tmp_path, made, monkeypatch, capsys
):
    """A Ctrl-C that came while an extension imported failed that import (an ImportError caused by
    it): the command ended as the stop, 130, but the stream's scores since the last kept were lost."""
    from streamgen.eval import drift

    monkeypatch.setattr(drift, "STREAM_SLICE", 8)
    monkeypatch.setattr(drift, "STREAM_KEEP_FRAMES", 16)
    failed_import = ImportError("initialization failed")
    failed_import.__cause__ = KeyboardInterrupt()  # (as `raise ... from` it sets)
    out = tmp_path / "cut"
    with scoring_stopped_at(monkeypatch, 24, failed_import):
        assert evaluate(out, "--minutes", "0.02") == 130
    capsys.readouterr()
    assert evaluate(out, "--minutes", "0.02") == 0
    assert "resuming: the drift stream's first 24 of 30 frames are already scored" in capsys.readouterr().err


# tiny-avatar's evaluation of one clip and a 30-frame drift stream, its state kept after every chunk;
# of 1 step (its chunks, their state and the frames kept are those of its 4: a quarter of the denoising)
MODEL_ARGV = ["eval", "--model", "tiny-avatar", "--steps", "1", "--clips", "1", "--minutes", "0.02", "--size", "32"]


@pytest.fixture(scope="module")
def models_whole_report(tmp_path_factory) -> dict:
    """The report of MODEL_ARGV's evaluation never stopped (with `made`'s clips), which the stopped
    ones of two tests must come to: made once for both, not once by each."""
    import streamgen.data.shards  # noqa: F401  (see `made`)
    from streamgen.eval import drift

    out = tmp_path_factory.mktemp("models_whole")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(world, "make_clip", small_clip)
        patch.setattr(drift, "STREAM_KEEP_FRAMES", 1)
        assert main([*MODEL_ARGV, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def test_a_models_stopped_drift_stream_goes_on_from_its_kept_state(
    tmp_path, made, monkeypatch, capsys, models_whole_report
):
    """A model's stream was made again from its start after a stop (its KV cache was not kept: the
    frames of an hour's stream made twice). Its session's state is kept with its scores, and the
    stream goes on from there, to the same report."""
    from streamgen.eval import drift, metrics
    from streamgen.stream import StreamSession

    monkeypatch.setattr(drift, "STREAM_KEEP_FRAMES", 1)  # (its scores and state kept after every chunk)
    evaluate = lambda out: main([*MODEL_ARGV, "--out", str(out)])  # noqa: E731
    whole = models_whole_report
    real_add, real_chunk, scored, chunks = metrics.StreamScores.add, StreamSession.next_chunk, [], []

    def counted(self, frames):
        if self.seen >= 16 and stop:
            raise KeyboardInterrupt
        scored.append(len(frames))
        real_add(self, frames)

    monkeypatch.setattr(metrics.StreamScores, "add", counted)
    monkeypatch.setattr(StreamSession, "next_chunk", lambda self: chunks.append(1) or real_chunk(self))
    out = tmp_path / "cut"
    stop = True
    assert evaluate(out) == 130
    start = int(partial.Measured(out, {}).load("stream-0.02-so-far")["seen"])
    assert 0 < start < 30 and (out / "partial" / "stream-0.02-so-far.pt").exists()
    stop, scored[:], chunks[:] = False, [], []
    capsys.readouterr()
    assert evaluate(out) == 0
    err = capsys.readouterr().err
    assert f"resuming: the drift stream's first {start} of 30 frames are already scored\n" in err, err
    assert sum(scored) == 30 - start
    per_chunk = 8  # (tiny-avatar's: 2 latent frames of 4)
    assert len(chunks) == -(-(30 - start) // per_chunk)  # the ones left (the clip is scored already)
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)


def test_a_models_stopped_drift_stream_without_a_kept_state_is_made_again(
    tmp_path, made, monkeypatch, capsys, models_whole_report
):
    """Its state kept before its last scores (killed between the two saves) or not at all (kept by
    code before it was): the stream is made again up to its scored frames, unscored, and checked to
    be the one scored (else scored afresh)."""
    from streamgen.eval import drift, metrics

    monkeypatch.setattr(drift, "STREAM_KEEP_FRAMES", 1)
    evaluate = lambda out: main([*MODEL_ARGV, "--out", str(out)])  # noqa: E731
    whole = models_whole_report
    real_add, real_save, scored, stop = metrics.StreamScores.add, partial.Measured.save, [], [True]

    def counted(self, frames):
        if self.seen >= 16 and stop[0]:
            raise KeyboardInterrupt
        scored.append(len(frames))
        real_add(self, frames)

    def run_stopped(out, between: bool):
        """Stopped once 16 frames are scored; `between`: killed as the scores of the chunk after
        the first are saved (the state kept with the first chunk's scores only)."""

        def save(self, name, arrays):
            real_save(self, name, arrays)
            if between and name.endswith("so-far") and int(arrays["seen"]) > 8:
                raise Killed

        stop[0] = True
        monkeypatch.setattr(partial.Measured, "save", save)
        if between:
            with pytest.raises(Killed):
                evaluate(out)
        else:
            assert evaluate(out) == 130
        monkeypatch.setattr(partial.Measured, "save", real_save)
        stop[0], scored[:] = False, []
        capsys.readouterr()

    monkeypatch.setattr(metrics.StreamScores, "add", counted)
    out = tmp_path / "between"
    run_stopped(out, between=True)
    start = int(partial.Measured(out, {}).load("stream-0.02-so-far")["seen"])
    assert evaluate(out) == 0
    err = capsys.readouterr().err
    assert (
        f"already scored (the model goes on from its state at frame 8: frames 8-{start - 1} are made again"
        in err
    )
    assert sum(scored) == 30 - start
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)

    out = tmp_path / "stateless"
    run_stopped(out, between=False)
    (out / "partial" / "stream-0.02-so-far.pt").unlink()
    assert evaluate(out) == 0
    assert "(the model makes it again up to there, unscored)" in capsys.readouterr().err
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)
    # scores of another stream's frames (its last scored frame not the one the model makes again)
    out = tmp_path / "other"
    run_stopped(out, between=False)
    (out / "partial" / "stream-0.02-so-far.pt").unlink()
    kept = partial.Measured(out, {})
    so_far = kept.load("stream-0.02-so-far")
    kept.save("stream-0.02-so-far", {**so_far, "last": so_far["last"] ^ 1})
    assert evaluate(out) == 0
    err = capsys.readouterr().err
    assert "differs from the one scored before: scoring it from its start" in err
    assert sum(scored) == 30
    # (its bar starts again: it went on past the end, to "46frame")
    assert "30/30" in re.findall(r"drift stream:[^\r\n]*", err)[-1], err
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)


@pytest.mark.slow  # about 15 s: a process's imports, a clip and a third of a minute's stream
def test_a_drift_stream_sent_sigterm_keeps_what_it_had_scored(tmp_path):
    """SIGTERM (`timeout`, `kill`, a job scheduler) ended eval where it was, without a word: the
    drift stream's scores since its last minute were lost, where a Ctrl-C keeps them. It ends as a
    Ctrl-C does: they are kept, "terminated", exit 143."""
    import os
    import signal
    import subprocess
    import threading
    import time

    out = tmp_path / "e"
    argv = ["eval", "--model", "ground-truth", "--clips", "1", "--size", "16", "--minutes", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "streamgen", *argv], stderr=subprocess.PIPE, text=True)
    said = []
    reader = threading.Thread(target=lambda: said.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        for _ in range(2400):  # (the imports, the clip, then 500 of the stream's frames: seconds)
            shown = [int(n) for n in re.findall(r"(\d+)/1500", "".join(said))]
            if (shown and max(shown) >= 500) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the evaluation ended before it could be stopped"
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    reader.join(timeout=10)
    err = "".join(said)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    kept = partial.Measured(out, {}).load("stream-1.0-so-far")
    assert kept is not None and int(kept["seen"]) >= 250  # (the bar counts a slice as it is made, before it is scored)


@pytest.mark.slow  # about 15 s: a teacher's clip and stream at 16x16, 1 step, twice
def test_a_teachers_drift_stream_keeps_its_scores_and_is_made_again_from_its_start(tmp_path, monkeypatch, capsys):
    """A teacher's stream failed with a traceback once its first minute was scored: its session
    (TeacherSession) has no state to keep. Its scores are kept; its stream is made again."""
    from streamgen.eval import drift

    monkeypatch.setattr(drift, "STREAM_KEEP_FRAMES", 8)
    argv = ["eval", "--model", "tiny-avatar-teacher", "--steps", "1", "--clips", "1", "--size", "16"]
    evaluate = lambda out: main([*argv, "--minutes", "0.02", "--out", str(out)])  # noqa: E731
    assert evaluate(tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    out = tmp_path / "cut"
    with scoring_stopped_at(monkeypatch, 16, Killed), pytest.raises(Killed):
        evaluate(out)
    assert not list((out / "partial").glob("*.pt"))
    capsys.readouterr()
    assert evaluate(out) == 0
    assert "(the model makes it again up to there, unscored)" in capsys.readouterr().err
    assert without_wall_time(json.loads((out / "report.json").read_text())) == without_wall_time(whole)
