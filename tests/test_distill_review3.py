"""Distillation settings honoured as given, or refused saying why: the self-correction coin's
probability, the critic's start (and its resume), motion prefixes of one-frame crops, a latent bank under another
name, numbers that YAML read as text."""

from __future__ import annotations

import pytest

from distill.rng import SampleRandom


def _chance_over_draws(monkeypatch, p: float, inside_draws: int = 1000) -> float:
    """The probability that shared_chance(p) says True, over every first draw (one of 10,000 bins)
    and `inside_draws` second draws spread evenly over theirs: to within one of those (1e-7)."""
    rnd = SampleRandom(seed=0, step=0, ids=[])
    scripted: dict[str, int] = {}
    monkeypatch.setattr(rnd, "shared_randint", lambda purpose, high: scripted[purpose])
    true = 0
    for bin_ in range(10_000):
        scripted["coin"] = bin_
        for k in range(inside_draws if bin_ == int(p * 10_000) else 1):
            scripted["coin/inside"] = -(-k * 2**53 // inside_draws)  # (the k-th of them, rounded up)
            weight = 1 / inside_draws if bin_ == int(p * 10_000) else 1
            true += weight * rnd.shared_chance("coin", p)
    return true / 10_000


@pytest.mark.parametrize("p", [0.00005, 0.00001, 0.12345, 0.5, 0.0, 1.0, 0.0051])
def test_the_self_correction_coin_falls_with_the_configured_probability(monkeypatch, p):
    """chunk.p_self_correct was drawn as one of 10,000 bins, `draw < p * 10_000`: a probability
    between two multiples of 1e-4 was the one above it, without a word (0.00005 was 0.0001,
    0.12345 was 0.1235), and 0.0051 (51.00000000000001 bins) was 0.0052."""
    assert _chance_over_draws(monkeypatch, p) == pytest.approx(p, abs=1 / (10_000 * 1000))


def test_a_coin_of_a_multiple_of_1e_4_falls_as_it_did_before():
    """Its bins are kept: a chunk run resumed across the change draws the same contexts."""
    for p in (0.5, 0.25, 0.0003):
        for step in range(300):
            rnd = SampleRandom(seed=7, step=step, ids=[0, 1])
            assert rnd.shared_chance("self_correct", p) == (rnd.shared_randint("self_correct", 10_000) < p * 10_000)



@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A debug teacher and its ODE-initialised student, and teachers of other make, one step each."""
    from distill_pipeline import train_pipeline
    from test_distill_helpers import debug_config, run

    models = train_pipeline(tmp_path_factory.mktemp("pipeline"))
    for name, overrides in (("no_audio", {"audio": False}), ("eight_channels", {"in_channels": 8, "out_channels": 8})):
        out = models["root"] / f"teacher_{name}"
        run(debug_config("teacher", out, **{"model.overrides": overrides, "run.steps": 1}))
        models[name] = out / "model"
    return models


def _critic_run(stage, pipeline, out, critic_init):
    from test_distill_helpers import debug_config

    cfg = debug_config(stage, out, teacher=pipeline["teacher"], init=pipeline["student"], **{"run.steps": 1})
    cfg.options.critic_init = str(critic_init)
    return cfg


@pytest.mark.parametrize("stage", ["self_forcing", "chunk"])
def test_a_student_given_as_the_critic_is_refused(stage, pipeline, tmp_path):
    """critic_init of a student's export (the ode stage's model, meant for model.init) trained
    without a word, the DMD fake score started from a causal few-step model; a student as the
    teacher was refused already."""
    from test_distill_helpers import run

    from distill.build import ModelSourceError
    from streamgen import checkpoint as ckpt

    with pytest.raises(
        ModelSourceError,
        match=rf"is not a teacher: its model.json says kind 'student-ode' \(exported by the ode stage\); give the "
        rf"teacher stage's model for {stage}\.critic_init .*or leave it out to start the critic from the teacher",
    ):
        run(_critic_run(stage, pipeline, tmp_path / stage, pipeline["student"]))
    assert ckpt.latest_checkpoint(tmp_path / stage) is None


def test_a_critic_without_the_teachers_audio_is_refused(pipeline, tmp_path):
    """A critic_init with no audio branch trained: its fake score blind to the audio the teacher's
    real score is conditioned on."""
    from test_distill_helpers import run

    from distill.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=rf"^self_forcing\.critic_init {pipeline['no_audio']} has no audio branch .*and the teacher has one",
    ):
        run(_critic_run("self_forcing", pipeline, tmp_path / "sf", pipeline["no_audio"]))


def test_a_critic_of_other_channels_is_refused_naming_its_path_and_both_values(pipeline, tmp_path):
    """It was "the critic and the student differ in in_channels": neither the setting nor the values."""
    from test_distill_helpers import run

    from distill.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=rf"^the chunk\.critic_init {pipeline['eight_channels']} and the student differ in in_channels: 8 and 4$",
    ):
        run(_critic_run("chunk", pipeline, tmp_path / "chunk", pipeline["eight_channels"]))


def test_a_critic_of_another_size_than_the_teacher_still_trains(pipeline, tmp_path):
    """A smaller fake score than the real one is a way to save memory (a 14B teacher, a 1.3B critic):
    only what the two must share is checked."""
    from test_distill_helpers import debug_config, run

    small = tmp_path / "small_teacher"
    run(debug_config("teacher", small, **{"model.overrides": {"dim": 32, "ffn_dim": 64, "num_layers": 1}, "run.steps": 1}))
    run(_critic_run("self_forcing", pipeline, tmp_path / "sf", small / "model"))


@pytest.mark.parametrize("max_motion_frames", [1, 2])
def test_motion_prefixes_with_crops_of_one_frame_are_said_to_do_nothing(tmp_path, max_motion_frames):
    """The teacher stage takes no motion prefix from a crop of one latent frame (a prefix leaves a
    frame to denoise): the warning said "motion prefixes are at most 1 frame" (max_motion_frames 2),
    or nothing (1), while the teacher trained and exported without them (motion_prefix_frames 0)."""
    from test_distill_helpers import debug_config

    from distill.config import ignored_settings

    cfg = debug_config("teacher", tmp_path / "t", **{"data.latent_frames": 1, "teacher.max_motion_frames": max_motion_frames})
    notes = [note for note in ignored_settings(cfg, 1) if "motion" in note]
    assert notes == [
        "teacher.p_motion_prefix does nothing with crops of data.latent_frames 1: a prefix leaves a frame to "
        "denoise, and a crop of one frame has none to spare; the teacher trains, and exports, without motion prefixes"
    ]
    cfg = debug_config("teacher", tmp_path / "t", **{"data.latent_frames": 1, "teacher.p_motion_prefix": 0.0})
    assert not [note for note in ignored_settings(cfg, 1) if "motion" in note]


def test_a_missing_bank_names_the_banks_there_under_other_latents_names(tmp_path):
    """The latents stage's config encodes into its own data.latents (tiny-avatar's tiny-vae-deep); a
    stage reading another name (the default tiny-vae) was told to run the latents stage, which found
    its banks made already, and the stage failed again the same way."""
    from distill.data import DataMissing, LatentBank

    for name in ("tiny-vae-deep", "other"):
        (tmp_path / "latents" / name).mkdir(parents=True)
        (tmp_path / "latents" / name / "bank-train.safetensors").write_bytes(b"")
    (tmp_path / "latents" / "val-only").mkdir()
    (tmp_path / "latents" / "val-only" / "bank-val.safetensors").write_bytes(b"")
    with pytest.raises(DataMissing) as missing:
        LatentBank.load(tmp_path, "tiny-vae", "train")
    assert str(missing.value).endswith(
        f"(data.latents is 'tiny-vae'; {tmp_path / 'latents'} holds the train bank of 'other', 'tiny-vae-deep': set "
        "data.latents to the name the latents stage encoded with, its config's data.latents)"
    ), str(missing.value)
    with pytest.raises(DataMissing) as missing:
        LatentBank.load(tmp_path, "tiny-vae", "test")
    assert str(missing.value).endswith("with the autoencoder"), str(missing.value)


@pytest.mark.parametrize(
    "written, says",
    [
        ("1e-4", "(YAML reads 1e-4 as text: write it as 0.0001; an exponent needs a decimal point and a sign, as in 1.0e-3)"),
        ("1.0e4", "(YAML reads 1.0e4 as text: write it as 10000.0; an exponent needs a decimal point and a sign, as in 1.0e-3)"),
        ("1e-10", "(YAML reads 1e-10 as text: write it as 1.0e-10; an exponent needs a decimal point and a sign, as in 1.0e-3)"),
        ('"0.001"', "(a number in quotes is text: write it without them)"),
    ],
)
def test_a_number_read_as_text_is_said_how_to_write_it(tmp_path, written, says):
    """It was "give it a decimal point, as in 1.0e-3" for each: 1.0e4 has one (YAML 1.1 wants a
    signed exponent too), and a quoted 0.001 needed none."""
    from distill.config import ConfigError, load_config

    path = tmp_path / "teacher.yaml"
    path.write_text(f"stage: teacher\noptim: {{lr: {written}}}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, "teacher")
    assert str(refused.value).endswith(says), str(refused.value)
    if not written.startswith('"'):  # the spelling it gives is a number to YAML
        fixed = says.split("write it as ")[1].split(";")[0]
        path.write_text(f"stage: teacher\noptim: {{lr: {fixed}}}\n")
        assert load_config(path, "teacher").optim.lr == float(written)


@pytest.mark.parametrize(
    "written, says",
    [('"40"', "(a number in quotes is text: write it without them)"), ("1e4", "(YAML reads 1e4 as text: write it as 10000.0;")],
)
def test_a_whole_number_read_as_text_is_said_how_to_write_it(tmp_path, written, says):
    """run.steps: "40" was "expected int, got '40'", and 1e4 "expected int, got '1e4'", nothing more."""
    from distill.config import ConfigError, load_config

    path = tmp_path / "teacher.yaml"
    path.write_text(f"stage: teacher\nrun: {{steps: {written}}}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, "teacher")
    assert f"run.steps: expected int, got '{written.strip(chr(34))}' {says}" in str(refused.value), str(refused.value)


@pytest.mark.slow
def test_a_critic_trained_on_another_autoencoders_latents_is_refused(teachers_of_two_banks, tmp_path):
    """The teacher was checked against the autoencoder that encoded the bank; critic_init was not:
    the fake score started from a model of another latent space than the bank's and the teacher's."""
    import re

    from distill_two_banks import EDITS, world_config
    from test_distill_helpers import run

    from distill.config import ConfigError

    # (the world, the banks 'dbg' and 'other' and a teacher of each: tests/distill_two_banks.py's,
    # made once, test_distill_data's too, and only read)
    folder = teachers_of_two_banks
    teacher = folder / "teacher-dbg" / "model"
    cfg = world_config("self_forcing", tmp_path / "run", folder / "world", **{**EDITS, "data.latents": "dbg",
                       "model.vae": str(folder / "autoencoder-dbg"), "model.init": str(teacher)})  # fmt: skip
    cfg.options.teacher, cfg.options.rollout_frames = str(teacher), 0
    cfg.options.critic_init = str(folder / "teacher-other" / "model")
    with pytest.raises(
        ConfigError,
        match=rf"^the teacher {re.escape(cfg.options.critic_init)} \(self_forcing\.critic_init\) was trained on the "
        r"latents of another autoencoder than the one that encoded the latents 'dbg'",
    ):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg.options.critic_init = str(teacher)
    run(cfg)


@pytest.mark.slow
def test_a_resume_whose_critic_init_is_gone_goes_on_from_the_checkpoints_critic(pipeline, tmp_path, capsys):
    """The critic's weights and config are in every checkpoint, but a resume read critic_init again
    to build it: with that folder moved or deleted, the run could not go on ("... is not a model
    directory (no model.json); train the stage that makes it first"). It goes on, with a warning,
    to the weights of the run never interrupted."""
    import shutil

    from test_distill_helpers import final_tensors, max_difference, run

    critic = tmp_path / "critic"
    shutil.copytree(pipeline["teacher"], critic)
    run(_whole(pipeline, tmp_path, critic))
    run(_whole(pipeline, tmp_path, critic, out="cut"), stop_after=1)
    shutil.rmtree(critic)
    capsys.readouterr()
    run(_whole(pipeline, tmp_path, critic, out="cut"), resume=True)
    err = capsys.readouterr().err
    assert f"warning: self_forcing.critic_init {critic} is not there: the critic is built" in err, err
    assert max_difference(final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "cut")) == 0
    with pytest.raises(Exception, match="is not a model directory"):  # (a fresh run has no critic to go on from)
        run(_whole(pipeline, tmp_path, critic, out="fresh"))


def _whole(pipeline, tmp_path, critic, out="whole"):
    from test_distill_helpers import debug_config

    cfg = debug_config("self_forcing", tmp_path / out, teacher=pipeline["teacher"], init=pipeline["student"])
    cfg.options.critic_init = str(critic)
    # 2 steps, a checkpoint after each, cut after the first: the resume's one step takes the
    # checkpoint's critic as 2 of the debug config's 4 did (the test's 8 steps of rollouts were 4)
    cfg.run.steps, cfg.run.checkpoint_every = 2, 1
    return cfg
