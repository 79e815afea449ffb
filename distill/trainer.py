"""The training loop shared by every stage.

A stage (teacher, ode, self_forcing, chunk, autoencoder, tiny_decoder) is an object with
  updaters      {name: Updater}: the trainable modules, each with its optimizer and EMA (updater.py)
  model_configs() -> {name: dict}: checked against a checkpoint on resume
  train_step(step) -> {scalar name: value}: one step (it calls updater.update(loss, step))
  export(directory): write the trained model (EMA weights) as a model directory
  input_identity() -> {setting: digest} (optional): what it reads but does not train (a frozen
                teacher), kept with each checkpoint; a resume refuses another (`_check_inputs`)
and the Trainer owns everything else: process group, threads, resume, the loop,
logging, atomic checkpoints, the NaN stop and the final export.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import sys
from pathlib import Path

import torch

from distill.build import NO_FILE_DIGEST, ModelSourceError, SourceDigests, found_source, source_digest
from distill.config import (
    MODEL_SOURCES,
    ConfigError,
    TrainConfig,
    ignored_settings,
    model_sources_in_text,
    resume_settings,
    resume_settings_in_text,
    setting,
)
from distill.data import data_identity, identity_change
from distill.distributed import World, close_world, init_world, others_wait_for_main
from distill.updater import (  # (Updater, learning_rate: importable from here, as before updater.py)
    NonFiniteLoss,
    Updater,  # noqa: F401
    learning_rate,  # noqa: F401
)
from streamgen import checkpoint as ckpt
from streamgen.cli import MACHINE_ERRNOS
from streamgen.data.shards import DataError
from streamgen.folder_lock import ExportLocked
from streamgen.model.files import watching_loads
from streamgen.parallel.launch import clear_error_frames

STAGE_MODULES = {
    "autoencoder": "distill.autoencoder",
    "teacher": "distill.teacher",
    "ode": "distill.ode",
    "self_forcing": "distill.self_forcing",
    "chunk": "distill.chunk",
    "tiny_decoder": "distill.tiny_decoder",
}


# The models a stage builds from the config's `model` section (`build.new_dit`: flavor, init and
# overrides), by their names in `model_configs()`: `model.overrides` sets what their checkpoint says.
# (The others come from elsewhere: the critic from `critic_init` or the teacher, an autoencoder.)
BUILT_FROM_MODEL_SECTION = ("teacher", "student", "generator")


def _same_setting(key: str, saved, current) -> bool:
    """Whether a checkpoint's value of a resume setting is the config's: data.root as the folder it
    names (a trailing slash, ./, relative or absolute: the same dataset, whose manifest is checked)."""
    if key == "data.root" and isinstance(saved, str) and isinstance(current, str):
        return os.path.realpath(saved) == os.path.realpath(current)
    return saved == current


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint that does not fit, ...)."""


class StageConfigError(TrainingError, ValueError):
    """A config value the stage's model, autoencoder or data cannot take (found building it)."""


def _check_writable(folder: Path, key: str, make: bool) -> None:
    """TrainingError unless `folder` is (or can become) a folder to write in; `make`: made now."""
    from streamgen.cli import UserError, output_folder

    try:
        output_folder(folder, key, make)
    except UserError as e:  # (a file in the way, a read-only disk: said as the other commands say it)
        raise TrainingError(str(e)) from None


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that are not there yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _unmake_unused(out: Path, made: list[Path]) -> None:
    """Remove the folders this run made (`made`, deepest first, run.out the first) where it ended
    before writing anything but its lock: a run refused as its stage was built (a teacher not yet
    trained) left run.out holding `.run.lock` alone, and the folders above it."""
    if not made:
        return
    try:
        if {p.name for p in out.iterdir()} - {RUN_LOCK}:
            return
        (out / RUN_LOCK).unlink(missing_ok=True)
        for folder in made:
            folder.rmdir()  # (OSError where another process has written into it meanwhile: kept)
    except OSError:
        pass


