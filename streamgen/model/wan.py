"""State-dict adapter between diffusers' `WanTransformer3DModel` and our `DiT`.

Real Wan2.1 checkpoints (diffusers format: a directory with config.json and
one or more *.safetensors, optionally sharded with an index) load unchanged;
the avatar branches we add (audio encoder, audio cross-attention) are not in
Wan and keep their initialisation, whose zero output projection leaves the
loaded model's output exactly as Wan's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from streamgen.files import home_expanded
from streamgen.model.audio import AudioEncoder
from streamgen.model.config import FLAVORS, ModelConfig
from streamgen.model.model import Block, DiT

# diffusers key pattern -> our key pattern ("{n}" = block index)
_BLOCK_KEYS = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "cross_norm",
    "ffn.net.0.proj": "ffn.up",
    "ffn.net.2": "ffn.down",
}
_TOP_KEYS = {
    "patch_embedding": "patch_embed",
    "condition_embedder.time_embedder.linear_1": "time_embed.0",
    "condition_embedder.time_embedder.linear_2": "time_embed.2",
    "condition_embedder.time_proj": "time_proj.1",
    "condition_embedder.text_embedder.linear_1": "text_embed.0",
    "condition_embedder.text_embedder.linear_2": "text_embed.2",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.proj",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str | None:
    m = _BLOCK_RE.match(key)
    table, rest, prefix = (block, m.group(2), f"blocks.{m.group(1)}.") if m else (top, key, "")
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return prefix + dst + rest[len(src) :]
    return None


def from_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel keys -> ours. Unknown keys raise (silently dropping weights hides bugs)."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        new = _rename(k, _TOP_KEYS, _BLOCK_KEYS)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise KeyError(
            f"keys with no counterpart in streamgen's DiT (image-conditioned Wan variants are not supported): {unknown[:8]}"
        )
    return out


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> diffusers keys; the avatar branches (absent from Wan) are left out."""
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    out = {}
    for k, v in state_dict.items():
        new = _rename(k, top, block)
        if new is not None:
            out[new] = v
    return out


def config_from_diffusers(cfg: dict, **overrides) -> ModelConfig:
    """Our config for the diffusers Wan transformer config `cfg`; a ValueError that names the key
    where one it is built from is missing or not a size (`load_pretrained` names the file)."""
    kind = cfg.get("_class_name")
    if kind == "WanModel" or (kind is None and "num_heads" in cfg and "num_attention_heads" not in cfg):
        raise ValueError("this is the original Wan layout (WanModel, as Wan-AI/Wan2.1-T2V-1.3B); "
                         "give its diffusers checkpoint (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")  # fmt: skip
    if kind is not None and kind != "WanTransformer3DModel":  # (the pipeline's vae/, say)
        raise ValueError(f"this is a {kind}, not a Wan transformer (WanTransformer3DModel): give the pipeline's "
                         "folder or its transformer/")  # fmt: skip
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
        raise ValueError("image-conditioned Wan (I2V) checkpoints are not supported; use a T2V checkpoint")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"unsupported qk_norm {cfg.get('qk_norm')!r}")
    heads, head_dim = _size(cfg, "num_attention_heads"), _size(cfg, "attention_head_dim")
    in_channels = _size(cfg, "in_channels", 16)
    patch_size = cfg.get("patch_size", (1, 2, 2))
    if (
        not isinstance(patch_size, (list, tuple))
        or len(patch_size) != 3
        or not all(map(_is_size, patch_size))
    ):
        raise ValueError(f"its 'patch_size' is {patch_size!r}, not a list of 3 positive integers")
    eps, cross_attn_norm = cfg.get("eps", 1e-6), cfg.get("cross_attn_norm", True)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"its 'eps' is {eps!r}, not a number between 0 and 1")
    if not isinstance(cross_attn_norm, bool):
        raise ValueError(f"its 'cross_attn_norm' is {cross_attn_norm!r}, not true or false")
    fields = dict(
        in_channels=in_channels,
        # (null: as many as in)
        out_channels=in_channels if cfg.get("out_channels") is None else _size(cfg, "out_channels"),
        patch_size=tuple(patch_size),
        dim=heads * head_dim,
        num_heads=heads,
        ffn_dim=_size(cfg, "ffn_dim"),
        num_layers=_size(cfg, "num_layers"),
        text_dim=_size(cfg, "text_dim", 4096),
        freq_dim=_size(cfg, "freq_dim", 256),
        eps=float(eps),
        cross_attn_norm=cross_attn_norm,
        name="wan-pretrained",
    )
    # the avatar branch (absent from Wan) as wide as the flavor of the same size (whose benches time it)
    flavor = _flavor_like(fields)
    if flavor is not None:
        fields["audio_dim"] = flavor.audio_dim
    fields.update(overrides)
    return ModelConfig(**fields)


