"""Wan weights: the same random weights in diffusers' WanTransformer3DModel and our DiT agree."""

import errno
import json
import os
import re

import pytest
import torch
from diffusers import WanTransformer3DModel

from streamgen.model.model import DiT
from streamgen.model.wan import (
    config_from_diffusers,
    from_diffusers,
    load_pretrained,
    save_pretrained,
    to_diffusers,
)


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    ).eval()
    with torch.no_grad():  # make every weight non-trivial (norm weights, modulation tables, ...)
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 8, 12, generator=g)
    t = torch.tensor([300.0, 700.0])
    ctx = torch.randn(2, 5, 24, generator=g)
    return x, t, ctx


@torch.no_grad()
def test_same_weights_same_output_bidirectional():
    ref = tiny_wan()
    ours = DiT(config_from_diffusers(dict(ref.config))).eval()
    missing, unexpected = ours.load_state_dict(from_diffusers(ref.state_dict()), strict=False)
    assert unexpected == []
    assert all("audio" in k for k in missing)  # only our avatar branches are absent from Wan
    x, t, ctx = inputs()
    expected = ref(x, t, ctx).sample
    got = ours(x, t, ctx, mode="bidirectional")
    assert (got - expected).abs().max().item() <= 1e-4
    # audio conditioning is zero-initialised: a loaded Wan model is unchanged by it
    audio = torch.randn(2, 3, ours.cfg.audio_window, ours.cfg.audio_dim)
    assert (ours(x, t, ctx, audio) - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_an_odd_freq_dim_embeds_timesteps_as_diffusers_does():
    """diffusers pads an odd timestep embedding with a zero; ours was one value short, and the
    first forward a shape error ("mat1 and mat2 shapes cannot be multiplied (2x32 and 33x48)")."""
    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=24, freq_dim=33, ffn_dim=64, num_layers=1,
    ).eval()  # fmt: skip
    ours = DiT(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=False)
    x, t, ctx = inputs()
    assert (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max().item() <= 1e-4


@torch.no_grad()
def test_per_frame_timesteps_match_a_uniform_timestep():
    ref = tiny_wan()
    ours = DiT(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=False)
    x, t, ctx = inputs()
    per_frame = t[:, None].expand(2, 3)
    assert torch.allclose(ours(x, per_frame, ctx), ref(x, t, ctx).sample, atol=1e-4)


@torch.no_grad()
def test_load_pretrained_directory_and_round_trip(tmp_path):
    ref = tiny_wan(seed=3)
    ref.save_pretrained(tmp_path / "wan", safe_serialization=True)
    ours = load_pretrained(tmp_path / "wan").eval()
    x, t, ctx = inputs()
    assert (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max().item() <= 1e-4
    # ours -> diffusers keys -> diffusers model gives the same weights back
    back = to_diffusers(ours.state_dict())
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    save_pretrained(ours, tmp_path / "again")
    reloaded = WanTransformer3DModel.from_pretrained(tmp_path / "again").eval()
    assert torch.allclose(reloaded(x, t, ctx).sample, ref(x, t, ctx).sample, atol=1e-6)


def test_load_pretrained_builds_no_second_model(tmp_path, monkeypatch):
    """The checkpoint's tensors become the weights, in the dtype asked for; only the avatar
    branches (which Wan lacks) are made anew, with their output zero, and trainable. A whole
    float32 DiT beside the checkpoint was ~3x Wan-14B's 56 GB at the peak."""
    from streamgen.model import model as model_module

    ref = tiny_wan(seed=4)
    ref.save_pretrained(tmp_path / "wan", safe_serialization=True)
    built_on = []
    dit_init = model_module.DiT.__init__

    def recording_init(self, cfg):
        built_on.append(torch.get_default_device().type)
        dit_init(self, cfg)

    monkeypatch.setattr(model_module.DiT, "__init__", recording_init)
    ours = load_pretrained(tmp_path / "wan", dtype=torch.bfloat16).eval()
    assert built_on == ["meta"]
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad and not p.is_meta for p in ours.parameters())
    assert all(b.audio_attn.o.weight.abs().max() == 0 for b in ours.blocks)
    assert ours.audio_encoder is not None and any(p.abs().max() > 0 for p in ours.audio_encoder.parameters())
    x, t, ctx = inputs()
    with torch.no_grad():
        got = ours(x.bfloat16(), t, ctx.bfloat16()).float()
    assert (got - ref(x, t, ctx).sample).abs().max().item() <= 0.1  # bf16 weights, same model


def test_a_checkpoint_of_more_layers_than_its_config_is_refused(tmp_path):
    """A config (or distill's model.overrides) of fewer layers than the weights: the rest were
    dropped without a word, and a 1-layer teacher trained and exported from a 2-layer Wan."""
    tiny_wan().save_pretrained(tmp_path / "wan")
    says = "of its weights have no place in a DiT of its config.json with the overrides {'num_layers': 1} (num_layers 1)"
    with pytest.raises(ValueError, match=re.escape(says)):
        load_pretrained(tmp_path / "wan", num_layers=1)


def test_weights_of_other_sizes_than_the_overrides_blame_the_overrides(tmp_path):
    """A distill config's model.overrides of other sizes than a Wan checkpoint's (in_channels 8
    for its 4) were said to be sizes "its config.json gives", which gave the weights' sizes: the
    overrides that changed them are named."""
    tiny_wan().save_pretrained(tmp_path / "wan")
    says = ("its weights are not of the sizes of its config.json with the overrides {'in_channels': 8}: "
            "patch_embedding.weight (32, 4, 1, 2, 2), not (32, 8, 1, 2, 2)")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(says)):
        load_pretrained(tmp_path / "wan", in_channels=8)


