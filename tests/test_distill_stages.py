"""The distillation stages on their debug configs: exact resume, rollouts equal inference, DMD, export."""

from __future__ import annotations

import os
import re

import pytest
import torch
from test_distill_helpers import debug_config, final_tensors, max_difference, run

from streamgen import checkpoint as ckpt


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A debug teacher and its ODE-initialised student (each a few steps), shared by the tests."""
    root = tmp_path_factory.mktemp("pipeline")
    run(debug_config("teacher", root / "teacher"))
    teacher = root / "teacher" / "model"
    run(debug_config("ode", root / "ode", teacher=teacher, init=teacher))
    return {"teacher": teacher, "student": root / "ode" / "model", "root": root}


def stage_config(stage, out, pipeline, **edits):
    init = pipeline["teacher"] if stage == "ode" else pipeline["student"]
    return debug_config(stage, out, teacher=pipeline["teacher"], init=init, **edits)


@pytest.mark.parametrize("stage", ["ode", "self_forcing", "chunk"])
def test_killed_and_resumed_equals_uninterrupted(stage, tmp_path, pipeline):
    run(stage_config(stage, tmp_path / "whole", pipeline))
    run(stage_config(stage, tmp_path / "split", pipeline), stop_after=3)
    run(stage_config(stage, tmp_path / "split", pipeline), resume=True)
    whole, split = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "split")
    assert max_difference(whole, split) <= 1e-6
    # and training did change the weights (the comparison is not of two untouched copies)
    first, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "whole")[0])
    name = next(k for k in whole if k.startswith("module/") and "blocks.0.self_attn.q.weight" in k)
    assert not torch.equal(first[name], whole[name])


def test_the_distilled_students_stream_through_the_inference_session(tmp_path, pipeline):
    from streamgen.models import load_model
    from streamgen.stream import StreamSession

    for stage in ("self_forcing", "chunk"):
        out = tmp_path / stage
        last = run(stage_config(stage, out, pipeline, **{"run.steps": 2}))
        assert {"loss_generator", "loss_critic", "dmd_grad_norm"} <= set(last)
        model = load_model(str(out / "model"))
        assert model.steps == 2 and model.meta["stage"] == stage
        session = StreamSession(model, height=16, width=16)
        session.start(torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy(), seed=0)
        session.push_audio(torch.zeros(16000).numpy())
        frames, _ = session.next_chunk()
        assert frames.shape == (8, 16, 16, 3)
    assert load_model(str(tmp_path / "chunk" / "model")).cfg.window_frames == 2


def _student_and_conditions(pipeline, batch=2, frames=6):
    from distill.build import load_dit
    from distill.flow import Conditions

    torch.manual_seed(0)
    student = load_dit(str(pipeline["student"])).eval()
    cfg = student.cfg
    cond = Conditions.full(
        torch.randn(batch, cfg.in_channels, 1, 8, 8),
        torch.randn(batch, frames, cfg.audio_window, cfg.audio_dim),
        torch.randn(batch, 1, cfg.text_dim),
    )
    return student, cond


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_rollout_equals_the_inference_path(pipeline, cache_from):
    """The training rollout (sink, cached steps, the chunk's cache write) is `generate_chunk`, chunk for chunk."""
    from distill.rng import SampleRandom
    from distill.rollout import rollout
    from streamgen.sampling import encode_sink, generate_chunk, student_sigmas

    student, cond = _student_and_conditions(pipeline)
    sigmas = student_sigmas(1)  # one step: no re-noising, so both paths see the same noise
    rnd = SampleRandom(0, 0, [0, 1])
    with torch.no_grad():
        video, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=None, cache_from=cache_from)
        cache = student.new_cache(2, (8, 8))
        encode_sink(student, cache, cond.reference, cond.context)
        chunks = []
        for j in range(3):
            noise = rnd.randn(f"r/noise{j}", student.cfg.in_channels, 2, 8, 8)
            audio = cond.audio[:, 2 * j : 2 * j + 2]
            chunks.append(
                generate_chunk(student, cache, noise, cond.context, audio, sigmas, cache_from=cache_from)
            )
    assert torch.allclose(video, torch.cat(chunks, 2), atol=1e-5)


