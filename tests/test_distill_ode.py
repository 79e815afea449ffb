"""The ode stage's trajectories: sampled once, by the teacher the run names, kept or refused on resume."""

from __future__ import annotations

import os

import pytest
import torch
from distill_pipeline import stage_config, train_pipeline
from test_distill_helpers import debug_config, run

from streamgen import checkpoint as ckpt


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A debug teacher and its ODE-initialised student (each a few steps), shared by the tests."""
    return train_pipeline(tmp_path_factory.mktemp("pipeline"))


def test_ode_samples_only_the_trajectories_it_keeps(pipeline, tmp_path, monkeypatch):
    """The last batch was sampled whole and cut after (trajectory_batch 1000 for 3 trajectories
    ran the teacher on 1000); the trajectories kept are the same as with a batch of three."""
    from safetensors.torch import load_file

    import distill.ode

    rows = []
    velocity = distill.ode.guided_velocity

    def counted(model, x, *args, **kwargs):
        rows.append(x.shape[0])
        return velocity(model, x, *args, **kwargs)

    monkeypatch.setattr(distill.ode, "guided_velocity", counted)
    made = {}
    for size in (1000, 3):
        rows.clear()
        edits = {"run.steps": 1, "ode.trajectories": 3, "ode.trajectory_batch": size}
        run(stage_config("ode", tmp_path / str(size), pipeline, **edits))
        assert sum(rows) == 3 * 6  # 3 trajectories of teacher_steps 6
        made[size] = load_file(str(tmp_path / str(size) / "trajectories.safetensors"))
    assert all(torch.equal(made[1000][k], made[3][k]) for k in made[3])


def test_ode_trajectories_are_sampled_once(pipeline, tmp_path):
    from safetensors.torch import load_file

    path = pipeline["root"] / "ode" / "trajectories.safetensors"
    t = load_file(str(path))
    assert t["states"].shape[:2] == (4, 2) and t["clean"].shape == t["states"][:, 0].shape
    # the first kept state is the pure noise the trajectory starts from (sigma = 1)
    assert abs(float(t["states"][:, 0].std()) - 1) < 0.2
    mtime = path.stat().st_mtime_ns
    run(stage_config("ode", pipeline["root"] / "ode", pipeline, **{"run.steps": 5}), resume=True)
    assert path.stat().st_mtime_ns == mtime
    # sampled with other settings: refused, not trained on with this run's noise levels
    from distill.config import ConfigError

    # (a resume refuses both first, unless given with --set: config.resume_settings)
    other = stage_config("ode", pipeline["root"] / "ode", pipeline, **{"run.steps": 6, "ode.shift": 3.0})
    with pytest.raises(ckpt.CheckpointError, match=r"ode\.shift: checkpoint 5\.0, config 3\.0"):
        run(other, resume=True)
    other.set_keys = ("ode.shift",)
    with pytest.raises(ConfigError, match="shift: 5.0 there, 3.0 here"):
        run(other, resume=True)
    # other clips than those the stored indices point into (fewer: an IndexError; more: others)
    fewer = stage_config(
        "ode", pipeline["root"] / "ode", pipeline, **{"run.steps": 6, "data.synthetic_clips": 2}
    )
    fewer.set_keys = ("data.synthetic_clips",)
    with pytest.raises(ConfigError, match="bank: "):
        run(fewer, resume=True)
    assert path.stat().st_mtime_ns == mtime


def test_an_export_over_a_model_the_run_reads_is_refused_before_any_work(pipeline, tmp_path):
    """An ode run with run.export at its teacher (here also its model.init; spelt with a trailing
    slash) overwrote the teacher with the student at the end."""
    from distill.trainer import TrainingError

    teacher = pipeline["teacher"]
    mtime = (teacher / "dit.safetensors").stat().st_mtime_ns
    cfg = stage_config("ode", tmp_path / "ode", pipeline, **{"run.export": f"{teacher}/"})
    with pytest.raises(TrainingError, match=rf"run.export {teacher}/ is the model this run reads as model.init: "):
        run(cfg)
    assert (teacher / "dit.safetensors").stat().st_mtime_ns == mtime
    assert not (tmp_path / "ode" / "trajectories.safetensors").exists()


def test_ode_trajectories_cut_short_are_one_line(pipeline, tmp_path):
    """A trajectories file that does not read (a copy cut short) was safetensors' traceback."""
    import shutil

    from distill.config import ConfigError

    path = tmp_path / "ode" / "trajectories.safetensors"
    path.parent.mkdir()
    shutil.copy(pipeline["root"] / "ode" / "trajectories.safetensors", path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 50)
    with pytest.raises(ConfigError) as e:
        run(stage_config("ode", tmp_path / "ode", pipeline))
    assert str(e.value).startswith(f"cannot read {path} (") and str(e.value).endswith(
        "): delete it to sample the trajectories again, or choose another run.out"
    )


