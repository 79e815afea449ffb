"""Training the evaluators on the avatar world (`streamgen eval train-evaluators`).

Training clips come from the world's train split (identities and sentences never seen
in val/test), generated on the fly or read from a dataset folder. Both models are
small (well under 2 MB each) and train on a CPU in minutes.

Resumable: every CHECKPOINT_EVERY steps the whole training state (weights, optimizer, the
batches' random generator) goes to OUT/checkpoints/ (`streamgen.checkpoint`'s files, as distill's, written
atomically), so the same command run again after a kill goes on from the newest one, to the same
weights as a run never interrupted (the clips are made again: they are a function of the seed).
The checkpoints go once both evaluators are written; a finished run of the same settings run again
trains nothing.
"""

from __future__ import annotations

import json
import sys
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
    from streamgen.data.pool import worker_pool

    # (a Ctrl-C reaches the workers too: each printed "Process SpawnPoolWorker-N:" and its traceback
    # over the command's "interrupted"; the parent, interrupted, ends them. Their temp files are
    # removed after them: each left its espeak-ng data view in the system's temp folder, every run)
    with worker_pool(workers, "streamgen-evaluators-") as pool:
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


def _one_cycle(opt, steps: int, done: int):
    """The learning-rate schedule, `done` steps in (its state is a function of the step: a resumed
    optimizer's param groups carry the initial_lr a scheduler made mid-way needs)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=steps, pct_start=0.1, last_epoch=done - 1
    )


def _resumed(bar, done: int) -> None:
    """The bar of a phase resumed `done` steps in: from there, its rate that of the steps run now
    (an update by `done` showed hundreds of steps a second)."""
    if bar is not None and done:
        bar.n = bar.last_print_n = bar.initial = done
        bar.refresh()


def train_syncnet(
    clips, steps: int, batch: int = 32, hard: int = 8, seed: int = 0, temperature: float = 0.05, bar=None,
    checkpoints=None,
) -> SyncNet:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SyncNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    done = checkpoints.restore("syncnet", model, opt, gen) if checkpoints else 0
    sched = _one_cycle(opt, steps, done) if done < steps else None  # (None: trained before)
    _resumed(bar, done)
    frames = [torch.from_numpy(c[0]) for c in clips]
    mels = [log_mel(c[1], len(c[0])) for c in clips]
    model.train()
    for step in range(done, steps):
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
        checkpoints and checkpoints.step_done("syncnet", step + 1, model, opt, gen)
    return model.eval()


def train_identity(
    clips, steps: int, batch: int = 32, seed: int = 0, bar=None, checkpoints=None
) -> IdentityEncoder:
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    model = IdentityEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    done = checkpoints.restore("identity", model, opt, gen) if checkpoints else 0
    sched = _one_cycle(opt, steps, done) if done < steps else None  # (None: trained before)
    _resumed(bar, done)
    identity = torch.tensor([c[3] for c in clips])
    model.train()
    for step in range(done, steps):
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
        checkpoints and checkpoints.step_done("identity", step + 1, model, opt, gen)
    return model.eval()


def check_training_data(data: Path | None, n_clips: int = 2) -> None:
    """A DataError for a dataset the evaluators cannot train on, from its manifest, or for too few
    clips: before a clip is read, a progress bar shown or --out made (each came first, and --out
    was left empty)."""
    from streamgen.data.manifest import load_manifest
    from streamgen.data.shards import DataError

    if n_clips < 2:  # (its loss was 0 at every step: evaluators that measure nothing, without a word)
        raise DataError(
            f"--clips {n_clips}: the identity encoder learns by telling the clips' identities apart, and one "
            "clip holds one identity: give --clips 2 or more (the bundled evaluators: 400)"
        )
    if data is None:  # (the world's clips, made on the fly: 4 s each)
        return

    manifest = load_manifest(data)
    if not manifest["splits"].get("train", {}).get("clips"):
        raise DataError(
            f"{data} has no train clips to train the evaluators on (make a dataset with more clips)"
        )
    if manifest["frames"] < WINDOW:  # (a traceback from torch.randint, after the clips were read)
        raise DataError(
            f"{data}: clips of {manifest['frames']} frames are shorter than the {WINDOW}-frame sync window"
        )


# steps between two checkpoints: about half a minute of training on the shared 2-core machine
CHECKPOINT_EVERY = 250


class TrainingResumeError(ValueError):
    """--out holds checkpoints this run cannot go on from (other settings, none readable)."""


class _Checkpoints:
    """The training state in OUT/checkpoints/, one global step count over both phases: the
    syncnet's steps, then the identity encoder's. A checkpoint of the identity phase carries the
    finished syncnet too."""

    def __init__(self, out: Path, settings: dict, every: int):
        from streamgen import (
            checkpoint as ckpt,  # (one checkpoint format, the distill stages' too: no second copy)
        )

        self.ckpt, self.out, self.settings, self.every = ckpt, Path(out), settings, every
        self.tensors, self.meta = {}, {}
        self.path, self.syncnet = None, None

    def newest(self) -> Path | None:
        """The checkpoint to go on from (None: a fresh start); newer ones that cannot be read are
        set aside with a warning, as distill's are."""
        ckpt = self.ckpt
        if ckpt.latest_checkpoint(self.out) is None:
            return None
        path, header, damaged = ckpt.newest_readable_checkpoint(self.out)
        if path is None:
            raise TrainingResumeError(
                f"{damaged[0][1]}; no checkpoint in {ckpt.checkpoint_dir(self.out)} can be read: to "
                "train from the start, delete that folder (or choose another --out)"
            )
        saved = header.get("settings")
        if header.get("kind") != "train-evaluators":  # (a distill run's: its stage's name instead)
            job = f"a distill {header['stage']} run's" if header.get("stage") else "another job's"
            raise TrainingResumeError(
                f"{ckpt.checkpoint_dir(self.out)} holds {job} checkpoints, not train-evaluators': "
                "choose another --out"
            )
        if saved != self.settings:
            theirs = saved if isinstance(saved, dict) else {}
            diffs = [f"{k}: checkpoint {theirs.get(k)!r}, now {v!r}" for k, v in self.settings.items()
                     if theirs.get(k) != v and k != "version"]  # fmt: skip
            if not diffs:  # (the version alone: no options of this code finish it)
                raise TrainingResumeError(
                    f"{self.out} holds an unfinished train-evaluators run of another version of its code "
                    f"({theirs.get('version')}, this one's {TRAINING_VERSION}): delete "
                    f"{ckpt.checkpoint_dir(self.out)} to train afresh (or choose another --out)"
                )
            raise TrainingResumeError(
                f"{self.out} holds an unfinished train-evaluators run of other settings "
                f"({'; '.join(diffs)}): run it again with those to finish it, or delete "
                f"{ckpt.checkpoint_dir(self.out)} (or choose another --out)"
            )
        for damaged_path, why in damaged:  # (once they are this run's: another job's are left as they are)
            aside = ckpt.set_aside(damaged_path)
            print(f"warning: {why}; set aside as {aside.name}, resuming from {path.name}", file=sys.stderr)
        self.tensors, self.meta = ckpt.load_checkpoint(path)
        self.path = path
        return path

    def resumed_step(self) -> int:
        return int(self.meta.get("step", 0))

    def restore(self, phase: str, model, opt, gen: torch.Generator) -> int:
        """Load `phase`'s state from the checkpoint into model, opt and gen; the steps it had done."""
        ckpt, meta = self.ckpt, self.meta
        if phase not in meta.get("phases", {}):
            return 0
        ckpt.load_module(phase, model, self.tensors, self.path)
        done = meta["phases"][phase]
        if done < self.settings[f"{phase}_steps"]:
            ckpt.load_optimizer(phase, opt, self.tensors, meta["optim"][phase])
            gen.set_state(self.tensors[f"gen/{phase}"])
            ckpt.set_rng_state(self.tensors, meta["rng"])
        return done

    def step_done(self, phase: str, done: int, model, opt, gen: torch.Generator) -> None:
        steps = self.settings[f"{phase}_steps"]
        step = done + (self.settings["syncnet_steps"] if phase == "identity" else 0)
        if phase == "syncnet" and done == steps:
            self.syncnet = model
        if done % self.every and done != steps:
            return
        ckpt = self.ckpt
        tensors, rng_meta = ckpt.rng_state()
        tensors[f"gen/{phase}"] = gen.get_state()
        tensors.update(ckpt.module_tensors(phase, model))
        optim, optim_meta = ckpt.optimizer_tensors(phase, opt)
        tensors.update(optim)
        phases = {phase: done}
        if phase == "identity":  # (the finished syncnet, from this run or from the checkpoint)
            syncnet = self.syncnet or self._saved_syncnet()
            tensors.update(ckpt.module_tensors("syncnet", syncnet))
            phases["syncnet"] = self.settings["syncnet_steps"]
        meta = {"kind": "train-evaluators", "settings": self.settings, "phases": phases,
                "optim": {phase: optim_meta}, "rng": rng_meta}  # fmt: skip
        ckpt.save_checkpoint(self.out, step, tensors, meta, keep=2)

    def _saved_syncnet(self) -> SyncNet:
        model = SyncNet()
        self.ckpt.load_module("syncnet", model, self.tensors, self.path)
        return model.eval()

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.ckpt.checkpoint_dir(self.out), ignore_errors=True)


