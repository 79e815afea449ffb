"""What a distill run refuses in one line before it trains (settings, ranks, folders, data), and the
settings it warns of."""

from __future__ import annotations

import pytest
import torch
from test_distill_helpers import debug_config, run

from distill.config import find_config, load_config
from distill.data import DataMissing


@pytest.mark.parametrize(
    "stage, sets, says",
    [
        ("teacher", ["run.fsdp=true"], "run.fsdp shards over the processes of a torchrun launch"),
        ("chunk", ["chunk.max_chunks_back=0"], "chunk.p_self_correct does nothing with chunk.max_chunks_back 0"),
        ("autoencoder", ["data.latent_frames=3"], "data.latent_frames does not apply to the autoencoder stage"),
        ("tiny_decoder", ["data.latents=other"], "data.latents does not apply to the tiny_decoder stage"),
        ("ode", ["data.video_frames=4"], "data.video_frames does not apply to the ode stage"),
        (
            "teacher",
            ["teacher.max_motion_frames=9"],
            "teacher.max_motion_frames 9 is more than crops of data.latent_frames 4 take: motion prefixes are "
            "at most 3 frames",
        ),
        (
            "tiny_decoder",
            ["tiny_decoder.architecture=causal_vae", "tiny_decoder.blocks_per_stage=2"],
            "tiny_decoder.blocks_per_stage is for a taehv decoder",
        ),
        ("self_forcing", ["self_forcing.critic_optim.ema=0.99"], "self_forcing.critic_optim.ema keeps an average"),
        ("chunk", ["chunk.critic_optim.ema=0.99"], "chunk.critic_optim.ema keeps an average of the critic"),
        (
            "teacher",
            ["model.vae=runs/ae/model", "model.vae_res_blocks=1"],
            "model.vae_res_blocks shapes the autoencoder the autoencoder stage trains (or a random one); this "
            "run reads model.vae's, runs/ae/model",
        ),
        ("tiny_decoder", ["model.vae=tiny-avatar", "model.vae_widths=[8, 8]"], "model.vae_widths shapes"),
    ],
)
def test_a_setting_that_does_not_apply_is_named_in_a_warning(stage, sets, says):
    """They were ignored without a word: the run trained as if they had not been given."""
    from distill.config import ignored_settings

    cfg = load_config(find_config("debug", stage), stage, sets)
    assert [note for note in ignored_settings(cfg, 1) if says in note], ignored_settings(cfg, 1)
    plain = load_config(find_config("debug", stage), stage)  # (the debug configs use all they set)
    assert ignored_settings(plain, 1) == []
    if sets == ["run.fsdp=true"]:
        assert ignored_settings(cfg, 2) == []  # (sharded under torchrun)


def test_a_run_warns_of_the_settings_it_does_not_use(tmp_path, capsys):
    run(debug_config("teacher", tmp_path / "t", **{"run.steps": 1, "run.fsdp": True}))
    assert "warning: run.fsdp shards over the processes of a torchrun launch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "stage, edit, says",
    [
        ("autoencoder", {"autoencoder.stats_clips": 9}, "autoencoder.stats_clips is 9, more than the 4 clips of"),
        ("tiny_decoder", {"tiny_decoder.eval_clips": 9}, "tiny_decoder.eval_clips is 9, more than the 4 clips of"),
    ],
)
def test_a_count_of_clips_over_the_clips_there_are_is_a_warning(tmp_path, capsys, stage, edit, says):
    """All the clips there were were used, and nothing said the count asked for was not."""
    run(debug_config(stage, tmp_path / "run", **{"run.steps": 1, **edit}))
    assert f"warning: {says} the synthetic data (data.synthetic_clips)" in capsys.readouterr().err


def test_an_empty_out_is_one_line_not_the_configs_folder(tmp_path, capsys, monkeypatch):
    """`--out "$UNSET"` trained into the config's run.out."""
    from streamgen.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:  # (streamgen.cli.named_folder, as eval's and data's --out)
        main(["distill", "teacher", "--config", "debug", "--out", ""])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.endswith("error: argument --out: '' names no folder: give the folder to write into\n"), err
    assert list(tmp_path.iterdir()) == []


