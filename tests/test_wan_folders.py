"""Wan folders given as a model: a bad weight file, index, config or path is named in one line,
before anything is loaded."""

import json
import re

import pytest
import torch
from wan_helpers import tiny_wan

from streamgen.model.wan import (
    load_pretrained,
)


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
