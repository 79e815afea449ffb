"""Loading the YAML config of a training stage, checked strictly (its sections: config_schema.py).

`load_config` reads the file, puts the --set options over it (config_sets.py), builds the sections
naming unknown keys and wrong types, and checks the values (config_checks.py); `find_config` finds
a config by path or by name in distill/configs. The settings a resume keeps are said here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path

from distill.config_checks import ignored_settings, model_name_problem, validate
from distill.config_schema import (
    BANK_STAGES,
    STAGE_OPTIONS,
    STAGES,
    ConfigError,
    DataConfig,
    DmdOptions,
    ModelConfigSection,
    OdeOptions,
    OptimConfig,
    RunConfig,
    TrainConfig,
    ValueTypeError,
)
from distill.config_sets import apply_sets, yaml_problem, yaml_reading
from streamgen.files import home_expanded

# the config's names, as they are imported from here (the sections' classes are config_schema's)
__all__ = [
    "BANK_STAGES", "ConfigError", "ModelConfigSection", "OptimConfig", "TrainConfig", "find_config",
    "MODEL_SOURCES", "ignored_settings", "load_config", "model_name_problem", "model_sources_in_text",
    "resume_settings", "resume_settings_in_text", "setting",
]  # fmt: skip


# What every step's samples and noise are drawn from, besides the step (distill/rng.py: the seed,
# and each sample's index in the global batch), and the data they are drawn out of: a resume that
# changed one would go on as another run than the checkpoint's, so it is refused unless the new
# value is given with --set. Which a run reads depends on its stage and data source
# (resume_settings). (The optimizer's settings, the other options of the stage and run.steps may
# change on a resume, as they do; the model's config is checked on its own, whole.)
LEGACY_SETTINGS = ("run.seed", "data.batch_size")  # all that checkpoints recorded at first


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
    defaults = {"run": RunConfig(), "data": DataConfig()}
    return _settings_in_text(text, LEGACY_SETTINGS, lambda section, name: getattr(defaults[section], name))


# The model section's sources of what a stage reads but does not train: its frozen autoencoder
# (model.vae, else model.init's own) and the network it starts from. Kept in checkpoints
# ("model_sources") for a resume whose config gives none to take the run's: a run begun with
# --set model.init=DIR and resumed without it went on with a new random autoencoder, without a word.
MODEL_SOURCES = ("model.init", "model.vae")


def model_sources_in_text(text: str) -> dict:
    """MODEL_SOURCES as a config's text says them (checkpoints from before "model_sources" keep
    only the text); {} where it no longer reads."""
    return _settings_in_text(text, MODEL_SOURCES, lambda section, name: None) or {}


def _settings_in_text(text: str, keys, default) -> dict | None:
    """`keys` ("section.key") as a config's text says them, the YAML and then its `# --set` lines,
    `default(section, name)` where it says none; None where the text does not read."""
    import yaml

    if not text.strip():
        return None
    sets = [line.removeprefix("# --set ") for line in text.splitlines() if line.startswith("# --set ")]
    try:
        raw = yaml.safe_load(text) or {}
        apply_sets(raw, sets)
        settings = {}
        for key in keys:
            section, name = key.split(".")
            settings[key] = (raw.get(section) or {}).get(name, default(section, name))
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
    if (float in allowed or int in allowed) and isinstance(value, str):  # (run.steps: "40" said no more)
        try:
            number = float(value)
        except ValueError:
            pass
        else:  # ("nan" and "inf" read as floats; YAML's own .nan and .inf are refused below)
            hint = _number_text_hint(value, number) if math.isfinite(number) else " (not a finite number)"
    raise ValueTypeError(f"{where}: expected {names}, got {value!r}{hint}", where, str in allowed)


def _number_text_hint(text: str, number: float) -> str:
    """Why a number came as text, and how to write it. YAML 1.1 reads a number with an exponent as a
    number only with a decimal point and a signed one (1e-4 and 1.0e4 are text); a number that YAML
    reads as one was quoted. (Both were "give it a decimal point, as in 1.0e-3": 1.0e4 has one, and
    a quoted 0.001 needed none.)"""
    import yaml

    if isinstance(yaml.safe_load(text), int | float):
        return " (a number in quotes is text: write it without them)"
    spelt = repr(number)
    if "e" in spelt:  # (Python's 1e-10: text to YAML again)
        mantissa, exponent = spelt.split("e")
        spelt = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent if exponent[0] in '+-' else '+' + exponent}"
    return f" (YAML reads {text} as text: write it as {spelt}; an exponent needs a decimal point and a sign, as in 1.0e-3)"


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
    apply_sets(raw, sets)
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
            reading = yaml_reading(item.partition("=")[2]) if e.wants_text else ""
            raise ConfigError(f"--set {item!r}: {e}{reading}") from None
        raise ConfigError(f"{path}: {e}") from None
    _expand_home(cfg)
    validate(cfg, path, sets)
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
