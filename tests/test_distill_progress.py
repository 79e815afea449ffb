"""What a stage shows while it works before its first training step."""

from __future__ import annotations

from test_distill_helpers import debug_config, run


def test_the_ode_stage_shows_its_teacher_trajectories_being_sampled(tmp_path, capsys):
    """The ode stage samples its teacher's trajectories before it trains (tiny-avatar: 256 of 48
    guided steps, minutes on a CPU) and showed nothing meanwhile: a run that looked hung. A bar
    counts them, shown where the training's bar is (run.progress)."""
    run(debug_config("teacher", tmp_path / "teacher"))
    teacher = tmp_path / "teacher" / "model"
    capsys.readouterr()
    run(debug_config("ode", tmp_path / "ode", teacher=teacher, init=teacher, **{"run.progress": True}))
    err = capsys.readouterr().err
    assert "ode: teacher trajectories: 100%" in err and "4/4" in err, err
    run(debug_config("ode", tmp_path / "quiet", teacher=teacher, init=teacher))  # (progress: false)
    assert "trajectories" not in capsys.readouterr().err


def test_the_latents_stage_shows_each_splits_clips_encoded_and_gathered(tmp_path, capsys):
    """The latents stage said a split's line once the split was done (tiny-avatar's 480 training
    clips: minutes of nothing). A bar counts each split's clips encoded, those cached before
    counted as done, then those gathered into its bank."""
    import torch

    from distill.config import find_config, load_config
    from distill.latents import build_latents
    from streamgen.data.shards import make_dataset
    from streamgen.model.vae import TinyCausalVAE

    root = tmp_path / "world"
    make_dataset(root, 4, 0, 32, 32, 1.0, 4, 50, 1)  # 4 clips of 1 s at 32x32: 2 train, 1 val, 1 test
    torch.manual_seed(0)
    TinyCausalVAE(4, (8, 16), 4).save(tmp_path / "autoencoder")
    cfg = load_config(find_config("tiny-avatar", "latents"), "latents")
    cfg.data.root, cfg.data.latents, cfg.model.flavor = str(root), "dbg", "debug"
    cfg.model.vae, cfg.run.threads, cfg.options.splits = str(tmp_path / "autoencoder"), 0, ["train"]
    capsys.readouterr()
    build_latents(cfg)
    err = capsys.readouterr().err
    assert "latents: train: encoded: 100%" in err and "2/2" in err, err
    assert "latents: train: gathered into its bank: 100%" in err, err
    (root / "latents" / "dbg" / "bank-train.safetensors").unlink()  # (its latents kept: gathered again)
    build_latents(cfg)
    err = capsys.readouterr().err
    assert "latents: train: encoded: 100%" in err and "gathered into its bank: 100%" in err, err
    assert "encoded:   0%" not in err  # (the clips cached before count as done)


def test_the_tiny_decoder_stage_shows_its_scoring_after_training(tmp_path, capsys):
    """The tiny_decoder stage scores its decoder on eval_split's clips after the training's bar
    reached 100% (tiny-avatar: 6 clips of 100 frames, each decoded twice), with nothing said
    meanwhile. A bar counts the clips scored."""
    run(debug_config("tiny_decoder", tmp_path / "td", **{"run.progress": True}))
    err = capsys.readouterr().err
    assert "tiny_decoder: scoring on train: 100%" in err and "2/2" in err, err


def test_the_autoencoder_stage_shows_its_latent_statistics_being_measured(tmp_path, capsys):
    """The autoencoder stage measures its latents' mean and std over stats_clips clips at export
    (tiny-avatar: 64), after the training's bar reached 100%, with nothing said meanwhile. A bar
    counts the clips."""
    run(debug_config("autoencoder", tmp_path / "ae", **{"run.progress": True}))
    err = capsys.readouterr().err
    assert "autoencoder: latent statistics: 100%" in err and "2/2" in err, err
