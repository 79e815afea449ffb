"""Models by name or path.

A model directory holds `model.json` (flavor config, native resolution,
sampling defaults), `dit.safetensors` and the autoencoder (`vae_config.json` +
`vae.safetensors`, which carries that config too; or the Wan VAE's `wan_vae/`; either
with `tiny_decoder.safetensors` beside it: `load_autoencoder`). Names resolve to the
directories shipped in `streamgen/assets/models/`; a flavor name with no shipped weights
gives a randomly initialised (seeded) model, flagged `trained=False`, so every path can
run before training has produced weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamgen.cli import SESSION_DTYPES
from streamgen.cpu_threads import chunk_forward_flop, cpu_has_amx, cpu_has_native_bfloat16
from streamgen.files import fixed_temp_names
from streamgen.folders import (
    move_over,
    new_folder_beside,
    read_folder,
    remove_whole,
    write_folder_atomically,
)
from streamgen.model.compile import compile_blocks
from streamgen.model.config import FLAVORS, ModelConfig, get_config
from streamgen.model.float8 import float8_layers
from streamgen.model.model import DiT
from streamgen.model.vae import TinyCausalVAE, VideoAutoencoder
from streamgen.sampling import CACHE_FROM
from streamgen.start_memo import StartMemo

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
MODELS_DIR = ASSETS / "models"
DEFAULT_MODEL = "tiny-avatar"
# the attention backend of every model this process and its children load, unless the caller
# names one (`--attention` of generate and serve sets it, so model processes and torchrun ranks
# inherit it with the environment)
ATTENTION_ENV = "STREAMGEN_ATTENTION"
# likewise the DiT's dtype and FP8 linears (`--dtype`, `--fp8`), for load_model calls that do not
# name a dtype: the server's model process and torchrun ranks load that way
DTYPE_ENV, FP8_ENV = "STREAMGEN_DTYPE", "STREAMGEN_FP8"
DTYPES = ("float32", "bfloat16")
# and where a student's KV cache comes from (`--cache-from`, streamgen.sampling.CACHE_FROM), in
# place of what its model.json says
CACHE_FROM_ENV = "STREAMGEN_CACHE_FROM"
# and the torch.compile backend of their sessions' DiT blocks (`serve --compile`; `compile_dits`)
COMPILE_ENV = "STREAMGEN_COMPILE"


def use_attention_backend(name: str | None) -> None:
    """Make `name` (a `kernels.ATTENTION_BACKENDS` entry; None leaves the models' own) the
    attention backend of the models loaded from now on, here and in processes started from here."""
    from streamgen.kernels import check_attention_backend

    if name is not None:
        os.environ[ATTENTION_ENV] = check_attention_backend(name)


def use_precision(dtype: str | None = None, fp8: bool = False) -> None:
    """Make `dtype` (a DTYPES name; None leaves the default, float32) and FP8 block linears
    (streamgen.model.float8) the precision of the models loaded from now on without a dtype of
    their own, here and in processes started from here."""
    if dtype is not None:
        dit_dtype_arg(dtype)  # a DTYPES name, or ValueError
        os.environ[DTYPE_ENV] = dtype
    if fp8:
        os.environ[FP8_ENV] = "1"


def _env_flag(name: str) -> bool:
    """An on/off environment switch: off when unset, empty, 0, false, no or off (STREAMGEN_FP8=0
    had turned FP8 on)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def use_cache_from(cache_from: str | None) -> None:
    """Make `cache_from` (None leaves each model's own) where the KV cache of every student loaded
    from now on comes from, here and in processes started from here."""
    from streamgen.sampling import check_cache_from

    if cache_from is not None:
        os.environ[CACHE_FROM_ENV] = check_cache_from(cache_from)


def use_compile(backend: str | None) -> None:
    """Make the models loaded from now on, here and in processes started from here, run their
    sessions' DiT blocks under torch.compile(backend) (None leaves them eager)."""
    if backend is not None:
        os.environ[COMPILE_ENV] = backend


@dataclass
class AvatarModel:
    name: str
    dit: DiT
    vae: VideoAutoencoder
    height: int = 128
    width: int = 128
    shift: float = 5.0
    steps: int = 4
    trained: bool = False
    meta: dict = field(default_factory=dict)
    # the DiT's dtype was asked for (load_model's dtype, $STREAMGEN_DTYPE): sessions keep it
    dtype_asked: bool = False
    # the torch.compile backend the blocks of every DiT sessions run are under (`compile_dits`)
    compile_backend: str | None = None

    _session_vaes: dict = field(default_factory=dict, repr=False, compare=False)
    _dits: dict = field(default_factory=dict, repr=False, compare=False)
    # sessions start on several threads at once (the server's lanes): one copy per dtype all the same
    _copying: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # the last few streams' starts (reference latent, sink), for the next start of the same
    # reference and text (streamgen/start_memo.py); capacity 0 turns it off
    start_memo: StartMemo = field(default_factory=StartMemo, repr=False, compare=False)

    @property
    def cfg(self) -> ModelConfig:
        return self.dit.cfg

    def dit_in(self, dtype: torch.dtype | None) -> DiT:
        """The DiT in `dtype` (None: as loaded): the loaded one, or a copy made once per dtype and
        shared by every session of this model (sessions of one size batch together on it)."""
        loaded = next(self.dit.parameters()).dtype  # the patch embedding's: never FP8
        if dtype is None or dtype == loaded:
            return self.dit
        if _runs_as_loaded(self.dit):
            raise ValueError("a sequence-parallel or FP8 DiT runs in the dtype it was loaded in")
        with self._copying:
            if dtype not in self._dits:
                dit = copy.deepcopy(self.dit).to(dtype)
                # (a copy's eager-attend wrappers would be the original's: wrapped afresh, or undone)
                self._dits[dtype] = compile_blocks(dit, self.compile_backend)
            return self._dits[dtype]

    def compile_dits(self, backend: str | None = "inductor") -> None:
        """Put the blocks of the DiTs this model's sessions run under torch.compile(backend) (None:
        eager), those made later included (streamgen/model/compile.py). Each shape compiles on
        its first call: a server's warm-up runs them."""
        with self._copying:
            self.compile_backend = backend
            for dit in (self.dit, *self._dits.values()):
                compile_blocks(dit, backend)

    def session_vae(
        self, decoder: torch.dtype | None = None, encoder: torch.dtype | None = None
    ) -> VideoAutoencoder:
        """The autoencoder with its decoder and encoder in these dtypes (None: as loaded), made
        once per pair and shared by every session of this model."""
        if decoder is None and encoder is None:
            return self.vae
        if not isinstance(self.vae, TinyCausalVAE):
            raise ValueError(
                f"a decode or encode dtype applies to TinyCausalVAE autoencoders, not {type(self.vae).__name__}"
            )
        with self._copying:
            if (decoder, encoder) not in self._session_vaes:
                self._session_vaes[decoder, encoder] = self.vae.with_dtypes(decoder, encoder)
            return self._session_vaes[decoder, encoder]


# A float32 DiT runs a session in bfloat16 (`default_dit_dtype`) from this much arithmetic a
# chunk's forward (streamgen.cpu_threads.chunk_forward_flop), on a CPU with AMX tiles. tiny-avatar's
# denoising and re-encode on the 2-core machine with AMX (bfloat16 on one thread against float32 on
# the threads it gains from): 0.98x at 0.74 GFLOP (160x160), 1.05x at 1.19 (192x192), 1.16x at
# 1.83 (224x224), 1.27x at 2.7 (256x256), 1.5x at 5.4 (320x320). On the 2-core AMD EPYC (AVX512-BF16,
# no AMX) the whole session gained little or lost with a bfloat16 DiT on its best threads:
# 1.03-1.04x at 224x224, 1.00-1.03x at 256x256, 0.90-0.98x at 320x320, 0.91-0.99x at 384x384
# (alternating rounds; docs/performance.md, "bf16 DiT").
DIT_BFLOAT16_FLOP = 1.5e9
DECODE_DTYPES = SESSION_DTYPES  # the command-line spelling of StreamSession's decode_dtype and encode_dtype


def decode_dtype_arg(name: str, what: str = "decode dtype") -> torch.dtype | str:
    if name not in DECODE_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(DECODE_DTYPES)}, got {name!r}")
    return name if name == "auto" else getattr(torch, name)


