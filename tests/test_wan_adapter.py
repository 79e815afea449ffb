"""Wan weights: the same random weights in diffusers' WanTransformer3DModel and our DiT agree."""

import errno
import json
import os
import re

import pytest
import torch
from diffusers import WanTransformer3DModel
from wan_helpers import tiny_wan

from streamgen.model.model import DiT
from streamgen.model.wan import (
    config_from_diffusers,
    from_diffusers,
    load_pretrained,
    save_pretrained,
    to_diffusers,
)


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
