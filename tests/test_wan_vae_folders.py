"""Wan VAE folders: one that is not whole, of another class, or with latent statistics or config
values of another shape is named in one line."""

import json
import re

import pytest
from wan_helpers import tiny_wan


def test_a_wan_vae_folder_that_is_not_whole_is_one_line(tmp_path):
    """diffusers' tracebacks (no config.json; the Hub looked for where there is no folder), and weights
    missing from its file made up at random after a page of their names."""
    from safetensors.torch import load_file, save_file

    from streamgen.model.wan_vae import WanVAE

    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json in it"):
        WanVAE.from_pretrained(tmp_path / "empty")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("decoder.conv_in")}, weights)
    with pytest.raises(
        ValueError, match="its weights do not match its config.json: 2 missing, e.g. decoder.conv_in"
    ):
        WanVAE.from_pretrained(tmp_path / "vae")
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable diffusers AutoencoderKLWan folder"):
        WanVAE.from_pretrained(tmp_path / "vae")


def test_a_wan_vae_folder_of_another_class_or_a_config_that_is_no_object_is_one_line(tmp_path):
    """A transformer's folder given for a Wan VAE (`model.vae: wan:PIPELINE/transformer`) was "its
    weights do not match its config.json: 194 missing"; a config.json of `null` diffusers'
    TypeError."""
    from streamgen.model.wan_vae import WanVAE

    tiny_wan(1).save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="config.json is of a WanTransformer3DModel, not a Wan VAE"):
        WanVAE.from_pretrained(tmp_path / "transformer")
    (tmp_path / "transformer" / "config.json").write_text("null")
    with pytest.raises(ValueError, match="config.json: not a JSON object"):
        WanVAE.from_pretrained(tmp_path / "transformer")


def test_a_wan_vae_folder_without_its_weights_says_which_file_it_lacks(tmp_path, capfd):
    """diffusers logged "An error occurred while trying to fetch" above its error, which named the
    diffusion_pytorch_model.bin it looked for last (of a folder of safetensors checkpoints)."""
    from streamgen.model.wan_vae import WanVAE

    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    capfd.readouterr()
    says = "no diffusion_pytorch_model.safetensors in it (it holds diffusion_pytorch_model.fp16.safetensors"
    with pytest.raises(ValueError, match=re.escape(says)):
        WanVAE.from_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model.safetensors in it$"):
        WanVAE.from_pretrained(tmp_path / "vae")
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("key", ["latents_mean", "latents_std"])
def test_a_wan_vae_whose_latent_statistics_are_not_one_per_channel_is_one_line(tmp_path, key):
    """A config.json with 3 means for 4 latent channels loaded, then the first encode failed with
    "The size of tensor a (4) must match the size of tensor b (3)", naming nothing."""
    from streamgen.model.wan_vae import WanVAE

    diffusers = pytest.importorskip("diffusers")
    stats = {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    stats[key] = stats[key][:3]
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               **stats).save_pretrained(tmp_path / "vae")  # fmt: skip
    says = f"{tmp_path / 'vae'}: its config.json's {key} is not 4 numbers (z_dim), one per latent channel"
    with pytest.raises(ValueError, match=re.escape(says)):
        WanVAE.from_pretrained(tmp_path / "vae")


def test_a_wan22_vae_is_refused_in_one_line(tmp_path):
    """The Wan2.2 VAE (patch_size 2) loaded, said its spatial factor was 8, and decoded 32x32 frames
    to 12 channels of 16x16: its decoder is driven here without diffusers' unpatchify."""
    from diffusers import AutoencoderKLWan

    from streamgen.model.wan_vae import WanVAE

    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4, is_residual=True, patch_size=2, in_channels=12,
                     out_channels=12).save_pretrained(tmp_path / "vae")  # fmt: skip
    with pytest.raises(ValueError, match=r"config.json is of the Wan2.2 VAE \(patch_size 2\)"):
        WanVAE.from_pretrained(tmp_path / "vae")


@pytest.mark.parametrize(
    "key, value, holds",
    [("latents_std", 0.0, "0.0"), ("latents_std", None, "null"), ("latents_mean", "a", '"a"')],
)
def test_a_wan_vae_whose_latent_statistics_are_not_numbers_is_one_line(tmp_path, key, value, holds):
    """A latents_std of 0 loaded, and every latent it normalised was inf or nan; a string or a null
    in the statistics was torch's "too many dimensions 'str'" (naming nothing) or its RuntimeError's
    traceback."""
    from streamgen.model.wan_vae import WanVAE

    diffusers = pytest.importorskip("diffusers")
    stats = {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    stats[key] = [*stats[key][:3], value]
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               **stats).save_pretrained(tmp_path / "vae")  # fmt: skip
    what = "positive numbers" if key == "latents_std" else "finite numbers"
    says = f"{tmp_path / 'vae'}: its config.json's {key} holds {holds}: they must be {what}"
    with pytest.raises(ValueError, match=re.escape(says) + "$"):
        WanVAE.from_pretrained(tmp_path / "vae")


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("z_dim", "4", "its config.json's z_dim is \"4\", not an integer of at least 1"),
        ("dim_mult", [1, "2", 2, 2], "its config.json's dim_mult is [1, \"2\", 2, 2], not a list of positive integers"),
        ("temperal_downsample", "ab", "not a readable diffusers AutoencoderKLWan folder (string index out of range)"),
    ],
)
def test_a_wan_vae_config_with_a_value_of_another_type_is_one_line(tmp_path, key, value, says):
    """A size given as a string in a Wan VAE's config.json (an edit, a tool that writes every value
    quoted) was diffusers' TypeError or IndexError from deep in its constructor, a traceback."""
    from streamgen.model.wan_vae import WanVAE

    diffusers = pytest.importorskip("diffusers")
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(tmp_path / "vae")  # fmt: skip
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'vae'}: {says}")):
        WanVAE.from_pretrained(tmp_path / "vae")
