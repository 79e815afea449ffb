"""The teacher a distillation stage scores against: a retrained one refused, a student refused, the critic's start."""

from __future__ import annotations

import os
import re

import pytest
import torch
from distill_pipeline import train_pipeline
from test_distill_helpers import debug_config, run

from streamgen import checkpoint as ckpt


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A debug teacher and its ODE-initialised student (each a few steps), shared by the tests."""
    return train_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.mark.parametrize("stage", ["self_forcing", "chunk"])
def test_a_resume_against_a_teacher_retrained_at_the_same_path_is_refused(stage, pipeline, tmp_path):
    """The ode stage notices it through its trajectories' file; self_forcing and chunk went on
    scoring the student against the new teacher as if it were the one the run began with."""
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(pipeline["teacher"], teacher)
    out = tmp_path / stage

    def config(**edits):
        return debug_config(stage, out, teacher=teacher, init=pipeline["student"], **edits)

    run(config(), stop_after=2)
    weights = load_file(str(teacher / "dit.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(teacher / "dit.safetensors"))
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"the teacher {re.escape(str(teacher))} \({stage}\.teacher\) has other weights than the "
        r"run's \(weights digest [0-9a-f]{16} then, [0-9a-f]{16} now\).*--set data\.accept_remade=true",
    ):
        run(config(), resume=True)
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    run(config(**{"data.accept_remade": True}), resume=True)
    assert ckpt.checkpoint_header(ckpt.latest_checkpoint(out))["step"] == 4


@pytest.mark.parametrize("stage", ["ode", "self_forcing", "chunk"])
def test_a_student_given_as_the_teacher_is_refused(stage, pipeline, tmp_path):
    """A student's model directory as the stage's teacher (the ode stage's export, one path
    off) trained and exported without a word, the trajectories or scores a causal few-step
    model's; a model.json that says no kind (hand-made, older) is still taken as a teacher."""
    import json
    import shutil

    from distill.build import ModelSourceError

    student = pipeline["student"]
    with pytest.raises(ModelSourceError, match=r"is not a teacher: its model.json says kind 'student-ode'"):
        run(debug_config(stage, tmp_path / stage, teacher=student, init=student, **{"run.steps": 1}))
    assert ckpt.latest_checkpoint(tmp_path / stage) is None
    assert not (tmp_path / stage / "trajectories.safetensors").exists()
    unmarked = tmp_path / "teacher"
    shutil.copytree(pipeline["teacher"], unmarked)
    meta = json.loads((unmarked / "model.json").read_text())
    del meta["kind"]
    (unmarked / "model.json").write_text(json.dumps(meta))
    run(debug_config(stage, tmp_path / "unmarked", teacher=unmarked, init=student, **{"run.steps": 1}))


def test_a_teacher_run_not_yet_exported_or_past_its_export_is_said_so(pipeline, tmp_path, capsys):
    """A run's folder given for its `model/`, and a run killed before its export, were both
    "train the stage that makes it first"; a `model/` its run has trained past (resumed with more
    --steps, killed or training still) was read without a word, as if it were the run's last."""
    import shutil

    from distill.build import ModelSourceError, load_dit

    with pytest.raises(ModelSourceError, match=r"the model of the run in .*teacher is .*teacher/model$"):
        load_dit(str(pipeline["teacher"].parent))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ckpt.checkpoint_dir(pipeline["teacher"].parent), ckpt.checkpoint_dir(unfinished))
    with pytest.raises(ModelSourceError, match=r"holds a run that has exported no model yet .*--resume"):
        load_dit(str(unfinished / "model"))
    with pytest.raises(ModelSourceError, match=r"train the stage that makes it first"):
        load_dit(str(tmp_path / "nowhere"))
    went_on = tmp_path / "went_on"
    shutil.copytree(pipeline["teacher"].parent, went_on)
    newest = ckpt.latest_checkpoint(went_on)
    shutil.copy(newest, ckpt.checkpoint_path(went_on, ckpt.checkpoint_step(newest) + 2))
    capsys.readouterr()
    load_dit(str(went_on / "model"))
    load_dit(str(went_on / "model"))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "has not exported that yet" in err, err


def test_the_critic_starts_from_the_teacher_the_stage_loaded(pipeline, tmp_path, monkeypatch):
    """With no `critic_init` the critic starts as the teacher. It was read from the teacher's path
    a second time, so a teacher exported in between gave the critic other weights than those of
    the teacher the run scores against (and keeps the digest of)."""
    import shutil

    from safetensors.torch import load_file, save_file

    import distill.dmd
    from distill.distributed import init_world
    from distill.trainer import build_stage

    teacher = tmp_path / "teacher"
    shutil.copytree(pipeline["teacher"], teacher)
    weights = load_file(str(teacher / "dit.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(tmp_path / "retrained.safetensors"))
    real_load = distill.dmd.load_frozen_and_digest

    def load_then_retrain(source):  # the retrained teacher put in place right after its read
        loaded = real_load(source)
        os.replace(tmp_path / "retrained.safetensors", teacher / "dit.safetensors")
        return loaded

    monkeypatch.setattr(distill.dmd, "load_frozen_and_digest", load_then_retrain)
    cfg = debug_config("self_forcing", tmp_path / "sf", teacher=teacher, init=pipeline["student"])
    stage = build_stage(cfg, init_world(cfg.run.device))
    critic, teacher_net = stage.critic.state_dict(), stage.teacher.state_dict()
    assert critic.keys() == teacher_net.keys()
    assert all(torch.equal(critic[k], teacher_net[k]) for k in critic)
    assert all(p.requires_grad for p in stage.critic.parameters()) and stage.critic.training
    assert not any(p.requires_grad for p in stage.teacher.parameters())