def _check_not_shipped(folder: Path, key: str) -> None:
    """TrainingError where `folder` is in the shipped models (streamgen/assets/models): a run.export
    there overwrote a shipped model (the default of every command) with the run's, as `distill.ship`
    only does when asked; a run.out there wrote its checkpoints and `model/` among them."""
    from streamgen.models import MODELS_DIR

    shipped = os.path.realpath(MODELS_DIR)
    if os.path.commonpath([os.path.realpath(folder), shipped]) == shipped:
        raise TrainingError(
            f"{key} {folder} is in the shipped models ({MODELS_DIR}): give another folder, and ship a "
            "trained model with python -m distill.ship MODEL_DIR NAME"
        )


def _check_export_reads_nothing(cfg: TrainConfig) -> None:
    """TrainingError where run.export is a model the run reads (its teacher, model.init, ...): the
    export at the end overwrote it (an ode run exported over its teacher: the teacher trained for
    hours, gone, and the later stages' teacher a student)."""
    from streamgen.models import resolve_model_dir

    export = os.path.realpath(os.path.expanduser(cfg.run.export))
    inputs = ["model.init", "model.vae"]
    inputs += [f"{cfg.stage}.{name}" for name in ("teacher", "critic_init") if hasattr(cfg.options, name)]
    for key in inputs:
        value = setting(cfg, key)
        if not isinstance(value, str) or value.startswith("wan:"):
            continue
        found = resolve_model_dir(value)
        if found is not None and os.path.realpath(found) == export:
            raise TrainingError(
                f"run.export {cfg.run.export} is the model this run reads as {key}: the export would "
                "overwrite it; give another folder"
            )


def _check_batch_splits(cfg: TrainConfig, world: World) -> None:
    """ConfigError unless data.batch_size (the global batch) splits evenly over the ranks: the ode
    stage trained on batch_size // N samples a rank, so 3 on 2 ranks on samples 0 and 1 alone, and
    the other stages stopped at their first step, once the stage was built (teacher, trajectories)."""
    size = cfg.data.batch_size
    if world.size > 1 and size % world.size:
        raise ConfigError(
            f"data.batch_size {size} (the global batch) does not split evenly over {world.size} ranks: "
            f"set it to a multiple of {world.size} (--set data.batch_size=...), or start "
            "--nproc_per_node ranks that divide it"
        )