def test_gradient_truncation_same_values_gradient_only_through_the_exit_step(pipeline):
    from distill.rng import SampleRandom
    from distill.rollout import rollout
    from streamgen.sampling import student_sigmas

    student, cond = _student_and_conditions(pipeline)
    sigmas = student_sigmas(2)
    rnd = SampleRandom(0, 0, [0, 1])
    with torch.no_grad():
        plain, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=1)
        full, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=None)
    graded, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=1, grad=True)
    assert torch.allclose(plain, graded.detach(), atol=1e-5) and torch.allclose(plain, full, atol=1e-5)
    assert graded.requires_grad
    graded.square().mean().backward()
    g = student.blocks[0].self_attn.q.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the exit step trains every weight it uses: the caption's cross-attention keys/values too,
    # which the sink write and the steps before it (without gradient) keep on the cache
    unused = [name for name, p in student.named_parameters() if p.grad is None]
    assert [name for name in unused if not name.startswith("audio_encoder.")] == []  # (windows given)
    g = student.blocks[0].cross_attn.k.weight.grad
    assert g.abs().sum() > 0 and student.text_embed[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_long_rollout_scores_only_the_last_window(pipeline, cache_from):
    """Lead chunks run as plain inference (no gradient, all steps); the scored chunks carry the gradient."""
    from distill.rng import SampleRandom
    from distill.rollout import rollout
    from streamgen.sampling import student_sigmas

    student, cond = _student_and_conditions(pipeline)
    sigmas = student_sigmas(2)
    rnd = SampleRandom(0, 0, [0, 1])
    with torch.no_grad():
        plain, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=None, cache_from=cache_from)
    video, _ = rollout(
        student,
        cond,
        (8, 8),
        3,
        sigmas,
        rnd,
        "r",
        exit_step=0,
        grad=True,
        first_free_chunk=2,
        cache_from=cache_from,
    )
    assert torch.allclose(video[:, :, :4].detach(), plain[:, :, :4], atol=1e-5)  # the lead: inference
    q = student.blocks[0].self_attn.q.weight
    video[:, :, :4].square().sum().backward(retain_graph=True)
    assert q.grad is None or q.grad.abs().sum() == 0
    video[:, :, 4:].square().sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_self_forcing_rollout_length_is_drawn_per_step(tmp_path, pipeline):
    import json

    from distill.config import ConfigError

    run(stage_config("self_forcing", tmp_path / "sf", pipeline, **{"run.steps": 6}))
    lengths = {json.loads(line)["rollout_frames"] for line in (tmp_path / "sf" / "scalars.jsonl").open()}
    assert lengths <= {4, 6, 8} and len(lengths) > 1
    with pytest.raises((ValueError, ConfigError), match="rollout_frames"):
        run(stage_config("self_forcing", tmp_path / "bad", pipeline, **{"self_forcing.rollout_frames": 5}))


def test_rollouts_longer_than_the_clips_are_refused_before_the_first_step(tmp_path, pipeline):
    """The length is drawn per step: rollout_frames past the clips' length trained until a step
    drew it (here step 3 of 30), then stopped with "crops of 10 latent frames do not fit"."""
    from distill.config import ConfigError

    edits = {"run.steps": 30, "run.checkpoint_every": 1, "self_forcing.rollout_frames": 10}
    with pytest.raises(ConfigError, match=r"self_forcing.rollout_frames 10: .* of 8 latent frames: set it to at most 8"):
        run(stage_config("self_forcing", tmp_path / "long", pipeline, **edits))
    assert ckpt.latest_checkpoint(tmp_path / "long") is None


def test_a_student_trained_to_keep_its_last_step_streams_that_way(tmp_path, pipeline):
    from distill.config import ConfigError
    from streamgen.stream import StreamSession

    edits = {"run.steps": 2, "self_forcing.cache_from": "last_step"}
    run(stage_config("self_forcing", tmp_path / "sf", pipeline, **edits))
    session = StreamSession(str(tmp_path / "sf" / "model"))
    assert session.model.meta["cache_from"] == session.cache_from == "last_step"
    with pytest.raises((ValueError, ConfigError), match="cache_from"):
        run(stage_config("self_forcing", tmp_path / "bad", pipeline, **{"self_forcing.cache_from": "never"}))


