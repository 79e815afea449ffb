"""Every file something reads later or in another process is written whole or not at all
(streamgen.files): dataset shards and manifests, latent caches and banks, training checkpoints,
ODE trajectories, loss curves and logs, eval reports and evaluator checkpoints, the results table,
bench's partial JSON, MP4s (a model export's folder: tests/test_folders.py). Each writer below is
cut short where its file was about to be put in place (the previous file must be there as it was,
and no temp file), then run again while a second writer of the same file runs (each must have a
temp file of its own, fsynced before its rename). The temp files a killed writer leaves:
tests/test_files_temp.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch


class CutShort(Exception):
    """Raised where a file was about to be renamed into place (a kill, a full disk)."""


def _same(a, b) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _temp_files(folder: Path) -> list[str]:
    """Anything under `folder` named like a temp file: every writer's convention, old and new."""
    return sorted(
        p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".part")) or ".tmp." in p.name
    )


def check_whole_or_not_at_all(monkeypatch, folder, target, write, read=None, fresh=False):
    """`write(i)` writes version i of `target` (`fresh`: a writer that writes only a file not there
    yet, so there is no version 0); `read(target)` says which version is there."""
    real_replace, real_fsync = os.replace, os.fsync
    if not fresh:
        write(0)
    before = target.read_bytes() if target.exists() else None
    renamed = []

    def cut_short(src, dst):
        if _same(dst, target):
            renamed.append(src)
            raise CutShort(dst)
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", cut_short)
        try:
            write(1)
        except CutShort:
            pass
    assert renamed, f"{target.name} was written in place, not renamed into place"
    assert (target.read_bytes() if target.exists() else None) == before, f"{target.name} changed"
    assert _temp_files(folder) == [], "a temp file was left behind"

    synced, temps = set(), []

    def fsync(fd):
        synced.add((os.fstat(fd).st_dev, os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        if _same(dst, target):
            assert (os.stat(src).st_dev, os.stat(src).st_ino) in synced, (
                f"{src} renamed before it was fsynced"
            )
            temps.append(Path(src).name)
            if len(temps) == 1:
                write(2)  # another writer of the same file, meanwhile
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        m.setattr(os, "replace", replace)
        write(1)
    assert len(temps) == 2 and temps[0] != temps[1], temps
    assert _temp_files(folder) == []
    if read is not None:
        assert read(target) == 1  # the last rename's, whole


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One test clip of 4 frames at 16x16 (clip 0 is a test clip)."""
    from streamgen.data.shards import make_dataset

    root = tmp_path_factory.mktemp("world")
    make_dataset(root, 1, seed=0, height=16, width=16, seconds=0.16, n_identities=10)
    return root


# ------------------------------------------------------------------ the dataset


def test_a_shard(tmp_path, monkeypatch):
    from streamgen.data.shards import ShardReader, _write_shard

    def clip(i):
        motion = SimpleNamespace(as_array=lambda: np.zeros((1, 11), np.float32))
        return SimpleNamespace(
            meta={}, caption=f"v{i}", video=np.zeros((1, 2, 2, 3), np.uint8), audio=np.zeros(640),
            reference=np.zeros((2, 2, 3), np.uint8), motion=motion,
        )  # fmt: skip

    def read(path):
        with ShardReader(path) as reader:
            return int(reader.clip(0)["caption"][1:])

    path = tmp_path / "shard-00000.npz"
    check_whole_or_not_at_all(monkeypatch, tmp_path, path, lambda i: _write_shard(path, [clip(i)]), read)


def test_the_manifest(tmp_path, monkeypatch):
    # (its writer, not make_dataset: two makes into one folder at once are refused, one at a time,
    # test_data_dataset; the second's settings here would be too, after the first's cut short)
    from streamgen.data.shards import _write_manifest

    out = tmp_path / "world"
    out.mkdir()
    settings = {"seed": 0, "clips": 1, "height": 16, "width": 16, "seconds": 0.04, "identities": 10,
                "speech": "espeak-ng 1.52"}  # fmt: skip
    write = lambda i: _write_manifest(out, {**settings, "seed": i}, [])
    read = lambda path: json.loads(path.read_text())["seed"]
    check_whole_or_not_at_all(monkeypatch, tmp_path, out / "manifest.json", write, read, fresh=True)


def test_a_killed_dataset_make_leaves_no_temp_file_of_its_shards(tmp_path, monkeypatch):
    """A pool's workers are ended by their parent before they can remove their temp files: the
    parent removes them, as it removes the shards."""
    from streamgen.data import shards
    from streamgen.files import new_file_beside

    def killed(path, clips, *made_for):
        new_file_beside(path).write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        shards.make_dataset(tmp_path / "world", 1, height=16, width=16, seconds=0.04, n_identities=10)
    assert [p for p in (tmp_path / "world").rglob("*") if p.is_file()] == []


def test_a_latent_cache_file(world, monkeypatch):
    from streamgen.data.dataset import AvatarWorldDataset

    ds = AvatarWorldDataset(world, "test")
    write = lambda i: ds.cache_latents(lambda video: np.full(2, float(i)), "v", overwrite=True)
    read = lambda path: int(np.load(path)["0000.latents"][0])
    path = world / "latents" / "v" / "test" / "shard-00000.npz"
    check_whole_or_not_at_all(monkeypatch, world, path, write, read)


def _latents_config(world, vae_dir):
    from distill.config import find_config, load_config

    cfg = load_config(find_config("tiny-avatar", "latents"), "latents")
    cfg.data.root, cfg.data.latents = str(world), "bank"
    cfg.model.flavor, cfg.model.vae = "debug", str(vae_dir)
    cfg.options.splits, cfg.options.captions, cfg.run.threads = ["test"], False, 1
    return cfg


def test_a_latent_bank(world, tmp_path, monkeypatch):
    import contextlib

    import distill.latents
    from distill.data import bank_path
    from distill.latents import build_latents
    from streamgen.model.config import get_config
    from streamgen.model.vae import TinyCausalVAE

    mcfg = get_config("debug")
    TinyCausalVAE(mcfg.in_channels, temporal_factor=mcfg.temporal_compression).save(tmp_path / "vae")
    cfg = _latents_config(world, tmp_path / "vae")
    path = bank_path(world, "bank", "test")
    # (a second run on one latents name is refused by the folder's lock; what is checked here is
    # the bank file's own writing, with another writer of it meanwhile: the lock is left out)
    monkeypatch.setattr(distill.latents, "no_other_writer", lambda folder, busy: contextlib.nullcontext())
    check_whole_or_not_at_all(monkeypatch, world, path, lambda i: build_latents(cfg), fresh=True)


def test_the_mark_of_a_latents_names_autoencoder(tmp_path, monkeypatch):
    """autoencoder.json was written in place: a kill mid-write left half a JSON file, and every
    later run stopped on it with a traceback."""
    from distill.latents import _claim_cache
    from streamgen.model.vae import TinyCausalVAE

    vae = TinyCausalVAE(latent_channels=4)
    write = lambda i: _claim_cache(tmp_path, vae, f"v{i}")
    read = lambda path: int(json.loads(path.read_text())["source"][1:])
    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / "autoencoder.json", write, read, fresh=True)


# ------------------------------------------------------------------ training


def test_a_training_checkpoint(tmp_path, monkeypatch):
    from streamgen import checkpoint as ckpt

    write = lambda i: ckpt.save_checkpoint(tmp_path, 5, {"w": torch.full((1,), float(i))}, {})
    read = lambda path: int(ckpt.load_checkpoint(path)[0]["w"][0])
    check_whole_or_not_at_all(monkeypatch, tmp_path, ckpt.checkpoint_path(tmp_path, 5), write, read)


def test_ode_trajectories(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import distill.ode
    from distill.ode import Stage

    monkeypatch.setattr(distill.ode, "load_frozen_and_digest", lambda source: (torch.nn.Identity(), "0"))
    monkeypatch.setattr(distill.ode, "weights_digest", lambda source: "0")

    def write(i):
        stage = SimpleNamespace(
            cfg=SimpleNamespace(run=SimpleNamespace(out=str(tmp_path))),
            world=SimpleNamespace(is_main=True, distributed=False, device="cpu"),
            opts=SimpleNamespace(teacher="teacher"),
            _trajectory_settings=lambda teacher_weights: {"seed": "0", "teacher_weights": teacher_weights},
            _sample_trajectories=lambda teacher: {"states": torch.full((1,), float(i))},
            _check_trajectories=lambda path, made_with: None,
        )
        Stage._trajectories(stage)

    read = lambda path: int(load_file(str(path))["states"][0])
    path = tmp_path / "trajectories.safetensors"
    check_whole_or_not_at_all(monkeypatch, tmp_path, path, write, read, fresh=True)


def test_loss_curves(tmp_path, monkeypatch):
    from distill.monitor import Monitor

    monitor = Monitor(tmp_path, 10, 0, enabled=False, progress=False, desc="")
    monitor.enabled = True  # (without TensorBoard)

    def write(i):
        monitor.log_path.write_text(json.dumps({"step": 0, "loss": 1.0 + i}) + "\n")
        monitor.plot()

    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / "loss_curves.png", write)


def test_the_scalar_log_cut_back_on_resume(tmp_path, monkeypatch):
    from distill.monitor import Monitor

    log = tmp_path / "scalars.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(10)))
    monitor = Monitor(tmp_path, 10, 0, enabled=False, progress=False, desc="")
    write = lambda i: monitor._truncate(10 - i)
    read = lambda path: 10 - len(path.read_text().splitlines())
    check_whole_or_not_at_all(monkeypatch, tmp_path, log, write, read)


# ------------------------------------------------------------------ reports and outputs


def test_an_eval_report(tmp_path, monkeypatch):
    from streamgen.eval.outputs import write_outputs

    def write(i):
        report = {
            "model": "m", "split": "test", "clips": i, "size": 8, "drift_source": "clips", "drift_slope": 0.0,
            **dict.fromkeys(["sync_c", "sync_d", "av_offset_frames", "csim", "fid", "fvd", "colour_drift_slope",
                             "black_frames", "frozen_frames", "flicker_frames", "seconds", "wall_seconds"], 0),
        }  # fmt: skip
        frames = np.zeros((2, 8, 8, 3), np.uint8)
        write_outputs(tmp_path, report, np.zeros(4), None, [(frames, frames)], [np.zeros(31)])

    read = lambda path: json.loads(path.read_text())["clips"]
    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / "report.json", write, read, fresh=True)


def test_an_evaluator_checkpoint(tmp_path, monkeypatch):
    from streamgen.eval.evaluators import SyncNet, load_checkpoint, save_checkpoint

    def write(i):
        model = SyncNet(dim=4, width=2)
        torch.nn.init.constant_(model.audio[-1].bias, float(i))
        save_checkpoint(model, tmp_path / "syncnet.safetensors", "syncnet")

    read = lambda path: int(load_checkpoint(path, "syncnet").audio[-1].bias[0])
    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / "syncnet.safetensors", write, read)


def test_a_png(tmp_path, monkeypatch):
    from PIL import Image

    from streamgen.data.media import save_png

    write = lambda i: save_png(tmp_path / "sheet.png", np.full((2, 2, 3), i, np.uint8))
    read = lambda path: Image.open(path).getpixel((0, 0))[0]
    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / "sheet.png", write, read)


@pytest.mark.parametrize("target", ["results.json", "results.md"])
def test_the_results_table(tmp_path, monkeypatch, target):
    """results.json is rewritten after every row of an evaluation hours long: written in place, a
    kill mid-write lost every row before it (and --missing-only then stopped on half a JSON file)."""
    from distill import results

    def write(i):
        row = {
            "row": f"v{i}",
            "model": "m",
            "nfe": None,
            "fps": None,
            **dict.fromkeys(results.REPORT_KEYS, 0),
        }
        monkeypatch.setattr(results, "evaluate_rows", lambda *args: [row])
        argv = ["--runs", str(tmp_path), "--out", str(tmp_path), "--doc", str(tmp_path / "results.md")]
        results.main([*argv, "--threads", str(torch.get_num_threads())])

    def read(path):
        if path.suffix == ".json":
            return int(json.loads(path.read_text())[0]["row"][1:])
        return int(re.search(r"\| v(\d+) \|", path.read_text()).group(1))

    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / target, write, read)


def test_benchs_partial_json(tmp_path, monkeypatch):
    from bench.gpu import write_partial

    write = lambda i: write_partial({"v": i}, str(tmp_path / "gpu.json"))
    read = lambda path: json.loads(path.read_text())["v"]
    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / "gpu.json", write, read)


def test_an_mp4(tmp_path, monkeypatch):
    import av

    from streamgen.media import Mp4Writer

    def write(i):
        writer = Mp4Writer(tmp_path / "out.mp4", 16, 16, audio_rate=None)
        writer.write_frames(np.zeros((1 + i, 16, 16, 3), np.uint8))
        writer.close()

    def read(path):
        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0)) - 1

    check_whole_or_not_at_all(monkeypatch, tmp_path, tmp_path / "out.mp4", write, read)


def test_a_symlink_at_the_target_is_followed_not_replaced(tmp_path):
    """results.json, scalars.jsonl and autoencoder.json were written in place, through a symlink at
    their path (a run's log kept on another disk, linked in); written beside and renamed, they put a
    file in the link's place, and the linked file kept the old contents. The write goes beside the
    link's target and is renamed over it; the link stays, pointing at the new contents."""
    from distill.monitor import Monitor
    from streamgen.files import new_file_beside, put_in_place, write_text_atomically

    elsewhere = tmp_path / "elsewhere"
    run = tmp_path / "run"
    elsewhere.mkdir()
    run.mkdir()
    (elsewhere / "results.json").write_text("old")
    (run / "results.json").symlink_to(elsewhere / "results.json")
    (run / "chain.json").symlink_to(run / "results.json")  # a link to a link
    write_text_atomically(run / "results.json", "new")
    write_text_atomically(run / "chain.json", "newer")
    assert (run / "results.json").is_symlink() and (run / "chain.json").is_symlink()
    assert (elsewhere / "results.json").read_text() == "newer"

    (run / "out.mp4").symlink_to(elsewhere / "out.mp4")  # dangling: written where it points, as open() did
    tmp = new_file_beside(run / "out.mp4")
    assert tmp.parent == elsewhere
    tmp.write_bytes(b"video")
    put_in_place(tmp, run / "out.mp4")
    assert (run / "out.mp4").is_symlink() and (elsewhere / "out.mp4").read_bytes() == b"video"

    (elsewhere / "scalars.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(10)))
    (run / "scalars.jsonl").symlink_to(elsewhere / "scalars.jsonl")
    Monitor(run, 10, 0, enabled=False, progress=False, desc="")._truncate(5)
    assert (run / "scalars.jsonl").is_symlink()
    assert len((elsewhere / "scalars.jsonl").read_text().splitlines()) == 5
    assert _temp_files(tmp_path) == []