def check_float_dtype(dtype: torch.dtype, what: str = "dtype") -> torch.dtype:
    """`dtype` if a model can run in it (a floating-point dtype, float8 aside: FP8 is
    `float8_linears`' weights, not a model's dtype), else a ValueError naming `what`."""
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(
            f"{what} must be a floating-point dtype such as torch.float32 or torch.bfloat16, got {dtype}"
        )
    return dtype


def autoencoder_dtype(value, vae: VideoAutoencoder, device, what: str = "decode dtype") -> torch.dtype | None:
    """A session's decode_dtype or encode_dtype (`what`): a dtype, its name, None (as loaded) or
    "auto" (`default_decode_dtype`), as a dtype or None."""
    if isinstance(value, str):
        value = decode_dtype_arg(value, what)
    elif isinstance(value, torch.dtype):
        value = check_float_dtype(value, what)
    elif value is not None:
        raise ValueError(
            f"{what} must be a torch dtype, one of {', '.join(DECODE_DTYPES)}, or None, got {value!r}"
        )
    return default_decode_dtype(vae, device) if value == "auto" else value


def default_decode_dtype(vae: VideoAutoencoder, device) -> torch.dtype | None:
    """bfloat16 for TinyCausalVAE decoders on CPUs with native bfloat16 (AMX or AVX512-BF16):
    2-3x faster decoding from 128x128 up, frames within 2 uint8 levels of float32 (measured by
    `streamgen bench decoder`); None (the loaded dtype) everywhere else. The same for the
    encoder of a session's reference image (`StreamSession(encode_dtype="auto")`): 2.2-2.9x
    faster, the same scores (docs/performance.md, "On this 2-core CPU")."""
    if not isinstance(vae, TinyCausalVAE) or torch.device(device).type != "cpu":
        return None
    return torch.bfloat16 if cpu_has_native_bfloat16() else None


