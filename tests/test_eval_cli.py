import json

import numpy as np
import pytest
from cli_helpers import no_teacher_loads

from streamgen.cli import main


@pytest.mark.slow  # about 7 s: generates and scores a full clip end to end
def test_eval_ground_truth_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "gt"
    assert main(["eval", "--model", "ground-truth", "--clips", "1", "--out", str(out), "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report == json.loads((out / "report.json").read_text())
    for key in ["sync_c", "sync_d", "av_offset_frames", "csim", "fid", "fvd", "drift_slope",
                "black_frames", "frozen_frames", "clips", "seconds"]:  # fmt: skip
        assert key in report
    assert report["clips"] == 1 and report["seconds"] == 4.0
    assert abs(report["av_offset_frames"]) <= 1 and report["csim"] > 0.8
    assert report["black_frames"] == 0 and report["frozen_frames"] < 5
    for name in ["report.md", "drift.png", "sync.png", "samples.png"]:
        assert (out / name).stat().st_size > 100
    # (every float to four decimals: "| seconds | 4.0000 |", a drift slope of 2e-5 "0.0000")
    table = dict(line.strip("|").replace(" ", "").split("|") for line in (out / "report.md").read_text().splitlines()
                 if line.startswith("| ") and not line.startswith("| metric"))  # fmt: skip
    assert table["seconds"] == "4.0" and float(table["drift_slope"]) == float(f"{report['drift_slope']:.4g}")
    assert "\n1 clip at " in (out / "report.md").read_text()  # (it said "1 clips")


def test_eval_errors_leave_no_report(tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(
        ["eval", "--model", "ground-truth", "--clips", "1", "--out", str(out), "--evaluators", str(tmp_path)]
    )
    assert code == 2
    assert "missing evaluator checkpoint" in capsys.readouterr().err
    assert not (out / "report.json").exists()
    assert main(["eval", "--out", str(tmp_path / "never")]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # refused before anything is made (it was made, and left empty)
    assert main(["eval", "--model", "no-such-model", "--clips", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot load model 'no-such-model'" in err
    assert len(err.strip().splitlines()) == 1, err  # (an empty progress bar's lines came first)
    assert not (out / "report.json").exists()
    # a run refused before it begins (a misspelt model) leaves an earlier run's results as they
    # were (it deleted report.json, and left that run's report.md and plots beside nothing)
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text('{"model": "ground-truth"}')
    assert main(["eval", "--model", "no-such-model", "--clips", "1", "--out", str(out)]) == 2
    assert (out / "report.json").read_text() == '{"model": "ground-truth"}'
    assert main(["eval", "--model", "ground-truth", "--minutes", "0.0002", "--out", str(out)]) == 2
    assert "--minutes must give a stream of at least two frames" in capsys.readouterr().err


def test_a_run_that_fails_on_the_way_leaves_no_earlier_report(tmp_path, monkeypatch):
    """Once the work begins an earlier run's report.json goes: its presence says the run finished."""
    import streamgen.data.world as world

    out = tmp_path / "e"
    out.mkdir()
    earlier = ["report.json", "report.md", "drift.png", "sync.png", "samples.png"]
    for name in earlier:
        (out / name).write_text("the earlier run's")
    (out / "report.json").write_text('{"model": "ground-truth", "settings": {}}')
    (out / "notes.txt").write_text("mine")

    def crash(*args, **kwargs):
        raise RuntimeError("crashed on the way")

    monkeypatch.setattr(world, "make_clip", crash)
    with pytest.raises(RuntimeError, match="crashed on the way"):
        main(["eval", "--model", "ground-truth", "--clips", "1", "--out", str(out)])
    # nor its report.md and plots, which named the earlier run's model beside no report.json (what
    # this run measured before it failed is kept in partial/, for the same command to go on from)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "partial"]


def test_a_report_md_no_evaluation_wrote_is_not_replaced(tmp_path, monkeypatch, capsys):
    """`eval --out .` in a folder of the user's removed its report.md (or drift.png) as the work
    began, and wrote its own in its place. An earlier evaluation's outputs are replaced as before."""
    from streamgen.data import world

    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("# my own report")
    monkeypatch.setattr(world, "make_clip", lambda *a: pytest.fail("the work began"))
    assert main(["eval", "--model", "ground-truth", "--clips", "1", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"--out {out} holds report.md, which no evaluation wrote there (no report.json nor "
                         "partial/ of one): eval would replace them; give another --out, or move them")  # fmt: skip
    assert (out / "report.md").read_text() == "# my own report"


def test_frozen_frames_leave_out_the_frames_held_before_a_1_plus_4k_stream(tmp_path, monkeypatch):
    """A Wan-layout stream's first frame is held over the 3 frames before it, to line up with its
    audio: those copies were counted as the model's frozen frames (3 a clip for a perfect model)."""
    import sys
    from pathlib import Path

    from streamgen.eval import metrics, report

    sys.path.insert(0, str(Path(__file__).parent))
    from test_model_dirs import export, wan_based_model

    seen = []
    real = metrics.frozen_frames
    monkeypatch.setattr(metrics, "frozen_frames", lambda frames: seen.append(frames) or real(frames))
    model = str(export(wan_based_model(), tmp_path / "model"))
    result = report.evaluate(model, tmp_path / "wan", n_clips=1, size=32, steps=2)
    (counted,) = seen
    assert len(counted) == 100 - 3 and result["seconds"] == 4.0  # the clip's 100 frames, less the 3 held


def test_eval_scores_the_teacher_by_name(tmp_path, capsys):
    """A teacher cannot stream; `streamgen eval` runs it through TeacherSession instead of refusing it."""
    out = tmp_path / "teacher"
    args = ["eval", "--model", "tiny-avatar-teacher", "--steps", "2", "--clips", "1", "--out", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["clips"] == 1 and 0 < report["csim"] <= 1 and report["black_frames"] == 0


def test_eval_of_a_student_says_where_its_cache_came_from(tmp_path, capsys):
    student = ["eval", "--model", "tiny-avatar", "--cache-from", "last_step", "--clips", "1", "--json"]
    assert main([*student, "--out", str(tmp_path / "student")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["cache_from"] == "last_step" and report["black_frames"] == 0
    # and in what precision its DiT and its reference encoder ran
    asked = ["--dtype", "bfloat16", "--encode-dtype", "float32", "--out", str(tmp_path / "bf16")]
    assert main([*student, *asked]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dtype"] == "bfloat16" and report["encode_dtype"] == "float32"
    teacher = ["eval", "--model", "tiny-avatar-teacher", "--cache-from", "last_step", "--clips", "1"]
    assert main([*teacher, "--out", str(tmp_path / "teacher")]) == 2
    assert "--cache-from applies to students" in capsys.readouterr().err


def test_eval_autoencoder_roundtrip(tmp_path, capsys):
    """`roundtrip:MODEL` scores the clips through MODEL's autoencoder and back: the ceiling of its students."""
    out = tmp_path / "roundtrip"
    assert main(["eval", "--model", "roundtrip:tiny-avatar", "--clips", "1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "roundtrip:tiny-avatar" and report["seconds"] == 4.0
    assert 0.5 < report["csim"] <= 1 and report["black_frames"] == 0
    assert main(["eval", "--model", "roundtrip:no-such-model", "--clips", "1", "--out", str(out)]) == 2
    assert "cannot load the autoencoder of 'no-such-model'" in capsys.readouterr().err


def test_eval_of_an_autoencoder_export_as_a_model_says_roundtrip(tmp_path, capsys):
    # `--model runs/x/autoencoder/model` said "a folder without model.json: not a streamgen model"
    from streamgen.models import load_model

    export = tmp_path / "autoencoder" / "model"
    load_model("tiny-avatar").vae.save(export)
    assert main(["eval", "--model", str(export), "--clips", "1", "--out", str(tmp_path / "e")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--model roundtrip:{export}" in line, line
    # the stage's run folder: its model folder is the one to give
    assert main(["eval", "--model", str(export.parent), "--clips", "1", "--out", str(tmp_path / "e")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"its model, {export}, is an autoencoder" in line and line.endswith(f"--model roundtrip:{export}"), line


def test_an_autoencoder_export_under_the_home_folder_is_found_by_its_tilde(tmp_path, monkeypatch, capsys):
    """`--model=roundtrip:~/ae` (no shell expands `~` there) was taken for a model's name: "~/ae is a
    folder without model.json"; and `--model=~/ae` was not told to score it with roundtrip:."""
    from streamgen.eval.report import autoencoder_roundtrip
    from streamgen.models import load_model

    monkeypatch.setenv("HOME", str(tmp_path))
    load_model("tiny-avatar").vae.save(tmp_path / "ae" / "model")
    assert autoencoder_roundtrip("~/ae/model").vae is not None
    assert main(["eval", "--model", "~/ae", "--clips", "1", "--out", str(tmp_path / "e")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("--model roundtrip:~/ae/model"), line


def test_autoencoder_roundtrip_keeps_length_and_range():
    import numpy as np

    from streamgen.eval.report import autoencoder_roundtrip

    video = (np.random.default_rng(0).random((10, 64, 64, 3)) * 255).astype(np.uint8)  # not a multiple of 4
    out = autoencoder_roundtrip("tiny-avatar")(video)
    assert out.shape == video.shape and out.dtype == np.uint8


def test_an_out_folder_with_a_file_in_its_way_is_one_line_before_the_work(tmp_path, capsys, monkeypatch):
    """eval wrote report.json into a file after the whole evaluation (NotADirectoryError); data
    preview made its clips first."""
    from streamgen.data import shards, world
    from streamgen.eval import report

    def worked(*args, **kwargs):
        raise AssertionError("the work ran")

    monkeypatch.setattr(report, "evaluate", worked)
    monkeypatch.setattr(world, "make_clip", worked)
    # (data make's: imported here, while patched, shards kept the fake for every later test)
    monkeypatch.setattr(shards, "make_clip", worked)
    a_file = tmp_path / "x.mp4"
    a_file.write_bytes(b"")
    truth = ["eval", "--model", "ground-truth", "--clips", "1"]
    for argv, says in (
        ([*truth, "--out", str(a_file)], "is a file, not a folder"),
        (["data", "preview", "--clips", "1", "--out", str(a_file / "sub")], "a file is in its way"),
        ([*truth, "--data", "d", "--out", str(tmp_path / "e")], "--data is for train-evaluators"),
        ([*truth, "--minutes", "inf", "--out", str(tmp_path / "e")], "--minutes is at most 60"),
        (["data", "make", "--clips", "1", "--out", str(a_file / "sub")], "a file is in its way"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_train_evaluators_on_data_it_cannot_train_on_is_one_line_and_makes_no_folder(tmp_path, capsys):
    """--data that is no dataset, or whose train clips are missing or too short, was refused after an
    empty 'training clips 0/N' bar (three lines), and left the --out it had made empty."""
    from streamgen.data.shards import make_dataset

    make_dataset(tmp_path / "two", 2, 0, 32, 32, 1.0)  # two clips: one in val, one in test
    make_dataset(tmp_path / "short", 6, 0, 32, 32, 0.1)  # 2-frame clips
    for data, says in (
        (tmp_path / "nowhere", "is not a finished dataset"),
        (tmp_path / "two", "has no train clips to train the evaluators on"),
        (tmp_path / "short", "shorter than the 5-frame sync window"),
    ):
        out = tmp_path / "ev" / data.name
        assert main(["eval", "train-evaluators", "--data", str(data), "--clips", "2", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_train_evaluators_on_clips_of_one_identity_is_one_line(tmp_path, capsys, monkeypatch):
    """--clips 1 trained evaluators that measure nothing, without a word: the identity encoder learns
    by telling the clips' identities apart, and its loss was 0 at every step."""
    from streamgen.eval import train

    out = tmp_path / "ev"
    assert main(["eval", "train-evaluators", "--clips", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--clips 1: the identity encoder learns by telling the clips' identities apart" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    video = np.zeros((8, 64, 64, 3), np.uint8)
    same = [(video, np.zeros(5000, np.float32), video[0], 7)] * 3  # (a dataset's clips of one person)
    monkeypatch.setattr(train, "training_clips", lambda *args: same)
    assert main(["eval", "train-evaluators", "--clips", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("the 3 training clips hold one identity (7): the identity encoder learns by "
                                "telling identities apart: give more clips (--clips), or --data with more "
                                "identities"), err  # fmt: skip
    assert not (out / "identity.safetensors").exists()


def test_an_eval_refused_at_its_set_up_makes_no_folder(tmp_path, capsys):
    """A model or evaluator that cannot be loaded was refused after --out was made: left empty."""
    out = tmp_path / "runs" / "eval"
    for extra, says in (
        (["--model", "no-such-model"], "cannot load model 'no-such-model'"),
        (["--model", "ground-truth", "--evaluators", str(tmp_path)], "missing evaluator checkpoint"),
    ):
        assert main(["eval", *extra, "--clips", "1", "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.slow  # about 8 s: a student's clip and stream, scored
def test_the_drift_stream_shows_its_progress(tmp_path, capsys):
    """The --minutes stream ran after the clips' bar had reached N/N, with nothing shown for as long
    as it took (at most 60 minutes of video: hours for a teacher)."""
    argv = ["eval", "--model", "tiny-avatar", "--clips", "1", "--minutes", "0.02"]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "drift stream" in err and "30/30" in err, err  # 0.02 minutes: 30 frames


def test_the_options_of_one_action_are_refused_by_the_other(tmp_path, capsys, monkeypatch):
    """They were taken and ignored without a word: eval --seed 3 scored the fixed clips of its own
    seed, train-evaluators --device cuda trained on the CPU, --split val on the train split."""
    from streamgen.data import world
    from streamgen.eval import report, train

    def worked(*args, **kwargs):
        raise AssertionError("the work ran")

    monkeypatch.setattr(report, "evaluate", worked)
    monkeypatch.setattr(train, "train_evaluators", worked)
    monkeypatch.setattr(world, "make_clip", worked)
    out = ["--out", str(tmp_path / "e")]
    for argv, says in (
        (["--model", "ground-truth", "--seed", "3"], "--seed is for train-evaluators"),
        (["--model", "ground-truth", "--workers", "1", "--sync-steps", "9"], "--sync-steps, --workers are"),
        (["train-evaluators", "--device", "cuda"], "--device is for eval, not train-evaluators"),
        (["train-evaluators", "--split", "val", "--json"], "--split, --json are for eval"),
        (["train-evaluators", "--model", "tiny-avatar"], "--model is for eval"),
        (["train-evaluators", "--minutes", "0"], "--minutes is for eval"),  # (not its value's check)
    ):
        assert main(["eval", *argv, *out]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "e").exists()


def test_a_file_where_eval_keeps_its_measured_clips_is_one_line(tmp_path, capsys):
    """A file named OUT/partial was mkdir's FileExistsError, a traceback."""
    out = tmp_path / "e"
    out.mkdir()
    (out / "partial").write_text("mine")
    assert main(["eval", "--model", "ground-truth", "--clips", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'partial'} is a file, where eval keeps the clips it has measured" in err and "Traceback" not in err
    assert (out / "partial").read_text() == "mine"


def test_a_second_eval_into_an_out_in_use_is_refused(tmp_path, capsys):
    """Two evals into one --out at once: the second removed the first's outputs as it began, then
    both wrote theirs over each other's (one's report.json beside the other's plots)."""
    import fcntl
    import os

    out = tmp_path / "e"
    out.mkdir()
    (out / "report.json").write_text('{"model": "the first"}')
    held = os.open(out, os.O_RDONLY)  # as the first eval holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["eval", "--model", "ground-truth", "--clips", "1", "--out", str(out)]) == 2
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert f"another evaluation is writing into {out}" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "report.json").read_text() == '{"model": "the first"}'
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # (and no lock file)


def test_a_drift_stream_this_machine_has_not_the_memory_for_is_one_line_before_the_work(
    tmp_path, capsys, monkeypatch
):
    """--minutes 60 at 128x128 (a student's: about 35 GiB) was made for ten minutes, then the
    kernel killed the process (now scored chunk by chunk); an autoencoder's round trip did so from
    half an hour at 64x64."""
    from streamgen import models
    from streamgen.eval import report

    def worked(*args, **kwargs):
        raise AssertionError("the work ran")

    monkeypatch.setattr(report, "evaluate", worked)
    monkeypatch.setattr(models, "free_memory", lambda: 2**30)  # 1 GiB free
    out = tmp_path / "e"
    # (a model's and the renderer's streams are scored chunk by chunk: no more memory for an hour)
    assert report.stream_memory_problem("tiny-avatar", 60, 128) is None
    assert report.stream_memory_problem("ground-truth", 60, 128) is None
    for model, minutes, size, says in (("roundtrip:tiny-avatar", "10", "64", "takes about 7.7 GiB"),):
        argv = ["eval", "--model", model, "--minutes", minutes, "--size", size, "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and "1.0 GiB free" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_session_options_for_what_runs_no_session_are_refused(tmp_path, capsys):
    """The renderer's clips and an autoencoder's round trip run no model session: its options were
    ignored (roundtrip --decode-dtype bfloat16 scored the float32 decoder, ground truth --steps 2)."""
    out = tmp_path / "e"
    for argv, says in (
        (["--model", "roundtrip:tiny-avatar", "--decode-dtype", "bfloat16"], "--decode-dtype is for a"),
        (["--model", "ground-truth", "--steps", "2", "--device", "cpu:0"], "--device, --steps are for"),
    ):
        assert main(["eval", *argv, "--clips", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_an_out_folder_that_cannot_be_made_is_one_line(capsys):
    """An --out under a folder no one may write into (here /proc) was mkdir's traceback, once the
    model and the evaluators had loaded."""
    out = "/proc/streamgen-eval-out"
    assert main(["eval", "--model", "ground-truth", "--clips", "1", "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"--out: cannot make {out}: No such file or directory" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_empty_out_is_refused_not_the_current_folder(tmp_path, capsys, monkeypatch):
    """`--out "$UNSET"`: Path("") is the current folder, which eval wrote its report and plots into
    (removing those an earlier run had left there), and train-evaluators its checkpoints."""
    from streamgen.eval import report, train

    def worked(*args, **kwargs):
        raise AssertionError("the work ran")

    monkeypatch.setattr(report, "evaluate", worked)
    monkeypatch.setattr(train, "train_evaluators", worked)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.json").write_text("mine")
    for argv in (["--model", "ground-truth", "--clips", "1"], ["train-evaluators", "--clips", "2"]):
        with pytest.raises(SystemExit) as exited:
            main(["eval", *argv, "--out", ""])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "argument --out: '' names no folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "mine"


def test_eval_refuses_steps_off_the_students_schedule(tmp_path, capsys):
    """--steps 3 of the 4-step tiny-avatar was scored (generate refused it), at levels it never
    learned; refused in one line before anything loads, no --out made."""
    out = tmp_path / "ev"
    assert main(["eval", "--model", "tiny-avatar", "--steps", "3", "--clips", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "streamgen eval: error: --steps 3: tiny-avatar runs 1, 2 or 4 steps, the levels of the 4-step "
        "schedule it was distilled for (a teacher takes any number)\n"
    )
    assert not out.exists()


def test_a_cache_from_for_a_teacher_is_refused_before_it_loads(tmp_path, capsys, monkeypatch):
    """It was refused once the teacher had loaded (a Wan teacher's minutes), as generate no longer did."""
    no_teacher_loads(monkeypatch)
    out = tmp_path / "ev"
    assert main(["eval", "--model", "tiny-avatar-teacher", "--cache-from", "reencode", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("streamgen eval: error: --cache-from reencode: tiny-avatar-teacher is a "
                                       "teacher, which samples whole windows without a KV cache; --cache-from "
                                       "applies to students\n")  # fmt: skip
    assert not out.exists()


def test_a_teachers_precision_options_are_refused_before_it_loads(tmp_path, capsys, monkeypatch):
    """--dtype, --decode-dtype, --encode-dtype bfloat16 were refused once the teacher had loaded."""
    no_teacher_loads(monkeypatch)
    out = tmp_path / "ev"
    assert main(["eval", "--model", "tiny-avatar-teacher", "--encode-dtype", "bfloat16", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("streamgen eval: error: --encode-dtype bfloat16: tiny-avatar-teacher is a "
                                       "teacher, which runs in float32 only; it applies to students\n")  # fmt: skip
    assert not out.exists()
