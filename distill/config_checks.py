"""The checks of a training config beyond its keys' types: the values each field may take, the
settings that go together, the model config its flavor and overrides make, and where a problem
comes from (the config file or a --set); and the settings a run ignores, to warn of."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re

from distill.config_schema import (
    BANK_STAGES,
    PIXEL_STAGES,
    ChunkOptions,
    ConfigError,
    DataConfig,
    DmdOptions,
    LatentsOptions,
    ModelConfigSection,
    OptimConfig,
    SelfForcingOptions,
    TeacherOptions,
    TinyDecoderOptions,
    TrainConfig,
)

# The values a field may take, by field name (the names mean the same in every section):
AT_LEAST_ONE = {
    "steps", "checkpoint_every", "log_every", "keep_checkpoints", "batch_size", "latent_frames",
    "video_frames", "synthetic_clips", "synthetic_clip_latents", "height", "width", "stats_clips",
    "sample_steps", "trajectories", "teacher_steps", "student_steps", "trajectory_batch",
    "critic_updates", "blocks_per_stage", "eval_clips",
    "max_motion_frames",  # (0 trained with one, as 1 does: `p_motion_prefix: 0` trains with none)
}  # fmt: skip
NOT_NEGATIVE = {
    "seed", "threads", "lr", "weight_decay", "eps", "warmup", "decay_steps", "min_lr", "grad_clip",
    "max_chunks_back", "rollout_frames", "l1_weight", "mse_weight", "latent_penalty", "mouth_weight",
    "video_weight", "cfg_scale", "vae_res_blocks", "motion_frames",
}  # fmt: skip
POSITIVE = {"shift", "train_shift"}
PROBABILITIES = {
    "p_drop_audio",
    "p_drop_reference",
    "p_drop_text",
    "p_drop_all",
    "p_motion_prefix",
    "p_self_correct",
}
BELOW_ONE = {"ema"}  # [0, 1): a decay
INSIDE_ZERO_ONE = {"score_t_min", "score_t_max"}  # (0, 1): noise levels
WIDTHS = {"vae_widths", "widths"}
# folders and files (and the latent bank's name, a folder's): an empty one was the current folder
# (`run.out: ""` trained into it, "finished 4 steps in  ") or a message about a model named ''
PATHS = {"out", "export", "root", "latents", "init", "vae", "teacher", "critic_init"}
WAN_PATHS = {"init", "vae", "teacher", "critic_init"}  # the DiT and autoencoder paths that take wan:DIR


def _range_problems(obj, where: str) -> list[str]:
    """Each field of dataclass `obj` (and of those inside it) against the tables above."""
    problems = []
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{where}.{f.name}"
        if dataclasses.is_dataclass(value):
            problems += _range_problems(value, name)
        elif isinstance(value, str) and f.name in PATHS and not value.strip():
            optional = f.default is None
            what = "a name" if f.name == "latents" else "a path"
            problems.append(f"{name} is empty: give {what}" + (", or leave it out for none" if optional else ""))
        elif isinstance(value, str) and f.name in WAN_PATHS and value.startswith("wan:") and not value[4:].strip():
            # (was the current folder: ". has no config.json")
            problems.append(f"{name} is {value!r}: give the Wan checkpoint's folder after wan:")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            if f.name in WIDTHS and not (
                value and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in value)
            ):
                problems.append(f"{name} must be a list of whole numbers >= 1, got {value!r}")
        elif value != value:  # NaN passes every comparison below
            problems.append(f"{name} must be a number, got nan")
        elif not math.isfinite(value):  # (an infinite rate or scale trained to a nan loss)
            problems.append(f"{name} must be a finite number, got {value}")
        elif f.name in AT_LEAST_ONE and value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
        elif f.name in NOT_NEGATIVE and value < 0:
            problems.append(f"{name} must be >= 0, got {value}")
        elif f.name in POSITIVE and value <= 0:
            problems.append(f"{name} must be > 0, got {value}")
        elif f.name in PROBABILITIES and not 0 <= value <= 1:
            problems.append(f"{name} is a probability: between 0 and 1, got {value}")
        elif f.name in BELOW_ONE and not 0 <= value < 1:
            problems.append(f"{name} is a decay: >= 0 and < 1, got {value}")
        elif f.name in INSIDE_ZERO_ONE and not 0 < value < 1:
            problems.append(f"{name} is a noise level: between 0 and 1 (both excluded), got {value}")
    return problems


def _optim_problems(optim: OptimConfig, where: str) -> list[str]:
    betas = optim.betas
    if len(betas) != 2 or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in betas):
        return [f"{where}.betas must be two numbers, got {betas!r}"]
    if not all(0 <= b < 1 for b in betas):
        return [f"{where}.betas must each be >= 0 and < 1, got {betas!r}"]
    if optim.decay_steps and optim.min_lr > optim.lr:  # (the cosine would climb to it: no decay)
        return [f"{where}.min_lr ({optim.min_lr:g}) is where the decay ends: it must be <= lr ({optim.lr:g})"]
    return []


UNKNOWN_OVERRIDE = "unknown model config key "


def validate(cfg: TrainConfig, path, sets=()) -> None:
    from streamgen.cli import usable_cpus
    from streamgen.data import SPLITS
    from streamgen.model.config import ModelConfig, get_config, type_problems
    from streamgen.sampling import CACHE_FROM

    problems = []
    for section in ("run", "data", "model", "optim"):
        problems += _range_problems(getattr(cfg, section), section)
    problems += _range_problems(cfg.options, cfg.stage)
    problems += _optim_problems(cfg.optim, "optim")
    opts = cfg.options
    if isinstance(opts, DmdOptions):
        problems += _optim_problems(opts.critic_optim, f"{cfg.stage}.critic_optim")
        if opts.score_t_min >= opts.score_t_max:
            problems.append(f"{cfg.stage}.score_t_min must be below score_t_max")
    if isinstance(opts, SelfForcingOptions) and opts.cache_from not in CACHE_FROM:
        problems.append(
            f"self_forcing.cache_from must be one of {', '.join(CACHE_FROM)}, got {opts.cache_from!r}"
        )
    if isinstance(opts, SelfForcingOptions) and opts.cache_from == "last_step" and opts.student_steps == 1:
        problems.append("self_forcing.cache_from last_step needs student_steps 2 or more (1 step sees only noise)")
    if isinstance(opts, TinyDecoderOptions) and opts.architecture not in ("taehv", "causal_vae"):
        problems.append(f"tiny_decoder.architecture must be taehv or causal_vae, got {opts.architecture!r}")
    if isinstance(opts, TinyDecoderOptions) and opts.architecture == "causal_vae" and opts.init is not None:
        # (it was ignored: the run trained from the teacher's weights, not the checkpoint given)
        problems.append(
            "tiny_decoder.init starts a taehv decoder; a causal_vae one starts from its teacher's "
            "weights (model.vae): leave init out"
        )
    if cfg.data.source not in ("world", "synthetic"):
        problems.append(f"data.source must be 'world' or 'synthetic', got {cfg.data.source!r}")
    splits = {"data.split": [cfg.data.split]}
    if isinstance(opts, LatentsOptions):
        splits["latents.splits"] = opts.splits
    if isinstance(opts, TinyDecoderOptions):
        splits["tiny_decoder.eval_split"] = [opts.eval_split]
    for name, values in splits.items():
        if not isinstance(values, list) or not values or any(v not in SPLITS for v in values):
            problems.append(f"{name} must name splits of {', '.join(SPLITS)}, got {values!r}")
    if isinstance(cfg.data.latents, str) and not _folder_name(cfg.data.latents):
        # (a path: `../x` wrote its latent bank outside DATA/latents/, where no stage looks)
        problems.append(
            f"data.latents {cfg.data.latents[:40]!r} is not a name for a folder of DATA/latents/: letters, "
            "digits, '.', '_' and '-', e.g. tiny-vae"
        )
    if cfg.run.export_name is not None:
        problem = model_name_problem(cfg.run.export_name)
        if problem:
            problems.append(f"run.export_name {problem}")
        exports = {"autoencoder": "an autoencoder", "latents": "no model", "tiny_decoder": "a tiny decoder"}
        taehv = isinstance(opts, TinyDecoderOptions) and opts.architecture == "taehv"
        if cfg.stage in ("autoencoder", "latents") or taehv:  # (it was ignored: nothing exported has a name)
            problems.append(
                f"run.export_name names an exported model (its model.json); the {cfg.stage} stage "
                f"exports {exports[cfg.stage]}, which has none"
            )
        elif not cfg.run.export:  # (it was ignored: OUT/model is exported under its folder's name)
            problems.append(
                "run.export_name names the model exported to run.export, which is not given: set "
                "run.export too, or leave export_name out"
            )
    threads, cpus = cfg.run.threads, usable_cpus()
    if isinstance(threads, int) and threads > cpus:  # (99999 crashed inside OpenMP with no message)
        problems.append(
            f"run.threads is {threads}: this process may use {cpus} CPUs; give at most {cpus} (0: torch's default)"
        )
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        problems.append(f"run.device must be auto, cpu or cuda, got {cfg.run.device!r}")
    sets_blamed = {}  # a problem: the keys of the --set options it comes from ([]: the file's)
    override_problems = [f"model.overrides.{problem}" for problem in type_problems(cfg.model.overrides)]
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in cfg.model.overrides:  # (was "ModelConfig.__init__() got an unexpected keyword argument")
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean model.overrides.{close[0]}?)" if close else ""
            override_problems.append(f"{UNKNOWN_OVERRIDE}model.overrides.{key}{hint}")
    problems += override_problems
    try:  # the flavor and its overrides make a model config
        get_config(cfg.model.flavor, **cfg.model.overrides)
    except KeyError as e:
        problems.append(f"model.flavor: {e.args[0]}")
    except (TypeError, ValueError) as e:
        if not override_problems:  # (said already, field by field)
            problems.append(f"model.overrides: {e}")
            # (`--set model.overrides.dim=-1` blamed the file, which does not hold it)
            sets_blamed[problems[-1]] = _override_sets_to_blame(cfg.model, sets, e)
    if problems:
        raise ConfigError(f"{_blamed(problems, sets, path, sets_blamed)}: " + "; ".join(problems))


def _override_sets_to_blame(model: ModelConfigSection, sets, error: Exception) -> list[str]:
    """The keys of the --set options of model.overrides behind the model config's `error`: those whose
    field it names, else all of them where the overrides without them make a config; [] where the
    config file's own overrides are to blame."""
    from streamgen.model.config import get_config

    given = [item.partition("=")[0].strip() for item in sets]
    if "model.overrides" in given:  # (`--set 'model.overrides={dim: -1}'`: all of them)
        return ["model.overrides"]
    names = list(dict.fromkeys(k.removeprefix("model.overrides.") for k in given if k.startswith("model.overrides.")))
    named = [name for name in names if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", str(error))]
    if named or not names:
        return [f"model.overrides.{name}" for name in named]
    try:
        get_config(model.flavor, **{k: v for k, v in model.overrides.items() if k not in names})
    except (KeyError, TypeError, ValueError):
        return []
    return [f"model.overrides.{name}" for name in names]


def ignored_settings(cfg: TrainConfig, processes: int) -> list[str]:
    """The settings of `cfg` this run of `processes` processes does not use, each a line to warn
    with: they were ignored without a word, and a run trained as if they had not been given. (The
    data settings warn only where they differ from the default: a shared data section is fine.)"""
    notes, default, opts = [], DataConfig(), cfg.options
    if cfg.run.fsdp and processes == 1:
        notes.append("run.fsdp shards over the processes of a torchrun launch; this run is one process: "
                     "it trains unsharded")  # fmt: skip
    if isinstance(opts, ChunkOptions) and opts.max_chunks_back == 0 and opts.p_self_correct > 0:
        notes.append("chunk.p_self_correct does nothing with chunk.max_chunks_back 0: every step trains the "
                     "first chunk, which has no chunks before it to roll out")  # fmt: skip
    if isinstance(opts, DmdOptions) and opts.critic_optim.ema > 0:  # (only the generator's is exported)
        notes.append(f"{cfg.stage}.critic_optim.ema keeps an average of the critic that nothing reads: the "
                     "fake score is the critic as it trains, and the export is the generator's; it costs a copy "
                     "of the critic's weights, in memory and in every checkpoint")  # fmt: skip
    most = cfg.data.latent_frames - 1  # (distill/teacher.py: a prefix leaves a frame to denoise)
    if isinstance(opts, TeacherOptions) and opts.p_motion_prefix > 0 and most == 0:
        # (was "motion prefixes are at most 1 frame", or nothing with max_motion_frames 1)
        notes.append("teacher.p_motion_prefix does nothing with crops of data.latent_frames 1: a prefix leaves "
                     "a frame to denoise, and a crop of one frame has none to spare; the teacher trains, and "
                     "exports, without motion prefixes")  # fmt: skip
    elif isinstance(opts, TeacherOptions) and opts.p_motion_prefix > 0 and opts.max_motion_frames > most:
        notes.append(f"teacher.max_motion_frames {opts.max_motion_frames} is more than crops of "
                     f"data.latent_frames {cfg.data.latent_frames} take: motion prefixes are at most {most} "
                     f"frame{'s' * (most != 1)}")  # fmt: skip
    if isinstance(opts, TinyDecoderOptions) and opts.architecture == "causal_vae":
        if opts.blocks_per_stage != TinyDecoderOptions.blocks_per_stage:
            notes.append("tiny_decoder.blocks_per_stage is for a taehv decoder; a causal_vae one has its "
                         "teacher's residual blocks")  # fmt: skip
    if cfg.stage != "autoencoder" and cfg.model.vae is not None:  # (they shape a new random autoencoder)
        model = ModelConfigSection()
        for name in ("vae_widths", "vae_res_blocks"):
            if getattr(cfg.model, name) != getattr(model, name):
                notes.append(f"model.{name} shapes the autoencoder the autoencoder stage trains (or a random "
                             f"one); this run reads model.vae's, {cfg.model.vae}")  # fmt: skip
    if cfg.stage in PIXEL_STAGES:
        unused, reads = ("latents", "latent_frames"), "video, in crops of data.video_frames"
    elif cfg.stage in BANK_STAGES:
        unused, reads = ("video_frames",), "a latent bank, in crops of data.latent_frames"
    else:
        unused, reads = (), ""
    for name in unused:
        if getattr(cfg.data, name) != getattr(default, name):
            notes.append(f"data.{name} does not apply to the {cfg.stage} stage, which reads {reads}")
    return notes


def _blamed(problems: list[str], sets, path, sets_blamed: dict | None = None) -> str:
    """Where `problems` come from: the --set options `sets`, where each problem begins with a key one
    of them set (the file was blamed for a value it does not hold), or `sets_blamed` gives the keys
    of a problem that begins with none; else the config file."""
    given = {item.partition("=")[0].strip(): item for item in sets}  # (the last of a key's wins)
    items = []
    for problem in problems:
        if sets_blamed and problem in sets_blamed:
            if not sets_blamed[problem]:
                return str(path)
            items += [f"--set {given[key]!r}" for key in sets_blamed[problem]]
            continue
        # (an unknown override begins with what it is: `--set model.overrides.bogus=1` blamed the file)
        named = problem.removeprefix(UNKNOWN_OVERRIDE)
        key = next((k for k in given if re.match(rf"{re.escape(k)}(?![\w.])", named)), None)
        if key is None:
            return str(path)
        items.append(f"--set {given[key]!r}")
    return ", ".join(dict.fromkeys(items))


# A model's name (model.json's `name`, a shipped model's folder under streamgen/assets/models): what a
# listing, a log line and `distill.ship` can take as it is. ('', '../x', 'a/b' or a newline went into
# model.json unchecked, and the same name shipped was written outside the shipped models or failed.)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MODEL_NAME_MAX = 255  # a folder's name on the usual file systems (NAME_MAX)


def _folder_name(name: str) -> bool:
    """Whether `name` names one folder, as a model's name does (no path, not `..`)."""
    return bool(MODEL_NAME.fullmatch(name)) and len(name) <= MODEL_NAME_MAX


def model_name_problem(name: str) -> str | None:
    """Why `name` is not a model name (a phrase after it), or None."""
    if not MODEL_NAME.fullmatch(name):
        return f"{name!r} is not a model name: letters, digits, '.', '_' and '-', e.g. tiny-avatar"
    if len(name) > MODEL_NAME_MAX:
        return f"{name[:20]!r}... is not a model name: {len(name)} characters, over {MODEL_NAME_MAX}"
    return None

