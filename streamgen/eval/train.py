"""Training the evaluators on the avatar world (`streamgen eval train-evaluators`).

Training clips come from the world's train split (identities and sentences never seen
in val/test), generated on the fly or read from a dataset folder. Both models are
small (well under 2 MB each) and train on a CPU in minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .evaluators import (
    MAX_OFFSET,
    WINDOW,
    IdentityEncoder,
    SyncNet,
    frames_to_tensor,
    log_mel,
    mel_windows,
    mouth_crops,
    save_checkpoint,
    video_windows,
)


def _make(job):
    from streamgen.data.world import make_clip

    seed, index, size = job
    c = make_clip(seed, index, "train", size, size, 4.0, 5000)
    return c.video, c.audio, c.reference, c.meta["identity_id"]


def training_clips(
    n_clips: int, seed: int, size: int = 64, workers: int = 1, data: Path | None = None, bar=None
):
    """[(video, audio, reference, identity_id)] from the train split."""
    if data is not None:
        from streamgen.data.shards import iter_clips

        out = []
        for c in iter_clips(data, "train", n_clips):
            out.append((c["video"], c["audio"], c["reference"], c["meta"]["identity_id"]))
            bar and bar.update(1)
        return out
    jobs = [(seed, i, size) for i in range(n_clips)]
    if workers <= 1:
        out = []
        for job in jobs:
            out.append(_make(job))
            bar and bar.update(1)
        return out
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        out = []
        for item in pool.imap(_make, jobs, chunksize=4):
            out.append(item)
            bar and bar.update(1)
    return out


def _jitter(x: torch.Tensor, gen: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translation and brightness, so the evaluators do not rely on exact pixels."""
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    gain = 1 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5)
    return x * gain


def train_syncnet(
    clips, steps: int, batch: int = 32, hard: int = 8, seed: int = 0, temperature: float = 0.05, bar=None
) -> SyncNet:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SyncNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    frames = [torch.from_numpy(c[0]) for c in clips]
    mels = [log_mel(c[1], len(c[0])) for c in clips]
    model.train()
    for _ in range(steps):
        ids = torch.randint(len(clips), (batch,), generator=gen)
        v_list, a_list, n_list = [], [], []
        for i in ids.tolist():
            t = int(torch.randint(0, len(frames[i]) - WINDOW + 1, (1,), generator=gen))
            x = frames_to_tensor(frames[i][t : t + WINDOW].numpy())
            v_list.append(video_windows(mouth_crops(_jitter(x, gen)), torch.tensor([0])))
            # hard negatives: the same clip's audio 3..15 frames early or late
            shifts = torch.randint(3, MAX_OFFSET + 1, (hard,), generator=gen)
            signs = torch.randint(0, 2, (hard,), generator=gen) * 2 - 1
            starts = torch.cat([torch.tensor([t]), t + shifts * signs])
            windows = mel_windows(mels[i], starts)
            a_list.append(windows[:1])
            n_list.append(windows[1:])
        v = model.embed_video(torch.cat(v_list))
        a = model.embed_audio(torch.cat(a_list))
        neg = model.embed_audio(torch.cat(n_list)).view(batch, hard, -1)
        logits = torch.cat([v @ a.T, (v[:, None] * neg).sum(-1)], dim=1) / temperature
        loss = F.cross_entropy(logits, torch.arange(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.set_postfix(sync_loss=f"{loss.item():.3f}")
            bar.update(1)
    return model.eval()


def train_identity(clips, steps: int, batch: int = 32, seed: int = 0, bar=None) -> IdentityEncoder:
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    model = IdentityEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    identity = torch.tensor([c[3] for c in clips])
    model.train()
    for _ in range(steps):
        ids = torch.randperm(len(clips), generator=gen)[:batch]
        first, second = [], []
        for i in ids.tolist():
            video, reference = clips[i][0], clips[i][2]
            t1, t2 = (int(v) for v in torch.randint(0, len(video), (2,), generator=gen))
            use_reference = bool(torch.rand(1, generator=gen) < 0.5)
            first.append(reference if use_reference else video[t1])
            second.append(video[t2])
        a = model(_jitter(frames_to_tensor(np.stack(first)), gen, 3))
        b = model(_jitter(frames_to_tensor(np.stack(second)), gen, 3))
        logits = a @ b.T / 0.1
        same = identity[ids][:, None] == identity[ids][None]
        logits = logits.masked_fill(same & ~torch.eye(len(ids), dtype=torch.bool), -1e4)
        target = torch.arange(len(ids))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.set_postfix(id_loss=f"{loss.item():.3f}")
            bar.update(1)
    return model.eval()


def check_training_data(data: Path | None) -> None:
    """A DataError for a dataset the evaluators cannot train on, from its manifest: before a clip
    is read, a progress bar shown or --out made (each came first, and --out was left empty)."""
    if data is None:  # (the world's clips, made on the fly: 4 s each)
        return
    from streamgen.data.shards import DataError, load_manifest

    manifest = load_manifest(data)
    if not manifest["splits"].get("train", {}).get("clips"):
        raise DataError(
            f"{data} has no train clips to train the evaluators on (make a dataset with more clips)"
        )
    if manifest["frames"] < WINDOW:  # (a traceback from torch.randint, after the clips were read)
        raise DataError(
            f"{data}: clips of {manifest['frames']} frames are shorter than the {WINDOW}-frame sync window"
        )


def train_evaluators(
    out: Path,
    n_clips: int = 300,
    sync_steps: int = 4000,
    identity_steps: int = 800,
    seed: int = 0,
    workers: int = 1,
    data: Path | None = None,
) -> dict:
    from tqdm import tqdm

    start = time.perf_counter()
    check_training_data(data)
    with tqdm(total=n_clips, desc="training clips", unit="clip") as bar:
        clips = training_clips(n_clips, seed, 64, workers, data, bar)
    with tqdm(total=sync_steps, desc="syncnet", unit="step") as bar:
        sync = train_syncnet(clips, sync_steps, seed=seed, bar=bar)
    with tqdm(total=identity_steps, desc="identity", unit="step") as bar:
        ident = train_identity(clips, identity_steps, seed=seed, bar=bar)
    info = {"clips": len(clips), "seed": seed, "seconds": round(time.perf_counter() - start, 1)}
    save_checkpoint(sync, Path(out) / "syncnet.safetensors", "syncnet", dict(info, steps=sync_steps))
    save_checkpoint(ident, Path(out) / "identity.safetensors", "identity", dict(info, steps=identity_steps))
    return info
