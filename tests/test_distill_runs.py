"""A distill run's outputs (checkpoints, logs, curves, its export), its exact resume, and what it says
when one fails mid-run."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from test_distill_helpers import debug_config, final_tensors, max_difference, run

import distill
from distill.config import find_config, load_config
from distill.trainer import TrainingError
from streamgen import checkpoint as ckpt

# --- a run's outputs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def whole_teacher(tmp_path_factory):
    """The debug teacher config's whole run (4 steps, checkpoints at 2 and 4) and its last scalars:
    the run whose outputs are checked, and the uninterrupted run that resumed ones are compared with
    (each test made its own, the same run each time). Its folder is only read: a test that changes
    a run's files changes a copy."""
    out = tmp_path_factory.mktemp("whole") / "teacher"
    last = run(debug_config("teacher", out))
    return out, last


def test_a_teacher_run_writes_checkpoints_logs_curves_and_a_loadable_model(whole_teacher):
    from streamgen.models import load_model

    out, last = whole_teacher
    assert set(last) >= {"loss_teacher", "grad_norm_teacher", "lr_teacher"}
    assert [p.name for p in ckpt.list_checkpoints(out)] == [
        "step-00000002.safetensors",
        "step-00000004.safetensors",
    ]
    records = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r["steps_per_s"] > 0 for r in records)
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert meta["step"] == 4 and meta["stage"] == "teacher"
    assert any(k.startswith("ema/teacher/") for k in tensors) and any(
        k.startswith("optim/teacher/") for k in tensors
    )
    assert "rng/torch" in tensors and "python" in meta["rng"]
    model = load_model(str(out / "model"))
    assert model.trained and model.meta["kind"] == "teacher" and model.cfg.num_layers == 2
    # the exported model holds the EMA weights, not the last raw weights
    ema = {k[len("ema/teacher/") :]: v for k, v in tensors.items() if k.startswith("ema/teacher/")}
    assert torch.equal(model.dit.state_dict()["head.proj.weight"], ema["head.proj.weight"])


def test_the_loss_curves_of_a_single_logged_step_show_it(tmp_path):
    """A one-step run (or a first checkpoint before the second logged step: log_every 10,
    checkpoint_every 5) drew its one point as a line of one point: blank axes."""
    import numpy as np
    from PIL import Image

    from distill.monitor import Monitor

    monitor = Monitor(tmp_path, 1, 0, enabled=True, progress=False, desc="teacher")
    monitor.log(0, {"loss_teacher": 2.0})
    monitor.close()
    pixels = np.asarray(Image.open(monitor.plot()).convert("RGB")).astype(int)
    line = np.array([31, 119, 180])  # matplotlib's first colour, the curve's
    assert (np.abs(pixels - line).sum(-1) < 60).sum() >= 9


def test_a_fresh_start_over_a_run_killed_before_its_first_checkpoint_shows_its_own_steps(tmp_path, monkeypatch):
    """TensorBoard kept the killed run's steps beside the new run's (scalars.jsonl was cut)."""
    import time
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    from distill.monitor import Monitor

    # Event files are read in name order, and their names begin with the second the writer was made
    # in: the killed run's writer is given a clock 2 s behind, as a run killed a while before the
    # fresh start had (the test slept 1.1 s after each run for that).
    for loss, behind_s in ((1.0, 2.0), (2.0, 0.0)):  # the killed run, then the fresh start
        clock = SimpleNamespace(time=lambda behind_s=behind_s: time.time() - behind_s)
        monkeypatch.setattr(event_file_writer, "time", clock)
        monitor = Monitor(tmp_path, 10, 0, enabled=True, progress=False, desc="teacher")
        for step in range(3 if loss == 1.0 else 2):
            monitor.log(step, {"loss_teacher": loss})
        monitor.close()
    names = sorted(path.name for path in (tmp_path / "tensorboard").iterdir())
    assert len(names) == 2 and names[0].split(".")[3] < names[1].split(".")[3]  # (the seconds differ)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss_teacher")] == [(0, 2.0), (1, 2.0)]
    assert len((tmp_path / "scalars.jsonl").read_text().splitlines()) == 2


def test_a_rerun_without_resume_refuses_to_overwrite(tmp_path):
    cfg = debug_config("teacher", tmp_path / "t", **{"run.steps": 2})
    run(cfg)
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume"):
        run(cfg)


def test_an_export_name_names_the_exported_model(tmp_path):
    from streamgen.models import load_model

    sets = [f"run.export={tmp_path / 'm'}", "run.export_name=my-avatar_2.1"]
    cfg = load_config(find_config("debug", "teacher"), "teacher", sets)
    cfg.run.out, cfg.run.steps = str(tmp_path / "run"), 1
    run(cfg)
    assert load_model(str(tmp_path / "m")).name == "my-avatar_2.1"