def _size(cfg: dict, key: str, default: int | None = None) -> int:
    """`cfg[key]`, a positive integer (`default` where there is none; required where no default):
    else a ValueError naming the key (a string "12" was a TypeError deep in the model's config)."""
    if key not in cfg and default is None:
        raise ValueError(f"no {key!r} in it")
    value = cfg.get(key, default)
    if not _is_size(value):
        raise ValueError(f"its {key!r} is {value!r}, not a positive integer")
    return value


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _flavor_like(fields: dict) -> ModelConfig | None:
    """The flavor with this checkpoint's transformer sizes (e.g. wan2.1-1.3b), if one has them."""
    sizes = ("dim", "num_heads", "ffn_dim", "num_layers", "text_dim")
    return next((f for f in FLAVORS.values() if all(getattr(f, k) == fields[k] for k in sizes)), None)


def diffusers_config(cfg: ModelConfig) -> dict:
    """The diffusers config that describes our transformer (for writing checkpoints)."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
    }


def transformer_dir(path) -> Path:
    """The diffusers-format Wan transformer folder `path` names: itself, or a pipeline folder's
    transformer/. A leading `~` is the home folder (`home_expanded`)."""
    d = home_expanded(path)
    return d / "transformer" if (d / "transformer" / "config.json").exists() else d


def folder_problem(d: Path) -> None:
    """A FileNotFoundError where `d` is no folder: a path given wrong, or a checkpoint's
    .safetensors file given for its folder, was "has no config.json", which sent one looking
    for a file in a folder that is not there."""
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such folder")
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is a file, not a folder: give the folder that holds its config.json")


def _is_plain_file_name(name) -> bool:
    """Whether `name` names a file of the folder it is read in: no path (either separator), not
    the folder or its parent."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name
    )


def weight_files(d: Path) -> list[Path]:
    """The .safetensors files of the transformer folder `d`: an index's shards where it has one;
    else its whole files (`_one_variant`); else the shards of a variant's index
    (`save_pretrained(..., variant="fp16")` of a sharded model writes NAME.safetensors.index.fp16.json
    and NAME.fp16-0000k-of-N.safetensors)."""
    index = sorted(d.glob("*.safetensors.index.json"))
    if index:
        return _indexed_shards(d, index[0])
    variant_indexes = sorted(d.glob("*.safetensors.index.*.json"))
    # (a variant's shards were read as whole files: one gone, "its weights lack N"; beside a
    # whole checkpoint, read over its tensors without a word)
    sharded = set()
    for variant_index in variant_indexes:
        sharded.update(_index_weight_map(variant_index).values())
    files = _one_variant(d, sorted(f for f in d.glob("*.safetensors") if f.name not in sharded))
    if not files and len(variant_indexes) > 1:
        raise ValueError(
            f"{d} holds {len(variant_indexes)} variants' indexes ({', '.join(f.name for f in variant_indexes)}) "
            "and no plain index or whole checkpoint: keep one of them"
        )
    if not files and variant_indexes:
        return _indexed_shards(d, variant_indexes[0])
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {d}")
    _all_shards(d, files)
    return files


_SHARD_NAME = re.compile(r"^(.+)-(\d+)-of-(\d+)\.safetensors$")


