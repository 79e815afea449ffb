"""Stage `latents`: encode the dataset once with the trained autoencoder.

Video latents go through the dataset's own cache (`AvatarWorldDataset.cache_latents`,
stored next to the shards in DIR/latents/NAME/); then one bank file per split
(`distill.data.bank_path`) gathers what the diffusion stages read every step:
latents, the reference image's latent frame, the clip's audio and the caption's
sentence embedding. Re-running skips what is already cached.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distill.autoencoder import video_to_input
from distill.build import load_vae
from distill.config import ConfigError
from distill.data import DataMissing, bank_path
from streamgen.files import write_text_atomically
from streamgen.folder_lock import no_other_writer
from streamgen.model.files import save_safetensors


def build_latents(cfg) -> list[Path]:
    from streamgen.model.config import get_config

    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise DataMissing(f"data directory {root} does not exist (make it with `streamgen data make`)")
    if cfg.model.vae is None:
        raise DataMissing("model.vae must name the trained autoencoder (the autoencoder stage's OUT/model)")
    mcfg = get_config(cfg.model.flavor, **cfg.model.overrides)
    _warn_if_captions_unembedded(cfg, mcfg.text_dim)
    vae = load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)
    folder = root / "latents" / cfg.data.latents
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only data root
        raise DataMissing(f"cannot write the latents into {folder}: {e.strerror or e}") from None
    # two runs on one latents name (two shells, or every rank of a torchrun) encoded the same clips
    # side by side, and claimed the folder for their autoencoders both, each before the other wrote
    busy = f"another `distill latents` run is writing {folder}: wait for it to end, or choose another data.latents"
    with no_other_writer(folder, lambda: DataMissing(busy)):
        try:
            _claim_cache(folder, vae, cfg.model.vae)
        except OSError as e:  # a read-only folder
            raise DataMissing(f"cannot write the latents into {folder}: {e.strerror or e}") from None
        return _encode_splits(cfg, root, vae, mcfg)


def _encode_splits(cfg, root: Path, vae, mcfg) -> list[Path]:
    from streamgen.data.dataset import AvatarWorldDataset
    from streamgen.data.shards import DataError

    @torch.no_grad()
    def encode(video: np.ndarray) -> np.ndarray:
        # latent frame l is the clip's frames [4l, 4l + 4) and their audio (frame_windows); a
        # 1 + 4k autoencoder (Wan) makes its first latent frame of one frame, the span's last
        usable = len(video) - len(video) % vae.temporal_factor
        x = video_to_input(
            torch.from_numpy(np.ascontiguousarray(video[vae.first_frame_index : usable]))[None]
        )
        return vae.encode(x)[0].numpy()

    written = []
    for split in cfg.options.splits:
        try:
            ds = AvatarWorldDataset(root, split)
            # (tiny-avatar's 480 training clips took minutes, shown by nothing until the split's line)
            cached = sum(shard["clips"] for shard in ds.shards
                         if (root / "latents" / cfg.data.latents / shard["file"]).exists())  # fmt: skip
            with _bar(cfg, f"latents: {split}: encoded", len(ds), cached) as bar:

                def encode_counted(video: np.ndarray) -> np.ndarray:
                    latent = encode(video)
                    bar.update()
                    return latent

                ds.cache_latents(encode_counted, cfg.data.latents)
            ds = ds.with_latents(cfg.data.latents)  # (its shards hashed once, above)
        except DataError as e:
            raise DataMissing(str(e)) from None
        path = bank_path(root, cfg.data.latents, split)
        captions = "true" if cfg.options.captions else "false"
        shards = _shards_digest(ds.shards)
        if path.exists():
            problem = _kept_bank_problem(path, captions, shards)
            if problem is None:
                print(f"latents: {split}: kept {path} (encoded before)")
                written.append(path)
                continue
            print(f"latents: {split}: {path} {problem}: made again")
        if len(ds) == 0:
            raise DataMissing(f"{root} has no {split} clips to encode (latents.splits names the splits)")
        # what the bank holds of each clip, read one clip at a time: every item, held whole (its video,
        # five times the rest) until the bank was made, was the split's frames in memory
        latents, audio, refs, texts = [], [], [], []
        with torch.no_grad(), _bar(cfg, f"latents: {split}: gathered into its bank", len(ds)) as bar:
            for i in range(len(ds)):
                item = ds[i]
                latents.append(item["latents"])
                audio.append(item["audio"])
                reference = video_to_input(torch.from_numpy(item["reference"])[None, None])[:, :, 0]
                refs.append(vae.encode_reference(reference))
                texts.append(item["caption"])
                del item
                bar.update()
        frames = min(lat.shape[1] for lat in latents)
        samples = frames * vae.temporal_factor * 640
        tensors = {
            "latents": torch.from_numpy(np.stack([lat[:, :frames] for lat in latents])).float(),
            "reference": torch.cat(refs).float(),
            "audio": torch.from_numpy(np.stack([_fit(a, samples) for a in audio])),
            "context": _captions(texts, mcfg.text_dim, cfg.options.captions),
        }
        del latents, audio, refs
        save_safetensors(tensors, path, metadata={"captions": captions, "shards": shards})
        written.append(path)
        print(f"latents: {split}: {len(texts)} clips, {frames} latent frames each -> {path}")
    return written


def _warn_if_captions_unembedded(cfg, text_dim: int) -> None:
    """A warning where latents.captions asks for the captions' MiniLM embeddings and the model's text
    width is not theirs: every caption was a zero context (`_captions`), the bank recorded captions
    true, and the stages after it trained without text, without a word."""
    from streamgen.model.text import TEXT_DIM

    if cfg.options.captions and text_dim != TEXT_DIM:
        print(f"warning: latents.captions embeds each caption with MiniLM ({TEXT_DIM} wide), and the model "
              f"({cfg.model.flavor}) takes text {text_dim} wide: the captions are left out (zero contexts); set "
              "latents.captions false to say so", file=sys.stderr)  # fmt: skip


def _bar(cfg, desc: str, clips: int, done: int = 0) -> tqdm:
    """A bar over a split's clips, shown where a training stage's is (run.progress)."""
    shown = cfg.run.progress
    return tqdm(total=clips, initial=done, desc=desc, unit="clip", disable=not shown, dynamic_ncols=True)


def autoencoder_digest(vae, half_parameters: bool = False) -> str:
    """A fingerprint of an autoencoder's weights and statistics. half_parameters: of its
    parameters rounded to float16, as a compact export stores them (build.export_model; its
    statistics stay float32), so that one autoencoder has one fingerprint shipped or not."""
    parameters = {name for name, _ in vae.named_parameters()}
    h = hashlib.sha1()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach()
        if half_parameters and name in parameters:
            t = t.half()
        h.update(name.encode())
        h.update(t.float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def same_autoencoder(mark: dict, vae) -> bool:
    """Whether `vae` is the autoencoder an autoencoder.json records (`_claim_cache`): the same
    weights, or the same ones stored compactly (a mark written before "digest_half": the first only)."""
    if mark.get("digest") == autoencoder_digest(vae):
        return True
    return "digest_half" in mark and mark["digest_half"] == autoencoder_digest(vae, half_parameters=True)


def _claim_cache(folder: Path, vae, source: str) -> None:
    """The cache and banks of one `data.latents` name hold one autoencoder's latents: a rerun with
    another (skipping what is cached) kept the first one's, and a teacher trained on them shipped
    with the other. The name's first autoencoder is recorded; another is refused."""
    mark = folder / "autoencoder.json"
    if mark.exists():
        kept = json.loads(mark.read_text())
        if not same_autoencoder(kept, vae):
            raise ConfigError(
                f"{folder} holds the latents of another autoencoder ({kept.get('source')}), not of "
                f"{source}: choose another data.latents name, or delete {folder} to encode it again"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    # (whole or not at all: half a file written as a run was killed stopped every later run on it)
    record = {"digest": autoencoder_digest(vae), "digest_half": autoencoder_digest(vae, half_parameters=True),
              "source": source}  # fmt: skip
    write_text_atomically(mark, json.dumps(record) + "\n")


def _shards_digest(shards: list[dict]) -> str:
    """A fingerprint of a split's shards (their files and sha256s, as its manifest records them):
    what a bank's clips were gathered from."""
    listed = json.dumps([(shard["file"], shard.get("sha256")) for shard in shards])
    return hashlib.sha256(listed.encode()).hexdigest()[:16]


def _kept_bank_problem(path: Path, captions: str, shards: str) -> str | None:
    """Why a bank encoded before cannot be kept (its clips' latents are the cached ones), None where
    it can. With another latents.captions it would be kept all the same, its captions not what was
    asked for, without a word (a ConfigError). One gathered from other shards (`_shards_digest`)
    than the split has now is made again: a dataset made again with more clips or fewer kept its
    shards that are the same, byte for byte, and so their cached latents, and the bank of the old
    clips was kept. So is one that cannot be read (safetensors' traceback, no file named). A bank
    from before either was recorded is taken as it is."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        return f"cannot be read ({e})"
    kept = metadata.get("captions")
    if kept is not None and kept != captions:
        raise ConfigError(
            f"{path} was encoded with latents.captions={kept}, not {captions}: choose another data.latents "
            f"name, or delete {path} to encode it again"
        )
    if metadata.get("shards", shards) != shards:
        return "holds other shards' clips (the dataset was made again)"
    return None


def _fit(audio: np.ndarray, samples: int) -> np.ndarray:
    out = np.zeros(samples, np.float32)
    n = min(samples, len(audio))
    out[:n] = audio[:n]
    return out


def _captions(captions: list[str], text_dim: int, enabled: bool) -> torch.Tensor:
    from streamgen.model.text import TEXT_DIM, embed_sentences

    context = torch.zeros(len(captions), 1, text_dim)
    if not enabled or text_dim != TEXT_DIM:
        return context
    unique = sorted({c for c in captions if c and c.strip()})
    if unique:
        table = dict(zip(unique, embed_sentences(unique)))
        for i, c in enumerate(captions):
            if c in table:
                context[i, 0] = table[c]
    return context