@pytest.mark.parametrize(
    "config, says",
    [
        # (Wan-AI/Wan2.1-T2V-1.3B's own config.json: "no 'num_attention_heads' in it")
        (
            {"_class_name": "WanModel", "dim": 1536, "num_heads": 12},
            "this is the original Wan layout (WanModel",
        ),
        ({"dim": 1536, "num_heads": 12, "num_layers": 30}, "give its diffusers checkpoint"),
        (
            {"_class_name": "AutoencoderKLWan", "z_dim": 16},
            "this is a AutoencoderKLWan, not a Wan transformer",
        ),
    ],
)
def test_a_folder_of_another_wan_layout_is_named_for_what_it_is(tmp_path, config, says):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(says)):
        load_pretrained(tmp_path)


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


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    cfg = dict(tiny_wan().config)
    cfg["image_dim"] = 1280
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="I2V"):
        load_pretrained(tmp_path)
    with pytest.raises(KeyError, match="no counterpart"):
        from_diffusers({"blocks.0.attn2.add_k_proj.weight": torch.zeros(1)})


def test_a_variant_beside_the_plain_checkpoint_is_not_read_over_it(tmp_path):
    """diffusers' save_pretrained(variant="fp16") writes NAME.fp16.safetensors beside NAME.safetensors;
    both were read, the variant's tensors replacing the plain file's without a word."""
    plain, other = tiny_wan(seed=3), tiny_wan(seed=4)
    plain.save_pretrained(tmp_path / "wan", safe_serialization=True)
    other.save_pretrained(tmp_path / "wan", safe_serialization=True, variant="zz")  # (sorts after)
    x, t, ctx = inputs()
    ours = load_pretrained(tmp_path / "wan").eval()
    assert (ours(x, t, ctx) - plain(x, t, ctx).sample).abs().max().item() <= 1e-4
    (tmp_path / "wan" / "diffusion_pytorch_model.safetensors").rename(
        tmp_path / "wan" / "diffusion_pytorch_model.aa.safetensors"
    )
    with pytest.raises(ValueError, match=r"2 variants of diffusion_pytorch_model.safetensors \(.*aa.*zz"):
        load_pretrained(tmp_path / "wan")
    (tmp_path / "wan" / "diffusion_pytorch_model.aa.safetensors").unlink()
    only = load_pretrained(tmp_path / "wan").eval()  # one variant alone is the checkpoint
    assert (only(x, t, ctx) - other(x, t, ctx).sample).abs().max().item() <= 1e-4


