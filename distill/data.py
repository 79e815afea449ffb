"""Training data for the diffusion stages: a bank of encoded clips held in memory.

A bank is one safetensors file per split, built once by the `latents` stage
from an avatar-world dataset and its latent cache (`AvatarWorldDataset.cache_latents`):

    latents    [N, C, F, h, w]   the clip's video latents (normalised)
    reference  [N, C, 1, h, w]   the reference image's latent frame
    audio      [N, F * 4 * 640]  16 kHz PCM of the clip
    context    [N, 1, text_dim]  the caption's sentence embedding (zeros: no caption)

Batches are a pure function of (seed, step): sample i of the global batch picks
its clip and crop from generator(seed, step, i), and each rank takes its own
contiguous slice of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distill.config import ConfigError
from distill.rng import generator


class DataMissing(FileNotFoundError):
    """The data directory or its latent bank is absent."""


def bank_path(root, latents: str, split: str) -> Path:
    return Path(root) / "latents" / latents / f"bank-{split}.safetensors"


@dataclass
class Batch:
    ids: list[int]  # positions in the global batch (keys of the per-sample randomness)
    x0: torch.Tensor  # [b, C, F, h, w] clean latents of the crop
    reference: torch.Tensor  # [b, C, 1, h, w]
    audio: torch.Tensor  # [b, N] the whole clip's PCM
    latent_start: list[int]  # absolute latent frame where the crop starts
    context: torch.Tensor  # [b, Lt, text_dim]
    clips: list[int]  # bank indices

    def to(self, device) -> Batch:
        return Batch(
            self.ids,
            self.x0.to(device),
            self.reference.to(device),
            self.audio.to(device),
            self.latent_start,
            self.context.to(device),
            self.clips,
        )


class LatentBank:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.latents = tensors["latents"].float()
        self.reference = tensors["reference"].float()
        self.audio = tensors["audio"].float()
        self.context = tensors["context"].float()
        self.num_clips, self.channels, self.frames = self.latents.shape[:3]
        self.latent_hw = tuple(self.latents.shape[3:])

    def digest(self) -> str:
        """A fingerprint of the clips' latents (what stored clip indices point into)."""
        import hashlib

        return hashlib.sha1(self.latents.contiguous().numpy().tobytes()).hexdigest()[:16]

    @classmethod
    def load(cls, root, latents: str, split: str) -> LatentBank:
        from streamgen.data.shards import DataError
        from streamgen.model.files import load_safetensors

        root = Path(root)
        if not root.is_dir():
            raise DataMissing(f"data directory {root} does not exist (make it with `streamgen data make`)")
        path = bank_path(root, latents, split)
        if not path.exists():
            raise DataMissing(
                f"{path} is missing: run `streamgen distill latents` to encode {root} with the autoencoder"
                + _other_banks(root, latents, split)
            )
        # (a file cut short or spoilt, copied by hand: safetensors' error, or a KeyError, named no file)
        again = "delete it and run `streamgen distill latents` to gather it again from the cached latents"
        try:
            tensors = load_safetensors(path)
        except ValueError as e:
            raise DataError(f"corrupted latent bank {e}: {again}") from None
        missing = [name for name in ("latents", "reference", "audio", "context") if name not in tensors]
        if missing:
            raise DataError(f"corrupted latent bank {path}: it has no {', '.join(missing)}: {again}")
        return cls(tensors)

    @classmethod
    def synthetic(cls, model_cfg, clips: int, frames: int, latent_hw, seed: int = 0) -> LatentBank:
        """Random but learnable clips for tests: a per-clip pattern drifting slowly over time."""
        g = generator(seed, "synthetic-bank")
        c, (h, w) = model_cfg.in_channels, latent_hw
        base = torch.randn(clips, c, 1, h, w, generator=g)
        drift = torch.randn(clips, c, 1, h, w, generator=g) * 0.3
        steps = torch.linspace(0, 1, frames).view(1, 1, frames, 1, 1)
        latents = base + drift * steps + 0.1 * torch.randn(clips, c, frames, h, w, generator=g)
        samples = frames * model_cfg.temporal_compression * 640
        t = torch.arange(samples) / 16000.0
        freq = 200 + 300 * torch.rand(clips, 1, generator=g)
        audio = 0.3 * torch.sin(2 * torch.pi * freq * t) * (torch.sin(3 * t) > 0)
        context = torch.randn(clips, 1, model_cfg.text_dim, generator=g) * 0.5
        return cls({"latents": latents, "reference": base, "audio": audio, "context": context})

    def batch(
        self, seed: int, step: int, global_batch: int, crop_frames: int, rank: int, world: int
    ) -> Batch:
        if global_batch % world:
            raise ConfigError(f"data.batch_size {global_batch} is not divisible by {world} ranks")
        if crop_frames > self.frames:
            raise ConfigError(f"crops of {crop_frames} latent frames do not fit clips of {self.frames}")
        per_rank = global_batch // world
        ids = list(range(rank * per_rank, (rank + 1) * per_rank))
        clips, starts = [], []
        for i in ids:
            g = generator(seed, step, i, "clip")
            clips.append(int(torch.randint(self.num_clips, (), generator=g)))
            starts.append(int(torch.randint(self.frames - crop_frames + 1, (), generator=g)))
        x0 = torch.stack([self.latents[c, :, s : s + crop_frames] for c, s in zip(clips, starts)])
        return Batch(
            ids,
            x0,
            self.reference[clips],
            self.audio[clips],
            starts,
            self.context[clips],
            clips,
        )

    def select(self, ids: list[int], clips: list[int], starts: list[int], crop_frames: int) -> Batch:
        """A batch of given clips and crop starts (e.g. those stored with ODE trajectories)."""
        x0 = torch.stack([self.latents[c, :, s : s + crop_frames] for c, s in zip(clips, starts)])
        return Batch(ids, x0, self.reference[clips], self.audio[clips], starts, self.context[clips], clips)