# the version of how the evaluators are trained: bump it with any change that changes the weights
# the same settings train to (a loss, a batch, an architecture), so that evaluators (and an
# unfinished run's checkpoints) trained by the code before are not taken for this code's
# (tests/test_eval_versions.py pins it to a digest of this module's, evaluators.py's and the clips' code)
TRAINING_VERSION = 1


def training_settings(
    n_clips: int, sync_steps: int, identity_steps: int, seed: int, data: Path | None
) -> dict:
    """What the trained weights are a function of (not --workers: the clips come back in order); of
    clips made here (no --data), the speech engine they are spoken by, as eval's (`eval_settings`)."""
    import hashlib

    from streamgen.data.speech import engine_version

    manifest = speech = None
    if data is not None:  # (a dataset made again in the same folder is other clips)
        manifest = hashlib.sha256((Path(data) / "manifest.json").read_bytes()).hexdigest()[:16]
    else:
        speech = engine_version()
    return {"clips": n_clips, "syncnet_steps": sync_steps, "identity_steps": identity_steps, "seed": seed,
            "data": str(Path(data).resolve()) if data is not None else None, "data_manifest": manifest,
            "speech": speech, "version": TRAINING_VERSION}  # fmt: skip


def finished_with(out: Path, settings: dict) -> bool:
    """Whether both evaluators in `out` were trained with `settings` (by a run that recorded them)."""
    from safetensors import safe_open

    try:
        for name in ("syncnet", "identity"):
            with safe_open(str(Path(out) / f"{name}.safetensors"), "pt") as f:
                extra = json.loads((f.metadata() or {}).get("extra", "{}"))
            if extra.get("settings") != settings:
                return False
    except Exception:  # (missing, unreadable: not finished; safetensors has error types of its own)
        return False
    return True