def test_the_loss_plot_is_drawn_while_the_other_ranks_wait_for_rank_0(tmp_path, monkeypatch):
    """Rank 0 drew the loss curves (matplotlib's import, seconds under load) after the checkpoint's
    wait had ended: the other ranks' next collective waited under the process group's timeout."""
    import contextlib

    import distill.trainer
    from distill.monitor import Monitor

    waiting, plotted = [False], []

    @contextlib.contextmanager
    def others_wait(world):
        waiting[0] = True
        try:
            yield
        finally:
            waiting[0] = False

    plot = Monitor.plot
    monkeypatch.setattr(distill.trainer, "others_wait_for_main", others_wait)
    monkeypatch.setattr(Monitor, "plot", lambda self: (plotted.append(waiting[0]), plot(self)))
    run(debug_config("teacher", tmp_path / "t", **{"run.steps": 2, "run.checkpoint_every": 1}))
    assert plotted == [True, True] and (tmp_path / "t" / "loss_curves.png").is_file()


# --- exact resume ---------------------------------------------------------------------------


def test_teacher_killed_and_resumed_equals_uninterrupted(tmp_path, whole_teacher):
    whole, _ = whole_teacher
    # "killed" after step 3: the step-2 checkpoint is the newest; step 3 is recomputed on resume
    run(debug_config("teacher", tmp_path / "split"), stop_after=3)
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step-00000002.safetensors"
    run(debug_config("teacher", tmp_path / "split"), resume=True)
    assert max_difference(final_tensors(whole), final_tensors(tmp_path / "split")) <= 1e-6
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "split" / "scalars.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 1, 2, 3]  # the log of the resumed run is the log of one run


def test_a_resume_takes_the_configs_optimizer_settings_and_refuses_fewer_steps(tmp_path):
    """Loading the optimizer's state brought back the settings it was saved with, whatever the
    config said; a resume with fewer steps than the checkpoint's exported it as a shorter run."""
    run(debug_config("teacher", tmp_path / "t"), stop_after=2)
    changed = debug_config("teacher", tmp_path / "t", **{"optim.betas": [0.5, 0.9], "optim.eps": 1e-3,
                                                           "optim.weight_decay": 0.5})  # fmt: skip
    from distill.trainer import Trainer

    trainer = Trainer(changed, resume=True)
    seen = []
    real = torch.optim.AdamW.step

    def step(opt, *args, **kwargs):
        seen.append({k: opt.param_groups[0][k] for k in ("betas", "eps", "weight_decay")})
        return real(opt, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        trainer.run()
    finally:
        torch.optim.AdamW.step = real
    assert seen and all(s == {"betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.5} for s in seen), seen[:1]
    with pytest.raises(TrainingError, match="at step 4, past run.steps 3"):
        run(debug_config("teacher", tmp_path / "t", **{"run.steps": 3}), resume=True)


def test_a_resume_with_another_seed_or_batch_size_is_refused_unless_set_on_purpose(tmp_path, capsys):
    """Only the model configs were compared: a resume with another run.seed or data.batch_size drew
    other samples and noise for every later step, a run that no config describes, without a word."""
    from streamgen.cli import main

    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)
    changed = debug_config("teacher", out, **{"run.seed": 1, "data.batch_size": 2})
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"run\.seed: checkpoint 0, config 1; data\.batch_size: checkpoint 4, config 2.*"
        r"--set run\.seed=1 --set data\.batch_size=2",
    ):
        run(changed, resume=True)
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    # the command line: one line, unless the new value is given with --set (a change on purpose)
    yaml = tmp_path / "seed1.yaml"
    yaml.write_text((Path(distill.__file__).parent / "configs" / "teacher-debug.yaml").read_text()
                    .replace("seed: 0", "seed: 1"))  # fmt: skip
    command = ["distill", "teacher", "--config", str(yaml), "--out", str(out), "--resume"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "run.seed: checkpoint 0, config 1" in err and len(err.strip().splitlines()) == 1
    assert main([*command, "--set", "run.seed=1"]) == 0
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out))[1]["run_settings"]["run.seed"] == 1