def test_trajectory_schedule_holds_the_student_sigmas():
    from distill.ode import trajectory_schedule
    from streamgen.sampling import student_sigmas

    for steps in (1, 2, 4):
        s = student_sigmas(steps, 5.0)
        grid = trajectory_schedule(10, s, 5.0)
        assert grid[0] == 1 and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
        assert all(bool((grid == v).any()) for v in s)


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


def test_the_chunk_stage_refuses_a_motion_prefix_other_than_one_chunk(tmp_path, pipeline):
    """The teacher's motion prefix is the chunk before; a longer one failed on a shape mismatch at
    the second chunk, after the stage had started."""
    from distill.config import ConfigError

    cfg = stage_config("chunk", tmp_path / "c", pipeline, **{"chunk.motion_frames": 4})
    cfg.model.overrides = {**cfg.model.overrides, "window_frames": 4}
    with pytest.raises(
        ConfigError, match="motion_frames \\(4\\) must equal the student's frames_per_chunk \\(2\\)"
    ):
        run(cfg)


def test_dmd_generator_loss_pushes_along_fake_minus_real():
    """d loss / d x0 = (fake - real) * weight / numel per sample (DMD's update direction)."""
    from types import SimpleNamespace

    from distill import dmd
    from distill.flow import Conditions
    from distill.rng import SampleRandom

    class Const(torch.nn.Module):  # velocity = a constant field -> x0 prediction known in closed form
        def __init__(self, value):
            super().__init__()
            self.value = value
            self.cfg = SimpleNamespace(sink_frames=1)

        def forward(self, x, t, context, audio, mask, mode, frame_pos=None):
            return torch.full_like(x, self.value)

    opts = SimpleNamespace(score_t_min=0.5, score_t_max=0.5, shift=1.0, cfg_scale=1.0)
    x0 = torch.randn(1, 2, 2, 4, 4, requires_grad=True)
    cond = Conditions.full(torch.zeros(1, 2, 1, 4, 4), None, torch.zeros(1, 1, 3))
    loss, _ = dmd.generator_loss(Const(1.0), Const(3.0), x0, cond, cond, SampleRandom(0, 0, [0]), "t", opts)
    loss.backward()
    sigma = 0.5
    noise = SampleRandom(0, 0, [0]).randn("t/noise", *x0.shape[1:])
    xt = (1 - sigma) * x0.detach() + sigma * noise
    real, fake = xt - sigma * 1.0, xt - sigma * 3.0
    weight = 1 / (x0.detach() - real).abs().mean()
    assert torch.allclose(x0.grad, (fake - real) * weight / x0.numel(), atol=1e-6)


@torch.no_grad()
def test_a_batch_mixing_kept_and_dropped_references_takes_the_models_output_channels():
    """out_channels != in_channels (a Wan config field): the mixed batch's output was allocated with
    the input's channels and the first sample's velocity did not fit in it."""
    from distill.flow import Conditions
    from streamgen.conditioning import sequence_velocity
    from streamgen.model import DiT, get_config

    torch.manual_seed(0)
    model = DiT(get_config("debug", in_channels=4, out_channels=8, audio=False)).eval()
    x, t = torch.randn(2, 4, 2, 4, 4), torch.rand(2, 2) * 1000
    cond = Conditions.full(torch.randn(2, 4, 1, 4, 4), None, torch.randn(2, 1, model.cfg.text_dim))
    cond.keep_reference = torch.tensor([True, False])
    mixed = sequence_velocity(model, x, t, cond)
    for i, kept in enumerate((True, False)):
        cond.keep_reference = torch.tensor([kept, kept])
        alone = sequence_velocity(model, x, t, cond)
        assert mixed.shape == (2, 8, 2, 4, 4) and torch.allclose(mixed[i], alone[i], atol=1e-5)