def _all_shards(d: Path, files: list[Path]) -> None:
    """A FileNotFoundError where the shards NAME-0000k-of-N.safetensors read without their index
    (a download that lost it) are fewer than N: a shard gone was "its weights lack M of a Wan
    transformer", naming no file."""
    held: dict[tuple[str, int], set[int]] = {}
    for f in files:
        if m := _SHARD_NAME.match(f.name):
            held.setdefault((m.group(1), int(m.group(3))), set()).add(int(m.group(2)))
    for (stem, total), numbers in held.items():
        absent = [k for k in range(1, total + 1) if k not in numbers]
        if absent:
            width = len(str(total).zfill(5))
            raise FileNotFoundError(
                f"{d}: {len(absent)} of the {total} shards of {stem} are not in it and it has no index, e.g. "
                f"{stem}-{absent[0]:0{width}d}-of-{total:0{width}d}.safetensors"
            )


def _index_weight_map(index: Path) -> dict:
    """The weight_map of a sharded checkpoint's index, each shard checked to be a file's name."""
    from streamgen.model.files import read_json

    weight_map = read_json(index, required=("weight_map",))["weight_map"]
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: its weight_map is not a JSON object")
    for weight, shard in weight_map.items():
        # (a number or a list was a TypeError from sorting the names, naming neither; "" the
        # folder; a path, "../x" or "/x", a file outside the folder read as the model's)
        if not _is_plain_file_name(shard):
            raise ValueError(f"{index}: its weight_map's {weight!r} is {shard!r}, not a file name")
    return weight_map


def _indexed_shards(d: Path, index: Path) -> list[Path]:
    """The shards `index` names, all of them in `d`."""
    shards = sorted(set(_index_weight_map(index).values()))
    files = [d / s for s in shards]
    absent = [f.name for f in files if not f.exists()]
    if absent:  # (a download cut short; an index left by a sharded save that a whole one replaced)
        unindexed = sorted(f.name for f in d.glob("*.safetensors") if f.name not in shards)
        also = f"; it holds {', '.join(unindexed)}, which the index does not name" if unindexed else ""
        raise FileNotFoundError(
            f"{index}: {len(absent)} of the {len(files)} shards it names are not in {d}, e.g. {absent[0]}{also}"
        )
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {d}")
    return files


def _one_variant(d: Path, files: list[Path]) -> list[Path]:
    """Without an index, the files of one checkpoint: diffusers saves a variant (`save_pretrained(...,
    variant="fp16")`) as NAME.fp16.safetensors beside NAME.safetensors, and reading both let the
    later file's tensors replace the other's without a word. The plain file is the checkpoint; two
    variants and no plain file are refused, since either could be meant."""
    names = {f.name for f in files}
    variants: dict[str, list[str]] = {}
    for f in files:
        stem, dot, variant = f.stem.rpartition(".")
        if dot and stem and "-of-" not in variant:  # (NAME-00001-of-00002.safetensors is a shard)
            variants.setdefault(f"{stem}.safetensors", []).append(f.name)
    left_out = set()
    for plain, of_it in variants.items():
        if plain in names:
            left_out.update(of_it)
        elif len(of_it) > 1:
            raise ValueError(
                f"{d} holds {len(of_it)} variants of {plain} ({', '.join(of_it)}) and no index or plain "
                f"{plain}: keep one of them"
            )
    return [f for f in files if f.name not in left_out]


def _read_safetensors_dir(d: Path, weights_hash=None) -> dict[str, torch.Tensor]:
    """The tensors of `weight_files(d)`; one safetensors cannot read (a download cut short) is a
    ValueError naming it, as is a weight in two of them (a second checkpoint in the folder, a
    copy kept beside the first: the later file's tensors replaced the other's without a word)."""
    from streamgen.model.files import load_safetensors, load_safetensors_from_bytes, show_loaded

    sd, read_from = {}, {}
    for f in weight_files(d):
        if weights_hash is None:
            tensors = load_safetensors(f)
        else:
            # the tensors from the very bytes hashed (the tensors are copies: one file's bytes are
            # held at a time beside them)
            data = f.read_bytes()
            weights_hash.update(f.name.encode())
            weights_hash.update(data)
            show_loaded(f, data)
            tensors = load_safetensors_from_bytes(data, f)
            del data
        twice = next((k for k in tensors if k in sd), None)
        if twice is not None:
            raise ValueError(
                f"{d}: its weight {twice} is in both {read_from[twice]} and {f.name}: the folder holds "
                "more than one checkpoint; keep one of them"
            )
        sd.update(tensors)
        read_from.update(dict.fromkeys(tensors, f.name))
        del tensors
    return sd