def dit_dtype_arg(value):
    """A DiT dtype as load_model and StreamSession take it: a `DTYPES` name becomes its torch
    dtype; a floating-point torch dtype, None and "auto" stay as they are. Anything else (an
    integer, complex or float8 dtype, a number) is a ValueError that says so (it was a TypeError
    from deep inside `nn.Module.to`, or a model that loaded and failed at its first chunk)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, torch.dtype):
        return check_float_dtype(value, "dtype")
    if not isinstance(value, str):
        raise ValueError(f"dtype must be a torch dtype, one of {', '.join(DTYPES)}, or 'auto', got {value!r}")
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    return getattr(torch, value)


def _runs_as_loaded(dit: DiT) -> bool:
    """A sequence-parallel or FP8 DiT: its sessions cannot run a copy in another dtype."""
    return hasattr(dit, "sequence_parallel_groups") or float8_layers(dit) > 0


def default_dit_dtype(
    model: AvatarModel, device, latent_hw: tuple[int, int], amx: bool | None = None
) -> torch.dtype | None:
    """bfloat16 for a float32 DiT whose chunk forward at `latent_hw` reaches `DIT_BFLOAT16_FLOP`,
    on CPUs with AMX tiles (`amx`: whether this one has them, None: ask it); None (as loaded)
    everywhere else (AVX512-BF16 alone makes the DiT no faster), for FP8 and sequence-parallel
    DiTs, and when the model's dtype was asked for."""
    dit = model.dit
    if (
        model.dtype_asked
        or torch.device(device).type != "cpu"
        or next(dit.parameters()).dtype != torch.float32
        or _runs_as_loaded(dit)
        or not (cpu_has_amx() if amx is None else amx)
    ):
        return None
    flop = chunk_forward_flop(dit, latent_hw, dit.cfg.frames_per_chunk)
    return torch.bfloat16 if flop >= DIT_BFLOAT16_FLOP else None