def test_the_teacher_streams_for_the_results_table(pipeline):
    """TeacherSession: windows of Euler + CFG samples, each continuing the last one's motion frames."""
    from distill.results import markdown
    from streamgen.eval.report import generate_with_stream_session
    from streamgen.teacher import TeacherSession

    session = TeacherSession(str(pipeline["teacher"]), 16, 16, steps=3, window=4, motion=2)
    ref = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy()
    audio = (0.1 * torch.randn(16000 * 2)).numpy()
    with pytest.raises(ValueError, match="text features"):  # as StreamSession: no silent drop
        session.start(ref, text="smiling")
    frames = generate_with_stream_session(session, ref, audio, "smiling", 40, seed=1)  # scored uncaptioned
    assert frames.shape == (40, 16, 16, 3) and frames.dtype.name == "uint8"
    assert session.position == 12  # three windows of 4 latent frames
    row = {"row": "teacher", "nfe": 100, "sync_c": 1.0, "sync_d": 0.5, "av_offset_frames": 0, "csim": 0.9,
           "fid": 1.0, "fvd": None, "drift_slope": 0.0, "drift_source": "x", "black_frames": 0,
           "frozen_frames": 0, "fps": 12.0}  # fmt: skip
    table = markdown([row], 8, 5.0, 1)
    assert "| teacher | 1.000 | 0.500 | 0 | 0.900 | 1.00 | — |" in table and "| 625.0 |" in table


@pytest.mark.slow
def test_autoencoder_latents_and_teacher_on_a_small_avatar_world(tmp_path):
    """The real data path: `streamgen data make` -> autoencoder -> latent bank -> teacher."""
    from distill.config import find_config, load_config
    from distill.latents import build_latents
    from streamgen.data.shards import make_dataset

    world = tmp_path / "world"
    make_dataset(world, 4, 0, 32, 32, 1.0, 4, 50, 1)  # 4 clips of 1 s at 32x32
    ae = debug_config("autoencoder", tmp_path / "ae", **{"data.source": "world", "data.root": str(world),
                                                         "model.height": 32, "model.width": 32})  # fmt: skip
    last = run(ae)
    assert "psnr" in last
    vae_dir = tmp_path / "ae" / "model"
    cfg = load_config(find_config("tiny-avatar", "latents"), "latents")
    cfg.data.root, cfg.data.latents, cfg.model.flavor, cfg.model.vae = (
        str(world),
        "dbg",
        "debug",
        str(vae_dir),
    )
    cfg.options.splits = ["train", "test"]
    banks = build_latents(cfg)
    from safetensors.torch import load_file

    bank = load_file(str(banks[0]))
    assert bank["latents"].shape[:3] == (2, 4, 6) and bank["audio"].shape == (2, 6 * 4 * 640)
    assert bank["reference"].shape == (2, 4, 1, 16, 16)
    # normalised by the statistics measured at export: roughly zero-mean, unit-variance latents
    assert abs(float(bank["latents"].mean())) < 0.5 and 0.3 < float(bank["latents"].std()) < 3
    assert build_latents(cfg) == banks  # cached: a second run reuses the banks
    teacher = debug_config("teacher", tmp_path / "t", **{
        "data.source": "world", "data.root": str(world), "data.latents": "dbg", "model.vae": str(vae_dir),
        "model.height": 32, "model.width": 32, "run.steps": 2})  # fmt: skip
    assert "loss_teacher" in run(teacher)


def test_ship_writes_a_compact_model_found_by_name(tmp_path, pipeline, monkeypatch):
    from distill.ship import ship
    from streamgen.models import load_model

    dst = ship(str(pipeline["student"]), "tiny-test", assets=tmp_path)
    monkeypatch.setenv("STREAMGEN_MODELS", str(tmp_path))
    model = load_model("tiny-test")
    assert (
        model.trained
        and model.meta["kind"] == "student-ode"
        and model.dit.blocks[0].ffn.up.weight.dtype == torch.float32
    )
    from safetensors.torch import load_file

    assert load_file(str(dst / "dit.safetensors"))["head.proj.weight"].dtype == torch.float16
    shipped_vae = load_file(str(dst / "vae.safetensors"))
    assert (
        shipped_vae["dec_in.weight"].dtype == torch.float16
        and shipped_vae["latent_std"].dtype == torch.float32
    )
    trained = load_model(str(pipeline["student"])).vae
    assert model.vae.dec_in.weight.dtype == torch.float32  # upcast on load
    assert torch.allclose(model.vae.dec_in.weight, trained.dec_in.weight, rtol=1e-3, atol=1e-4)
    assert torch.equal(model.vae.latent_std, trained.latent_std)