def test_a_sharded_variant_is_read_through_its_index(tmp_path):
    """save_pretrained(variant="fp16") of a sharded model writes NAME.safetensors.index.fp16.json and
    NAME.fp16-0000k-of-N.safetensors, which were read as whole files: a shard gone was "its weights
    lack N", and beside a whole checkpoint their tensors replaced its own without a word."""
    plain, other = tiny_wan(seed=3), tiny_wan(seed=4)
    other.save_pretrained(tmp_path / "wan", variant="fp16", max_shard_size="20KB")
    x, t, ctx = inputs()
    ours = load_pretrained(tmp_path / "wan").eval()
    assert (ours(x, t, ctx) - other(x, t, ctx).sample).abs().max().item() <= 1e-4
    plain.save_pretrained(tmp_path / "plain")  # (a whole checkpoint beside them is the one read)
    name = "diffusion_pytorch_model.safetensors"
    (tmp_path / "wan" / name).write_bytes((tmp_path / "plain" / name).read_bytes())
    ours = load_pretrained(tmp_path / "wan").eval()
    assert (ours(x, t, ctx) - plain(x, t, ctx).sample).abs().max().item() <= 1e-4
    (tmp_path / "wan" / "diffusion_pytorch_model.safetensors").unlink()
    shard = sorted((tmp_path / "wan").glob("*.fp16-*-of-*.safetensors"))[1]
    shard.unlink()
    says = f"shards it names are not in {tmp_path / 'wan'}, e.g. {shard.name}"
    with pytest.raises(FileNotFoundError, match=re.escape(says)):
        load_pretrained(tmp_path / "wan")


def test_shards_without_their_index_and_one_gone_name_the_one_gone(tmp_path):
    """A sharded checkpoint whose index was lost read its shards as whole files: one gone was "its
    weights lack 13 of a Wan transformer", naming no file."""
    tiny_wan(3).save_pretrained(tmp_path / "wan", max_shard_size="20KB")
    (tmp_path / "wan" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    load_pretrained(tmp_path / "wan")  # (all of them: read without the index)
    shards = sorted((tmp_path / "wan").glob("*-of-*.safetensors"))
    shards[2].unlink()
    says = f"1 of the {len(shards)} shards of diffusion_pytorch_model are not in it and it has no index, e.g. {shards[2].name}"
    with pytest.raises(FileNotFoundError, match=re.escape(says)):
        load_pretrained(tmp_path / "wan")


def test_a_checkpoint_the_size_of_a_flavor_gets_its_audio_width():
    """Wan2.1-1.3B's config.json makes the wan2.1-1.3b flavor's model, avatar branch included
    (the GPU benchmark times that flavor); a size no flavor has keeps the default width."""
    from streamgen.model.config import ModelConfig, get_config
    from streamgen.model.wan import diffusers_config

    flavor = get_config("wan2.1-1.3b")
    cfg = config_from_diffusers(diffusers_config(flavor))
    assert cfg.audio_dim == flavor.audio_dim == 512
    assert config_from_diffusers(diffusers_config(flavor), audio_dim=64).audio_dim == 64
    assert config_from_diffusers(dict(tiny_wan().config)).audio_dim == ModelConfig().audio_dim


def test_the_weights_digest_of_a_wan_pipeline_folder_is_of_its_transformers_weights(tmp_path):
    """`wan:DIR` loads a pipeline folder's transformer/ (load_pretrained); its digest, which a run
    keeps to refuse a resume against another teacher, hashed DIR/*.safetensors: none there, so
    every pipeline folder had one digest, of nothing, whatever its weights."""
    from distill.build import load_frozen_and_digest, weights_digest

    digests = []
    for seed in (3, 4):
        tiny_wan(seed).save_pretrained(tmp_path / "pipeline" / "transformer", safe_serialization=True)
        digests.append(weights_digest(f"wan:{tmp_path / 'pipeline'}"))
        assert load_frozen_and_digest(f"wan:{tmp_path / 'pipeline'}")[1] == digests[-1]
    assert digests[0] != digests[1]
    # a transformer folder itself: the same digest as the pipeline folder around it
    assert weights_digest(f"wan:{tmp_path / 'pipeline' / 'transformer'}") == digests[1]


def test_a_wan_teachers_digest_is_of_the_weights_it_loaded(tmp_path, monkeypatch):
    """`load_frozen_and_digest("wan:DIR")` hashed the transformer's files, then loaded them in a
    second read: weights replaced in between (a re-download, another save) gave the digest of
    the old teacher beside the new one's weights, so a resume's check passed against a teacher
    it was not scored with. The digest is of the bytes the weights are loaded from."""
    import streamgen.model.wan
    from distill.build import load_frozen_and_digest, weights_digest

    pipeline, transformer = tmp_path / "pipeline", tmp_path / "pipeline" / "transformer"
    tiny_wan(3).save_pretrained(transformer, safe_serialization=True)
    tiny_wan(4).save_pretrained(tmp_path / "retrained", safe_serialization=True)
    real_load = streamgen.model.wan.load_pretrained

    def retrained_then_load(path, *args, **kwargs):  # the retrained weights put in place first
        for f in (tmp_path / "retrained").glob("*.safetensors"):
            os.replace(f, transformer / f.name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(streamgen.model.wan, "load_pretrained", retrained_then_load)
    teacher, digest = load_frozen_and_digest(f"wan:{pipeline}")
    monkeypatch.undo()
    retrained = from_diffusers(tiny_wan(4).state_dict())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in retrained.items())
    assert digest == weights_digest(f"wan:{pipeline}")


def _our_wan(seed: int, **overrides) -> DiT:
    """Our DiT of tiny_wan's sizes (`overrides` changed), with random weights."""
    torch.manual_seed(seed)
    return DiT(config_from_diffusers(dict(tiny_wan().config), **overrides)).eval()


def _same_weights(loaded: DiT, saved: DiT) -> bool:
    theirs = to_diffusers(saved.state_dict())
    return all(torch.equal(v, theirs[k]) for k, v in to_diffusers(loaded.state_dict()).items())


def test_a_wan_folder_is_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    """save_pretrained wrote into the folder in place, config.json first: a save cut short after
    it (a full disk, a kill) left the new config beside the old weights, which loaded no more."""
    import errno

    import streamgen.model.files

    old, new = _our_wan(0), _our_wan(1, num_layers=3)
    save_pretrained(old, tmp_path / "wan")
    before = {p.name: p.read_bytes() for p in (tmp_path / "wan").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streamgen.model.files, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(new, tmp_path / "wan")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "wan").iterdir()} == before
    assert os.listdir(tmp_path) == ["wan"]
    assert _same_weights(load_pretrained(tmp_path / "wan"), old)


