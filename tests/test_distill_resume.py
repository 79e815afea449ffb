"""Resume: what a checkpoint's run was made of, checked against the config that continues it."""

from __future__ import annotations

from pathlib import Path

import torch
from test_distill_helpers import final_tensors, max_difference

import distill
from distill import checkpoint as ckpt

CONFIGS = Path(distill.__file__).parent / "configs"


# --- a Wan-initialised run from before the audio-width change ------------------------------------


def test_a_wan_run_from_before_the_audio_width_change_resumes_with_the_width_given(
    tmp_path, monkeypatch, capsys
):
    """config_from_diffusers now gives a Wan checkpoint the size of a flavor that flavor's audio
    width (wan2.1-1.3b: 512); a run started before took the default 256, and its checkpoints are
    refused (`audio_dim: checkpoint 256, config 512`). The refusal says how to go on, and going on
    that way resumes it: the same weights as the run never interrupted."""
    from streamgen.cli import main
    from streamgen.model import config as model_config
    from streamgen.model.model import DiT
    from streamgen.model.wan import save_pretrained

    sizes = dict(in_channels=4, out_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                 text_dim=16, freq_dim=32)  # fmt: skip
    torch.manual_seed(3)
    save_pretrained(DiT(model_config.ModelConfig(**sizes, audio_mels=16)), tmp_path / "wan")
    yaml = tmp_path / "wan-teacher.yaml"
    yaml.write_text(
        (CONFIGS / "teacher-debug.yaml")
        .read_text()
        .replace(
            "model: {flavor: debug,",
            f"model: {{flavor: debug, init: 'wan:{tmp_path / 'wan'}', "
            "overrides: {audio_mels: 16, frames_per_chunk: 2, window_frames: 6},",
        )
    )

    def command(out, *extra):
        return ["distill", "teacher", "--config", str(yaml), "--out", str(tmp_path / out), *extra]

    # before the change: no flavor has these sizes, so the default audio width (256)
    assert main(command("whole")) == 0
    assert main([*command("cut"), "--steps", "2"]) == 0
    header = ckpt.checkpoint_header(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert header["model_configs"]["teacher"]["audio_dim"] == 256
    # the change: a flavor of these sizes, 512 wide
    wide = model_config.ModelConfig(name="wan-tiny", **sizes, audio_dim=512)
    monkeypatch.setitem(model_config.FLAVORS, "wan-tiny", wide)
    capsys.readouterr()
    assert main([*command("cut"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "teacher.audio_dim: checkpoint 256, config 512" in err, err
    assert "--set model.overrides.audio_dim=256" in err, err
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000002.safetensors"
    # the way the message says: resumed where it stopped, and the same run as the whole one
    assert main([*command("cut"), "--resume", "--set", "model.overrides.audio_dim=256"]) == 0, (
        capsys.readouterr()
    )
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000004.safetensors"
    assert max_difference(final_tensors(tmp_path / "cut"), final_tensors(tmp_path / "whole")) < 1e-6
    from streamgen.models import load_model

    assert load_model(str(tmp_path / "cut" / "model")).dit.cfg.audio_dim == 256