def test_an_export_name_without_an_export_is_one_line_before_any_work(tmp_path, capsys):
    """run.export_name names run.export's model: without run.export it was ignored without a word
    (OUT/model is exported under its folder's name)."""
    from streamgen.cli import main

    out = tmp_path / "run"
    assert main(["distill", "teacher", "--config", "debug", "--out", str(out), "--set", "run.export_name=mine"]) == 2
    err = capsys.readouterr().err
    assert "run.export_name names the model exported to run.export, which is not given" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_distill_steps_take_positive_numbers(tmp_path, capsys):
    """`--steps 0` ran the config's steps; `--steps -3` exported the untrained model as finished."""
    from streamgen.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "teacher", "--config", "debug", "--steps", "-3", "--out", str(tmp_path / "o")])
    assert "argument --steps: '-3' is not a positive" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "world_size, says",
    [("2", "environment variable RANK expected"), ("two", "WORLD_SIZE='two' is not a whole number")],
)
def test_a_world_size_without_torchrun_is_one_line(tmp_path, capsys, monkeypatch, world_size, says):
    """A WORLD_SIZE left in the shell, no torchrun around it: a traceback from inside torch's
    env:// rendezvous (or from int())."""
    from streamgen.cli import main

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert main(["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert says in err and "torchrun --nproc_per_node N" in err and "Traceback" not in err


@pytest.mark.parametrize("stage", ["ode", "teacher"])
def test_a_batch_the_ranks_do_not_divide_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, stage):
    """data.batch_size 3 under torchrun --nproc_per_node 2: the ode stage trained every step on
    samples 0 and 1 alone (1 a rank), unsaid; the teacher stopped at its first step, once built."""
    import distill.trainer
    from distill.distributed import World
    from streamgen.cli import main

    monkeypatch.setattr(distill.trainer, "init_world", lambda device: World(rank=0, size=2))
    out = tmp_path / "o"
    assert main(["distill", stage, "--config", "debug", "--out", str(out), "--set", "data.batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size 3 (the global batch) does not split evenly over 2 ranks" in err
    assert "Traceback" not in err and not out.exists()


def test_more_ranks_than_gpus_is_one_line(tmp_path, capsys, monkeypatch):
    """torchrun --nproc_per_node 3 on a machine with 2 GPUs: the third rank's set_device raised a
    CUDA error, a traceback."""
    from streamgen.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device reached"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    out = str(tmp_path / "o")
    assert main(["distill", "teacher", "--config", "debug", "--out", out, "--set", "run.device=cuda"]) == 2
    assert "the rank with LOCAL_RANK 2 has no GPU: this machine has 2" in capsys.readouterr().err


def test_missing_data_directory(tmp_path):
    cfg = debug_config(
        "teacher", tmp_path / "t", **{"data.source": "world", "data.root": str(tmp_path / "nope")}
    )
    with pytest.raises(DataMissing, match="nope does not exist"):
        run(cfg)
    (tmp_path / "empty").mkdir()
    cfg = debug_config(
        "teacher", tmp_path / "t", **{"data.source": "world", "data.root": str(tmp_path / "empty")}
    )
    with pytest.raises(DataMissing, match="bank-train.safetensors is missing"):
        run(cfg)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--steps", "5"], "--steps is for the training stages"),
        (["--resume"], "--resume is for the training stages"),
        (["--out", "OUT", "--resume"], "--resume, --out are for the training stages"),
    ],
)
def test_the_latents_stage_refuses_the_training_stages_options(tmp_path, capsys, monkeypatch, flags, says):
    """`distill latents --steps 5 --resume --out DIR` encoded the dataset as ever, the three ignored
    without a word (it trains nothing and writes into DATA/latents/NAME, not a run.out)."""
    from distill import latents
    from streamgen.cli import main

    monkeypatch.setattr(latents, "build_latents", lambda cfg: pytest.fail("it went on to encode"))
    flags = [str(tmp_path / "out") if flag == "OUT" else flag for flag in flags]
    assert main(["distill", "latents", "--config", "tiny-avatar", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--set", "model.height=17"], "cannot build the teacher stage from this config: frame size 17x"),
        # latents smaller than a patch, or not a whole number of patches (a convolution's traceback)
        (["--set", "model.width=2"], "make latents of 8x1, which the model's 2x2 patches do not tile: set them to multiples of 4x4"),
        (["--set", "model.width=6"], "make latents of 8x3, which the model's 2x2 patches do not tile"),
        # (at the first step, naming no setting: "crops of 12 latent frames do not fit clips of 8")
        (["--set", "data.latent_frames=12"], "data.latent_frames 12: crops that long do not fit the clips "
         "(data.synthetic_clip_latents: 8 latent frames); set it to at most 8"),  # fmt: skip
        (["--set", "model.overrides.num_layers=0"], "num_layers must be at least 1, not 0"),
        # (was "model.overrides: '<' not supported between instances of 'str' and 'int'")
        (["--set", "model.overrides.window_frames=abc"], "overrides.window_frames: expected int, got 'abc'"),
        (["--set", "model.overrides.patch_size=2"], "model.overrides.patch_size: expected tuple, got 2"),
        # (was "(YAML reads nan as text: give it a decimal point, as in 1.0e-3)")
        (["--set", "optim.lr=nan"], "optim.lr: expected float, got 'nan' (not a finite number)"),
        (["--out", "{file}/x"], "a file is in its way ({file})"),
        (["--set", "run.export={file}"], "run.export {file} is a file, not a folder"),  # was: after training
        (["--out", "/proc/streamgen-run"], "run.out: cannot make /proc/streamgen-run: No such file"),  # (a traceback)
        # overrides of other sizes than a model folder's weights: load_state_dict's traceback
        (["--set", "model.init={model}", "--set", "model.overrides.num_layers=9"],
         "dit.safetensors does not fit the model config (with model.overrides): "),  # fmt: skip
    ],
)
def test_a_config_the_stage_cannot_take_is_one_line_before_training(tmp_path, extra, says, capsys):
    from streamgen.cli import main
    from streamgen.models import MODELS_DIR

    a_file = tmp_path / "afile"
    a_file.write_text("")
    model = MODELS_DIR / "tiny-avatar"
    extra = [arg.replace("{file}", str(a_file)).replace("{model}", str(model)) for arg in extra]
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says.replace("{file}", str(a_file)) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("key", ["run.export", "run.out"])
def test_a_run_that_would_write_into_the_shipped_models_is_one_line_before_training(
    tmp_path, monkeypatch, capsys, key
):
    """run.export into streamgen/assets/models overwrote a shipped model (tiny-avatar-teacher, the
    default of every command that takes a teacher) with the run's, which only `distill.ship` does."""
    import streamgen.models
    from streamgen.cli import main

    shipped = tmp_path / "assets" / "models"
    (shipped / "tiny-avatar-teacher").mkdir(parents=True)
    (shipped / "tiny-avatar-teacher" / "model.json").write_text("{}")
    monkeypatch.setattr(streamgen.models, "MODELS_DIR", shipped)
    into = shipped / "tiny-avatar-teacher"
    out = into if key == "run.out" else tmp_path / "run"
    argv = ["distill", "teacher", "--config", "debug", "--out", str(out), "--steps", "1"]
    assert main([*argv, "--set", f"run.export={into}"] if key == "run.export" else argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"streamgen distill: error: {key} {into} is in the shipped models ({shipped}): give another folder, "
        "and ship a trained model with python -m distill.ship MODEL_DIR NAME\n"
    )
    assert sorted(p.name for p in shipped.rglob("*")) == ["model.json", "tiny-avatar-teacher"]
    assert (into / "model.json").read_text() == "{}" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["autoencoder", "tiny_decoder"])
def test_a_frame_size_the_autoencoder_cannot_take_is_one_line_before_training(stage, tmp_path, capsys):
    """The stages that train an autoencoder or its decoder did not check the frame size: a
    shape mismatch's traceback at the first step ("The size of tensor a (16) must match ...")."""
    from streamgen.cli import main

    argv = ["distill", stage, "--config", "debug", "--out", str(tmp_path / "run"), "--set", "model.height=17"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot build the {stage} stage from this config: frame size 17x" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_refused_as_its_stage_is_built_leaves_no_folder_it_made(tmp_path, monkeypatch, capsys):
    """The ode stage without its teacher: refused once run.out was made and locked, which was left
    holding `.run.lock` alone (and the folders above it). A run.out there before stays."""
    from streamgen.cli import main

    monkeypatch.chdir(tmp_path)  # (the debug config's teacher, runs/debug/teacher/model: not there)
    assert main(["distill", "ode", "--config", "debug", "--out", "a/b/run"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    assert main(["distill", "ode", "--config", "debug", "--out", "mine"]) == 2
    assert (tmp_path / "mine").is_dir()