def model_search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("STREAMGEN_MODELS", "").split(os.pathsep) if p]
    return extra + [MODELS_DIR]


def resolve_model_dir(name_or_path: str) -> Path | None:
    if not name_or_path.strip():  # (Path("") is the current folder: `--model "$UNSET"` loaded it)
        return None
    # (`~` as a shell would: `--model=~/m`, a config's `model.init: ~/m` reach here unexpanded)
    p = Path(name_or_path).expanduser()
    if _is_there(p / "model.json"):
        return p
    for root in model_search_path():
        if _is_there(root / name_or_path / "model.json"):
            return root / name_or_path
    return None


def _is_there(path: Path) -> bool:
    """Whether `path` exists; False for a name the file system cannot hold (ENAMETOOLONG: exists()
    raised it, a traceback from every command given a long --model)."""
    try:
        return path.exists()
    except OSError:
        return False


def available_models() -> list[str]:
    names = {
        d.name
        for root in model_search_path()
        if root.is_dir()
        for d in root.iterdir()
        if (d / "model.json").exists() and not d.name.startswith(".")  # (not an export's staging folder)
    }
    return sorted(names | {n for n in FLAVORS if n != "debug"})


def load_model(
    name_or_path: str = DEFAULT_MODEL, device="cpu", dtype=None, seed: int = 0, **cfg_overrides
) -> AvatarModel:
    """Load a trained model directory, or build a seeded random model of a flavor. Its attention
    backend is `attn_backend` when given, else $STREAMGEN_ATTENTION when set, else its config's.
    Its DiT is in `dtype` when given (a torch dtype or a `DTYPES` name), else (None, "auto") in
    $STREAMGEN_DTYPE (float32 when unset: then its sessions may run a bfloat16 copy where that is
    faster, `default_dit_dtype`); its block
    linears are in FP8 when $STREAMGEN_FP8 is set (`use_precision`); its sessions keep their KV
    cache as $STREAMGEN_CACHE_FROM says when it is set (`use_cache_from`), else as it was trained;
    their DiT blocks run under torch.compile when $STREAMGEN_COMPILE names a backend (`use_compile`)."""
    name_or_path = os.fspath(name_or_path)  # (a Path to no model was an AttributeError)
    if os.environ.get(ATTENTION_ENV) and "attn_backend" not in cfg_overrides:
        cfg_overrides["attn_backend"] = os.environ[ATTENTION_ENV]
    dtype = None if dtype == "auto" else dit_dtype_arg(dtype)
    asked = dtype is not None or bool(os.environ.get(DTYPE_ENV))
    if dtype is None:
        try:  # (getattr(torch, ...) took "bf16" as an AttributeError, "float16" as a dtype)
            dtype = dit_dtype_arg(os.environ.get(DTYPE_ENV) or "float32")
        except ValueError as e:
            raise ValueError(f"${DTYPE_ENV}: {e}") from None
    model = _load(name_or_path, device, dtype, seed, **cfg_overrides)
    model.dtype_asked = asked
    if _env_flag(FP8_ENV):
        from streamgen.model.float8 import float8_linears

        float8_linears(model.dit)
    if os.environ.get(CACHE_FROM_ENV):
        model.meta = {**model.meta, "cache_from": os.environ[CACHE_FROM_ENV]}
    if os.environ.get(COMPILE_ENV):
        model.compile_dits(os.environ[COMPILE_ENV])
    return model


