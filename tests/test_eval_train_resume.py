"""`streamgen eval train-evaluators` killed midway and run again goes on from its last checkpoint,
to the weights a run never interrupted reaches; a finished run run again trains nothing."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from streamgen import checkpoint as ckpt
from streamgen.cli import main
from streamgen.eval import train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from streamgen.data.shards import make_dataset

    path = tmp_path_factory.mktemp("data") / "d"
    make_dataset(path, 8, 0, 32, 32, 0.4)  # 10-frame clips: enough for a 5-frame sync window
    return path


def command(dataset, out, *extra):
    return ["eval", "train-evaluators", "--data", str(dataset), "--clips", "8", "--sync-steps", "4",
            "--identity-steps", "3", "--out", str(out), *extra]  # fmt: skip


def weights(out):
    return {name: load_file(str(out / f"{name}.safetensors")) for name in ("syncnet", "identity")}


@pytest.fixture(scope="module")
def whole(dataset, tmp_path_factory):
    """The weights of a run never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "ev"
    assert main(command(dataset, out)) == 0
    return weights(out)


# killed in the syncnet's steps; in the identity encoder's; there, its newest checkpoint then
# damaged (a disk error): set aside, and the run goes on from the one before
@pytest.mark.parametrize("killed_after, damaged", [(2, False), (6, False), (6, True)])
def test_a_killed_run_run_again_resumes_to_the_same_weights(
    dataset, whole, tmp_path, monkeypatch, capsys, killed_after, damaged
):
    monkeypatch.setattr(train, "CHECKPOINT_EVERY", 2)
    real = ckpt.save_checkpoint

    def killed(out, step, *args, **kwargs):
        path = real(out, step, *args, **kwargs)
        if step == killed_after:
            raise SystemExit("killed")  # (right after the save: as a kill between two steps)
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", killed)
    out = tmp_path / "cut"
    with pytest.raises(SystemExit):
        main(command(dataset, out))
    assert not (out / "identity.safetensors").exists()
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    if damaged:
        newest = ckpt.checkpoint_path(out, killed_after)
        newest.write_bytes(newest.read_bytes()[:100])
        killed_after -= 2
    capsys.readouterr()
    assert main(command(dataset, out)) == 0
    err = capsys.readouterr().err
    assert f"resuming from {ckpt.checkpoint_path(out, killed_after)} (step {killed_after} of 7)" in err, err
    assert ("set aside as step-00000006.safetensors.damaged" in err) == damaged, err
    cut = weights(out)
    for name in whole:
        assert whole[name].keys() == cut[name].keys()
        for key in whole[name]:
            assert (whole[name][key] == cut[name][key]).all(), (name, key)
    assert not ckpt.checkpoint_dir(out).exists()  # (gone once both evaluators are written)


