"""YAML configs for the training stages, checked strictly.

A config file is the sections below; every stage reads `run`, `data`, `model`
and `optim`, plus the section named after itself (`teacher:`, `ode:`, ...).
Unknown keys are errors that name the key, its section and the closest valid
spelling, so a typo never silently trains with a default.

    stage: teacher
    run:   {out: runs/teacher, steps: 2000, seed: 0, checkpoint_every: 500}
    data:  {source: world, root: data/world, latents: tiny-vae, batch_size: 8, latent_frames: 6}
    model: {flavor: tiny-avatar, overrides: {num_layers: 4}}
    optim: {lr: 2.0e-4, warmup: 100, grad_clip: 1.0, ema: 0.999}
    teacher: {p_drop_audio: 0.1}
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from streamgen.files import home_expanded

STAGES = ("autoencoder", "latents", "teacher", "ode", "self_forcing", "chunk", "tiny_decoder")


class ConfigError(ValueError):
    """The YAML file is unreadable, or holds an unknown key or a bad value."""


class ValueTypeError(ConfigError):
    """A value of the wrong type; `key` is its SECTION.KEY (a --set's is named, not the file)."""

    def __init__(self, message: str, key: str, wants_text: bool = False):
        super().__init__(message)
        self.key, self.wants_text = key, wants_text  # (wants_text: a str would have done)


@dataclass
class RunConfig:
    out: str = "runs/run"  # checkpoints, TensorBoard events, loss curves
    steps: int = 100  # optimizer steps of the main model in total
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    threads: int = 0  # torch.set_num_threads; 0 leaves the default
    device: str = "auto"  # auto | cpu | cuda
    export: str | None = None  # model directory written at the end (EMA weights)
    # the name in run.export's model.json (default: the folder's); of a model: not an autoencoder or a taehv decoder
    export_name: str | None = None
    progress: bool = True
    fsdp: bool = False  # under torchrun: shard the trainable modules with FSDP2 (large flavors)


@dataclass
class DataConfig:
    source: str = "world"  # world (a `streamgen data make` folder) | synthetic (random tensors, tests)
    root: str = "data/world"
    latents: str = "tiny-vae"  # latent cache name (see the `latents` stage)
    split: str = "train"
    batch_size: int = 8  # global: divided over the data-parallel ranks
    latent_frames: int = 6  # generated latent frames per sample (after the reference frame)
    video_frames: int = 8  # autoencoder stage: video frames per training crop
    synthetic_clips: int = 8
    synthetic_clip_latents: int = 10  # latent frames per synthetic clip
    # resume over a dataset (data.root) or latent bank (data.latents) made again since the checkpoint,
    # or against a teacher with other weights (self_forcing, chunk, tiny_decoder): refused unless this is given
    # (`--set data.accept_remade=true`), as the paths are by every command
    accept_remade: bool = False


@dataclass
class ModelConfigSection:
    flavor: str = "tiny-avatar"
    overrides: dict = field(default_factory=dict)  # ModelConfig fields to change
    init: str | None = None  # a model directory (its DiT), or wan:DIR (a diffusers Wan2.1 transformer)
    vae: str | None = None  # trained autoencoder directory; None: a random TinyCausalVAE
    vae_widths: list = field(default_factory=lambda: [32, 64, 96, 128])
    vae_res_blocks: int = 0  # extra residual blocks per scale of the TinyCausalVAE
    height: int = 64
    width: int = 64


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup: int = 0  # linear warm-up steps
    decay_steps: int = 0  # > 0: cosine decay from lr to min_lr over this many updates after warm-up
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 disables
    ema: float = 0.0  # EMA decay of the weights; 0 disables


@dataclass
class AutoencoderOptions:
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    latent_penalty: float = 1e-4  # keeps latents small and well-conditioned for diffusion
    stats_clips: int = 64  # clips used to measure latent_mean / latent_std at the end
    # extra weight of the reconstruction error inside the mouth box (the evaluators' MOUTH_BOX):
    # the mouth is ~15% of the frame but carries all of the lip sync
    mouth_weight: float = 0.0


@dataclass
class LatentsOptions:
    splits: list = field(default_factory=lambda: ["train", "val", "test"])
    captions: bool = True  # embed captions with MiniLM (needs text_dim 384); else zero context


@dataclass
class TeacherOptions:
    shift: float = 5.0  # timestep shift at sampling (exported into model.json)
    train_shift: float = 1.0  # shift of the training noise levels (small latents need low-noise training)
    logit_normal: bool = True  # sample training sigmas from a logit-normal before the shift
    p_drop_audio: float = 0.1
    p_drop_reference: float = 0.1
    p_drop_text: float = 0.1
    p_drop_all: float = 0.1  # the unconditional branch of CFG
    p_motion_prefix: float = 0.3  # train with clean leading frames (motion frames of the chunk stage)
    max_motion_frames: int = 2
    sample_steps: int = 50  # exported into model.json
    cfg_scale: float = 3.0


@dataclass
class OdeOptions:
    teacher: str = "runs/teacher/model"  # the teacher's model directory
    trajectories: int = 64  # teacher trajectories sampled once
    teacher_steps: int = 48  # Euler steps per trajectory
    cfg_scale: float = 3.0
    student_steps: int = 4
    shift: float = 5.0
    trajectory_batch: int = 8


@dataclass
class DmdOptions:
    """Shared by Self-Forcing and chunk distillation."""

    teacher: str = "runs/teacher/model"
    critic_init: str | None = None  # default: the teacher's weights
    cfg_scale: float = 3.0
    student_steps: int = 4
    shift: float = 5.0
    score_t_min: float = 0.02
    score_t_max: float = 0.98
    critic_updates: int = 5  # critic updates per generator update
    critic_optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SelfForcingOptions(DmdOptions):
    # Roll out up to this many latent frames (0: data.latent_frames) and score only the last
    # data.latent_frames of them: the teacher saw crops of that length, while drift happens over
    # longer streams, so the chunks in front run as plain inference (no gradient) and put the
    # scored window where the student's cache is already full of its own output. The length is
    # drawn per step, a whole number of chunks from data.latent_frames up to this.
    rollout_frames: int = 0
    # where the rollouts' (and the exported student's) ring keys/values come from:
    # `streamgen.sampling.CACHE_FROM`; "last_step" drops the clean re-encode at inference
    cache_from: str = "reencode"


@dataclass
class ChunkOptions(DmdOptions):
    motion_frames: int = 2  # clean frames of the previous chunk the student conditions on
    p_self_correct: float = 0.5  # contexts from the student's own rollout (else from the data)
    max_chunks_back: int = 3  # the own rollout runs up to this many chunks before the trained one


@dataclass
class TinyDecoderOptions:
    """A fast decoder distilled from `model.vae`'s (distill/tiny_decoder.py)."""

    # "taehv": TAEHV's decoder architecture; "causal_vae": the teacher's own (a TinyCausalVAE)
    # with narrower `widths` (from full resolution down), started from the teacher's weights
    architecture: str = "taehv"
    widths: list = field(default_factory=lambda: [256, 128, 64, 64])  # TAEHV's (taew2_1)
    blocks_per_stage: int = 3  # taehv only: a causal_vae decoder has the teacher's res_blocks
    init: str | None = None  # taehv only: a TAEHV checkpoint (taew2_1.pth) or ours to start from
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    video_weight: float = 0.0  # the same distance to the training video, beside the teacher's frames
    eval_split: str = "val"
    eval_clips: int = 8


STAGE_OPTIONS = {
    "autoencoder": AutoencoderOptions,
    "latents": LatentsOptions,
    "teacher": TeacherOptions,
    "ode": OdeOptions,
    "self_forcing": SelfForcingOptions,
    "chunk": ChunkOptions,
    "tiny_decoder": TinyDecoderOptions,
}


@dataclass
class TrainConfig:
    stage: str
    run: RunConfig
    data: DataConfig
    model: ModelConfigSection
    optim: OptimConfig
    options: typing.Any  # the stage's own section
    source: str = ""  # the YAML text, stored in checkpoints
    set_keys: tuple = ()  # the SECTION.KEY names given with --set: changed on purpose

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d[self.stage] = d.pop("options")
        d.pop("source")
        d.pop("set_keys")
        return d


# What every step's samples and noise are drawn from, besides the step (distill/rng.py: the seed,
# and each sample's index in the global batch), and the data they are drawn out of: a resume that
# changed one would go on as another run than the checkpoint's, so it is refused unless the new
# value is given with --set. Which a run reads depends on its stage and data source
# (resume_settings). (The optimizer's settings, the other options of the stage and run.steps may
# change on a resume, as they do; the model's config is checked on its own, whole.)
LEGACY_SETTINGS = ("run.seed", "data.batch_size")  # all that checkpoints recorded at first
BANK_STAGES = ("teacher", "ode", "self_forcing", "chunk")  # they read a latent bank (distill/data.py)


def resume_settings(cfg: TrainConfig) -> dict:
    """The settings of `cfg` a resume keeps, by "section.key" (kept in checkpoints as "run_settings"):
    the seed and batch size; where the clips come from (data.root, .split and, for the stages that
    read a latent bank, .latents; the synthetic clips' counts); the crops' length; the student's
    noise levels (student_steps and shift of the ode, self_forcing and chunk stages)."""
    keys = [*LEGACY_SETTINGS, "data.source"]
    bank = cfg.stage in BANK_STAGES
    if cfg.data.source == "world":
        keys += ["data.root", "data.split"] + (["data.latents"] if bank else [])
    else:
        keys += ["data.synthetic_clips", "data.synthetic_clip_latents"]
    keys.append("data.latent_frames" if bank else "data.video_frames")
    if isinstance(cfg.options, OdeOptions | DmdOptions):
        keys += [f"{cfg.stage}.student_steps", f"{cfg.stage}.shift"]
    return {key: setting(cfg, key) for key in keys}


def setting(cfg: TrainConfig, key: str):
    """The value of "section.key" in `cfg` (the stage's own section by the stage's name)."""
    section, name = key.split(".")
    return getattr(cfg.options if section == cfg.stage else getattr(cfg, section), name)


def resume_settings_in_text(text: str) -> dict | None:
    """LEGACY_SETTINGS as a config's text says them, the YAML and then its `# --set` lines (what
    checkpoints from before "run_settings" keep); None where the text no longer reads. (Not the
    later settings: a checkpoint that does not record one is not checked for it.)"""
    import yaml

    if not text.strip():
        return None
    sets = [line.removeprefix("# --set ") for line in text.splitlines() if line.startswith("# --set ")]
    defaults = {"run": RunConfig(), "data": DataConfig()}
    try:
        raw = yaml.safe_load(text) or {}
        _apply_sets(raw, sets)
        settings = {}
        for key in LEGACY_SETTINGS:
            section, name = key.split(".")
            settings[key] = (raw.get(section) or {}).get(name, getattr(defaults[section], name))
        return settings
    except (yaml.YAMLError, ConfigError, AttributeError, TypeError):
        return None


def _build(cls, values, where: str):
    """Instantiate dataclass `cls` from a dict, naming unknown keys and wrong types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hints.append(f"{where}.{k}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
        message = f"unknown config key(s): {', '.join(hints)}"
        raise ValueTypeError(message, f"{where}.{unknown[0]}") if len(unknown) == 1 else ConfigError(message)
    hints_by_name = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints_by_name[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value, hint, where: str):
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueTypeError(f"{where}: must not be empty", where, str in allowed)
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        # (`--set run.steps=1e4`: a whole number written as a float was "expected int, got 10000.0")
        if base is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    hint = ""
    if float in allowed and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:  # ("nan" and "inf" read as floats; YAML's own .nan and .inf are refused below)
            hint = (f" (YAML reads {value} as text: give it a decimal point, as in 1.0e-3)" if math.isfinite(number)
                    else " (not a finite number)")  # fmt: skip
    raise ValueTypeError(f"{where}: expected {names}, got {value!r}{hint}", where, str in allowed)


def load_config(path: str | Path, stage: str, sets: list[str] | tuple = ()) -> TrainConfig:
    """The config of `stage` in the YAML file at `path`, with `sets` ("SECTION.KEY=VALUE", the
    value read as YAML, e.g. run.out=runs/x or model.overrides.window_frames=6) over it."""
    import yaml

    path = Path(path)
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    file_stage = raw.pop("stage", stage)
    if file_stage != stage:
        raise ConfigError(f"{path} is a config for stage {file_stage!r}, not {stage!r}")
    in_file = set(raw)
    _apply_sets(raw, sets)
    if sets:  # kept with the checkpoints' config text: what the run was made of
        text += "".join(f"\n# --set {item}" for item in sets) + "\n"
    sections = {"run", "data", "model", "optim", stage}
    unknown = [k for k in raw if k not in sections]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), sorted(sections), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if k in STAGE_OPTIONS:
                hint = f" (a section of stage {k!r}, not {stage!r})"
            hints.append(f"{k}{hint}")
        given = {item.partition("=")[0].split(".")[0].strip(): item for item in sets}
        # (the file was blamed for a section a --set named)
        where = ", ".join(f"--set {given[k]!r}" for k in unknown) if in_file.isdisjoint(unknown) else path
        raise ConfigError(f"{where}: unknown config section(s): {', '.join(hints)}")
    try:
        cfg = TrainConfig(
            stage=stage,
            run=_build(RunConfig, raw.get("run"), "run"),
            data=_build(DataConfig, raw.get("data"), "data"),
            model=_build(ModelConfigSection, raw.get("model"), "model"),
            optim=_build(OptimConfig, raw.get("optim"), "optim"),
            options=_build(STAGE_OPTIONS[stage], raw.get(stage), stage),
            source=text,
            set_keys=tuple(item.partition("=")[0].strip() for item in sets),
        )
    except ConfigError as e:
        given = {item.partition("=")[0].strip(): item for item in sets}  # (the last of a key's wins)
        item = given.get(getattr(e, "key", None))
        if item is not None:  # (the file was blamed for a value it does not hold)
            reading = _yaml_reading(item.partition("=")[2]) if e.wants_text else ""
            raise ConfigError(f"--set {item!r}: {e}{reading}") from None
        raise ConfigError(f"{path}: {e}") from None
    _expand_home(cfg)
    _validate(cfg, path, sets)
    return cfg


# The folders the trainer opens itself (the model paths go through `resolve_model_dir`, which
# expands `~`): `--set run.out=~/runs/t` reaches here unexpanded (no shell expands `~` after `=`)
# and made a folder named `~` in the current one.
HOME_PATHS = ("run.out", "run.export", "data.root")


def _expand_home(cfg: TrainConfig) -> None:
    for key in HOME_PATHS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(getattr(cfg, section), name, os.path.expanduser(value))


def _apply_sets(raw: dict, sets) -> None:
    import yaml

    for item in sets:
        key, sep, value = item.partition("=")
        # (`run.out = x`, as a YAML file spaces it: "unknown config key(s): run.out  (did you mean run.out?)")
        names = [name.strip() for name in key.split(".")]
        if not sep or len(names) < 2 or not all(names):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. run.out=runs/mine")
        node = raw
        for depth, name in enumerate(names[:-1]):
            if node.get(name) is None:  # (a section the file leaves empty: `optim:`)
                node[name] = {}
            node = node[name]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(names[: depth + 1])} is not a section")
        try:
            node[names[-1]] = value.strip() if _ends_in_comment(value) else _number_or(yaml.safe_load(value), value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {yaml_problem(e)}") from None


def _ends_in_comment(text: str) -> bool:
    """Whether YAML reads the end of a --set's `text` as a comment. A shell drops its own comments,
    so a ` #` that reaches a --set was quoted on purpose: part of the value (`run.out=runs/a #1` was
    read as runs/a, the rest dropped without a word)."""
    import yaml

    node = yaml.compose(text)  # (the value as YAML reads it, with where it ends)
    rest = text[node.end_mark.index :] if node is not None else text
    return rest.strip().startswith("#")


def _yaml_reading(text: str) -> str:
    """Why YAML read a --set's `text` as other than the text it looks like, or ''."""
    import yaml

    text = text.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return ""
    if text.startswith("wan:") and isinstance(value, dict):  # (`wan:`, `wan: DIR`: a mapping)
        return " (YAML reads it as a mapping: give the Wan checkpoint's folder right after wan:, as in wan:DIR)"
    if isinstance(value, bool) or (value is None and text):  # (`~`, the home folder: null to YAML)
        read = "null" if value is None else str(value).lower()
        return f" (YAML reads {text} as {read}: quote it for text, as in '{text}')"
    if isinstance(value, dict) and ":" in text:
        return f" (YAML reads {text} as a mapping: quote it for text, as in '{text}')"
    if isinstance(value, int) and ":" in text:
        return f" (YAML reads {text} as the base-60 number {value}: quote it for text, as in '{text}')"
    if isinstance(value, datetime.date):
        return f" (YAML reads {text} as a date: quote it for text, as in '{text}')"
    return ""


def yaml_problem(e) -> str:
    """A YAML error in one line: where, what, and in what ("line 2, column 6: expected ',' or '}',
    but got '<stream end>' (while parsing a flow mapping)"). PyYAML's own text was six lines, with
    the line quoted, a caret under it, and "<unicode string>" for the file."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if not problem:
        return " ".join(str(e).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, opened = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and opened is not None and (mark is None or (opened.line, opened.column) != (mark.line, mark.column)):
        context += f" from line {opened.line + 1}, column {opened.column + 1}"  # (the `{` left open)
    return where + " ".join(problem.split()) + (f" ({' '.join(context.split())})" if context else "")


def _number_or(value, text: str):
    """A command line's 1e-4 is a number (YAML 1.1 reads it as text without a decimal point);
    quoted ("1e4"), or not written as a number (nan, a path), it stays text."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text.strip()):
        return float(text)
    return value


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


def _validate(cfg: TrainConfig, path, sets=()) -> None:
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


PIXEL_STAGES = ("autoencoder", "tiny_decoder")  # they read video, in crops of data.video_frames


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
    most = max(1, cfg.data.latent_frames - 1)  # (distill/teacher.py: a prefix leaves a frame to denoise)
    if isinstance(opts, TeacherOptions) and opts.p_motion_prefix > 0 and opts.max_motion_frames > most:
        notes.append(f"teacher.max_motion_frames {opts.max_motion_frames} is more than crops of "
                     f"data.latent_frames {cfg.data.latent_frames} take: motion prefixes are at most {most} "
                     f"frame{'s' * (most != 1)}")  # fmt: skip
    if isinstance(opts, TinyDecoderOptions) and opts.architecture == "causal_vae":
        if opts.blocks_per_stage != TinyDecoderOptions.blocks_per_stage:
            notes.append("tiny_decoder.blocks_per_stage is for a taehv decoder; a causal_vae one has its "
                         "teacher's residual blocks")  # fmt: skip
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


def find_config(name_or_path: str, stage: str) -> Path:
    """A path, or a config name from distill/configs (e.g. 'debug' -> configs/<stage>-debug.yaml)."""
    p = home_expanded(name_or_path)  # (`--config=~/x.yaml`: no shell expands it there)
    if p.is_file():  # (not a folder named as a config: `--config debug` beside a run's ./debug)
        return p
    here = Path(__file__).parent / "configs"
    for candidate in (
        here / name_or_path,
        here / f"{name_or_path}.yaml",
        here / f"{stage}-{name_or_path}.yaml",
    ):
        if candidate.exists():
            return candidate
    # (`latents --config debug`: that stage has none, and nothing said which names it has)
    names = sorted(p.name.removeprefix(f"{stage}-").removesuffix(".yaml") for p in here.glob(f"{stage}-*.yaml"))
    theirs = f"; the {stage} stage's: {', '.join(names)}" if names else ""
    raise ConfigError(f"config {name_or_path!r} not found (not a file, nor a name in {here}{theirs})")
