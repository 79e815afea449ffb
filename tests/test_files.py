"""Every file something reads later or in another process is written whole or not at all
(streamgen.files): dataset shards and manifests, latent caches and banks, training checkpoints,
ODE trajectories, loss curves and logs, eval reports and evaluator checkpoints, the results table,
bench's partial JSON, MP4s (a model export's folder: tests/test_folders.py). Each writer below is
cut short where its file was about to be put in place (the previous file must be there as it was,
and no temp file), then run again while a second writer of the same file runs (each must have a
temp file of its own, fsynced before its rename)."""

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
    from streamgen.eval.report import _write_outputs

    def write(i):
        report = {
            "model": "m", "split": "test", "clips": i, "size": 8, "drift_source": "clips", "drift_slope": 0.0,
            **dict.fromkeys(["sync_c", "sync_d", "av_offset_frames", "csim", "fid", "fvd", "colour_drift_slope",
                             "black_frames", "frozen_frames", "flicker_frames", "seconds", "wall_seconds"], 0),
        }  # fmt: skip
        frames = np.zeros((2, 8, 8, 3), np.uint8)
        _write_outputs(tmp_path, report, np.zeros(4), None, [(frames, frames)], [np.zeros(31)])

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


def test_a_killed_writers_temp_files_are_removed_by_the_next_writer(tmp_path):
    """Each temp file has a name of its own, so one a killed writer left (SIGKILL, the OOM killer)
    would stay for good, as big as the weights it held; the next writer of the same file removes
    those whose writer has ended, and no other: a live writer's, another host's, or one of a name
    it does not know."""
    import subprocess
    import sys

    from streamgen.files import HOST_TAG, write_text_atomically
    from streamgen.folders import new_folder_beside

    target = tmp_path / "dit.safetensors"
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(ended.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".dit.safetensors.{HOST_TAG}-{dead}-abc123.tmp": "gone",
            f".dit.safetensors.{HOST_TAG}-{live.pid}-abc123.tmp": "kept",
            f".dit.safetensors.otherhost-{dead}-abc123.tmp": "kept",
            ".dit.safetensors.0123456789ab.tmp": "kept",
            f".other.safetensors.{HOST_TAG}-{dead}-abc123.tmp": "kept",  # another file's
        }
        for name in names:
            (tmp_path / name).write_bytes(b"weights")
        (tmp_path / f".autoencoder.{HOST_TAG}-{dead}-xyz.tmp").mkdir()  # a staging folder
        write_text_atomically(target, "new")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"dit.safetensors", f".autoencoder.{HOST_TAG}-{dead}-xyz.tmp"} | {
            name for name, fate in names.items() if fate == "kept"
        }
        staging = new_folder_beside(tmp_path / "autoencoder")  # removes the ended writer's folder
        assert {p.name for p in tmp_path.iterdir() if p.name.startswith(".autoencoder.")} == {staging.name}
    finally:
        live.kill()
        live.wait()