def test_a_finished_run_run_again_trains_nothing_and_other_settings_are_refused(
    dataset, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "ev"
    assert main(command(dataset, out)) == 0
    written = (out / "syncnet.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(train, "training_clips", lambda *a, **k: pytest.fail("trained again"))
    capsys.readouterr()
    assert main(command(dataset, out)) == 0
    assert "already trained with these settings: nothing to do" in capsys.readouterr().out
    assert (out / "syncnet.safetensors").stat().st_mtime_ns == written
    # an unfinished run's checkpoints, and another seed: refused, the checkpoints kept
    ckpt.save_checkpoint(out / "other", 2, {"x": __import__("torch").zeros(1)},
                         {"kind": "train-evaluators", "settings": {"seed": 0}})  # fmt: skip
    assert main([*command(dataset, out / "other"), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished train-evaluators run of other settings (clips: checkpoint None" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert ckpt.latest_checkpoint(out / "other") is not None
    # a distill run's checkpoints: not taken for an unfinished run of other settings
    ckpt.save_checkpoint(out / "teacher", 2, {"x": __import__("torch").zeros(1)}, {"stage": "teacher"})
    ckpt.checkpoint_path(out / "teacher", 4).write_bytes(b"damaged")  # (its to set aside, not ours)
    assert main(command(dataset, out / "teacher")) == 2
    err = capsys.readouterr().err
    assert "holds a distill teacher run's checkpoints, not train-evaluators': choose another --out" in err, (
        err
    )
    assert ckpt.checkpoint_path(out / "teacher", 4).exists()


def test_the_clip_workers_leave_a_ctrl_c_to_the_command(monkeypatch):
    """A Ctrl-C goes to the terminal's whole process group: each pool worker making training clips
    printed 'Process SpawnPoolWorker-N:' over the command's 'interrupted'. They ignore it, as
    `data make`'s do, and the command, interrupted, ends them."""
    import multiprocessing
    import signal
    import tempfile

    started, ignored = [], []

    class Pool:  # (in this process: what matters is how the workers start)
        def __init__(self, workers, initializer=None, initargs=()):
            started.append(initializer)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def imap(self, function, jobs, chunksize=1):
            return map(function, jobs)

        def close(self):
            pass

        def join(self):
            pass

    monkeypatch.setattr(multiprocessing.get_context("spawn"), "Pool", Pool, raising=False)
    monkeypatch.setattr(train, "_make", lambda job: job)
    assert len(train.training_clips(3, 0, 32, workers=2)) == 3
    monkeypatch.setattr(signal, "signal", lambda signum, handler: ignored.append((signum, handler)))
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # (put back after the worker's start sets it)
    started[0]("/nowhere")  # (a worker's start, here)
    assert ignored == [(signal.SIGINT, signal.SIG_IGN)] and tempfile.tempdir == "/nowhere"


def test_the_clip_workers_leave_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    """Each pool worker's espeak-ng data view (a temp folder of 244 files) was left behind at every
    run: the pool's exit terminated its workers, which ran no clean-up (as `data make`'s did)."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # (the spawned workers' temp folder)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # (and this process's)
    assert len(train.training_clips(2, 0, 16, workers=2)) == 2
    assert list(temp.iterdir()) == []


@pytest.mark.slow  # about 20 s: a process's imports and its clip workers' start
def test_a_sigterm_ends_the_clip_workers_and_leaves_nothing_in_the_temp_folder(tmp_path):
    """SIGTERM (`timeout`, `kill`, a job scheduler) ended the command's process alone: its clip
    workers went on to finish their clips, and their temp folder was left. It ends as a Ctrl-C does:
    the workers ended, the folder removed, "terminated", exit 143."""
    import os

    from cli_helpers import terminated_once

    temp = tmp_path / "temp"
    temp.mkdir()
    argv = ["eval", "train-evaluators", "--out", str(tmp_path / "e"), "--clips", "60", "--workers", "2"]
    env = {**os.environ, "TMPDIR": str(temp)}
    # (the imports, then the pool's temp folder: seconds; a second more, the workers started)
    code, err = terminated_once(argv, lambda: any(temp.iterdir()), env=env, settle=1.0)
    assert code == 143 and "terminated" in err and "Traceback" not in err, err
    assert list(temp.iterdir()) == []


def test_a_resumed_phase_shows_the_rate_of_the_steps_it_runs(monkeypatch):
    """The bar of a resumed phase was moved on by the steps done before, in one update: it showed
    hundreds of steps a second, and an end minutes too early. It starts there instead."""
    import io

    import numpy as np
    from tqdm import tqdm

    class Resumed:
        def restore(self, phase, model, opt, gen):
            train._one_cycle(opt, 3, 0)  # (the schedule's entries in the optimizer's state, as saved)
            return 2

        def step_done(self, *args):
            pass

    rng = np.random.default_rng(0)
    clips = [(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), np.zeros(6400, np.float32),
              None, 0)]  # fmt: skip
    with tqdm(total=3, file=io.StringIO()) as bar:
        train.train_syncnet(clips, 3, batch=2, hard=2, bar=bar, checkpoints=Resumed())
        assert bar.n == 3 and bar.format_dict["initial"] == 2


def test_a_second_run_into_an_out_in_use_is_refused(dataset, tmp_path, capsys):
    """Two runs into one --out wrote each other's checkpoints, went on from them, and the first to
    end removed the other's checkpoints from under it."""
    import fcntl
    import os

    out = tmp_path / "ev"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # as the first run holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(command(dataset, out)) == 2
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert f"another train-evaluators is writing into {out}" in err and len(err.strip().splitlines()) == 1, (
        err
    )
    assert list(out.iterdir()) == []


def test_evaluators_of_a_stopped_run_say_it_did_not_finish(tmp_path):
    """eval --evaluators on the --out of a stopped train-evaluators said to train them, as if
    nothing were there: the run is to be run again, and goes on from its checkpoints."""
    from streamgen.eval.evaluators import EvaluatorError, Evaluators

    ckpt.checkpoint_dir(tmp_path).mkdir()
    with pytest.raises(EvaluatorError, match="did not finish .*run it again to go on from them"):
        Evaluators(tmp_path)


def test_evaluators_trained_by_other_training_code_are_trained_again(dataset, tmp_path, capsys, monkeypatch):
    """A finished run was recognised by its settings alone: the same command run after a change to
    how the evaluators train said they were already trained, and kept the old weights."""
    out = tmp_path / "ev"
    assert main(command(dataset, out)) == 0
    monkeypatch.setattr(train, "TRAINING_VERSION", getattr(train, "TRAINING_VERSION", 0) + 1, raising=False)
    capsys.readouterr()
    assert main(command(dataset, out)) == 0
    assert capsys.readouterr().out.startswith("wrote ")
    # an unfinished run of the code before: refused in one line (no options of this code finish it)
    monkeypatch.setattr(train, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(ckpt, "save_checkpoint", killed_at_step_2 := _killed_at(2))
    with pytest.raises(SystemExit):
        main(command(dataset, tmp_path / "cut"))
    monkeypatch.setattr(ckpt, "save_checkpoint", killed_at_step_2.real)
    monkeypatch.setattr(train, "TRAINING_VERSION", train.TRAINING_VERSION + 1)
    capsys.readouterr()
    assert main(command(dataset, tmp_path / "cut")) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished train-evaluators run of another version of its code" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_evaluators_trained_on_clips_spoken_by_another_speech_engine_are_trained_again(tmp_path, monkeypatch):
    """The clips made without --data are spoken by espeak-ng (the pip package's library or the
    system's): evaluators trained (or half trained) on another's were taken as this one's, as were
    eval's scores (`eval_settings`). A dataset's clips are its own, whatever speaks now."""
    from streamgen.data import speech

    (tmp_path / "manifest.json").write_text("{}")
    made_here, of_a_dataset = train.training_settings(8, 4, 3, 0, None), train.training_settings(8, 4, 3, 0, tmp_path)
    monkeypatch.setattr(speech, "engine_version", lambda: "espeak-ng 1.49 (espeakng-loader not installed)")
    assert train.training_settings(8, 4, 3, 0, None) != made_here
    assert train.training_settings(8, 4, 3, 0, tmp_path) == of_a_dataset


def _killed_at(step: int):
    """ckpt.save_checkpoint, and a SystemExit once it has saved `step` (a kill between two steps)."""
    real = ckpt.save_checkpoint

    def killed(out, at, *args, **kwargs):
        path = real(out, at, *args, **kwargs)
        if at == step:
            raise SystemExit("killed")
        return path

    killed.real = real
    return killed