def _other_banks(root: Path, latents: str, split: str) -> str:
    """Where `root` holds the `split` bank under other data.latents names, what to say of them: the
    latents stage's config names its own (tiny-avatar's tiny-vae-deep), and a stage reading another
    was told to run the latents stage, which made the banks it had made already, under that name."""
    try:
        names = sorted(d.name for d in (root / "latents").iterdir() if d.name != latents
                       and (d / f"bank-{split}.safetensors").is_file())  # fmt: skip
    except OSError:
        return ""
    if not names:
        return ""
    listed = ", ".join(repr(n) for n in names)
    return (f" (data.latents is {latents!r}; {root / 'latents'} holds the {split} bank of {listed}: set data.latents "
            "to the name the latents stage encoded with, its config's data.latents)")  # fmt: skip


def data_identity(cfg) -> dict[str, str]:
    """What the data a run reads is, beyond the settings that name it (config.resume_settings), by
    the setting whose --set takes another on purpose: "data.root": the sha256 of the dataset's
    manifest.json (which records every shard's), another when the dataset was made again there;
    "data.latents" (the stages that read a latent bank): the digest of the autoencoder that encoded
    it (`latents.py`'s autoencoder.json), another when it was encoded again. Read from small files
    only; what is not there (synthetic data, a folder not made yet) is left out."""
    import hashlib
    import json

    from distill.config import BANK_STAGES

    d = cfg.data
    identity = {}
    if d.source != "world":
        return identity
    manifest = Path(d.root) / "manifest.json"
    if manifest.is_file():
        identity["data.root"] = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    mark = Path(d.root) / "latents" / d.latents / "autoencoder.json"
    if cfg.stage in BANK_STAGES and mark.is_file():
        try:
            digest = json.loads(mark.read_text()).get("digest")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            digest = None
        if isinstance(digest, str):
            identity["data.latents"] = digest
    return identity


def check_bank_autoencoder(cfg, vae) -> None:
    """ConfigError unless `vae` is the autoencoder that encoded the bank (its autoencoder.json): a
    teacher trained on one autoencoder's latents exported another (model.vae, or a random one
    where none was given), whose decoder made nothing of them. data.accept_remade lets it be."""
    import json

    from distill.latents import same_autoencoder

    mark = Path(cfg.data.root) / "latents" / cfg.data.latents / "autoencoder.json"
    try:
        kept = json.loads(mark.read_text())
    except (OSError, ValueError):  # a bank from before the mark: nothing to check against
        return
    if not isinstance(kept, dict) or cfg.data.accept_remade or same_autoencoder(kept, vae):
        return
    given = cfg.model.vae or (
        f"model.init's ({cfg.model.init})" if cfg.model.init else "a random one (no model.vae)"
    )
    raise ConfigError(
        f"the latents {cfg.data.latents!r} in {cfg.data.root} were encoded by the autoencoder {kept.get('source')}, "
        f"and this run decodes and exports another: {given}; set model.vae to the one that encoded them "
        "(or pass --set data.accept_remade=true to go on with it on purpose)"
    )