def test_no_writer_removes_a_live_writers_temp_file_of_another_host_or_pid_namespace(tmp_path):
    """A PID means a process only on its host, in its PID namespace. The host name was cut to 32
    characters (the pods of one deployment, a node pool's machines: one host), and a container of
    the host's name (--uts=host, --network=host) has PIDs of its own: each looked the other's
    writers up where their PIDs mean nothing, found none, and removed their live temp files (the
    writer then failed to put its file in place)."""
    import shutil
    import subprocess
    import sys
    import threading

    from streamgen.files import temp_files_beside, write_atomically

    target = tmp_path / "shard-00000.npz"
    # a process on another host of a name that starts alike, whose live writer's PID is not one here
    tag = subprocess.run(
        [sys.executable, "-c", "import socket; socket.gethostname = lambda: 'streamgen-dataset-generator-"
         "7d9f8b6c5d-x2k4p'\nimport streamgen.files as f; print(f.HOST_TAG)"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    ).stdout.strip()  # fmt: skip
    other_host = tmp_path / f".{target.name}.{tag}-4000000-abc123.tmp"
    other_host.write_bytes(b"being written")
    code = (
        "import socket; socket.gethostname = lambda: 'streamgen-dataset-generator-7d9f8b6c5d-q8w3z'\n"
        f"import streamgen.files as f; f.write_text_atomically({str(target)!r}, 'b')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    assert other_host.exists()

    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run(
        [unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "true"], capture_output=True
    )
    if not probe or probe.returncode:
        pytest.skip("no unshare of a PID namespace here")
    started, go_on, errors = threading.Event(), threading.Event(), []

    def slow_write(tmp):
        tmp.write_bytes(b"weights")
        started.set()
        go_on.wait(30)

    def writer():
        try:
            write_atomically(tmp_path / "dit.safetensors", slow_write)
        except Exception as e:
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert started.wait(30)
        live = temp_files_beside(tmp_path / "dit.safetensors")
        code = f"import streamgen.files as f; f.write_text_atomically({str(tmp_path / 'dit.safetensors')!r}, 'x')"
        subprocess.run(
            [unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
            check=True, cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        assert temp_files_beside(tmp_path / "dit.safetensors") == live
    finally:
        go_on.set()
        thread.join()
    assert errors == [] and (tmp_path / "dit.safetensors").read_bytes() == b"weights"


def test_a_temp_file_named_with_no_pid_there_can_be_is_left_alone(tmp_path):
    """A temp file of this host's tag and a PID beyond a C int (a stray file of the pattern) made
    os.kill raise OverflowError: every later write of its target failed."""
    from streamgen.files import HOST_TAG, write_text_atomically

    stray = tmp_path / f".model.json.{HOST_TAG}-99999999999-abc.tmp"
    stray.touch()
    write_text_atomically(tmp_path / "model.json", "{}")
    assert (tmp_path / "model.json").read_text() == "{}" and stray.exists()


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


def made_at(p: Path, when: float, folder: bool, touched: float) -> Path:
    """A temp file (or a staging folder with weights in it, written at `touched`) at `p`, last
    changed at `when`."""
    if folder:
        p.mkdir()
        (p / "vae.safetensors").write_bytes(b"weights")
        os.utime(p / "vae.safetensors", (touched, touched))
    else:
        p.write_bytes(b"weights")
    os.utime(p, (when, when))
    return p


def test_temp_files_whose_writer_cannot_be_asked_after_are_removed_once_untouched_for_a_day(tmp_path):
    """The previous naming's temp files (`.NAME.<hex>.tmp`, the staging `.autoencoder.<rand>.tmp`)
    name no writer, and those of another host or of a container whose PID namespace has gone name
    one that cannot be asked after: none was ever removed, each as big as the weights it held.
    Removing a live writer's is worse than leaving junk, so they go only once nothing in them has
    been written for ABANDONED_AFTER_S (no writer leaves its temp file untouched that long); a name
    of a shape no writer made is left alone, however old."""
    from streamgen.files import ABANDONED_AFTER_S, HOST_TAG, write_text_atomically
    from streamgen.folders import new_folder_beside

    old = os.stat(tmp_path).st_mtime - ABANDONED_AFTER_S - 3600

    def made(name, folder=False, touched=old):
        return made_at(tmp_path / name, old, folder, touched)

    other_namespace = HOST_TAG[:-12] + "0123456789ab"  # this host's name, another PID namespace
    gone = [
        made(".dit.safetensors.0123456789ab.tmp"),
        made(f".dit.safetensors.{other_namespace}-12-abc123.tmp"),
        made(".dit.safetensors.otherhost-12-abc123.tmp"),
        made(".autoencoder.k2_x9qzr.tmp", folder=True),
        made(f".autoencoder.{other_namespace}-12-abcdefgh.tmp", folder=True),
    ]
    kept = [
        made(".dit.safetensors.456789abcdef.tmp"),
        made(".dit.safetensors.my-notes.tmp"),  # no writer's name
        made(".autoencoder.q8w3z_00.tmp", folder=True, touched=old + ABANDONED_AFTER_S),  # written lately
    ]
    os.utime(kept[0], None)  # written just now
    write_text_atomically(tmp_path / "dit.safetensors", "new")
    new_folder_beside(tmp_path / "autoencoder")
    assert [p.name for p in gone if os.path.lexists(p)] == []
    assert all(p.exists() for p in kept)



def test_the_fixed_temp_names_of_older_writers_are_removed_once_untouched_for_a_day(tmp_path):
    """Before temp files had names of their own, the writers of NAME wrote `.NAME.tmp` (weights,
    checkpoints, the autoencoder's staging folder `.autoencoder.tmp`) or `NAME.tmp` (model.json,
    the manifest, a shard's .npz): one a killed writer left was never removed, and a model
    directory's `model.json.tmp` was carried into every later export. No writer makes them now;
    they go as the previous naming's do, once untouched for ABANDONED_AFTER_S."""
    from streamgen.files import ABANDONED_AFTER_S, write_text_atomically
    from streamgen.folders import new_folder_beside
    from streamgen.model.config import get_config
    from streamgen.model.model import DiT
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.model_export import save_model
    from streamgen.models import AvatarModel

    old = os.stat(tmp_path).st_mtime - ABANDONED_AFTER_S - 3600

    def made(name, folder=False):
        return made_at(tmp_path / name, old, folder, old)

    gone = [made(".dit.safetensors.tmp"), made("manifest.json.tmp"), made(".autoencoder.tmp", folder=True)]
    kept = [made(".dit.tmp.safetensors"), made("dit.safetensors.tmp")]  # (a shape no writer made; fresh)
    os.utime(kept[1], None)
    write_text_atomically(tmp_path / "dit.safetensors", "new")
    write_text_atomically(tmp_path / "manifest.json", "{}")
    new_folder_beside(tmp_path / "autoencoder").rmdir()
    assert [p.name for p in gone if os.path.lexists(p)] == []
    assert all(p.exists() for p in kept)
    # a model directory's: left in the folder an export replaces, not carried into the new one
    d = tmp_path / "model"
    model = AvatarModel("m", DiT(get_config("debug")).eval(), TinyCausalVAE(4, (8, 16), 4).eval())
    save_model(model, d)
    (d / "model.json.tmp").write_text("{}")
    (d / "notes.txt").write_text("kept")
    save_model(model, d)
    assert sorted(p.name for p in d.iterdir() if not p.name.endswith((".json", ".safetensors"))) == [
        "notes.txt"
    ]


def test_the_older_part_temp_names_are_removed_once_untouched_for_a_day(tmp_path):
    """Before streamgen.files, MP4s (generate's, the dataset preview's), PNG sheets, the eval
    report.json and the evaluators' checkpoints were written to `NAME.part` and renamed: one a
    killed writer left stayed for good (an MP4's, as big as the video). They name no writer, so
    they go as the other fixed names do, once untouched for ABANDONED_AFTER_S; a fresh one (a live
    older writer's), a folder, and the `.part` of a name no such writer wrote (a browser's download
    of a model's weights, paused) are kept."""
    from streamgen.data.media import save_png
    from streamgen.eval.evaluators import SyncNet, save_checkpoint
    from streamgen.files import ABANDONED_AFTER_S, write_text_atomically
    from streamgen.media import Mp4Writer

    old = os.stat(tmp_path).st_mtime - ABANDONED_AFTER_S - 3600
    run = tmp_path / "run"
    run.mkdir()
    gone = [
        made_at(tmp_path / name, old, False, old)
        for name in ("out.mp4.part", "sheet.png.part", "report.json.part", "syncnet.safetensors.part")
    ]
    kept = [
        made_at(run / "out.mp4.part", old, True, old),  # a folder: no writer's
        made_at(tmp_path / "dit.safetensors.part", old, False, old),
        tmp_path / "fresh.mp4.part",
    ]
    kept[2].write_bytes(b"being written")
    Mp4Writer(tmp_path / "out.mp4", 16, 16, audio_rate=None).abort()  # (its temp file made beside)
    write_text_atomically(tmp_path / "fresh.mp4", "new")
    save_png(tmp_path / "sheet.png", np.zeros((4, 4, 3), np.uint8))
    write_text_atomically(tmp_path / "report.json", "{}")
    save_checkpoint(SyncNet(), tmp_path / "syncnet.safetensors", "syncnet")
    write_text_atomically(tmp_path / "dit.safetensors", "new")
    write_text_atomically(run / "out.mp4", "new")
    assert [p.name for p in gone if os.path.lexists(p)] == []
    assert all(p.exists() for p in kept)


def test_the_loss_curves_older_fixed_temp_name_is_removed_once_untouched_for_a_day(tmp_path):
    """The first training monitor wrote loss_curves.png through `.loss_curves.tmp.png` (its
    suffix kept for matplotlib): one a killed run left in its run.out stayed there for good, as
    no other writer's fixed name has that shape. A fresh one (a live older writer's) is kept."""
    from distill.monitor import Monitor
    from streamgen.files import ABANDONED_AFTER_S

    old = os.stat(tmp_path).st_mtime - ABANDONED_AFTER_S - 3600
    runs = [tmp_path / "old", tmp_path / "fresh"]
    for out in runs:
        out.mkdir()
    abandoned = made_at(runs[0] / ".loss_curves.tmp.png", old, False, old)
    fresh = runs[1] / ".loss_curves.tmp.png"
    fresh.write_bytes(b"png")
    for out in runs:
        monitor = Monitor(out, total_steps=1, start_step=0, enabled=True, progress=False, desc="test")
        monitor.log(0, {"loss": 0.5})
        assert monitor.plot() == out / "loss_curves.png"
        monitor.close()
    assert not os.path.lexists(abandoned)
    assert fresh.exists()


def test_a_users_folder_named_like_an_older_temp_name_is_kept(tmp_path):
    """The older writers' fixed temp names were files (`.NAME.tmp`, `NAME.tmp`) and one staging
    folder (`.autoencoder.tmp`). A copy of a model folder kept beside it as `NAME.tmp` (cp -a keeps
    its times, so it is a day old at once) is the user's, and was deleted whole by the next export;
    so was a folder `NAME.tmp` beside a file written atomically."""
    from streamgen.files import ABANDONED_AFTER_S, write_text_atomically
    from streamgen.model.config import get_config
    from streamgen.model.model import DiT
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.model_export import save_model
    from streamgen.models import AvatarModel

    old = os.stat(tmp_path).st_mtime - ABANDONED_AFTER_S - 3600
    d = tmp_path / "avatar"
    model = AvatarModel("m", DiT(get_config("debug")).eval(), TinyCausalVAE(4, (8, 16), 4).eval())
    save_model(model, d)
    copies = [tmp_path / "avatar.tmp", tmp_path / ".avatar.tmp", tmp_path / "results.json.tmp"]
    for copy in copies:
        copy.mkdir()
        (copy / "model.json").write_text("{}")
        for p in (copy / "model.json", copy):
            os.utime(p, (old, old))
    save_model(model, d)
    write_text_atomically(tmp_path / "results.json", "{}")
    assert [copy.name for copy in copies if (copy / "model.json").exists()] == [c.name for c in copies]