def _exported_stage(out: Path) -> str | None:
    """The stage whose model run.out's `model/` holds (its model.json says), or None."""
    import json

    try:
        stage = json.loads((out / "model" / "model.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


RUN_LOCK = ".run.lock"  # in run.out: held (flock) by the run writing there, naming its process


@contextlib.contextmanager
def one_run_at_a_time(out: Path):
    """run.out for this run alone: a second run into it at once (before the first had written a
    checkpoint, which the "pass --resume" check would have seen) trained beside it, the two runs'
    steps in one log, their checkpoints and exports over each other's, and both said "finished".
    The lock goes with the process however it ends. Where the file system takes no lock (ENOLCK,
    EOPNOTSUPP) runs are not kept apart."""
    import fcntl
    import socket

    path = out / RUN_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TrainingError(f"run.out: cannot write {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise TrainingError(
                f"{out} is in use by another training run ({holder}): wait for it to end, or set "
                "run.out to another folder"
            ) from None
        except OSError:  # (no locks on this file system)
            pass
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def build_stage(cfg: TrainConfig, world: World):
    module = importlib.import_module(STAGE_MODULES[cfg.stage])
    return module.Stage(cfg, world)


def _where_now(source: str | None) -> str | None:
    """A model section source as a checkpoint keeps it: where it is found now (`found_source`), as
    given where it is not (the stage's build says why)."""
    return None if source is None else found_source(source) or source


def _check_same_source(latest: Path, key: str, kept: str | None, given: str, digest: str | None) -> None:
    """CheckpointError where a resume's `key` (model.init, model.vae) is another source than the
    run's, `kept` (None: the run read none): it went on without a word from that one's frozen
    autoencoder, which checkpoints do not keep. The same one spelt otherwise (relative, a link, a
    shipped model by its name or its folder) is the run's, and so is any where the run's is no
    longer there (given where it is now, as the refusal of a source gone says to), if its weights
    are the run's (`digest`, the checkpoint's `source_digest` of it: any was taken, another model's
    autoencoder trained the rest of the run; a checkpoint from before they were kept, any). No --set
    lets it through: `make model` gives model.init and model.vae to every run and resume of a stage."""
    if kept is not None and found_source(kept) is None:
        found = found_source(given)
        if digest is None or found is None:  # (a source not there: the stage's build says so)
            return
        now = source_digest(found)
        if now == digest:
            return
        raise ckpt.CheckpointError(
            f"checkpoint {latest} is of a run that read {key}: {kept}, which is no longer there, and {given} "
            f"is another model (weights digest {digest} then, {now} now): resumed, the run would go on from "
            "another model than it began with; give where the run's is now (--set "
            f"{key}=PATH), or set run.out to a new folder to begin a run from {given}"
        )
    if kept is not None and _place(kept) == _place(given):
        return
    way_out = "set run.out to a new folder to begin a run from it"
    if kept is None:
        raise ckpt.CheckpointError(
            f"checkpoint {latest} is of a run that read no {key}, and this config gives {given}: resumed, "
            f"the run would go on from another model than it began with (its frozen autoencoder, which "
            f"checkpoints do not keep); resume it without {key}, or {way_out}"
        )
    raise ckpt.CheckpointError(
        f"checkpoint {latest} is of a run that read {key}: {kept}, and this config gives {given}: resumed, "
        f"the run would go on from another model than it began with (its frozen autoencoder, which "
        f"checkpoints do not keep); give the run's (--set {key}={shlex.quote(kept)}), or {way_out}"
    )


def _place(source: str) -> str:
    """Where a model source is (`found_source`), a model directory by its resolved folder (a shipped
    model's name and its folder are one)."""
    from streamgen.models import resolve_model_dir

    found = found_source(source) or source
    if found.startswith("wan:"):
        return found
    folder = resolve_model_dir(found)
    return str(folder.resolve()) if folder is not None else found


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, stop_after: int | None = None):
        """stop_after: leave the loop after this many steps, as if killed there (for tests)."""
        self.cfg, self.resume, self.stop_after = cfg, resume, stop_after
        self.is_main = True  # whether this process is rank 0 (known once run has joined the ranks)

    def run(self) -> dict:
        cfg = self.cfg
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        world = init_world(cfg.run.device)
        self.is_main = world.is_main
        try:
            return self._run(world)
        except BaseException as e:
            if world.mesh is not None:  # (run.fsdp) the error's frames hold the sharded modules
                clear_error_frames(e)
            raise
        finally:
            close_world(world)

    def _run(self, world: World) -> dict:
        _check_batch_splits(self.cfg, world)
        if world.is_main:
            for note in ignored_settings(self.cfg, world.size):
                print(f"warning: {note}", file=sys.stderr)
        out = Path(self.cfg.run.out)
        _check_not_shipped(out, "run.out")
        if self.cfg.run.export:
            _check_not_shipped(Path(self.cfg.run.export), "run.export")
            _check_export_reads_nothing(self.cfg)
        made = _missing_folders(out)
        _check_writable(out, "run.out", make=True)
        try:
            with one_run_at_a_time(out) if world.is_main else contextlib.nullcontext():
                return self._run_in(out, world)
        except BaseException:
            if world.is_main:
                _unmake_unused(out, made)
            raise

    def _run_in(self, out: Path, world: World) -> dict:
        cfg = self.cfg
        if cfg.run.export:  # (found after the whole run, it failed the export with a traceback)
            _check_writable(Path(cfg.run.export), "run.export", make=False)
        self.data_identity = data_identity(cfg)  # (before the stage is built: the data it reads)
        latest = self._checkpoint_to_resume(out, world)  # before the stage writes anything there
        # (where they are as it begins: a relative path found again from another folder)
        self.model_sources = {key: _where_now(setting(cfg, key)) for key in MODEL_SOURCES}
        # the model sources' digests (rank 0's alone, which writes the checkpoints) from the bytes
        # the stage's build loads them from: read apart, a Wan checkpoint's GBs were read twice
        sources = {key: source for key, source in self.model_sources.items() if source}
        digests = SourceDigests(sources) if world.is_main else None
        try:
            with watching_loads(digests) if digests is not None else contextlib.nullcontext():
                stage = build_stage(cfg, world)
        # the stage's own checks, and data found damaged: they say what is wrong already (a
        # corrupted bank was "cannot build the teacher stage from this config: corrupted ...")
        except (ConfigError, DataError):
            raise
        except ValueError as e:  # a size or shape the model or autoencoder cannot take
            raise StageConfigError(f"cannot build the {cfg.stage} stage from this config: {e}") from None
        self.input_identity = stage.input_identity() if hasattr(stage, "input_identity") else {}
        self.model_source_digests = digests.digests() if digests is not None else {}
        if latest is not None:
            self._check_inputs(latest)
        if cfg.run.fsdp and world.distributed:
            for up in stage.updaters.values():
                up.shard()  # transformers only; the autoencoder replicates
        start = 0 if latest is None else self._restore(stage, latest)
        from distill.monitor import Monitor

        monitor = Monitor(out, cfg.run.steps, start, world.is_main, cfg.run.progress, cfg.stage)
        last = {}
        try:
            for step in range(start, cfg.run.steps):
                try:
                    last = stage.train_step(step)
                except NonFiniteLoss as e:
                    good = ckpt.latest_checkpoint(out)
                    # (a resume is exact: "resume with --resume" alone ran into the same nan again;
                    # the settings are the optimizer's that stepped: a critic's said optim.lr, the
                    # generator's rate)
                    opt = e.settings
                    raise TrainingError(
                        f"{e} at step {step}; stopped. Last good checkpoint: "
                        + (
                            f"{good}; resumed as it is, the run repeats the same steps: change what "
                            f"made it non-finite (a lower {opt}.lr, a tighter {opt}.grad_clip: "
                            f"--set {opt}.lr=...) and resume with --resume"
                            if good
                            else "none (no checkpoint was saved yet)"
                        )
                    ) from None
                done = step + 1
                if step % cfg.run.log_every == 0 or done == cfg.run.steps:
                    monitor.log(step, last)
                monitor.advance()
                if done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps:
                    self._save(stage, world, out, done, monitor)
                if self.stop_after is not None and done >= self.stop_after:
                    return last
            for up in stage.updaters.values():
                up.gather()  # sharded modules: a collective, before rank 0 exports
            # (a large model's export, or one waiting for another's lock, outlasts NCCL's barrier)
            with others_wait_for_main(world):
                self._export(stage, out, world)
        finally:
            monitor.close()
        return last

    def _export(self, stage, out: Path, world: World) -> None:
        """Rank 0's export of the trained model (OUT/model, and run.export where set)."""
        if not world.is_main:
            return
        cfg = self.cfg
        try:
            stage.export(out / "model")
            if cfg.run.export:
                stage.export(Path(cfg.run.export), name=cfg.run.export_name, compact=True)
        except ExportLocked as e:  # (another export kept the folder past the wait: a traceback)
            raise TrainingError(
                f"{e}; the trained weights are in {out}'s last checkpoint: run again with "
                "--resume to export them"
            ) from None
        except OSError as e:
            if e.errno not in MACHINE_ERRNOS:
                raise
            # (a full disk: "No space left on device" alone, as if the run were lost)
            raise TrainingError(
                f"could not export the trained model ({e.strerror or e}); the trained weights "
                f"are in {out}'s last checkpoint: free the space and run again with --resume "
                "to export them"
            ) from None

    def _save(self, stage, world: World, out: Path, step: int, monitor=None) -> None:
        """The checkpoint of `step`, and the loss curves' plot (`monitor`), both rank 0's alone."""
        # gathering shards is a collective (every rank); replicated state is rank 0's alone
        if world.is_main or any(up.sharded for up in stage.updaters.values()):
            states = {name: up.state() for name, up in stage.updaters.items()}
        # (a large model's checkpoint, written by rank 0 alone, outlasts NCCL's barrier)
        with others_wait_for_main(world):
            if world.is_main:
                tensors, meta = ckpt.rng_state()
                meta = {"rng": meta, "stage": self.cfg.stage, "world_size": world.size}
                meta["model_configs"] = stage.model_configs()
                meta["updaters"] = {}
                for name, (t, m) in states.items():
                    tensors.update(t)
                    meta["updaters"][name] = m
                meta["config"] = self.cfg.source
                meta["run_settings"] = resume_settings(self.cfg)
                meta["model_sources"] = self.model_sources
                meta["model_source_digests"] = self.model_source_digests
                meta["data_identity"] = self.data_identity
                meta["input_identity"] = self.input_identity
                ckpt.save_checkpoint(out, step, tensors, meta, self.cfg.run.keep_checkpoints)
                if monitor is not None:  # (seconds under load, matplotlib's import: inside the wait too)
                    monitor.plot()

    def _checkpoint_to_resume(self, out: Path, world: World) -> Path | None:
        """The checkpoint this run continues (None: a fresh start), or why run.out is not this run's
        to use: checked before the stage is built, which may write into run.out (the ODE stage's
        trajectories). Newer checkpoints that cannot be read are set aside, with a warning, for
        the newest one that can: a resume from the step before beats no resume."""
        exported = _exported_stage(out)
        if exported not in (None, self.cfg.stage):  # (the checkpoints deleted, the export kept)
            raise TrainingError(
                f"{out} holds the model the {exported} stage exported ({out / 'model'}), which this "
                f"{self.cfg.stage} run would write into: set run.out to a new folder"
            )
        latest = ckpt.latest_checkpoint(out)
        if latest is None:
            return None  # (with --resume too: nothing to resume, a fresh start)
        if not self.resume:
            raise TrainingError(
                f"{out} already holds checkpoints (newest {latest.name}); "
                "pass --resume to continue it, or set run.out to a new folder"
            )
        latest, header, damaged = ckpt.newest_readable_checkpoint(out)
        if latest is None:
            # (left as they are, for the user to decide: the message said nothing of what to do,
            # and both a rerun and a resume stop on them again)
            raise ckpt.CheckpointError(
                f"{damaged[0][1]}; no checkpoint in {ckpt.checkpoint_dir(out)} can be read"
                + (f" ({len(damaged)} tried)" if len(damaged) > 1 else "")
                + ": to start the run again, set run.out to a new folder (or delete them)"
            )
        for path, why in damaged:
            if world.is_main:
                aside = ckpt.set_aside(path)
                print(
                    f"warning: {why}; set aside as {aside.name}, resuming from {latest.name}", file=sys.stderr
                )
        written_by = header.get("stage")
        if not header:  # (a safetensors file of another kind, a model's weights say: "written by stage None")
            raise ckpt.CheckpointError(
                f"{latest} is not a streamgen training checkpoint (no streamgen metadata in its header): "
                f"move it out of {ckpt.checkpoint_dir(out)}, or set run.out to a new folder"
            )
        if written_by != self.cfg.stage:
            raise ckpt.CheckpointError(
                f"{latest} was written by stage {written_by!r}, not {self.cfg.stage!r}"
            )
        self._check_settings(latest, header)
        self._take_model_sources(latest, header, world)
        return latest

    def _take_model_sources(self, latest: Path, header: dict, world: World) -> None:
        """The run's own model.init and model.vae (config.MODEL_SOURCES: its frozen autoencoder's
        source), from its checkpoint, where this config gives none: a resume needed them given again,
        and without them went on with a new random autoencoder. A ModelSourceError where the run's is
        no longer there; a CheckpointError where this config gives another (`_check_same_source`)."""
        saved = header.get("model_sources") or model_sources_in_text(header.get("config", ""))
        for key in MODEL_SOURCES:
            kept = saved.get(key)
            if setting(self.cfg, key) is not None:
                if key in saved:
                    digest = (header.get("model_source_digests") or {}).get(key)
                    _check_same_source(latest, key, kept, setting(self.cfg, key), digest)
                continue
            if not kept:
                continue
            found = found_source(kept)
            if found is None:
                raise ModelSourceError(
                    f"checkpoint {latest} is of a run that read {key}: {kept}, which is no longer there "
                    f"(the run's frozen autoencoder came from it, and a resume must read the same one): "
                    f"put it back, or give where it is now with --set {key}=PATH"
                )
            section, name = key.split(".")
            setattr(getattr(self.cfg, section), name, found)
            if world.is_main:
                print(f"resuming with {key}: {found}, the run's (its config gives none)", file=sys.stderr)

    def _check_settings(self, latest: Path, header: dict) -> None:
        """CheckpointError if this config changes a setting the run's samples are drawn from
        (config.resume_settings), unless the new value was given with --set; or if the data at its
        paths was made again since (data.data_identity), unless data.accept_remade (a path given
        with --set is not enough: `make model` gives data.root to every stage). A setting the
        checkpoint does not record (written before it was) is not checked."""
        saved = header.get("run_settings") or resume_settings_in_text(header.get("config", "")) or {}
        current = resume_settings(self.cfg)
        differ = {k for k, v in current.items() if k in saved and not _same_setting(k, saved[k], v)}
        changed = {k: v for k, v in current.items() if k in differ and k not in self.cfg.set_keys}
        diffs = [f"{k}: checkpoint {saved[k]!r}, config {v!r}" for k, v in changed.items()]
        on_purpose = [f"{k}={v}" for k, v in changed.items()]
        kept = header.get("data_identity") or {}
        remade = [
            identity_change(key, self.cfg, kept[key], now)
            for key, now in self.data_identity.items()
            # (another folder or bank name: other data, named above or given on purpose)
            if kept.get(key) and kept[key] != now and not differ & {key, "data.root"}
        ]
        if remade and not self.cfg.data.accept_remade:
            diffs += remade
            on_purpose.append("data.accept_remade=true")
        if diffs:
            given = " ".join(f"--set {shlex.quote(item)}" for item in on_purpose)
            raise ckpt.CheckpointError(
                f"checkpoint {latest} is of a run with other settings ({'; '.join(diffs)}): resumed, "
                "every later step would draw other samples, noise or noise levels than the run it "
                f"continues; put them back, or pass {given} to change them on purpose"
            )

    def _check_inputs(self, latest: Path) -> None:
        """CheckpointError if a model the stage reads but does not train (`input_identity`: the
        self_forcing and chunk stages' teacher) has other weights than when the checkpoint was
        written (retrained at the same path, or another one), unless data.accept_remade: a path
        given with --set says nothing (`make model` gives the teacher to every stage). Checked once
        the stage has read it (the digest is of the weights it loaded). (The ode stage's teacher is
        checked by its trajectories' file.) A checkpoint that does not record one (or records the
        digest of no file, `NO_FILE_DIGEST`) is not checked."""
        if self.cfg.data.accept_remade:
            return
        kept = ckpt.checkpoint_header(latest).get("input_identity") or {}
        changed = [
            f"the {key.split('.')[-1]} {setting(self.cfg, key)} ({key}) has other weights than the run's "
            f"(weights digest {kept[key]} then, {now} now)"
            for key, now in self.input_identity.items()
            if kept.get(key) and kept[key] not in (now, NO_FILE_DIGEST)
        ]
        if changed:
            raise ckpt.CheckpointError(
                f"checkpoint {latest} was trained against other models ({'; '.join(changed)}): resumed, "
                "every later step would score it against another model than the steps before; put "
                "it back, or pass --set data.accept_remade=true to go on with it on purpose"
            )

    def _restore(self, stage, latest: Path) -> int:
        tensors, meta = ckpt.load_checkpoint(latest)
        saved, current = meta.get("model_configs", {}), stage.model_configs()
        diffs = ckpt.config_mismatch(saved, current)
        if diffs:
            message = f"checkpoint {latest} does not match the config's model: " + "; ".join(diffs[:6])
            sets = ckpt.overrides_to_match(saved, current, BUILT_FROM_MODEL_SECTION)
            if sets:  # (a default that changed since the run began: the audio width a Wan checkpoint gets)
                given = " ".join(f"--set {shlex.quote(item)}" for item in sets)
                message += f"; to resume it as it was made, pass {given}"
            raise ckpt.CheckpointError(message)
        for name, up in stage.updaters.items():
            if name not in meta["updaters"]:
                raise ckpt.CheckpointError(f"checkpoint {latest} has no state for {name}")
            up.load_state(tensors, meta["updaters"][name], latest)
        ckpt.set_rng_state(tensors, meta["rng"])
        step = int(meta["step"])
        if step > self.cfg.run.steps:  # it would export those weights as a run of fewer steps
            raise TrainingError(
                f"checkpoint {latest} is at step {step}, past run.steps {self.cfg.run.steps}: "
                "give --steps at least that, or set run.out to a new folder"
            )
        return step
