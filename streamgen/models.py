"""Models by name or path.

A model directory holds `model.json` (flavor config, native resolution,
sampling defaults), `dit.safetensors` and the autoencoder (`vae_config.json` +
`vae.safetensors`, which carries that config too; or the Wan VAE's `wan_vae/`; either
with `tiny_decoder.safetensors` beside it: `load_autoencoder`). Names resolve to the
directories shipped in `streamgen/assets/models/`; a flavor name with no shipped weights
gives a randomly initialised (seeded) model, flagged `trained=False`, so every path can
run before training has produced weights (FLAVOR-teacher: a teacher, with a teacher's schedule).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamgen.files import home_expanded
from streamgen.folders import (
    read_folder,
)
from streamgen.model.compile import compile_blocks
from streamgen.model.config import FLAVORS, ModelConfig, get_config
from streamgen.model.model import DiT
from streamgen.model.vae import TinyCausalVAE, VideoAutoencoder
from streamgen.precision import dit_dtype_arg, runs_as_loaded
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


ENV_ON, ENV_OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env_flag(name: str) -> bool:
    """An on/off environment switch: off when unset, empty, 0, false, no or off (STREAMGEN_FP8=0
    had turned FP8 on); on for 1, true, yes or on. Any other value is a ValueError naming the
    variable, as an option's is (STREAMGEN_FP8=maybe, or a typo of true, had turned FP8 on)."""
    value = os.environ.get(name, "").strip().lower()
    if value not in ENV_ON + ENV_OFF:
        raise ValueError(
            f"${name}: {os.environ[name]!r} is neither on ({', '.join(ENV_ON)}) nor off "
            f"({', '.join(ENV_OFF[1:])}, or empty)"
        )
    return value in ENV_ON


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


def _check_compile_backend(backend: str) -> None:
    """A ValueError, in torch's words, for a torch.compile backend torch does not know (torch
    itself says so only as the first block compiles: in `serve`, in the started server)."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend(backend)
    except InvalidBackend as e:
        raise ValueError(str(e).strip()) from None


def check_model_environment() -> None:
    """Refuse, as load_model would (a ValueError naming the variable), an attention backend, dtype,
    FP8 switch, cache source or compile backend of the environment that no model can take: for a
    command that loads its model later, in a server started meanwhile (`serve`, whose log had the
    traceback)."""
    from streamgen.kernels import check_attention_backend
    from streamgen.sampling import check_cache_from

    for name, check in ((ATTENTION_ENV, check_attention_backend), (DTYPE_ENV, dit_dtype_arg),
                        (CACHE_FROM_ENV, check_cache_from),
                        (COMPILE_ENV, _check_compile_backend)):  # fmt: skip
        if os.environ.get(name):
            try:
                check(os.environ[name])
            except ValueError as e:
                raise ValueError(f"${name}: {e}") from None
    _env_flag(FP8_ENV)


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
        if runs_as_loaded(self.dit):
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


def model_search_path() -> list[Path]:
    # (`~` as a shell would: a systemd unit, a Docker env file or a quoted export give it unexpanded)
    extra = [home_expanded(p) for p in os.environ.get("STREAMGEN_MODELS", "").split(os.pathsep) if p]
    return extra + [MODELS_DIR]


def resolve_model_dir(name_or_path: str) -> Path | None:
    if not name_or_path.strip():  # (Path("") is the current folder: `--model "$UNSET"` loaded it)
        return None
    # (`~` as a shell would: `--model=~/m`, a config's `model.init: ~/m` reach here unexpanded)
    p = home_expanded(name_or_path)
    if _is_there(p / "model.json"):
        return p
    if _is_a_path(name_or_path):  # (`./tiny-avatar` with no such folder loaded the shipped model)
        return None
    for root in model_search_path():
        if _is_there(root / name_or_path / "model.json"):
            return root / name_or_path
    return None


def _is_a_path(name: str) -> bool:
    """Whether `name` can only be a path, never a model's name: absolute, or from ., .. or ~."""
    return Path(name).is_absolute() or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", "..")


def _is_there(path: Path) -> bool:
    """Whether `path` exists; False for a name the file system cannot hold (ENAMETOOLONG: exists()
    raised it, a traceback from every command given a long --model)."""
    try:
        return path.exists()
    except OSError:
        return False