def test_a_wan_save_cut_short_file_by_file_is_refused_clearly(tmp_path, monkeypatch):
    """Where the folder is written into file by file (no exchange), a save cut short once the new
    config.json was in place left it beside the old index and shards, which load_pretrained read:
    the old weights under the new config (or a KeyError naming neither). The old index and shards
    go before the new config comes, and a reader through read_folder (distill's `wan:` teacher)
    is told the save was cut short."""
    import streamgen.folders
    from streamgen.folders import read_folder

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    real_replace = os.replace

    def cut_short_after_config(src, dst):
        real_replace(src, dst)
        if os.fspath(dst) == str(folder / "config.json"):  # (not the staging folder's)
            raise OSError(errno.EIO, "an I/O error")

    monkeypatch.setattr(streamgen.folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(os, "replace", cut_short_after_config)
    with pytest.raises(OSError):
        save_pretrained(_our_wan(1), folder)
    monkeypatch.undo()
    assert not list(folder.glob("*.index.json"))
    with pytest.raises(Exception, match="cut short") as refused:
        read_folder(folder, load_pretrained)
    assert type(refused.value).__name__ == "ExportUnderWay", refused.value


@pytest.mark.parametrize("whole_folder_swap", [True, False], ids=["exchange", "in_place"])
def test_a_wan_save_replaces_a_sharded_checkpoint_and_keeps_what_else_is_there(
    tmp_path, monkeypatch, whole_folder_swap
):
    """A folder that held a sharded checkpoint (an index and its shards, as downloaded) kept them
    beside the one file save_pretrained wrote: the index is what load_pretrained reads, so it
    loaded the old weights. What is not the transformer's (a pipeline's other folders, a note)
    stays, also where the folder is written into file by file (no exchange)."""
    import streamgen.folders

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and list(folder.glob("*.index.json"))
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text("{}")
    (folder / "README.md").write_text("notes")
    if not whole_folder_swap:
        monkeypatch.setattr(streamgen.folders, "exchange", lambda a, b: False)
    new = _our_wan(1)
    save_pretrained(new, folder)
    monkeypatch.undo()
    stamp = [] if whole_folder_swap else [streamgen.folders.EXPORT_STAMP]  # (written file by file)
    assert sorted(os.listdir(folder)) == [
        *stamp, "README.md", "config.json", "diffusion_pytorch_model.safetensors", "vae",
    ]  # fmt: skip
    assert (folder / "vae" / "config.json").read_text() == "{}"
    assert (folder / "README.md").read_text() == "notes"
    assert _same_weights(load_pretrained(folder), new)
    assert os.listdir(tmp_path) == ["wan"]


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "not fully covered"),
        (lambda f: f.write_bytes(b"<html>Not Found</html>"), "header too large"),
        (lambda f: f.write_bytes(b""), "header too small"),
    ],
    ids=["truncated", "an_error_page", "empty"],
)
def test_a_bad_weight_file_in_a_wan_folder_is_named_in_one_line(tmp_path, capsys, damage, says):
    """A `wan:` folder's weight file that safetensors cannot read (a download cut short, an error
    page saved under its name) raised safetensors' own error, naming no file, through every
    command: `streamgen distill` printed a traceback. The file and what is wrong with it are named,
    by the teacher's digest path (the bytes read once) too."""
    from distill.build import ModelSourceError, load_frozen_and_digest
    from streamgen.cli import main

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    damage(weights)
    with pytest.raises(ModelSourceError, match=re.escape(f"{weights}: not a readable safetensors file")) as e:
        load_frozen_and_digest(f"wan:{folder}")
    assert says in str(e.value)
    command = ["distill", "teacher", "--config", "debug", "--set", f"model.init=wan:{folder}"]
    assert main([*command, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: not a readable safetensors file" in err and "Traceback" not in err


def test_a_wan_folders_unreadable_config_or_index_is_named(tmp_path):
    """config.json and the shards' index were read by json.loads alone: a broken one said
    "Expecting value: line 1 column 1 (char 0)", naming no file, and an index without its
    weight_map said "'weight_map'"."""
    from distill.build import ModelSourceError, load_dit

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    index = next(folder.glob("*.index.json"))
    index.write_text("{}")
    with pytest.raises(ModelSourceError, match=re.escape(f"{index}: no 'weight_map' in it")):
        load_dit(f"wan:{folder}")
    index.write_text("")
    with pytest.raises(ModelSourceError, match=re.escape(f"{index}: not valid JSON")):
        load_dit(f"wan:{folder}")
    (folder / "config.json").write_text("{")
    with pytest.raises(ModelSourceError, match=re.escape(f"{folder / 'config.json'}: not valid JSON")):
        load_dit(f"wan:{folder}")


def _teacher_command_error(folder, out, capsys) -> str:
    """What `streamgen distill teacher` with the `wan:` folder `folder` as its model prints, once
    it has exited 2 (a user's error)."""
    from streamgen.cli import main

    command = ["distill", "teacher", "--config", "debug", "--set", f"model.init=wan:{folder}"]
    assert main([*command, "--out", str(out)]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("shard", [3, None, ["model-00001.safetensors"], {"file": "x"}, ""])
def test_a_wan_index_whose_weight_map_names_no_file_is_named_in_one_line(tmp_path, capsys, shard):
    """A shards' index whose weight_map gave a weight no file name (a number, null, a list) was a
    TypeError from sorting or hashing the names, naming neither the index nor the weight, and
    `streamgen distill` printed a traceback. The index and the weight are named in one line."""
    from distill.build import ModelSourceError, load_dit

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    index = next(folder.glob("*.index.json"))
    content = json.loads(index.read_text())
    weight = sorted(content["weight_map"])[1]
    content["weight_map"][weight] = shard
    index.write_text(json.dumps(content))
    says = f"{index}: its weight_map's {weight!r} is {shard!r}, not a file name"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{folder}")
    err = _teacher_command_error(folder, tmp_path / "out", capsys)
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder", "backslash", "dotdot"])
def test_a_wan_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, where):
    """The shards' index names its shards by file name, beside it. A path in its weight_map
    ("../x.safetensors", an absolute one) was joined to the folder as it was: the weights of a
    file outside the model's folder were read as the model's (here a copy of its own shard, which
    loaded). Such an index is refused, naming it and the weight."""
    import shutil

    from distill.build import ModelSourceError, load_dit, weights_digest

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    index = next(folder.glob("*.index.json"))
    content = json.loads(index.read_text())
    weight = sorted(content["weight_map"])[1]
    shard = folder / content["weight_map"][weight]
    (tmp_path / "sub").mkdir()
    outside = {"parent": tmp_path / shard.name, "absolute": tmp_path / "sub" / shard.name,
               "subfolder": folder / "sub" / shard.name}  # fmt: skip
    named = {"parent": f"../{shard.name}", "absolute": str(outside["absolute"]),
             "subfolder": f"sub/{shard.name}", "backslash": f"sub\\{shard.name}", "dotdot": ".."}[where]  # fmt: skip
    if where in outside:
        outside[where].parent.mkdir(exist_ok=True)
        shutil.copy(shard, outside[where])
    content["weight_map"] = {w: named if s == shard.name else s for w, s in content["weight_map"].items()}
    index.write_text(json.dumps(content))
    first = sorted(w for w, s in content["weight_map"].items() if s == named)[0]
    says = f"{index}: its weight_map's {first!r} is {named!r}, not a file name"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{folder}")
    # (the digest a run keeps of its teacher reads the same files: told alike, not a ValueError)
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        weights_digest(f"wan:{folder}")


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("num_attention_heads", None, "no 'num_attention_heads' in it"),
        ("attention_head_dim", None, "no 'attention_head_dim' in it"),
        ("ffn_dim", None, "no 'ffn_dim' in it"),
        ("num_layers", None, "no 'num_layers' in it"),
        ("num_attention_heads", "2", "its 'num_attention_heads' is '2', not a positive integer"),
        ("num_layers", 0, "its 'num_layers' is 0, not a positive integer"),
        ("in_channels", 4.0, "its 'in_channels' is 4.0, not a positive integer"),
        ("patch_size", 2, "its 'patch_size' is 2, not a list of 3 positive integers"),
        ("attention_head_dim", 3, "head_dim 3 must be even"),
        ("eps", "1e-6", "its 'eps' is '1e-6', not a number between 0 and 1"),
        ("cross_attn_norm", "yes", "its 'cross_attn_norm' is 'yes', not true or false"),
    ],
)
def test_a_wan_config_without_a_size_or_with_a_wrong_one_is_named_in_one_line(
    tmp_path, capsys, key, value, says
):
    """config.json without `num_attention_heads` (or another size a Wan transformer is built from)
    said only "cannot load the Wan checkpoint DIR: 'num_attention_heads'", naming no file, and a
    size of another type ("2") was a TypeError from deep in the model's config: a traceback. The
    file and the key are named in one line. (None: the key left out.)"""
    from distill.build import ModelSourceError, load_dit

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=re.escape(f"{config_path}: {says}")):
        load_dit(f"wan:{folder}")
    if key == "num_attention_heads":  # (the command's one line, once for a missing key, once for a type)
        err = _teacher_command_error(folder, tmp_path / "out", capsys)
        assert f"{config_path}: {says}" in err and "Traceback" not in err


