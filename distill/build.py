"""Building the networks a stage trains or reads, and writing model directories.

`model.init` (and the `teacher:` paths of the distillation stages) name either a
model directory (what every stage exports to OUT/model; also the shipped models
by name, e.g. `tiny-avatar-teacher`) or `wan:DIR`, a Wan2.1 diffusers checkpoint
loaded through the state-dict adapter.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from distill.config import ConfigError
from streamgen.files import home_expanded
from streamgen.model.config import ModelConfig, get_config


class ModelSourceError(FileNotFoundError):
    """A model path in the config does not name a model directory or Wan checkpoint."""


def _model_dir(path: str) -> Path:
    from streamgen.models import resolve_model_dir

    d = resolve_model_dir(path)
    if d is None:
        raise ModelSourceError(f"{path!r} is not a model directory (no model.json){_run_hint(path)}")
    if behind := run_past_export(d, None, "reading the model of step {step} (for the newest, finish that run with --resume first)"):
        _warn_once(behind)
    return d


def found_source(source: str) -> str | None:
    """Where the model or autoencoder source `source` (model.init, model.vae: a model directory or
    name, an autoencoder directory, `wan:DIR`) is now, a folder given by path made absolute (a resume
    run from another folder finds it); None where it is not there."""
    from streamgen.models import has_autoencoder, resolve_model_dir

    try:
        if source.startswith("wan:"):
            folder = home_expanded(source[4:])
            return f"wan:{folder.resolve()}" if folder.is_dir() else None
        folder = home_expanded(source)
        if has_autoencoder(folder) or resolve_model_dir(source) == folder:
            return str(folder.resolve())
    except OSError:  # (a name the file system cannot hold: no folder of it)
        return None
    return source if resolve_model_dir(source) is not None else None  # (a shipped model, by its name)


def _run_hint(path: str) -> str:
    """What a training run's folder at `path` says of its model ("train the stage that makes it
    first" was said of a run's folder given for its `model/`, and of a run killed before its export)."""
    from streamgen.checkpoint import latest_checkpoint
    from streamgen.models import has_autoencoder

    given = home_expanded(path)
    if _is_diffusers_wan(given):  # (was "train the stage that makes it first")
        return f"; it is a diffusers Wan checkpoint: give it as wan:{path}"
    try:
        if (given / "model" / "model.json").is_file():
            return f"; the model of the run in {given} is {given / 'model'}"
        # (the autoencoder's and a tiny decoder's exports were "a run that has exported no model
        # yet ... finish it with --resume", which only exported them again)
        if has_autoencoder(given):
            return "; it is an autoencoder (the autoencoder stage's export), not a model: an autoencoder is model.vae"
        if (given / "tiny_decoder.safetensors").is_file():
            return (
                "; it holds a tiny decoder (the tiny_decoder stage's export), not a model: a tiny decoder "
                "decodes a model's latents, from that model's directory (docs/distill.md)"
            )
        run = given.parent if given.name == "model" else given
        newest = latest_checkpoint(run)
    except OSError:  # (a name too long for the file system)
        newest = None
    if newest is None:
        return f"; train the stage that makes it first: {stage_that_makes(given)}"
    return (
        f"; {run} holds a run that has exported no model yet (newest checkpoint {newest.name}): a run "
        "exports its model when it finishes, so finish it with --resume"
    )


# a run's folder (RUNS/NAME, as the Makefile names them): the stage that exports RUNS/NAME/model,
# and its config where the Makefile gives another than tiny-avatar
RUN_STAGES = {"autoencoder": ("autoencoder", "tiny-avatar"), "teacher": ("teacher", "tiny-avatar"),
              "ode": ("ode", "tiny-avatar"), "self_forcing": ("self_forcing", "tiny-avatar"),
              "self_forcing_last_step": ("self_forcing", "tiny-avatar-last-step"), "chunk": ("chunk", "tiny-avatar")}  # fmt: skip


def stage_that_makes(model_dir: Path) -> str:
    """Which stage, and which command, exports the model directory `model_dir` ("train the stage
    that makes it first" named neither)."""
    run = model_dir.parent if model_dir.name == "model" else model_dir
    if run.name not in RUN_STAGES:
        return ("`python -m streamgen distill STAGE --config CONFIG --set run.out=RUN` exports its model to "
                "RUN/model (docs/distill.md)")  # fmt: skip
    stage, config = RUN_STAGES[run.name]
    return (f"the {stage} stage makes it: `make {run.name} RUNS={run.parent}`, or `python -m streamgen distill "
            f"{stage} --config {config} --set run.out={run}`")  # fmt: skip