def load_pretrained(path, dtype=torch.float32, device="cpu", weights_hash=None, **overrides) -> DiT:
    """Load a diffusers-format Wan transformer directory (or a pipeline dir with transformer/).
    `weights_hash` (a hashlib object): updated with each weight file's name and the bytes its
    tensors are loaded from, in `weight_files`' order: a digest of the weights loaded, which a
    second read of the files (replaced meanwhile) might not be."""
    d = transformer_dir(path)
    folder_problem(d)
    if not (d / "config.json").exists():
        # (a pipeline's transformer/ without its config, a download cut short: the pipeline's
        # folder was named as the one lacking it, which a pipeline's never has)
        where = d / "transformer" if (d / "transformer").is_dir() else d
        raise FileNotFoundError(f"{where} has no config.json (expected a diffusers-format Wan transformer)")
    from streamgen.model.files import read_json

    config = read_json(d / "config.json")
    try:
        own = config_from_diffusers(config)  # (the file's sizes checked apart from the caller's overrides)
    except ValueError as e:  # (the key alone says not which file)
        raise ValueError(f"{d / 'config.json'}: {e}") from None
    cfg = config_from_diffusers(config, **overrides)
    # the sizes the weights are checked against: the file's, or as the caller's overrides (a
    # distill config's model.overrides) changed them, which were blamed on config.json
    changed = {k: v for k, v in overrides.items() if getattr(own, k, None) != v}
    sizes = "its config.json" + (f" with the overrides {changed}" if changed else "")
    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the weights
        model = DiT(cfg)
    _check_memory(d, dtype)
    try:
        sd = from_diffusers(_read_safetensors_dir(d, weights_hash))
    except KeyError as e:  # (str() of a KeyError is its message in quotes, naming no folder)
        raise ValueError(f"{d}: {e.args[0]}") from None
    missing = [k for k in model.state_dict() if k not in sd and not _is_avatar_key(k)]
    if missing:  # (named as in its files: "self_attn.q" is no name a Wan checkpoint has)
        raise ValueError(
            f"{d}: its weights lack {len(missing)} of a Wan transformer of {sizes}, e.g. "
            f"{', '.join(to_diffusers(dict.fromkeys(missing[:4])))}"
        )
    # (a config, or overrides, of fewer layers than the weights': the rest were dropped unsaid)
    places = model.state_dict()
    extra = [k for k in sd if k not in places]
    if extra:
        raise ValueError(
            f"{d}: {len(extra)} of its weights have no place in a DiT of {sizes} (num_layers "
            f"{cfg.num_layers}), e.g. {next(iter(to_diffusers({extra[0]: sd[extra[0]]})), extra[0])}"
        )
    # (a config.json of other sizes than the weights': load_state_dict's RuntimeError, a traceback)
    other_sizes = [
        f"{next(iter(to_diffusers({k: p})), k)} {tuple(sd[k].shape)}, not {tuple(p.shape)}"  # (the file's name)
        for k, p in model.state_dict().items()
        if k in sd and sd[k].shape != p.shape
    ]
    if other_sizes:
        raise ValueError(
            f"{d}: its weights are not of the sizes of {sizes}: {'; '.join(other_sizes[:4])}"
        )
    # (an integer or boolean weight was load_state_dict's RuntimeError, a traceback of several lines)
    not_floating = [k for k in sd if not sd[k].is_floating_point()]
    if not_floating:
        k = not_floating[0]
        raise ValueError(
            f"{d}: {len(not_floating)} of its weights are not floating-point numbers, e.g. "
            f"{next(iter(to_diffusers({k: sd[k]})), k)} ({str(sd[k].dtype).removeprefix('torch.')})"
        )
    # each weight one tensor in `dtype` on `device` (none copied where the checkpoint's agree): a
    # second whole model in float32 beside them was ~3x Wan-14B's 56 GB of CPU memory at the peak
    weights = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()
    }
    del sd
    model.load_state_dict(weights, strict=False, assign=True)
    _new_avatar_branches(model, device, dtype)
    unset = [name for name, p in model.named_parameters() if p.is_meta]
    if unset:  # (a branch neither the checkpoint nor _new_avatar_branches gives)
        raise KeyError(f"no weights for: {unset[:8]}")
    return model