def available_models() -> list[str]:
    from streamgen.model_names import available_models

    return available_models()


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
        from streamgen.kernels import check_attention_backend

        try:  # (checked here: the config's check blamed the model's model.json for it)
            cfg_overrides["attn_backend"] = check_attention_backend(os.environ[ATTENTION_ENV])
        except ValueError as e:
            raise ValueError(f"${ATTENTION_ENV}: {e}") from None
    dtype = None if dtype == "auto" else dit_dtype_arg(dtype)
    asked = dtype is not None or bool(os.environ.get(DTYPE_ENV))
    if dtype is None:
        try:  # (getattr(torch, ...) took "bf16" as an AttributeError, "float16" as a dtype)
            dtype = dit_dtype_arg(os.environ.get(DTYPE_ENV) or "float32")
        except ValueError as e:
            raise ValueError(f"${DTYPE_ENV}: {e}") from None
    fp8 = _env_flag(FP8_ENV)  # (each variable checked before the load, as an option is)
    cache_from = os.environ.get(CACHE_FROM_ENV)
    if cache_from:
        from streamgen.sampling import check_cache_from

        try:  # (refused later, in words that named no variable: "cache_from must be one of ...")
            check_cache_from(cache_from)
        except ValueError as e:
            raise ValueError(f"${CACHE_FROM_ENV}: {e}") from None
    model = _load(name_or_path, device, dtype, seed, **cfg_overrides)
    model.dtype_asked = asked
    if fp8:
        from streamgen.model.float8 import float8_linears

        float8_linears(model.dit)
    if cache_from:
        model.meta = {**model.meta, "cache_from": cache_from}
    if os.environ.get(COMPILE_ENV):
        from torch._dynamo.exc import InvalidBackend

        try:  # (torch's own words named no variable: "Invalid backend: '2', see ...")
            model.compile_dits(os.environ[COMPILE_ENV])
        except InvalidBackend as e:
            raise ValueError(f"${COMPILE_ENV}: {str(e).strip()}") from None
    return model


def _load(name_or_path: str, device, dtype, seed: int, **cfg_overrides) -> AvatarModel:
    from streamgen.model_names import not_a_model

    directory = resolve_model_dir(name_or_path)
    if directory is not None:
        given = home_expanded(name_or_path)
        if directory != given and given.is_dir():  # (a run's folder named as a shipped model, say)
            log.warning("%s; loading the model named %s in %s instead", not_a_model(name_or_path),
                        name_or_path, directory.parent)  # fmt: skip
        return load_model_dir(directory, device, dtype, **cfg_overrides)
    flavor = name_or_path.removesuffix("-teacher")
    if flavor in FLAVORS:
        if os.environ.get("RANK", "0") == "0":  # (torchrun's ranks all load it: said once, not once per rank)
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
        meta = {"kind": "teacher"} if _is_stand_in_teacher(name_or_path) else {}
        return AvatarModel(name_or_path, dit, vae, **_stand_in_settings(name_or_path), meta=meta)
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
        return _stand_in_settings(name_or_path)
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
        raise ValueError(
            f"{where or 'model.json'}: its cache_from is {cache_from!r}, not one of {', '.join(CACHE_FROM)}"
        )
    return settings


# what distill's stages export (model.json's "kind"; an older export or a hand-made one has none)
MODEL_KINDS = ("teacher", "student-ode", "student", "student-chunk")


# a stand-in teacher's steps: a trained teacher's (its model.json's, TeacherSession's default)
TEACHER_STEPS = 50


def _stand_in_settings(name: str) -> dict:
    """The settings of a flavor's stand-in (`name`: FLAVOR, or FLAVOR-teacher: a teacher, which had
    run as a student, 4 steps with a KV cache and no guidance)."""
    size = 64 if name.removesuffix("-teacher") == "debug" else 128
    steps = TEACHER_STEPS if _is_stand_in_teacher(name) else MODEL_META_DEFAULTS["steps"]
    return {**MODEL_META_DEFAULTS, "height": size, "width": size, "steps": steps}


def _is_stand_in_teacher(name: str) -> bool:
    """Whether `name` (one no model directory holds) asks for a flavor's teacher: FLAVOR-teacher."""
    return name.endswith("-teacher") and name.removesuffix("-teacher") in FLAVORS


def model_kind(name_or_path: str) -> str | None:
    """A model directory's kind (model.json's, `MODEL_KINDS`), read without loading its weights;
    "teacher" for a flavor's stand-in teacher (FLAVOR-teacher), None for a stand-in student, an
    export that does not say, or a model.json that cannot be read."""
    from streamgen.model.files import read_json

    directory = resolve_model_dir(os.fspath(name_or_path))
    if directory is None and _is_stand_in_teacher(os.fspath(name_or_path)):
        return "teacher"
    try:
        return read_json(directory / "model.json").get("kind") if directory is not None else None
    except (OSError, ValueError):
        return None


