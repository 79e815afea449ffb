"""The models a stage reads (model.init, the teacher, model.vae): what it says of a folder that is none."""

from __future__ import annotations

import shutil

import pytest
from test_distill_helpers import debug_config, run

from distill.build import ModelSourceError, load_dit, load_vae


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The autoencoder's and the tiny decoder's exports, each a finished run of one step."""
    root = tmp_path_factory.mktemp("exports")
    for stage in ("autoencoder", "tiny_decoder"):
        run(debug_config(stage, root / stage, **{"run.steps": 1}))
    return root


@pytest.mark.parametrize("moved", [False, True])
def test_an_autoencoder_given_as_a_model_is_said_to_be_one(exports, tmp_path, moved):
    """A finished autoencoder run's model/ given as model.init (or a teacher) was "a run that has
    exported no model yet ...: finish it with --resume", which only exported it again; copied away
    from its run, "train the stage that makes it first"."""
    folder = exports / "autoencoder" / "model"
    if moved:
        folder = shutil.copytree(folder, tmp_path / "vae")
    with pytest.raises(ModelSourceError) as refused:
        load_dit(str(folder))
    assert str(refused.value) == (
        f"{str(folder)!r} is not a model directory (no model.json); it is an autoencoder (the autoencoder "
        "stage's export), not a model: an autoencoder is model.vae"
    )


@pytest.mark.parametrize("key", ["model.init", "model.vae"])
def test_a_tiny_decoder_given_as_a_model_or_autoencoder_is_said_to_be_one(exports, key):
    folder = exports / "tiny_decoder" / "model"
    cfg = debug_config("teacher", exports / "unused", **{key: str(folder)})
    with pytest.raises(ModelSourceError) as refused:
        load_dit(cfg.model.init) if key == "model.init" else load_vae(cfg.model, 4, 4, 0)
    said = str(refused.value)
    assert said.endswith(
        "; it holds a tiny decoder (the tiny_decoder stage's export), not a model: a tiny decoder decodes "
        "a model's latents, from that model's directory (docs/distill.md)"
    ), said
    assert "--resume" not in said


def test_a_chunk_teacher_that_never_saw_a_chunks_motion_prefix_is_a_warning(tmp_path, capsys):
    """The chunk stage's real score is the teacher on [reference | the chunk before, clean | chunk]; a
    teacher trained with shorter prefixes (teacher.max_motion_frames) or none (p_motion_prefix 0)
    scored those contexts all the same, without a word."""
    import json

    from distill.distributed import World
    from distill.trainer import build_stage

    def chunk_stage_says(teacher_edits: dict) -> str:
        teacher = tmp_path / f"teacher{len(list(tmp_path.iterdir()))}"
        run(debug_config("teacher", teacher, **{"run.steps": 1, **teacher_edits}))
        capsys.readouterr()
        build_stage(debug_config("chunk", tmp_path / "chunk", teacher=teacher / "model", init=teacher / "model"),
                    World())  # fmt: skip
        return capsys.readouterr().err

    assert "motion prefix" not in chunk_stage_says({})  # (the debug teacher's: up to 2, the chunk's 2)
    said = chunk_stage_says({"teacher.max_motion_frames": 1})
    assert (
        "trained with clean motion prefixes of at most 1 frame (its teacher.max_motion_frames, p_motion_prefix), "
        "and the chunk stage gives it the chunk before, 2 frames, as its prefix" in said
    ), said
    assert "trained with no clean motion prefix (its" in chunk_stage_says({"teacher.p_motion_prefix": 0.0})
    # an export that does not record it (from before it did) is not checked
    teacher = tmp_path / "teacher2" / "model"  # (the last one: none)
    meta = json.loads((teacher / "model.json").read_text())
    assert meta.pop("motion_prefix_frames") == 0
    (teacher / "model.json").write_text(json.dumps(meta))
    build_stage(debug_config("chunk", tmp_path / "chunk", teacher=teacher, init=teacher), World())
    assert "motion prefix" not in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["self_forcing", "chunk"])
def test_a_student_init_of_other_noise_levels_is_a_warning(tmp_path, capsys, stage):
    """The stages' configs keep student_steps and shift those of the ODE init by hand; one changed
    alone started a DMD run from a student of other noise levels, without a word."""
    from distill.distributed import World
    from distill.trainer import build_stage

    teacher, ode = tmp_path / "teacher" / "model", tmp_path / "ode" / "model"
    run(debug_config("teacher", teacher.parent, **{"run.steps": 1}))
    # the ode debug config's student: 2 steps at shift 5
    run(debug_config("ode", ode.parent, teacher=teacher, init=teacher, **{"run.steps": 1}))

    def says(init, **edits) -> str:
        capsys.readouterr()
        build_stage(debug_config(stage, tmp_path / "run", teacher=teacher, init=init, **edits), World())
        return capsys.readouterr().err

    assert "noise levels" not in says(ode)  # (the debug configs': 2 steps at shift 5)
    said = says(ode, **{f"{stage}.shift": 1.0})
    assert (
        f"warning: model.init {ode} is a student of 2 steps at shift 5.0 (its model.json), and this run's takes "
        f"2 at shift 1.0 ({stage}.student_steps, {stage}.shift): it starts from a student of other noise levels"
        in said
    ), said
    assert "a student of 2 steps" in says(ode, **{f"{stage}.student_steps": 1})
    assert "noise levels" not in says(teacher, **{f"{stage}.student_steps": 1})  # (a teacher has none)