def _load(name_or_path: str, device, dtype, seed: int, **cfg_overrides) -> AvatarModel:
    directory = resolve_model_dir(name_or_path)
    if directory is not None:
        given = Path(name_or_path).expanduser()
        if directory != given and given.is_dir():  # (a run's folder named as a shipped model, say)
            log.warning("%s; loading the model named %s in %s instead", _not_a_model(name_or_path),
                        name_or_path, directory.parent)  # fmt: skip
        return load_model_dir(directory, device, dtype, **cfg_overrides)
    flavor = name_or_path.removesuffix("-teacher")
    if flavor in FLAVORS:
        log.warning(
            "no trained weights for %r; using randomly initialised weights (seed %d)", name_or_path, seed
        )
        torch.manual_seed(seed)
        cfg = get_config(flavor, **cfg_overrides)
        check_memory_for(sum(p.numel() for p in _meta_dit(cfg).parameters()), name_or_path)
        dit = DiT(cfg)
        # The audio branch starts at zero so that loaded Wan weights are unchanged;
        # an untrained stand-in model gets a live one so the audio path is exercised.
        for blk in dit.blocks:
            if blk.audio_attn is not None:
                torch.nn.init.normal_(blk.audio_attn.o.weight, std=0.5 / cfg.dim**0.5)
        vae = TinyCausalVAE(latent_channels=cfg.in_channels, temporal_factor=cfg.temporal_compression)
        dit, vae = dit.to(device, dtype).eval(), vae.to(device).eval()
        return AvatarModel(name_or_path, dit, vae, **_stand_in_settings(flavor))
    require_model(name_or_path)


def model_settings(name_or_path: str) -> dict:
    """What sessions of a model run with unless told otherwise, as `load_model` gives it: height,
    width, shift and steps from a model directory's model.json (`MODEL_META_DEFAULTS` for what an
    older export leaves out) or a flavor's stand-in's, read without loading its weights.
    FileNotFoundError for an unknown model; OSError or ValueError for an unreadable model.json."""
    from streamgen.model.files import read_json

    name_or_path = os.fspath(name_or_path)
    directory = resolve_model_dir(name_or_path)
    if directory is None:
        require_model(name_or_path)
        return _stand_in_settings(name_or_path.removesuffix("-teacher"))
    return _settings(read_json(directory / "model.json"), directory / "model.json")


def _settings(meta: dict, where: Path | None = None) -> dict:
    """A model.json's settings (`MODEL_META_DEFAULTS`), each checked: a string height was a
    TypeError in a session's log line, a string shift one in the sigma schedule."""
    settings = {key: meta.get(key, default) for key, default in MODEL_META_DEFAULTS.items()}
    for key, value in settings.items():
        whole = isinstance(value, int) and not isinstance(value, bool)
        number = (whole or isinstance(value, float)) and math.isfinite(value)
        if not (whole if key != "shift" else number) or value <= 0:
            kind = "a positive number" if key == "shift" else "a positive whole number"
            raise ValueError(f"{where or 'model.json'}: its {key} is {value!r}, not {kind}")
    kind = meta.get("kind")
    if kind is not None and kind not in MODEL_KINDS:  # ("Teacher" streamed a teacher as a student)
        raise ValueError(f"{where or 'model.json'}: its kind {kind!r} is none of {', '.join(MODEL_KINDS)}")
    # (a teacher's string cfg_scale was a TypeError in its first guided step; a cache_from none
    # knows was said as if of --cache-from, naming no file)
    scale = meta.get("cfg_scale")
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    if scale is not None and not (number and scale >= 0):
        raise ValueError(f"{where or 'model.json'}: its cfg_scale is {scale!r}, not a number of at least 0")
    cache_from = meta.get("cache_from")
    if cache_from is not None and cache_from not in CACHE_FROM:
        raise ValueError(f"{where or 'model.json'}: its cache_from is {cache_from!r}, not one of {', '.join(CACHE_FROM)}")
    return settings


# what distill's stages export (model.json's "kind"; an older export or a hand-made one has none)
MODEL_KINDS = ("teacher", "student-ode", "student", "student-chunk")


def _stand_in_settings(flavor: str) -> dict:
    size = 64 if flavor == "debug" else 128
    return {**MODEL_META_DEFAULTS, "height": size, "width": size}


