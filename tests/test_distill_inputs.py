"""The models a stage reads (model.init, the teacher, model.vae): what it says of a folder that is none."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from test_distill_helpers import debug_config, run

from distill.build import ModelSourceError, load_dit, load_vae
from distill.config import ConfigError


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


def test_the_teacher_starts_from_a_wan_checkpoint_through_the_adapter(tmp_path):
    from streamgen.model.config import get_config
    from streamgen.model.model import DiT
    from streamgen.model.wan import save_pretrained
    from streamgen.models import load_model

    torch.manual_seed(5)
    wan = DiT(get_config("debug"))
    save_pretrained(wan, tmp_path / "wan")
    avatar = {"audio_dim": 16, "audio_mels": 16, "frames_per_chunk": 2, "window_frames": 6}
    cfg = debug_config(
        "teacher", tmp_path / "t", **{"model.init": f"wan:{tmp_path / 'wan'}", "model.overrides": avatar,
                                      "optim.lr": 0.0, "optim.ema": 0.0, "run.steps": 1},
    )  # fmt: skip
    run(cfg)
    trained = load_model(str(tmp_path / "t" / "model")).dit.state_dict()
    assert torch.equal(trained["blocks.1.ffn.up.weight"], wan.state_dict()["blocks.1.ffn.up.weight"])
    cfg.model.init = f"wan:{tmp_path / 'nowhere'}"
    cfg.run.out = str(tmp_path / "t2")
    from distill.build import ModelSourceError

    with pytest.raises(ModelSourceError, match="cannot load the Wan checkpoint"):
        run(cfg)


@pytest.mark.parametrize(
    "kind, says",
    [
        ("wan z_dim 8", r"wan:.* has 8 latent channels, the model 4"),
        ("wan temporal 2", r"wan:.* makes 2 video frames of each latent frame, the model's temporal_compression is 4"),
        ("autoencoder temporal 2", r"makes 2 video frames of each latent frame, the model's temporal_compression is 4"),
    ],
)
def test_a_model_vae_of_other_latents_or_frames_is_one_line_before_any_work(tmp_path, kind, says):
    """load_vae returned a `wan:` VAE before its latent channels were compared, and compared no
    autoencoder's temporal factor with the model's temporal_compression (the model directory's
    loader refuses both)."""
    from distill.build import load_vae
    from streamgen.model.config import get_config
    from streamgen.model.vae import TinyCausalVAE

    torch.manual_seed(0)
    if kind.startswith("wan"):
        diffusers = pytest.importorskip("diffusers")
        z_dim = 8 if "z_dim" in kind else 4
        downsample = [False, True, False] if "temporal" in kind else [False, True, True]
        wan = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=downsample,
            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        )  # fmt: skip
        wan.save_pretrained(tmp_path / "vae")  # (diffusers' AutoencoderKLWan folder)
        source = f"wan:{tmp_path / 'vae'}"
    else:
        TinyCausalVAE(4, (8, 16), 2).save(tmp_path / "vae")
        source = str(tmp_path / "vae")
    cfg = debug_config("teacher", tmp_path / "t", **{"model.vae": source})
    mcfg = get_config("debug")
    with pytest.raises(ConfigError, match=says):
        load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)
    if kind == "wan z_dim 8":  # a taehv tiny decoder is made for the teacher's latents, whatever the flavor
        from distill.distributed import World
        from distill.tiny_decoder import Stage

        cfg = debug_config("tiny_decoder", tmp_path / "td", **{"model.vae": source})
        assert Stage(cfg, World()).teacher.latent_channels == 8


def test_a_model_directory_given_as_wan_is_told_to_drop_the_prefix(tmp_path):
    """`model.init: wan:DIR` (or `model.vae`) of a streamgen model directory said "DIR has no
    config.json", as if the folder were damaged."""
    from distill.build import ModelSourceError, export_model, load_dit, load_vae
    from streamgen.model.config import get_config
    from streamgen.model.model import DiT
    from streamgen.model.vae import TinyCausalVAE

    mcfg = get_config("debug")
    torch.manual_seed(0)
    vae = TinyCausalVAE(mcfg.in_channels, (8, 16), mcfg.temporal_compression)
    model = export_model(DiT(mcfg).eval(), vae, tmp_path / "model", "debug", 32, 32, 5.0, 2)
    says = f"{model} is a streamgen model directory, not a diffusers Wan checkpoint: give it without wan:"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{model}")
    cfg = debug_config("teacher", tmp_path / "t", **{"model.vae": f"wan:{model}"})
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)


def test_a_missing_model_names_the_stage_and_the_command_that_make_it(tmp_path):
    """"... is not a model directory (no model.json); train the stage that makes it first" named
    neither the stage nor its command: a run's folder named as the Makefile names them says both."""
    from distill.build import ModelSourceError, load_dit

    runs = tmp_path / "runs"
    for folder, says in (("ode", "the ode stage makes it: `make ode RUNS="),
                         ("self_forcing_last_step", "the self_forcing stage makes it: `make self_forcing_last_step RUNS="),
                         ("elsewhere", "`python -m streamgen distill STAGE --config CONFIG --set run.out=RUN`")):  # fmt: skip
        with pytest.raises(ModelSourceError, match=re.escape(says)) as refused:
            load_dit(str(runs / folder / "model"))
        assert "train the stage that makes it first" in str(refused.value)
    with pytest.raises(ModelSourceError) as refused:
        load_dit(str(runs / "self_forcing_last_step" / "model"))
    assert f"--config tiny-avatar-last-step --set run.out={runs / 'self_forcing_last_step'}`" in str(refused.value)