def check_teacher_autoencoder(cfg, key: str) -> None:
    """ConfigError unless the teacher model at setting `key` was trained on the latents of the
    autoencoder that encoded the bank (its directory's autoencoder is its teacher stage's, which that
    stage checked against its own bank): the stage's own autoencoder is checked (`check_bank_autoencoder`),
    the teacher's was not, and a teacher of another latent space scored the student's latents (or
    gave the ode stage its trajectories) without a word. A teacher without a TinyCausalVAE of its
    own (a Wan checkpoint, the Wan VAE), or a bank from before the mark, is not checked;
    data.accept_remade lets it be."""
    import json

    from distill.config import setting
    from distill.latents import same_autoencoder
    from streamgen.models import load_autoencoder, resolve_model_dir

    source = setting(cfg, key)
    if cfg.data.source != "world" or cfg.data.accept_remade or source.startswith("wan:"):
        return
    folder = resolve_model_dir(source)
    mark = Path(cfg.data.root) / "latents" / cfg.data.latents / "autoencoder.json"
    if folder is None or not (folder / "vae_config.json").is_file():
        return
    try:
        kept = json.loads(mark.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(kept, dict) or same_autoencoder(kept, load_autoencoder(folder)):
        return
    raise ConfigError(
        f"the teacher {source} ({key}) was trained on the latents of another autoencoder than the one that "
        f"encoded the latents {cfg.data.latents!r} in {cfg.data.root} ({kept.get('source')}): it would score "
        "latents of another space; give the teacher trained on these latents (or pass --set "
        "data.accept_remade=true to go on with it on purpose)"
    )


def identity_change(key: str, cfg, then: str, now: str) -> str:
    """A data_identity entry that changed since a checkpoint, in words."""
    change = f"{then} then, {now} now"
    if key == "data.root":
        return f"the dataset in {cfg.data.root} was made again since (manifest.json sha256 {change})"
    return f"the latents {cfg.data.latents} were encoded again since, by another autoencoder ({change})"


def _check_patches_tile(cfg, model_cfg, latent_hw) -> None:
    """ConfigError unless the model's patches tile the latents of model.height x model.width: a
    latent frame smaller than a patch was a convolution's traceback at the first step, one they do
    not tile lost its last rows and columns."""
    (h, w), (ph, pw) = latent_hw, tuple(model_cfg.patch_size[1:])
    if h % ph or w % pw:
        fh, fw = cfg.model.height // h, cfg.model.width // w
        raise ConfigError(
            f"model.height x model.width ({cfg.model.height}x{cfg.model.width}) make latents of {h}x{w}, "
            f"which the model's {ph}x{pw} patches do not tile: set them to multiples of {fh * ph}x{fw * pw}"
        )


def load_bank(cfg, model_cfg, latent_hw, vae=None) -> LatentBank:
    """The run's latent bank. vae: the autoencoder the stage decodes with and exports, checked to be
    the one that encoded the bank (`check_bank_autoencoder`). model_cfg: the DiT's config, whose
    patches must tile the latents (None: not checked; a world bank needs it for nothing else)."""
    d = cfg.data
    if model_cfg is not None:
        _check_patches_tile(cfg, model_cfg, latent_hw)
    if d.source == "synthetic":
        bank = LatentBank.synthetic(
            model_cfg, d.synthetic_clips, d.synthetic_clip_latents, latent_hw, cfg.run.seed
        )
        _check_crops_fit(d, bank, "data.synthetic_clip_latents")
        return bank
    bank = LatentBank.load(d.root, d.latents, d.split)
    if vae is not None:
        check_bank_autoencoder(cfg, vae)
    if bank.latent_hw != tuple(latent_hw):  # a model of another frame size than the bank's frames
        h, w = bank.latent_hw
        raise ConfigError(
            f"the {d.split} bank of {d.latents!r} holds latents of {h}x{w}, while model.height x model.width "
            f"({cfg.model.height}x{cfg.model.width}) make {latent_hw[0]}x{latent_hw[1]}: set them to the "
            "size of the frames it was encoded from"
        )
    _check_crops_fit(d, bank, f"the {d.split} bank of {d.latents!r}")
    return bank


def _check_crops_fit(d, bank: LatentBank, clips: str) -> None:
    """ConfigError naming data.latent_frames where its crops are longer than the clips (found at
    the first step, it named no setting: "crops of 12 latent frames do not fit clips of 8")."""
    if d.latent_frames > bank.frames:
        raise ConfigError(
            f"data.latent_frames {d.latent_frames}: crops that long do not fit the clips ({clips}: "
            f"{bank.frames} latent frames); set it to at most {bank.frames}"
        )