def require_model(name_or_path: str) -> None:
    """FileNotFoundError, saying what there is, unless `name_or_path` names a model `load_model` loads
    (a check before a long job, which would otherwise fail only where it loads it)."""
    name_or_path = os.fspath(name_or_path)
    if resolve_model_dir(name_or_path) is None and name_or_path.removesuffix("-teacher") not in FLAVORS:
        raise FileNotFoundError(_not_a_model(name_or_path))


def _not_a_model(name: str) -> str:
    """What `name` is instead of a model, said so that its user knows what to give instead (a Wan
    checkpoint's folder, a run's folder and an empty one were all "unknown model")."""
    if not name.strip():  # (was " is a folder without model.json", of the current folder)
        return f"the model's name is empty ({name!r}): give a model name or a model directory"
    folder = Path(name).expanduser()
    if not _is_there(folder):
        return f"unknown model {name!r}: not a model directory and not one of {', '.join(available_models())}"
    if folder.is_file() and (folder.parent / "model.json").is_file():  # (its model.json, its weights)
        return f"{name} is a file of the model directory {folder.parent}: give the directory"
    if (folder / "model" / "model.json").is_file():
        return f"{name} is a run's folder: its model is {folder / 'model'}"
    if _is_diffusers_wan(folder):
        return (f"{name} is a diffusers Wan2.1 checkpoint, not a streamgen model: distill it into one first "
                f"(a distill config's model.init: wan:{name}, docs/distill.md)")  # fmt: skip
    if folder.is_dir():
        return f"{name} is a folder without model.json: not a streamgen model (docs/distill.md says how one is made)"
    return f"unknown model {name!r}: not a model directory and not one of {', '.join(available_models())}"


def _is_diffusers_wan(folder: Path) -> bool:
    """A diffusers Wan2.1 pipeline's folder, or its transformer's."""
    import json

    for config in (folder / "config.json", folder / "transformer" / "config.json", folder / "model_index.json"):  # fmt: skip
        try:
            meta = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and str(meta.get("_class_name", "")).startswith("Wan"):
            return True
    return False


def load_model_dir(d: Path, device="cpu", dtype=None, **cfg_overrides) -> AvatarModel:
    """A model directory as it is (no environment's attention, precision or compile: `load_model`),
    its files all of one export: read again where one put its folder in place meanwhile
    (`streamgen.folders.read_folder`; `save_model`)."""
    d = Path(d)
    meta, dit, vae = read_folder(d, lambda folder: _read_dir(folder, cfg_overrides))
    return AvatarModel(
        name=meta.get("name", d.name),
        dit=dit.to(device, dtype).eval(),
        vae=vae.to(device).eval(),
        **_settings(meta),
        trained=True,
        meta=meta,
    )