def train_evaluators(
    out: Path,
    n_clips: int = 300,
    sync_steps: int = 4000,
    identity_steps: int = 800,
    seed: int = 0,
    workers: int = 1,
    data: Path | None = None,
    checkpoint_every: int | None = None,
) -> dict:
    """Train both evaluators into `out`, going on from its checkpoints; the run's info, with
    "resumed_from" (the step gone on from) or "already_trained" (nothing to do) where so."""
    from streamgen.folder_lock import no_other_writer

    check_training_data(data, n_clips)
    Path(out).mkdir(parents=True, exist_ok=True)
    # (two runs into one --out wrote each other's checkpoints, went on from them, and the first to
    # end removed the other's from under it)
    busy = f"another train-evaluators is writing into {out}: let it finish, or choose another --out"
    with no_other_writer(Path(out), lambda: TrainingResumeError(busy)):
        return _train_evaluators(out, n_clips, sync_steps, identity_steps, seed, workers, data,
                                 checkpoint_every)  # fmt: skip


def _train_evaluators(
    out, n_clips, sync_steps, identity_steps, seed, workers, data, checkpoint_every
) -> dict:
    from tqdm import tqdm

    start = time.perf_counter()
    settings = training_settings(n_clips, sync_steps, identity_steps, seed, data)
    if finished_with(out, settings):
        return {"already_trained": True, "seed": seed}
    checkpoints = _Checkpoints(out, settings, checkpoint_every or CHECKPOINT_EVERY)
    resumed = checkpoints.newest()
    if resumed is not None:
        step = checkpoints.resumed_step()
        print(
            f"resuming from {resumed} (step {step} of {sync_steps + identity_steps}); "
            "the training clips are made again",
            file=sys.stderr,
        )
    with tqdm(total=n_clips, desc="training clips", unit="clip") as bar:
        clips = training_clips(n_clips, seed, 64, workers, data, bar)
    identities = {c[3] for c in clips}
    if len(identities) < 2:  # (a dataset's train clips all of one person: the same loss of 0)
        from streamgen.data.shards import DataError

        raise DataError(
            f"the {len(clips)} training clips hold one identity ({identities.pop()}): the identity encoder "
            "learns by telling identities apart: give more clips (--clips), or --data with more identities"
        )
    with tqdm(total=sync_steps, desc="syncnet", unit="step") as bar:
        sync = train_syncnet(clips, sync_steps, seed=seed, bar=bar, checkpoints=checkpoints)
    with tqdm(total=identity_steps, desc="identity", unit="step") as bar:
        ident = train_identity(clips, identity_steps, seed=seed, bar=bar, checkpoints=checkpoints)
    info = {"clips": len(clips), "seed": seed, "seconds": round(time.perf_counter() - start, 1)}
    save_checkpoint(sync, Path(out) / "syncnet.safetensors", "syncnet",
                    dict(info, steps=sync_steps, settings=settings))  # fmt: skip
    save_checkpoint(ident, Path(out) / "identity.safetensors", "identity",
                    dict(info, steps=identity_steps, settings=settings))  # fmt: skip
    checkpoints.remove()  # (after both: a kill between the two goes on from the last step)
    return dict(info, resumed_from=checkpoints.resumed_step()) if resumed else info