# safetensors' names of the floating dtypes a checkpoint may store
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _check_memory(d: Path, dtype: torch.dtype) -> None:
    """A ValueError where this machine has not the memory that loading the checkpoint in `d` in
    `dtype` takes at its peak (its files' bytes, read whole, and a copy in `dtype` of each
    floating tensor stored in another), from the files' headers alone: Wan-14B's 28 GB of bfloat16
    read into float32 on a smaller machine was the kernel's kill, without a word
    (`streamgen.models.check_memory_for` does the same for model directories)."""
    import struct

    from streamgen.models import free_memory

    free = free_memory()
    if free is None:
        return
    needed = 0
    try:
        for f in weight_files(d):
            with open(f, "rb") as stream:
                header = json.loads(stream.read(struct.unpack("<Q", stream.read(8))[0]))
            needed += f.stat().st_size
            for entry in header.values():
                stored = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if stored is not None and stored != dtype:
                    begin, end = entry["data_offsets"]
                    needed += (end - begin) // stored.itemsize * dtype.itemsize
    # (a damaged file: the load names what is wrong with it)
    except (OSError, ValueError, struct.error, AttributeError, TypeError, KeyError, MemoryError):
        return
    if needed > free:
        raise ValueError(f"{d}: loading its weights in {str(dtype).removeprefix('torch.')} takes "
                         f"{needed / 2**30:.1f} GiB; this machine has {free / 2**30:.1f} GiB free")  # fmt: skip


def _new_avatar_branches(model: DiT, device, dtype) -> None:
    """The avatar branches a Wan checkpoint lacks, initialised as DiT's constructor does."""
    if model.audio_encoder is None:
        return
    with torch.device(device):
        model.audio_encoder = AudioEncoder(model.cfg).to(dtype)
        for block in model.blocks:
            norm, attn = Block.new_audio_branch(model.cfg)
            block.audio_norm, block.audio_attn = norm.to(dtype), attn.to(dtype)


def _is_avatar_key(key: str) -> bool:
    return key.startswith("audio_encoder.") or ".audio_attn." in key or ".audio_norm." in key


def save_pretrained(model: DiT, path) -> None:
    """Write our transformer as a diffusers-format Wan directory (avatar branches excluded), whole
    or not at all, as a model export is (`write_folder_atomically`): written in place, a save cut
    short left the new config.json beside the old weights, and a sharded checkpoint's index and
    shards stayed beside the new weights (load_pretrained reads the index: the old weights). What
    else the folder holds (a pipeline's other folders, notes) is kept. Where the folder can only
    be written file by file (no exchange, a mount point), the old index and shards go before the
    new config.json comes, and a reader through `read_folder` is told of a save under way or cut
    short (`streamgen.folders.EXPORT_STAMP`). A pipeline's folder (one with transformer/config.json)
    gets its transformer/ written: the folder load_pretrained reads (written beside it, the new
    weights never loaded)."""
    from streamgen.folders import write_folder_atomically, write_into_folder
    from streamgen.model import files

    path = transformer_dir(path)

    sd = to_diffusers({k: v.contiguous() for k, v in model.state_dict().items()})

    def write(d: Path) -> None:
        files.save_safetensors(sd, d / "diffusion_pytorch_model.safetensors")
        files.write_text_atomically(d / "config.json", json.dumps(diffusers_config(model.cfg), indent=2))

    def carry(name: str) -> bool:  # (not a transformer's files, nor a writer's temp file)
        ours = name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json"))
        return not ours and not (name.startswith(".") and name.endswith(".tmp"))

    write_folder_atomically(
        path, write, carry=carry, in_place=lambda folder: write_into_folder(folder, write, keep=carry)
    )