def model_shape(name_or_path: str) -> tuple[ModelConfig, int] | None:
    """A model's DiT config and its autoencoder's spatial factor, as `load_model` would build them,
    read without loading its weights (for checks before a long start: `--sp N`'s processes). None
    where its files do not say them (loading the model says what is wrong)."""
    from streamgen.model.files import read_json, read_safetensors_metadata
    from streamgen.model.wan_vae import WanVAE

    name_or_path = os.fspath(name_or_path)
    directory = resolve_model_dir(name_or_path)
    try:
        if directory is None:
            flavor = name_or_path.removesuffix("-teacher")
            return (get_config(flavor), TinyCausalVAE.spatial_factor_of()) if flavor in FLAVORS else None
        cfg = ModelConfig.from_dict(read_json(directory / "model.json")["config"])
        if (directory / WanVAE.DIRECTORY).is_dir():  # (the autoencoder `_read_autoencoder` takes)
            return cfg, WanVAE.spatial_factor_of(read_json(directory / WanVAE.DIRECTORY / "config.json")["dim_mult"])
        vae_config = read_safetensors_metadata(directory / "vae.safetensors").get("vae_config")
        vae_config = json.loads(vae_config) if vae_config else read_json(directory / "vae_config.json")
        return cfg, TinyCausalVAE.spatial_factor_of(vae_config.get("widths", TinyCausalVAE.DEFAULT_WIDTHS))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def require_model(name_or_path: str) -> None:
    """FileNotFoundError, saying what there is, unless `name_or_path` names a model `load_model` loads
    (a check before a long job, which would otherwise fail only where it loads it)."""
    from streamgen.model_names import not_a_model

    name_or_path = os.fspath(name_or_path)
    if resolve_model_dir(name_or_path) is None and name_or_path.removesuffix("-teacher") not in FLAVORS:
        raise FileNotFoundError(not_a_model(name_or_path))


def load_model_dir(d: Path, device="cpu", dtype=None, **cfg_overrides) -> AvatarModel:
    """A model directory as it is (no environment's attention, precision or compile: `load_model`),
    its files all of one export: read again where one put its folder in place meanwhile
    (`streamgen.folders.read_folder`; `streamgen.model_export.save_model`)."""
    d = Path(d)
    try:
        meta, dit, vae = read_folder(d, lambda folder: _read_dir(folder, cfg_overrides))
    except FileNotFoundError as e:  # (it was "[Errno 2] No such file or directory: '.../vae.safetensors'")
        if e.filename is None or not Path(e.filename).is_relative_to(d):
            raise
        raise FileNotFoundError(
            f"{d}: the model directory has no {Path(e.filename).relative_to(d)}: copy or export the whole "
            "model again"
        ) from None
    return AvatarModel(
        name=meta.get("name", d.name),
        dit=dit.to(device, dtype).eval(),
        vae=vae.to(device).eval(),
        **_settings(meta),
        trained=True,
        meta=meta,
    )


def _read_dir(d: Path, cfg_overrides: dict) -> tuple[dict, DiT, VideoAutoencoder]:
    from streamgen.model.files import load_safetensors, non_finite_tensor, read_json

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
    if bad := non_finite_tensor(sd):  # (it loaded without a word, and made a black video)
        raise ValueError(f"{d / 'dit.safetensors'}: its {bad} holds NaN or infinite values (from a training "
                         "run that diverged?): the model cannot generate with them")  # fmt: skip
    vae = _read_autoencoder(d)
    if vae.latent_channels != cfg.in_channels:  # (else a convolution's error at the first chunk)
        raise ValueError(f"{d}: the DiT takes {cfg.in_channels} latent channels, its autoencoder gives "
                         f"{vae.latent_channels}")  # fmt: skip
    if vae.temporal_factor != cfg.temporal_compression:
        # (else each latent frame's audio window was cut for temporal_compression video frames
        # while it decoded to temporal_factor: the lips drifted off the speech, without a word)
        raise ValueError(f"{where}: its temporal_compression is {cfg.temporal_compression}, its autoencoder "
                         f"makes {vae.temporal_factor} video frames of each latent frame")  # fmt: skip
    unit, settings = vae.spatial_factor * cfg.patch_size[1], _settings(meta, where)
    if settings["height"] % unit or settings["width"] % unit:  # (a session's error, naming no file)
        raise ValueError(f"{where}: its height and width ({settings['height']}x{settings['width']}) must be "
                         f"multiples of {unit}, what its autoencoder and patches tile")  # fmt: skip
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
    """How `weights` differ from what a DiT of `cfg` holds (names, shapes, floating-point), said
    briefly, or None."""
    wanted = {name: tuple(t.shape) for name, t in _meta_dit(cfg).state_dict().items()}
    missing = [name for name in wanted if name not in weights]
    extra = [name for name in weights if name not in wanted]
    other = [f"{name} {tuple(weights[name].shape)} (the config's: {shape})"
             for name, shape in wanted.items() if name in weights and tuple(weights[name].shape) != shape]  # fmt: skip
    # (an integer or boolean weight was copied into the float parameter as it was, 0s and 1s and
    # all, without a word)
    not_floating = [f"{name} ({str(t.dtype).removeprefix('torch.')})"
                    for name, t in weights.items() if name in wanted and not t.is_floating_point()]  # fmt: skip
    said = [f"{len(found)} {what}, e.g. {found[0]}" for what, found in
            (("of other shapes", other), ("not floating-point", not_floating), ("missing", missing),
             ("it has no place for", extra)) if found]  # fmt: skip
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