def test_a_checkpoint_from_before_the_settings_were_recorded_is_checked_against_its_config(
    tmp_path, monkeypatch
):
    """Older checkpoints keep the settings only in their config text (with its --set lines)."""
    real = ckpt.save_checkpoint

    def as_before(out, step, tensors, meta, keep=3):
        return real(out, step, tensors, {k: v for k, v in meta.items() if k != "run_settings"}, keep)

    monkeypatch.setattr(ckpt, "save_checkpoint", as_before)
    cfg = load_config(find_config("debug", "teacher"), "teacher", [f"run.out={tmp_path / 't'}",
                                                                   "data.batch_size=2"])  # fmt: skip
    run(cfg, stop_after=2)
    with pytest.raises(ckpt.CheckpointError, match=r"data\.batch_size: checkpoint 2, config 4"):
        run(debug_config("teacher", tmp_path / "t"), resume=True)
    run(cfg, resume=True)  # the same settings: resumed


def test_a_resume_skips_a_log_line_cut_short(tmp_path):
    run(debug_config("teacher", tmp_path / "t"), stop_after=3)
    with open(tmp_path / "t" / "scalars.jsonl", "a") as f:
        f.write('{"step": 3, "loss_te')  # killed while writing it
    run(debug_config("teacher", tmp_path / "t"), resume=True)
    lines = (tmp_path / "t" / "scalars.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    last = run(debug_config("teacher", tmp_path / "t", **{"run.steps": 1}), resume=True)
    assert (
        "loss_teacher" in last and ckpt.latest_checkpoint(tmp_path / "t").name == "step-00000001.safetensors"
    )


def test_mismatched_checkpoint_and_config_names_the_difference(tmp_path):
    run(debug_config("teacher", tmp_path / "t", **{"run.steps": 2}))
    cfg = debug_config("teacher", tmp_path / "t", **{"model.overrides": {"num_layers": 3}})
    with pytest.raises(ckpt.CheckpointError, match=r"teacher\.num_layers: checkpoint 2, config 3"):
        run(cfg, resume=True)


# --- failures mid-run -------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    import distill.teacher

    real = distill.teacher._per_frame_flow_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 4 else loss  # step 3 (0-based)

    monkeypatch.setattr(distill.teacher, "_per_frame_flow_loss", poisoned)
    out = tmp_path / "t"
    with pytest.raises(
        TrainingError, match=r"loss is nan at step 3; stopped\. Last good checkpoint: .*step-00000002"
    ) as stopped:
        run(debug_config("teacher", out))
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    # a resume is exact: resumed as it was, the run met the same nan again (the message said only
    # "resume with --resume")
    assert "repeats the same steps: change what made it non-finite (a lower optim.lr" in str(stopped.value)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)
    good = ckpt.latest_checkpoint(out)
    before = good.read_bytes()

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_bytes", full)
    with pytest.raises(
        ckpt.CheckpointError, match=r"step 4 \(No space left on device\).*step-00000002.*intact"
    ):
        run(debug_config("teacher", out), resume=True)
    assert ckpt.list_checkpoints(out) == [good] and good.read_bytes() == before
    assert not list((out / "checkpoints").glob(".*tmp"))  # no half-written file left behind
    monkeypatch.undo()
    run(debug_config("teacher", out), resume=True)  # and training continues from it
    assert ckpt.latest_checkpoint(out).name == "step-00000004.safetensors"


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "t"
    run(debug_config("teacher", out, **{"run.steps": 2}))
    path = ckpt.latest_checkpoint(out)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        ckpt.CheckpointError,
        match="cannot read checkpoint.*no checkpoint in .* can be read: to start the run again, set run.out",
    ):
        run(debug_config("teacher", out, **{"run.steps": 4}), resume=True)
    assert ckpt.list_checkpoints(out) == [path]  # nothing set aside: the user decides


def test_a_resume_sets_a_damaged_newest_checkpoint_aside_for_the_one_before(tmp_path, capsys, whole_teacher):
    """A checkpoint damaged after it was written (a copy cut short, a disk error): --resume stopped
    at it, though the step before was intact. It goes on from the newest checkpoint that reads,
    with a warning, and reaches what an undamaged run does; the damaged file is kept aside."""
    import shutil

    whole, _ = whole_teacher
    out = tmp_path / "damaged"
    shutil.copytree(whole, out)
    first, newest = ckpt.list_checkpoints(out)  # steps 2 and 4
    newest.write_bytes(newest.read_bytes()[:-100])
    capsys.readouterr()
    run(debug_config("teacher", out), resume=True)
    warning = capsys.readouterr().err
    assert "cannot read checkpoint" in warning and "resuming from step-00000002" in warning, warning
    aside = newest.with_name(newest.name + ".damaged")
    assert aside.exists() and [p.name for p in ckpt.list_checkpoints(out)] == [first.name, newest.name]
    assert max_difference(final_tensors(whole), final_tensors(out)) <= 1e-6