def _not_a_model_dir(source: str) -> None:
    """A ModelSourceError where the `wan:` path `source` is a streamgen model directory (it was
    "has no config.json")."""
    given = source[4:]
    if (home_expanded(given) / "model.json").is_file():
        raise ModelSourceError(f"{given} is a streamgen model directory, not a diffusers Wan checkpoint: "
                               "give it without wan:")  # fmt: skip


def _is_diffusers_wan(folder: Path) -> bool:
    """A diffusers Wan folder: a pipeline's, its transformer's or its VAE's."""
    import json

    for config in ("config.json", "transformer/config.json", "vae/config.json", "model_index.json"):
        try:
            kind = json.loads((folder / config).read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(kind, str) and (kind.startswith("Wan") or kind == "AutoencoderKLWan"):
            return True
    return False


def run_past_export(d: Path, meta: dict | None, then: str) -> str | None:
    """Why the model directory `d`, a run's `model/`, holds older weights than its run's newest
    checkpoint (resumed with more --steps, then killed or training still: its export is written when
    it finishes), ending with `then` (what is done instead; `{step}`: the export's step), or None.
    Read or shipped without a word, it was taken for the run's last. `meta`: its model.json, where
    read already. An export that does not record its steps (from before they were) is not checked."""
    import json

    from streamgen.checkpoint import checkpoint_step, latest_checkpoint

    if d.name != "model":
        return None
    try:
        trained = (meta if meta is not None else json.loads((d / "model.json").read_text())).get("trained_steps")
        newest = latest_checkpoint(d.parent)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(trained, int) or newest is None or checkpoint_step(newest) <= trained:
        return None
    return (
        f"{d} holds the model of step {trained}, while its run trained on to step "
        f"{checkpoint_step(newest)} ({newest.name}) and has not exported that yet: {then.format(step=trained)}"
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning on stderr, once a process (a model directory is resolved more than once) and from
    rank 0 alone (every rank's lines run together)."""
    import sys

    from distill.distributed import launch_rank

    if message not in _WARNED and launch_rank() == 0:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def load_dit(source: str, **overrides):
    """A DiT from a model directory or `wan:DIR`, with config overrides."""
    return _read_dit(source, overrides, digest=False)[0]


def load_critic(source: str, key: str):
    """The critic's start from `source`, the setting `key` (a stage's critic_init): a model
    directory whose model.json says it is a student (a run's own export, one path off, or a
    student meant as model.init) is a ModelSourceError, as a student given as the teacher is; it
    was trained from without a word, the fake score a causal few-step model's (`_read_dit`)."""
    return _read_dit(source, {}, digest=False, teacher=key)[0]


def load_frozen(source: str):
    dit = load_dit(source)
    return dit.eval().requires_grad_(False)


def load_frozen_and_digest(source: str) -> tuple[torch.nn.Module, str]:
    """`load_frozen(source)` of a teacher and the `weights_digest` of the very weights it loaded
    (whose digest a run keeps): from one read of a model directory's dit.safetensors, or of a `wan:`
    folder's transformer weights (load_pretrained's `weights_hash`). Read apart,
    an export put in place between the two reads gave the digest of another teacher than the one
    loaded. A model directory whose model.json says it is a student is refused (`_read_dit`)."""
    dit, digest = _read_dit(source, {}, digest=True, teacher=True)
    return dit.eval().requires_grad_(False), digest


def _read_dit(source: str, overrides: dict, digest: bool, teacher: bool | str = False):
    """(the DiT, the digest of its weights' bytes when `digest`, else None). `teacher`: the DiT is
    read as a teacher, and a model directory whose model.json says it is another kind (a student
    given as the ode, self_forcing or chunk stage's teacher: it trained and exported as if it were
    one, its students scored against a causal few-step model) is a ModelSourceError; one that
    says no kind (a hand-made or older export) is taken as it is. A setting's name (a stage's
    critic_init) for `teacher`: a teacher's weights read for that setting."""
    from streamgen.folders import read_folder

    if source.startswith("wan:"):
        from streamgen.model.wan import load_pretrained, transformer_dir

        def read_wan(d):
            weights_hash = hashlib.sha1() if digest else None  # (weights_digest's, of the bytes loaded)
            dit = load_pretrained(d, weights_hash=weights_hash, **overrides)
            return dit, weights_hash.hexdigest()[:16] if digest else None

        _not_a_model_dir(source)
        folder = home_expanded(source[4:])
        if (folder / "transformer_2").is_dir():  # (a Wan2.2 A14B pipeline: two experts, by noise level)
            _warn_once(
                f"{folder} holds transformer_2/ (Wan2.2's low-noise expert), which is not loaded: only "
                "transformer/ (the high-noise expert) is read, and used at every noise level"
            )
        try:
            # config and weights from one save (streamgen.model.wan.save_pretrained swaps the folder)
            return read_folder(transformer_dir(source[4:]), read_wan)
        except (OSError, ValueError, KeyError) as e:
            raise ModelSourceError(f"cannot load the Wan checkpoint {source[4:]}: {e}") from None
    from streamgen.model.files import load_safetensors, load_safetensors_from_bytes, read_json, show_loaded
    from streamgen.model.model import DiT
    from streamgen.models import weights_problem

    def read(d):
        meta = read_json(d / "model.json", required=("config",))
        kind = meta.get("kind")
        if teacher and kind is not None and kind != "teacher":
            given = "as the teacher" if teacher is True else (
                f"for {teacher} (the critic learns the score of the student's samples at every noise level, "
                "from a teacher's weights), or leave it out to start the critic from the teacher"
            )
            raise ModelSourceError(
                f"{source!r} is not a teacher: its model.json says kind {kind!r} (exported by the "
                f"{meta.get('stage', '?')} stage); give the teacher stage's model {given}"
            )
        path = d / "dit.safetensors"
        if digest:  # the tensors from the very bytes digested
            data = path.read_bytes()
            show_loaded(path, data)
            fingerprint, state = _bytes_digest(path.name, data), load_safetensors_from_bytes(data, path)
            del data  # (the tensors are copies: the file's bytes and the DiT are not held at once)
        else:
            fingerprint, state = None, load_safetensors(path)
        cfg = ModelConfig.from_dict({**meta["config"], **overrides})
        if problem := weights_problem(cfg, state):  # (overrides of other sizes: a traceback)
            raise ModelSourceError(f"{path} does not fit the model config (with model.overrides): {problem}")
        dit = DiT(cfg)
        dit.load_state_dict({k: v.float() for k, v in state.items()})
        return dit, fingerprint

    # config and weights from one export: a re-export (write_model_dir) swaps the whole folder
    return read_folder(_model_dir(source), read)


# what weights_digest gave every `wan:` pipeline folder before it read its transformer/: the digest
# of no file, which says nothing of the teacher; a record of it is taken as none
NO_FILE_DIGEST = hashlib.sha1().hexdigest()[:16]


def weights_digest(source: str) -> str:
    """A fingerprint of the DiT weights `load_dit(source)` reads: their files' bytes (a model
    retrained or replaced at the same path has another). `load_frozen_and_digest` gives the
    same one for the weights it loads."""
    try:
        if source.startswith("wan:"):
            from streamgen.model.wan import transformer_dir, weight_files

            # the files load_pretrained reads (a pipeline folder's are in transformer/)
            files = weight_files(transformer_dir(source[4:]))
        else:
            files = [_model_dir(source) / "dit.safetensors"]
        h = hashlib.sha1()
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as stream:
                while block := stream.read(1 << 24):
                    h.update(block)
    except (OSError, ValueError) as e:  # (as `_read_dit`'s: the folder changed since it was loaded)
        raise ModelSourceError(f"cannot read the weights of {source}: {e}") from None
    return h.hexdigest()[:16]


# the files a model or autoencoder source's weights are read from (a model directory's dit, vae and
# tiny decoder, a Wan VAE's folder, a Wan checkpoint's transformer and VAE)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _digest_files(source: str) -> tuple[Path, list[Path]]:
    """The folder a model section source names and the weight files `source_digest` hashes, in its
    order; an OSError where it cannot be read."""
    from streamgen.models import resolve_model_dir

    if source.startswith("wan:"):
        folder = home_expanded(source[4:])
    else:
        folder = home_expanded(source)
        if not folder.is_dir():
            folder = resolve_model_dir(source) or folder  # (a shipped model by its name)
    roots = [folder / part for part in ("transformer", "vae") if (folder / part).is_dir()] or [folder]
    return folder, sorted(f for root in roots for f in root.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())


def _hash_file(h, path: Path) -> None:
    """Feed the bytes of the file `path`, read from disk, to the hash `h`."""
    with open(path, "rb") as stream:
        while block := stream.read(1 << 24):
            h.update(block)


def source_digest(source: str) -> str:
    """A fingerprint of the weights a model section source (model.init, model.vae: a model or
    autoencoder directory, a shipped model's name, `wan:DIR`) holds: every weight file's name and
    bytes, of a Wan pipeline its transformer/ and vae/ alone (not its text encoder). A copy of the
    folder has the same; another model (another seed's, retrained) another. ModelSourceError where
    it cannot be read. `SourceDigests` gives the same from the bytes a load reads."""
    try:
        folder, files = _digest_files(source)
        h = hashlib.sha1()
        for f in files:
            h.update(str(f.relative_to(folder)).encode())
            _hash_file(h, f)
    except OSError as e:
        raise ModelSourceError(f"cannot read the weights of {source}: {e}") from None
    if not files:
        raise ModelSourceError(f"{source} holds no weight files")
    return h.hexdigest()[:16]


class _Digesting:
    """One source's digest under way: its folder and weight files, and how many are hashed."""

    def __init__(self, folder: Path, files: list[Path]):
        self.folder, self.files, self.hashed, self.hash = folder, files, 0, hashlib.sha1()
        self.resolved = [f.resolve() for f in files]

    def ahead(self, path: Path) -> int | None:
        """The index of the file `path` (resolved) where it is yet to be hashed, else None."""
        return next((i for i in range(self.hashed, len(self.files)) if self.resolved[i] == path), None)

    def hash_from_disk(self, end: int) -> None:
        """Hash the files before index `end` not hashed yet, read from disk."""
        for f in self.files[self.hashed : end]:
            self.hash.update(str(f.relative_to(self.folder)).encode())
            _hash_file(self.hash, f)
        self.hashed = max(self.hashed, end)


class SourceDigests:
    """`source_digest` of each of `sources` ({key: source}), hashed from the bytes the loads read
    while it watches (`streamgen.model.files.watching_loads`: a run's stage build): a Wan
    checkpoint's transformer, GBs, was read by its load and again for its digest. The files are
    hashed in `source_digest`'s order: one loaded ahead of the next to hash has the files before it
    read from disk first (those its load does not read: a Wan VAE's, a tiny decoder's), and `digests`
    reads the rest; one loaded again, or behind, is not used. A source not listed here (not there
    yet: the build says why) is digested at the end as `source_digest` does."""

    def __init__(self, sources: dict[str, str]):
        self.sources, self.digesting = dict(sources), {}
        for key, source in self.sources.items():
            try:
                self.digesting[key] = _Digesting(*_digest_files(source))
            except OSError:
                pass

    def wants(self, path: Path) -> bool:
        found = path.resolve()
        return any(d.ahead(found) is not None for d in self.digesting.values())

    def saw(self, path: Path, data: bytes) -> None:
        found = path.resolve()
        for d in self.digesting.values():
            at = d.ahead(found)
            if at is None:
                continue
            d.hash_from_disk(at)
            d.hash.update(str(d.files[at].relative_to(d.folder)).encode())
            d.hash.update(data)
            d.hashed = at + 1

    def digests(self) -> dict[str, str]:
        """{key: its source's digest}; ModelSourceError where one cannot be read."""
        found = {}
        for key, source in self.sources.items():
            d = self.digesting.get(key)
            if d is None or not d.files:
                found[key] = source_digest(source)  # (its ModelSourceError)
                continue
            try:
                d.hash_from_disk(len(d.files))
            except OSError as e:
                raise ModelSourceError(f"cannot read the weights of {source}: {e}") from None
            found[key] = d.hash.hexdigest()[:16]
        return found


def _bytes_digest(name: str, data: bytes) -> str:
    """`weights_digest` of one file `name` of the bytes `data`."""
    h = hashlib.sha1(name.encode())
    h.update(data)
    return h.hexdigest()[:16]


def new_dit(section, seed: int):
    """The stage's main network: from model.init if given, else a fresh seeded flavor."""
    from streamgen.model.model import DiT

    overrides = dict(section.overrides)
    torch.manual_seed(seed)  # also initialises the avatar branches a Wan checkpoint lacks
    if section.init:
        return load_dit(section.init, **overrides)
    try:
        cfg = get_config(section.flavor, **overrides)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    return DiT(cfg)


def load_vae(section, latent_channels: int, temporal: int, seed: int, match_model: bool = True):
    """`model.vae`: an autoencoder directory, a model directory (its autoencoder), or `wan:DIR`
    (diffusers' AutoencoderKLWan folder, or a pipeline's folder holding it in vae/, as
    `model.init: wan:DIR` takes a pipeline's transformer/); none: the `model.init` model's, else a
    seeded random TinyCausalVAE. Frozen. `match_model`: its latent channels and temporal factor
    must be the model's (`latent_channels`, `temporal`), a ConfigError where not; off for a stage
    that trains nothing on its latents but a decoder of its own (a taehv tiny decoder)."""
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.model.wan_vae import WanVAE
    from streamgen.models import has_autoencoder, load_autoencoder

    source = section.vae
    if source is not None and source.startswith("wan:"):
        from streamgen.folders import read_folder

        _not_a_model_dir(source)
        try:
            # config and weights of one save (WanVAE.save puts a folder in place whole, or writes
            # it file by file under an export stamp: ExportUnderWay, a ValueError, where cut short)
            folder = home_expanded(source[4:])
            vae_dir = folder / "vae"  # (a pipeline's: "no config.json in it")
            # (and a pipeline's vae/ without its config, a download cut short: the pipeline's folder
            # was named as the one lacking it, which a pipeline's never has)
            if (vae_dir / "config.json").is_file() or (vae_dir.is_dir() and not (folder / "config.json").is_file()):
                folder = vae_dir
            vae = read_folder(folder, WanVAE.from_pretrained)
        except (OSError, ValueError) as e:
            raise ModelSourceError(f"cannot load the Wan VAE {source[4:]}: {e}") from None
    else:
        if source is None and section.init and not section.init.startswith("wan:"):
            d = _model_dir(section.init)
            if has_autoencoder(d):
                source = str(d)
        if source is not None:
            p = home_expanded(source)
            vae = load_autoencoder(p if has_autoencoder(p) else _model_dir(source))
        else:
            pipeline = home_expanded(section.init[4:]) if section.init and section.init.startswith("wan:") else None
            if pipeline is not None and (pipeline / "vae").is_dir():  # (its transformer/ taken, its vae/ not)
                _warn_once(
                    f"model.init is the Wan pipeline {pipeline}, but model.vae is not set: its vae/ is not "
                    f"used, the latents are a new random TinyCausalVAE's; set model.vae: wan:{pipeline} for it"
                )
            torch.manual_seed(seed + 1)
            vae = TinyCausalVAE(latent_channels, tuple(section.vae_widths), temporal, section.vae_res_blocks)
    # (as streamgen.models._read_dir refuses in a model directory: a Wan VAE of another z_dim was
    # a convolution's traceback at the first batch, one of another temporal factor cut each latent
    # frame's audio window for temporal_compression video frames while it decoded to another count)
    where = f"the autoencoder of {source}" if source else "the autoencoder"
    if not match_model:
        return vae.eval().requires_grad_(False)
    if vae.latent_channels != latent_channels:
        raise ConfigError(f"{where} has {vae.latent_channels} latent channels, the model {latent_channels}")
    if vae.temporal_factor != temporal:
        raise ConfigError(
            f"{where} makes {vae.temporal_factor} video frames of each latent frame, the model's "
            f"temporal_compression is {temporal}"
        )
    return vae.eval().requires_grad_(False)


def export_model(
    dit,
    vae,
    directory,
    name: str | None,
    height: int,
    width: int,
    shift: float,
    steps: int,
    extra: dict | None = None,
    compact: bool = False,
) -> Path:
    """Write a model directory that `streamgen.models.load_model` (and so every command) reads.

    compact: store the DiT weights and the autoencoder's parameters as float16 (the
    shipped models stay a few MB; the shipped decoder's frames move by under 0.1 of
    a level of 255); loading upcasts them. The autoencoder's latent statistics stay
    float32, since every latent is normalised by them.
    """
    from streamgen.model_export import save_model
    from streamgen.models import AvatarModel

    d = Path(directory)
    out_dit = copy.deepcopy(dit).cpu().eval()
    out_vae = copy.deepcopy(vae).cpu()
    if compact:
        out_dit = out_dit.half()
        for p in out_vae.parameters():
            p.data = p.data.half()
    model = AvatarModel(name or d.name, out_dit, out_vae, height, width, shift, steps, True)
    save_model(model, d, extra)
    return d