def test_a_wan_config_of_other_sizes_than_its_weights_is_named_in_one_line(tmp_path, capsys):
    """A config.json whose sizes the weights beside it are not of (an ffn_dim edited, another
    model's config) was torch's RuntimeError from load_state_dict, uncaught: a traceback. The
    folder and the weights of other sizes (by the file's names) are named in one line."""
    from distill.build import ModelSourceError, load_dit

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ffn_dim": 32}))
    says = f"{folder}: its weights are not of the sizes of its config.json: blocks.0.ffn.net.0.proj.weight (64, 32), not (32, 32)"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{folder}")
    err = _teacher_command_error(folder, tmp_path / "out", capsys)
    assert says in err and "Traceback" not in err


def test_a_wan_save_into_a_pipeline_folder_writes_its_transformer(tmp_path):
    """save_pretrained given a pipeline's folder (its transformer in transformer/) wrote the new
    config.json and weights beside transformer/, which load_pretrained of the same folder reads:
    the old weights loaded, without a word. The pipeline's transformer/ is what it writes now."""
    pipeline = tmp_path / "pipeline"
    tiny_wan(3).save_pretrained(pipeline / "transformer", safe_serialization=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    new = _our_wan(1)
    save_pretrained(new, pipeline)
    assert sorted(os.listdir(pipeline)) == ["model_index.json", "transformer"]
    assert _same_weights(load_pretrained(pipeline), new)
    assert _same_weights(load_pretrained(pipeline / "transformer"), new)


def test_a_wan_checkpoint_missing_a_weight_or_with_a_foreign_one_is_named_in_one_line(tmp_path, capsys):
    """A checkpoint that lacked a weight said "checkpoint lacks weights for:
    ['blocks.0.self_attn.q.weight']", in the quotes of a KeyError, naming no folder and the weight
    by a name its files do not have; one with a weight of no place likewise in quotes. Both name
    the folder, and the weight as the checkpoint's files name it."""
    from safetensors.torch import load_file, save_file

    from distill.build import ModelSourceError, load_dit

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    complete = load_file(weights)
    save_file({k: v for k, v in complete.items() if k != "blocks.1.attn1.to_q.weight"}, weights)
    says = f"{folder}: its weights lack 1 of a Wan transformer of its config.json, e.g. blocks.1.attn1.to_q.weight"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{folder}")
    err = _teacher_command_error(folder, tmp_path / "out", capsys)
    assert says in err and "Traceback" not in err and "\"" not in err
    save_file({**complete, "blocks.0.attn2.add_k_proj.weight": torch.zeros(1)}, weights)
    with pytest.raises(ModelSourceError, match=re.escape(f"{folder}: keys with no counterpart")) as refused:
        load_dit(f"wan:{folder}")
    assert "\"" not in str(refused.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_wan_checkpoint_with_a_weight_that_is_not_floating_point_is_named_in_one_line(
    tmp_path, capsys, dtype
):  # fmt: skip
    """An integer or boolean weight was load_state_dict's RuntimeError ("Only Tensors of floating
    point and complex dtype can require gradients"), several lines and a traceback from
    `streamgen distill`. It is one line naming the folder, the weight and its dtype."""
    from safetensors.torch import load_file, save_file

    from distill.build import ModelSourceError, load_dit

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["proj_out.bias"] = tensors["proj_out.bias"].to(dtype)
    save_file(tensors, weights)
    name = str(dtype).removeprefix("torch.")
    says = f"{folder}: 1 of its weights are not floating-point numbers, e.g. proj_out.bias ({name})"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{folder}")
    err = _teacher_command_error(folder, tmp_path / "out", capsys)
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_pipelines_transformer_without_its_config_is_the_folder_named(tmp_path):
    """A pipeline whose transformer/ lacks config.json (a download cut short) was said to be the
    pipeline folder without one, which a pipeline's folder never has."""
    from distill.build import ModelSourceError, load_dit

    pipeline = tmp_path / "pipeline"
    tiny_wan(3).save_pretrained(pipeline / "transformer", safe_serialization=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (pipeline / "transformer" / "config.json").unlink()
    says = f"{pipeline / 'transformer'} has no config.json"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{pipeline}")


@pytest.mark.parametrize("given", ["nowhere", "weights.safetensors"])
def test_a_wan_path_that_is_no_folder_says_so(tmp_path, given):
    """`model.init: wan:PATH` (and `model.vae`) of no such path, or of a checkpoint's .safetensors
    file, said "PATH has no config.json", sending one to look for a file in a folder not there."""
    from distill.build import ModelSourceError, load_dit, load_vae
    from distill.config import find_config, load_config

    (tmp_path / "weights.safetensors").write_bytes(b"")
    path = tmp_path / given
    says = f"{path}: no such folder" if given == "nowhere" else f"{path} is a file, not a folder"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{path}")
    section = load_config(find_config("debug", "teacher"), "teacher").model
    section.vae = f"wan:{path}"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_vae(section, 4, 4, 0)


def test_a_wan_folder_given_without_its_prefix_is_told_to_take_it(tmp_path):
    """A diffusers Wan folder given as a model directory (`model.init: DIR`, no `wan:`) was told
    "train the stage that makes it first"."""
    from distill.build import ModelSourceError, load_dit, load_frozen_and_digest

    pipeline = tmp_path / "pipeline"
    tiny_wan(3).save_pretrained(pipeline / "transformer")
    (pipeline / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    for given in (pipeline, pipeline / "transformer"):
        says = f"it is a diffusers Wan checkpoint: give it as wan:{given}"
        with pytest.raises(ModelSourceError, match=re.escape(says)):
            load_dit(str(given))
        with pytest.raises(ModelSourceError, match=re.escape(says)):
            load_frozen_and_digest(str(given))


def test_a_wan_index_naming_shards_that_are_not_there_says_so(tmp_path):
    """diffusers' save_pretrained of a whole checkpoint over a sharded one removes the shards but
    leaves their index, which the loader reads first: "[Errno 2] No such file or directory" of a
    shard, not saying that the index named it, nor that the weights were beside it."""
    from distill.build import ModelSourceError, load_dit

    folder = tmp_path / "wan"
    tiny_wan(1).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    tiny_wan(2).save_pretrained(folder, safe_serialization=True)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    shards = len(set(json.loads(index.read_text())["weight_map"].values()))
    says = (f"{index}: {shards} of the {shards} shards it names are not in {folder}, e.g. "
            f"diffusion_pytorch_model-00001-of-0000{shards}.safetensors; it holds "
            "diffusion_pytorch_model.safetensors, which the index does not name")  # fmt: skip
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{folder}")


def test_a_wan_checkpoint_larger_than_the_free_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Wan-14B's bfloat16 weights read into float32 on a machine without the memory for them were
    the kernel's kill of the process, without a word. What loading takes (the files' bytes, and a
    float32 copy of each tensor stored in another dtype) is reckoned from the headers first."""
    from distill.build import ModelSourceError, load_dit
    from streamgen import models

    folder = tmp_path / "wan"
    tiny_wan(3).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    files = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    weights = sum(p.numel() for p in tiny_wan(3).parameters())
    monkeypatch.setattr(models, "free_memory", lambda: files + 4 * weights - 1)
    with pytest.raises(ModelSourceError, match=re.escape(f"{folder}: loading its weights in float32 takes")):
        load_dit(f"wan:{folder}")
    monkeypatch.setattr(models, "free_memory", lambda: files + 4 * weights)
    assert load_dit(f"wan:{folder}").cfg.num_layers == 2
    # (stored as loaded: the files' bytes alone)
    load_pretrained(folder, dtype=torch.bfloat16)


def test_a_wan22_pipelines_second_expert_is_said_to_be_left_out(tmp_path, capsys):
    """A Wan2.2 pipeline's transformer_2/ (its low-noise expert) was ignored without a word: the
    high-noise expert in transformer/ was distilled from as if it denoised every noise level."""
    from distill.build import load_dit

    pipeline = tmp_path / "wan22"
    tiny_wan(3).save_pretrained(pipeline / "transformer", safe_serialization=True)
    assert load_dit(f"wan:{pipeline}") is not None
    assert "transformer_2" not in capsys.readouterr().err
    tiny_wan(4).save_pretrained(pipeline / "transformer_2", safe_serialization=True)
    load_dit(f"wan:{pipeline}")
    load_dit(f"wan:{pipeline}")  # (said once)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {pipeline} holds transformer_2/"), err
    assert "low-noise expert), which is not loaded" in err


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


def test_a_wan_pipeline_given_as_model_init_alone_says_its_vae_is_not_used(tmp_path, capsys):
    """`model.init: wan:PIPELINE` without model.vae trained on a new random TinyCausalVAE's latents,
    the pipeline's own vae/ beside its transformer/ left unused without a word."""
    from distill.build import load_vae
    from distill.config import ModelConfigSection

    pipeline = tmp_path / "pipeline"
    section = ModelConfigSection(init=f"wan:{pipeline}")
    (pipeline / "transformer").mkdir(parents=True)
    load_vae(section, 4, 4, seed=0)
    assert capsys.readouterr().err == ""  # (a transformer folder alone: no VAE to take)
    (pipeline / "vae").mkdir()
    vae = load_vae(section, 4, 4, seed=0)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: model.init is the Wan pipeline {pipeline}, but model.vae is not set")
    assert f"set model.vae: wan:{pipeline}" in err and err.count("\n") == 1
    assert type(vae).__name__ == "TinyCausalVAE"


def test_a_wan_folder_holding_a_second_checkpoint_is_refused_not_read_over_the_first(tmp_path):
    """A folder with a second whole checkpoint beside the first (a copy of other weights, kept under
    another name) loaded both, the later file's tensors over the other's without a word: weights
    that are neither. A weight in two files is one error naming both."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "wan"
    tiny_wan(3).save_pretrained(folder, safe_serialization=True)
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    save_file({k: v * 0 for k, v in weights.items()}, folder / "older.safetensors")
    says = (
        rf"{re.escape(str(folder))}: its weight \S+ is in both diffusion_pytorch_model\.safetensors and "
        r"older\.safetensors: the folder holds more than one checkpoint; keep one of them$"
    )
    with pytest.raises(ValueError, match=says):
        load_pretrained(folder)
    (folder / "older.safetensors").unlink()
    assert torch.equal(load_pretrained(folder).patch_embed.weight, weights["patch_embedding.weight"])


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


def test_a_wan_path_under_the_home_of_no_such_user_says_it_is_not_there():
    """`model.init: wan:~someone/wan` (a config from another machine, whose user this one has not)
    was pathlib's RuntimeError "Could not determine home directory.", a traceback."""
    from distill.build import ModelSourceError, load_dit, load_vae
    from distill.config import find_config, load_config

    path = "~no-such-user-of-streamgen/wan"
    with pytest.raises(ModelSourceError, match=re.escape(f"{path}: no such folder")):
        load_dit(f"wan:{path}")
    section = load_config(find_config("debug", "teacher"), "teacher").model
    section.vae = f"wan:{path}"
    with pytest.raises(ModelSourceError, match=re.escape(f"{path}: no such folder")):
        load_vae(section, 4, 4, 0)