def test_ship_keeps_the_tiny_decoder_a_model_decodes_through(tmp_path, pipeline, capsys):
    """Ship loaded TinyCausalVAE alone: a tiny decoder beside it was left behind without a word
    (the shipped model decoded with the full decoder)."""
    import shutil

    from distill.ship import main, ship
    from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig
    from streamgen.models import load_model

    src = tmp_path / "src"
    shutil.copytree(pipeline["student"], src)
    decoder_cfg = TinyDecoderConfig(latent_channels=4, widths=(16, 8, 8, 8), blocks_per_stage=1,
                                    time_upscale=(False, True, True), space_upscale=(True, False, False))  # fmt: skip
    TinyDecoder(decoder_cfg).save(src / "tiny_decoder.safetensors")
    dst = ship(str(src), "with-tiny-decoder", assets=tmp_path / "assets")
    assert (dst / "tiny_decoder.safetensors").exists()
    assert type(load_model(str(dst)).vae) is type(load_model(str(src)).vae)
    with pytest.raises(SystemExit) as exited:  # one line, not a traceback
        main([str(tmp_path / "nothing"), "x"])
    err = capsys.readouterr().err  # (named as it is run: it said 'ship.py: error')
    assert exited.value.code == 2 and "is not a model directory" in err and err.startswith("python -m distill.ship:")


def test_ship_of_an_unfinished_run_or_a_run_folder_says_what_to_do(tmp_path, pipeline, capsys):
    """A run killed before its export (or still training) has no model.json: ship said "not a
    model directory" and no more, for a run's folder given in place of its model/ too."""
    from distill.ship import main

    run(debug_config("teacher", tmp_path / "t"), stop_after=2)
    for given in (tmp_path / "t", tmp_path / "t" / "model"):
        with pytest.raises(SystemExit) as exited:
            main([str(given), "tiny-test"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{tmp_path / 't'} holds a teacher run that has exported no model yet" in err
        assert "step-00000002.safetensors" in err and f"--out {tmp_path / 't'} --resume" in err
    with pytest.raises(SystemExit):
        main([str(pipeline["root"] / "ode"), "tiny-test"])
    assert f"the model of the run in {pipeline['root'] / 'ode'} is " in capsys.readouterr().err
    run(debug_config("autoencoder", tmp_path / "ae"))  # (finished: its export is an autoencoder)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ae" / "model"), "tiny-test"])
    assert "is the autoencoder stage's export, not a model to ship" in capsys.readouterr().err


def test_ship_onto_a_full_disk_is_one_line(tmp_path, pipeline, monkeypatch, capsys):
    import errno

    from distill.ship import main
    from streamgen import model_export, models

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(model_export, "write_model_dir", full_disk)
    with pytest.raises(SystemExit) as exited:
        main([str(pipeline["student"]), "tiny-test"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "cannot write the model tiny-test: No space left on device" in err
    assert len(err.strip().splitlines()) == 1, err


def test_ship_of_a_run_trained_on_past_its_export_says_so(tmp_path, monkeypatch, capsys):
    """A finished run resumed with more --steps and killed (or training still) keeps its earlier
    export in model/: shipped without a word, it was taken for the newest weights."""
    import json

    from distill.ship import main
    from streamgen import models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "assets")
    out = tmp_path / "t"
    run(debug_config("teacher", out))  # 4 steps, exported
    run(debug_config("teacher", out, **{"run.steps": 8}), resume=True, stop_after=6)
    assert main([str(out / "model"), "tiny-test"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'model'} holds the model of step 4, while its run trained on to step 6 " in err
    assert "finish the run with --resume" in err
    run(debug_config("teacher", out, **{"run.steps": 8}), resume=True)
    assert main([str(out / "model"), "tiny-test"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "assets" / "tiny-test" / "model.json").read_text())["trained_steps"] == 8


def test_ship_of_a_wan_checkpoint_says_to_distill_it_first(tmp_path, capsys):
    """A diffusers Wan2.1 folder given to ship said "not a model directory (no model.json)" and no
    more, as if the folder were wrong, where `streamgen generate` says to distill a model from it."""
    from distill.ship import main

    wan = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    (wan / "transformer").mkdir(parents=True)
    (wan / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (wan / "transformer" / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    for given in (wan, wan / "transformer"):
        with pytest.raises(SystemExit) as exited:
            main([str(given), "tiny-test"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "is a diffusers Wan2.1 checkpoint: distill a model from it first" in err
        assert f"model.init: wan:{given}" in err