def test_ode_trajectories_of_a_teacher_retrained_at_the_same_path_are_refused(pipeline, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from distill.config import ConfigError

    teacher = tmp_path / "teacher"
    shutil.copytree(pipeline["teacher"], teacher)
    cfg = lambda steps: debug_config(
        "ode", tmp_path / "ode", teacher=teacher, init=teacher, **{"run.steps": steps}
    )  # noqa: E731
    run(cfg(1))
    weights = load_file(str(teacher / "dit.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(teacher / "dit.safetensors"))
    with pytest.raises(ConfigError, match="teacher_weights: "):
        run(cfg(2), resume=True)


def test_ode_trajectories_of_the_same_teacher_spelt_otherwise_are_kept(pipeline, tmp_path):
    """The teacher's path was compared as text: the same teacher by another path (a trailing
    slash, a link, absolute against relative, as `make model RUNS=...` may give it) was refused,
    with advice to delete the trajectories; its weights' digest says it is the same."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(pipeline["teacher"], teacher)
    (tmp_path / "link").symlink_to(teacher)
    run(debug_config("ode", tmp_path / "ode", teacher=teacher, init=teacher, **{"run.steps": 1}))
    path = tmp_path / "ode" / "trajectories.safetensors"
    mtime = path.stat().st_mtime_ns
    for steps, spelt in ((2, f"{teacher}/"), (3, tmp_path / "link")):
        run(
            debug_config("ode", tmp_path / "ode", teacher=spelt, init=teacher, **{"run.steps": steps}),
            resume=True,
        )
    assert path.stat().st_mtime_ns == mtime  # not sampled again


def test_ode_trajectories_record_the_digest_of_the_teacher_that_sampled_them(pipeline, tmp_path, monkeypatch):
    """The digest in the trajectories' file was read from dit.safetensors apart from the teacher's
    weights: a teacher re-exported between the two reads sampled them under the old one's digest
    (and a resume then took them as the new teacher's). The retrained teacher is put in place
    right after the first read of the file, whichever reads it."""
    import builtins
    import io
    import shutil

    from safetensors.torch import load_file, save_file

    import distill.ode
    from distill.build import weights_digest

    teacher = tmp_path / "teacher"
    shutil.copytree(pipeline["teacher"], teacher)
    before = weights_digest(str(teacher))
    weights = load_file(str(teacher / "dit.safetensors"))
    key = next(k for k in weights if weights[k].is_floating_point())  # (what tells the two apart)
    save_file({k: v * 1.01 for k, v in weights.items()}, str(tmp_path / "retrained.safetensors"))
    real_open, real_velocity = io.open, distill.ode.guided_velocity
    swapped, sampled_by = [], set()

    class RetrainedOnClose(io.BufferedReader):
        def close(self):
            super().close()
            if not swapped:
                swapped.append(1)
                os.replace(tmp_path / "retrained.safetensors", teacher / "dit.safetensors")

    def opened(file, mode="r", *args, **kwargs):
        if os.fspath(file) == str(teacher / "dit.safetensors") and "b" in mode and not swapped:
            return RetrainedOnClose(real_open(file, "rb", buffering=0))
        return real_open(file, mode, *args, **kwargs)

    def velocity(net, *args, **kwargs):
        sampled_by.add(float(net.state_dict()[key].double().sum()))
        return real_velocity(net, *args, **kwargs)

    monkeypatch.setattr(io, "open", opened)  # (pathlib's)
    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(distill.ode, "guided_velocity", velocity)
    run(debug_config("ode", tmp_path / "ode", teacher=teacher, init=pipeline["teacher"], **{"run.steps": 1}))
    monkeypatch.undo()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ode" / "trajectories.safetensors"), "pt") as f:
        recorded = f.metadata()["teacher_weights"]
    retrained = load_file(str(teacher / "dit.safetensors"))
    sums = {before: weights[key], weights_digest(str(teacher)): retrained[key]}
    sums = {digest: float(w.double().sum()) for digest, w in sums.items()}
    assert swapped and len(sums) == 2, "the retrained teacher was never put in place"
    assert recorded in sums and sampled_by == {sums[recorded]}


def test_the_ode_stage_lets_go_of_its_teacher_and_samples_before_it_loads_the_trajectories(
    pipeline, tmp_path, monkeypatch
):
    """Rank 0 held the teacher and the trajectories it sampled until the stage had loaded the
    trajectories' file: that file's copy beside them (the trajectories twice at the peak; on the
    debug config 1.46 MB of tensors live at the load instead of 1.02 MB)."""
    import gc
    import weakref

    import distill.ode

    held = {}
    real_load, real_sample = distill.ode.load_frozen_and_digest, distill.ode.Stage._sample_trajectories
    real_check = distill.ode.Stage._check_trajectories

    def load(source):
        teacher, digest = real_load(source)
        held["teacher"] = weakref.ref(teacher)
        return teacher, digest

    def sample(self, teacher):
        tensors = real_sample(self, teacher)
        held["states"] = weakref.ref(tensors["states"])
        return tensors

    def check(path, made_with):  # (right before the trajectories' file is loaded)
        gc.collect()
        held["at_load"] = {name: ref() is not None for name, ref in held.items()}
        return real_check(path, made_with)

    monkeypatch.setattr(distill.ode, "load_frozen_and_digest", load)
    monkeypatch.setattr(distill.ode.Stage, "_sample_trajectories", sample)
    monkeypatch.setattr(distill.ode.Stage, "_check_trajectories", staticmethod(check))
    teacher = pipeline["teacher"]
    run(debug_config("ode", tmp_path / "ode", teacher=teacher, init=teacher, **{"run.steps": 1}))
    assert held["at_load"] == {"teacher": False, "states": False}


def test_the_ode_stage_writes_nothing_into_a_folder_it_may_not_use(pipeline, tmp_path):
    """It sampled its trajectories into run.out, then found the folder another stage's."""
    import shutil

    from distill.trainer import TrainingError

    teacher_run = pipeline["root"] / "teacher"
    for resume in (False, True):  # (its exported model says whose the folder is, first)
        with pytest.raises(TrainingError, match="holds the model the teacher stage exported"):
            run(stage_config("ode", teacher_run, pipeline), resume=resume)
    assert not (teacher_run / "trajectories.safetensors").exists()
    checkpoints_only = tmp_path / "teacher"  # (its checkpoints say it too)
    shutil.copytree(teacher_run / "checkpoints", checkpoints_only / "checkpoints")
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        run(stage_config("ode", checkpoints_only, pipeline))
    with pytest.raises(ckpt.CheckpointError, match="written by stage 'teacher', not 'ode'"):
        run(stage_config("ode", checkpoints_only, pipeline), resume=True)
    assert not (checkpoints_only / "trajectories.safetensors").exists()