def _read_dir(d: Path, cfg_overrides: dict) -> tuple[dict, DiT, VideoAutoencoder]:
    from streamgen.model.files import load_safetensors, read_json

    where = d / "model.json"
    meta = read_json(where, required=("config",))
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{where}: its config is not a JSON object")
    _settings(meta, where)
    try:
        cfg = ModelConfig.from_dict({**meta["config"], **cfg_overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    sd = load_safetensors(d / "dit.safetensors")
    # the shapes first, on the meta device: a config larger than its weights built the whole
    # random model (6.5 GB for wan2.1-1.3b's) before a page of missing keys
    if problem := weights_problem(cfg, sd):
        raise ValueError(f"{d}: dit.safetensors does not match the model config in model.json: {problem}")
    vae = _read_autoencoder(d)
    if vae.latent_channels != cfg.in_channels:  # (else a convolution's error at the first chunk)
        raise ValueError(f"{d}: the DiT takes {cfg.in_channels} latent channels, its autoencoder gives "
                         f"{vae.latent_channels}")  # fmt: skip
    check_memory_for(sum(t.numel() for t in sd.values()), str(d))  # (the weights' count, checked above)
    dit = DiT(cfg)
    dit.load_state_dict(sd)
    return meta, dit, vae


def check_memory_for(parameters: int, name: str) -> None:
    """A ValueError where this machine has not the memory a DiT of this many `parameters` is built
    in (float32, on the CPU, before it moves to its device and dtype): wan2.1-14b's stand-in took
    15 GB and 53 s before the allocator's error, and with less free memory the kernel kills the
    process."""
    needed = 4 * parameters
    free = free_memory()
    if free is not None and needed > free:
        raise ValueError(f"{name}: its DiT takes {needed / 2**30:.1f} GiB in float32 as it loads; this machine "
                         f"has {free / 2**30:.1f} GiB free")  # fmt: skip


def free_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can have (MemAvailable), where it says."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _meta_dit(cfg: ModelConfig) -> DiT:
    with torch.device("meta"):
        return DiT(cfg)


def weights_problem(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> str | None:
    """How `weights` differ from what a DiT of `cfg` holds (names, shapes), said briefly, or None."""
    wanted = {name: tuple(t.shape) for name, t in _meta_dit(cfg).state_dict().items()}
    missing = [name for name in wanted if name not in weights]
    extra = [name for name in weights if name not in wanted]
    other = [f"{name} {tuple(weights[name].shape)} (the config's: {shape})"
             for name, shape in wanted.items() if name in weights and tuple(weights[name].shape) != shape]  # fmt: skip
    said = [f"{len(found)} {what}, e.g. {found[0]}" for what, found in
            (("of other shapes", other), ("missing", missing), ("it has no place for", extra)) if found]  # fmt: skip
    return "; ".join(said) or None


# what a model.json may leave out (an older export): the size, schedule shift and steps it runs with
MODEL_META_DEFAULTS = {"height": 128, "width": 128, "shift": 5.0, "steps": 4}


def has_autoencoder(directory) -> bool:
    """Whether `directory` holds an autoencoder `load_autoencoder` reads."""
    from streamgen.model.wan_vae import WanVAE

    d = Path(directory)
    return (d / "vae_config.json").exists() or (d / WanVAE.DIRECTORY).is_dir()


def load_autoencoder(directory) -> VideoAutoencoder:
    """A model (or autoencoder) directory's autoencoder, as its `save` wrote it: TinyCausalVAE
    (vae_config.json) or the Wan VAE (wan_vae/, a diffusers folder); behind TAEHV's tiny decoder
    where tiny_decoder.safetensors lies beside them. Its files all of one export (`read_folder`)."""
    return read_folder(directory, _read_autoencoder)


def _read_autoencoder(d: Path) -> VideoAutoencoder:
    from streamgen.model.tiny_decoder import TINY_DECODER_FILE, TinyDecoder, TinyDecoderVAE
    from streamgen.model.wan_vae import WanVAE

    if (d / WanVAE.DIRECTORY).is_dir():
        vae = WanVAE.load(d)
    elif (d / "vae_config.json").exists():
        vae = TinyCausalVAE.load(d)
    else:
        raise FileNotFoundError(f"{d}: no autoencoder (vae_config.json, or {WanVAE.DIRECTORY}/)")
    if (d / TINY_DECODER_FILE).exists():
        vae = TinyDecoderVAE(vae, TinyDecoder.from_checkpoint(d / TINY_DECODER_FILE).eval())
    return vae.eval()


def _replace_autoencoder(vae: VideoAutoencoder, d: Path) -> None:
    """`vae`'s files in `d`, and no other autoencoder's (a re-export over a directory that held a
    tiny decoder or a Wan VAE left them there, and `load_autoencoder` took them over the new one),
    swapped so that a reader loading `d` meanwhile (a server, a stage) finds the old autoencoder or
    the new one, never none, half of one, or one's config beside the other's weights:

    - each new file is renamed over its old counterpart, one atomic step each, and a new folder
      with no counterpart is renamed in whole (one over an old folder is exchanged with it in one
      step; where the file system cannot, file by file, its weights before the config.json that
      says how to read them). vae.safetensors carries its config, which the loader takes over
      vae_config.json's;
    - only then go the old files that have no counterpart. The loader's choice of kind is wan_vae/,
      else vae_config.json: a new TinyCausalVAE's files lie in place while an old wan_vae/ still
      decides, which then goes in one rename (into a folder deleted after); a new wan_vae/ decides
      before the old TinyCausalVAE's files go;
    - tiny_decoder.safetensors alone decides a tiny decoder: an old one the new autoencoder lacks
      goes first, a new one comes last, so that a decoder is never over a base it was not saved
      with (where both change, a reader meanwhile finds a base decoding with its own decoder).
    """
    from streamgen.model.tiny_decoder import TINY_DECODER_FILE
    from streamgen.model.wan_vae import WanVAE

    # a folder of this export's own: a second export into `d` emptied a shared one under this one
    staging = new_folder_beside(d / "autoencoder")
    try:
        vae.save(staging / "new")
        order = {"vae.safetensors": 0, WanVAE.DIRECTORY: 0, TINY_DECODER_FILE: 2}  # (others: 1)
        new = sorted((p.name for p in (staging / "new").iterdir()), key=lambda name: order.get(name, 1))
        if TINY_DECODER_FILE not in new:
            remove_whole(d / TINY_DECODER_FILE, staging / "old")
        for name in new:
            move_over(staging / "new" / name, d / name, staging / "old")
        for name in ("vae_config.json", "vae.safetensors", WanVAE.DIRECTORY):
            if name not in new:
                remove_whole(d / name, staging / "old")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model(model: AvatarModel, directory, extra_meta: dict | None = None) -> None:
    """Write a model directory `load_model` reads, put in place whole (`write_model_dir`)."""
    state = {k: v.contiguous() for k, v in model.dit.state_dict().items()}
    meta = {
        "name": model.name,
        "config": model.cfg.to_dict(),
        "height": model.height,
        "width": model.width,
        "shift": model.shift,
        "steps": model.steps,
        **(extra_meta or {}),
    }

    def write_dit(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(tmp))

    write_model_dir(directory, write_dit, model.vae, meta)


def write_model_dir(directory, write_dit, vae: VideoAutoencoder, meta: dict) -> None:
    """A model directory of the DiT weights `write_dit(tmp)` writes to the file `tmp`, `vae` and
    model.json of `meta`, which readers (a server, a stage) find whole: the old export or the new
    one, never one's model.json beside the other's DiT weights or autoencoder, nor a base
    autoencoder without the tiny decoder it was saved with. Written into a folder beside, then put
    in the directory's place in one step (`streamgen.folders.write_folder_atomically`; what else the
    directory held is linked in first), and read by `load_model` through `read_folder`.

    Where the system cannot exchange folders (not Linux, overlayfs' lower layers), the staged files
    are moved into the directory one by one, model.json last; at a mount point, written into it
    (the DiT weights, the autoencoder: `_replace_autoencoder`, model.json last). Either way under
    the directory's export stamp (`streamgen.folders.EXPORT_STAMP`): a reader meanwhile reads again
    once the export is done, or is told that it is under way or was cut short, rather than pairing
    the new DiT weights with the old model.json."""
    from streamgen.model.files import write_atomically, write_text_atomically
    from streamgen.model.tiny_decoder import TINY_DECODER_FILE
    from streamgen.model.wan_vae import WanVAE

    def write(d: Path) -> None:
        write_atomically(d / "dit.safetensors", write_dit)
        _replace_autoencoder(vae, d)
        write_text_atomically(d / "model.json", json.dumps(meta, indent=2))

    ours = {"model.json", "dit.safetensors", "vae_config.json", "vae.safetensors", WanVAE.DIRECTORY}
    ours.add(TINY_DECODER_FILE)

    # nor the fixed temp names their writers had before (model.json.tmp: carried into every export)
    not_carried = ours | {tmp.name for name in ours for tmp in fixed_temp_names(name)}

    def carry(name: str) -> bool:  # (not the export's files, nor a writer's temp file)
        return name not in not_carried and not (name.startswith(".") and name.endswith(".tmp"))

    write_folder_atomically(directory, write, carry=carry, in_place=write)