def test_the_newest_checkpoint_is_the_highest_step_past_eight_digits(tmp_path):
    """Names are zero-padded to 8 digits: step 10^8 has 9, and sorted by name it came before
    step 99999999, so a resume took the older one and pruning deleted the newer."""
    out = tmp_path / "t"
    for step in (99_999_998, 99_999_999, 100_000_000):
        ckpt.save_checkpoint(out, step, {"w": torch.zeros(1)}, {}, keep=3)
    assert ckpt.latest_checkpoint(out).name == "step-100000000.safetensors"
    ckpt.save_checkpoint(out, 100_000_001, {"w": torch.zeros(1)}, {}, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(out)] == [
        "step-99999999.safetensors",
        "step-100000000.safetensors",
        "step-100000001.safetensors",
    ]
    (out / "checkpoints" / "step-latest.safetensors").write_bytes(b"")  # not a step: not a checkpoint
    (out / "checkpoints" / "step-00000002.safetensors").write_bytes(b"")  # the 8-digit names still read
    assert ckpt.list_checkpoints(out)[0].name == "step-00000002.safetensors"
    assert ckpt.latest_checkpoint(out).name == "step-100000001.safetensors"


def test_an_export_that_another_export_keeps_out_is_one_line_and_resume_exports(tmp_path, monkeypatch, capsys):
    """The final export into `run.export` gives up after `LOCK_WAIT_S` where another export into
    the folder in place holds its lock (`streamgen.folder_lock`): that was a traceback after the
    whole run. It is one line that says how to export the trained weights, and --resume does."""
    import fcntl

    from streamgen import folder_lock, folders
    from streamgen.cli import main

    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("another export's")
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)  # (written in place, under the lock)
    monkeypatch.setattr(folder_lock, "LOCK_WAIT_S", 0.3)
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run"), "--steps", "1",
            "--set", f"run.export={export}"]  # fmt: skip
    held = os.open(export, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(argv) == 2
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert "gave up" in err and "--resume" in err and len(err.strip().splitlines()) == 1, err
    assert not (export / "model.json").exists()
    assert main([*argv, "--resume"]) == 0
    assert (export / "model.json").exists()
    # (it said "finished 1 step in ..." and no loss: no step ran)
    assert "had finished its 1 step already: its model was exported again" in capsys.readouterr().out


def test_a_full_disk_at_the_export_says_the_run_is_kept_and_resume_exports(tmp_path, monkeypatch, capsys):
    """The final export onto a full disk said "No space left on device" and no more, after the
    whole run: as if it were lost. It says where the trained weights are and how to export them."""
    from streamgen import model_export
    from streamgen.cli import main

    real_write = model_export.write_model_dir

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_export, "write_model_dir", full_disk)
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run"), "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "could not export the trained model (No space left on device)" in err, err
    assert "last checkpoint" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(model_export, "write_model_dir", real_write)
    assert main([*argv, "--resume"]) == 0
    assert (tmp_path / "run" / "model" / "model.json").exists()


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Two runs into one run.out at once, before the first had saved a checkpoint, both trained and
    both said "finished": one log of both runs' steps, checkpoints and exports over each other."""
    import os

    from distill.trainer import RUN_LOCK, TrainingError, one_run_at_a_time

    out = tmp_path / "t"
    out.mkdir()
    with one_run_at_a_time(out):  # as the first run holds it
        in_use = rf"{out} is in use by another training run \(pid {os.getpid()} on "
        with pytest.raises(TrainingError, match=in_use):
            run(debug_config("teacher", out, **{"run.steps": 2}))
        assert not (out / "checkpoints").exists() and not (out / "scalars.jsonl").exists()
    run(debug_config("teacher", out, **{"run.steps": 2}))  # free once it ends
    assert (out / RUN_LOCK).exists() and ckpt.latest_checkpoint(out) is not None


def test_another_stages_model_is_not_written_into_when_its_checkpoints_are_gone(tmp_path):
    """Only checkpoints told a run.out apart: with them deleted, an autoencoder run replaced the
    autoencoder inside a teacher's exported model and left its DiT and model.json."""
    import shutil

    from distill.trainer import TrainingError

    out = tmp_path / "t"
    run(debug_config("teacher", out, **{"run.steps": 2}))
    shutil.rmtree(out / "checkpoints")
    before = (out / "model" / "vae.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"holds the model the teacher stage exported .* set run\.out"):
        run(debug_config("autoencoder", out, **{"run.steps": 2}))
    assert (out / "model" / "vae.safetensors").read_bytes() == before
    run(debug_config("teacher", out, **{"run.steps": 2}))  # its own stage: a fresh run, as before
