"""Every file something reads later or in another process is written whole or not at all
(streamgen.files): dataset shards and manifests, latent caches and banks, training checkpoints,
ODE trajectories, loss curves and logs, eval reports and evaluator checkpoints, the results table,
bench's partial JSON, MP4s; and a model export's folder (streamgen.folders). Each writer below is
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
    from streamgen.data.shards import make_dataset

    out = tmp_path / "world"
    write = lambda i: make_dataset(out, 1, seed=i, height=16, width=16, seconds=0.04, n_identities=10)
    read = lambda path: json.loads(path.read_text())["seed"]
    check_whole_or_not_at_all(monkeypatch, tmp_path, out / "manifest.json", write, read, fresh=True)


def test_a_killed_dataset_make_leaves_no_temp_file_of_its_shards(tmp_path, monkeypatch):
    """A pool's workers are ended by their parent before they can remove their temp files: the
    parent removes them, as it removes the shards."""
    from streamgen.data import shards
    from streamgen.files import new_file_beside

    def killed(path, clips):
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
    from distill.data import bank_path
    from distill.latents import build_latents
    from streamgen.model.config import get_config
    from streamgen.model.vae import TinyCausalVAE

    mcfg = get_config("debug")
    TinyCausalVAE(mcfg.in_channels, temporal_factor=mcfg.temporal_compression).save(tmp_path / "vae")
    cfg = _latents_config(world, tmp_path / "vae")
    path = bank_path(world, "bank", "test")
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
    from distill import checkpoint as ckpt

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

    from streamgen.files import _HOST, write_text_atomically
    from streamgen.folders import new_folder_beside

    target = tmp_path / "dit.safetensors"
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(ended.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".dit.safetensors.{_HOST}-{dead}-abc123.tmp": "gone",
            f".dit.safetensors.{_HOST}-{live.pid}-abc123.tmp": "kept",
            f".dit.safetensors.otherhost-{dead}-abc123.tmp": "kept",
            ".dit.safetensors.0123456789ab.tmp": "kept",
            f".other.safetensors.{_HOST}-{dead}-abc123.tmp": "kept",  # another file's
        }
        for name in names:
            (tmp_path / name).write_bytes(b"weights")
        (tmp_path / f".autoencoder.{_HOST}-{dead}-xyz.tmp").mkdir()  # a staging folder
        write_text_atomically(target, "new")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"dit.safetensors", f".autoencoder.{_HOST}-{dead}-xyz.tmp"} | {
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
         "7d9f8b6c5d-x2k4p'\nimport streamgen.files as f; print(f._HOST)"],
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
    from streamgen.files import _HOST, write_text_atomically

    stray = tmp_path / f".model.json.{_HOST}-99999999999-abc.tmp"
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
    from streamgen.files import _HOST, ABANDONED_AFTER_S, write_text_atomically
    from streamgen.folders import new_folder_beside

    old = os.stat(tmp_path).st_mtime - ABANDONED_AFTER_S - 3600

    def made(name, folder=False, touched=old):
        return made_at(tmp_path / name, old, folder, touched)

    other_namespace = _HOST[:-12] + "0123456789ab"  # this host's name, another PID namespace
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


def test_a_folder_put_in_place_keeps_the_old_folders_permissions(tmp_path):
    """The new folder is made by the writer with the umask's mode: put in the old one's place, a
    model directory kept private (0700) became readable to all, and one shared with a group
    (setgid, group-writable) was no longer writable by the group. It takes the old one's mode."""
    from streamgen.folders import write_folder_atomically

    d = tmp_path / "model"
    d.mkdir()
    (d / "a").write_text("old")
    os.chmod(d, 0o2771)  # (a mode no umask gives a new folder)
    write_folder_atomically(d, lambda new: (new / "a").write_text("new"))
    assert (d / "a").read_text() == "new"
    assert oct(os.stat(d).st_mode & 0o7777) == oct(0o2771)


def _can_be_another_user() -> bool:
    import sys

    return sys.platform.startswith("linux") and hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(not _can_be_another_user(), reason="needs root on Linux, to write as another user")
def test_a_folder_that_cannot_be_exchanged_for_its_permissions_is_written_in_place(tmp_path):
    """In a sticky folder (/tmp, a shared models folder), a user may write in another's folder that
    lets them, but not rename it: the exchange failed with EPERM and so did the export, which
    wrote in place before. Where the exchange is not permitted, the folder is written in place."""
    import shutil
    import tempfile

    from streamgen.folders import write_folder_atomically

    shared = Path(tempfile.mkdtemp())
    try:
        os.chmod(shared, 0o1777)  # sticky, like /tmp
        d = shared / "model"
        d.mkdir()
        os.chmod(d, 0o777)  # root's, writable by all
        (d / "a").write_text("old")
        os.chmod(d / "a", 0o666)

        def write(folder):
            (folder / "a").write_text("new")

        pid = os.fork()
        if pid == 0:  # (the child: as nobody)
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                write_folder_atomically(d, write, in_place=write)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (d / "a").read_text() == "new"
        assert sorted(p.name for p in shared.iterdir()) == ["model"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_folder_beside_which_nothing_can_be_made_is_written_in_place(tmp_path, monkeypatch):
    """A model directory mounted writable in a read-only file system (a container's `--read-only`
    root with a volume at the model's path): no staging folder can be made beside it (EROFS, not a
    PermissionError), and the export failed where it wrote in place before."""
    import errno

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "a").write_text("old")

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path).parent))

    monkeypatch.setattr(folders, "new_folder_beside", read_only)
    folders.write_folder_atomically(
        d, lambda folder: (folder / "a").write_text("new"), in_place=lambda f: (f / "a").write_text("new")
    )
    assert (d / "a").read_text() == "new"


@pytest.mark.skipif(not _can_be_another_user(), reason="needs root on Linux, to mount a file system")
def test_a_mount_point_is_written_in_place_once(tmp_path):
    """A folder that is a mount point (a volume mounted at the model's path) cannot be exchanged
    (EXDEV, EBUSY): the whole export was written into a staging folder on the parent's file system
    (a container's small root: ENOSPC), thrown away, and written again in place. It is written in
    place, once."""
    import subprocess

    from streamgen.folders import write_folder_atomically

    d = tmp_path / "model"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (d / "a").write_text("old")
        written = []

        def write(folder):
            written.append(folder)
            (folder / "a").write_text("new")

        write_folder_atomically(d, write, in_place=write)
        assert (d / "a").read_text() == "new"
        assert written == [d]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_a_file_written_into_the_old_folder_while_the_new_one_is_synced_is_kept(tmp_path, monkeypatch):
    """What the old folder holds is carried into the new one before its files are fsynced (seconds
    for a model's weights): a file another process wrote into the directory meanwhile (a report, a
    sample beside the model) stayed in the old folder, and went with it. The old folder's carried
    entries the new one lacks after the exchange are moved in."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "notes.txt").write_text("kept")
    real = folders._fsync_tree

    def meanwhile(folder):
        (d / "report.json").write_text("written meanwhile")
        return real(folder)

    monkeypatch.setattr(folders, "_fsync_tree", meanwhile)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new" and (d / "notes.txt").read_text() == "kept"
    assert (d / "report.json").read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_carried_file_replaced_in_the_old_folder_while_the_new_one_is_synced_is_kept(tmp_path, monkeypatch):
    """A file already carried into the new folder (hard linked: the old file's inode) and then
    replaced in the old one by a rename (another writer's atomic write) while the new folder is
    fsynced: its new version went with the old folder, and the directory kept the one it replaced.
    Only what the new folder lacked was moved over. A carried file written again in the directory
    after the exchange is that writer's latest, and stays."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    for name in ("report.json", "notes.txt", "log.txt", "kept.txt"):
        (d / name).write_text(f"{name} before")
    (d / "samples").mkdir()
    (d / "samples" / "0.png").write_text("before")
    real_fsync, real_exchange = folders._fsync_tree, folders.exchange

    def replaced(path, text):
        (path.parent / f"{path.name}.writer").write_text(text)
        os.replace(path.parent / f"{path.name}.writer", path)

    def meanwhile(folder):
        for name in ("report.json", "log.txt"):
            replaced(d / name, f"{name} replaced meanwhile")
        (d / "samples.writer").mkdir()  # a folder put in place whole (moved aside, the new one in)
        (d / "samples.writer" / "0.png").write_text("replaced meanwhile")
        os.rename(d / "samples", tmp_path / "samples.old")
        os.rename(d / "samples.writer", d / "samples")
        return real_fsync(folder)

    def then_written_again(a, b):
        done = real_exchange(a, b)
        replaced(d / "log.txt", "log.txt written after the exchange")
        return done

    monkeypatch.setattr(folders, "_fsync_tree", meanwhile)
    monkeypatch.setattr(folders, "exchange", then_written_again)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new"
    assert (d / "report.json").read_text() == "report.json replaced meanwhile"
    assert (d / "log.txt").read_text() == "log.txt written after the exchange"
    assert (d / "samples" / "0.png").read_text() == "replaced meanwhile"
    assert [(d / name).read_text() for name in ("notes.txt", "kept.txt")] == [
        "notes.txt before",
        "kept.txt before",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "samples.old"]


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
    from streamgen.models import AvatarModel, save_model

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
    from streamgen.models import AvatarModel, save_model

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


def test_a_sample_added_to_a_carried_folder_while_it_is_copied_is_kept(tmp_path, monkeypatch):
    """A carried folder (samples/ beside a model) is copied file by file, as listed at the start; a
    file another process adds to it meanwhile is not in the copy. The old folder's version was
    taken after the copy, so the change went unseen and the file went with the old folder."""
    from streamgen import folders

    d = tmp_path / "model"
    (d / "samples").mkdir(parents=True)
    (d / "weights").write_text("old")
    (d / "samples" / "0.png").write_text("first")
    os.utime(d / "samples", (1, 1))  # (its time before the write below, on any clock's grain)
    real = folders._link_copy

    def then_added(src, dst):
        real(src, dst)
        if src.name == "samples":
            (src / "1.png").write_text("added while copied")

    monkeypatch.setattr(folders, "_link_copy", then_added)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new"
    assert sorted(p.name for p in (d / "samples").iterdir()) == ["0.png", "1.png"]


def test_a_file_added_deep_in_a_carried_folder_while_the_new_one_is_synced_is_kept(tmp_path, monkeypatch):
    """A carried folder's version was its own entry's alone: a sample written into a folder inside
    it (samples/run1/) while the new folder was fsynced changed no time of samples/ itself, and went
    with the old folder."""
    from streamgen import folders

    d = tmp_path / "model"
    (d / "samples" / "run1").mkdir(parents=True)
    (d / "weights").write_text("old")
    (d / "samples" / "run1" / "0.png").write_text("first")
    real = folders._fsync_tree

    def meanwhile(folder):
        (d / "samples" / "run1" / "1.png").write_text("written meanwhile")
        return real(folder)

    monkeypatch.setattr(folders, "_fsync_tree", meanwhile)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new"
    assert sorted(p.name for p in (d / "samples" / "run1").iterdir()) == ["0.png", "1.png"]


def test_an_entry_gone_from_the_old_folder_while_it_is_carried_fails_no_export(tmp_path, monkeypatch):
    """What the old folder holds is listed, then carried entry by entry: one removed meanwhile (a
    tool's transient file renamed to its final name, a note deleted) made the link and the copy
    fail, and with them the whole export, its weights written for nothing."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "report.json.part").write_text("being written")
    (d / "notes.txt").write_text("kept")
    (d / "samples").mkdir()
    for name in ("0.png", "1.png"):
        (d / "samples" / name).write_text(name)
    real_link = os.link

    def link(src, dst, *args, **kwargs):
        if os.fspath(src) == str(d / "samples" / "1.png"):  # deleted as the folder is copied
            os.unlink(src)
        return real_link(src, dst, *args, **kwargs)

    def carry(name: str) -> bool:
        if name == "report.json.part" and (d / name).exists():  # its writer renames it just now
            os.replace(d / name, d / "report.json")
        return name != "weights"

    monkeypatch.setattr(os, "link", link)
    folders.write_folder_atomically(d, lambda new: (new / "weights").write_text("new"), carry=carry)
    assert (d / "weights").read_text() == "new" and (d / "notes.txt").read_text() == "kept"
    assert (d / "report.json").read_text() == "being written"
    assert [p.name for p in (d / "samples").iterdir()] == ["0.png"]


def test_a_folder_that_cannot_be_exchanged_is_written_once(tmp_path, monkeypatch):
    """Where the folder could not be exchanged (not Linux, overlayfs' lower layers), the export
    written into the staging folder was thrown away and written again into the folder in place:
    a model's weights written twice. The staged files are moved in, one rename each."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "stale").write_text("the old export's, which the new one lacks")
    (d / "notes.txt").write_text("kept")
    written = []

    def write(folder):
        written.append(folder)
        (folder / "weights").write_text("new")
        (folder / "config.json").write_text("new")

    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    folders.write_folder_atomically(d, write, carry=lambda name: name == "notes.txt", in_place=write)
    assert len(written) == 1
    assert (d / "weights").read_text() == "new" and (d / "config.json").read_text() == "new"
    assert (d / "notes.txt").read_text() == "kept" and not (d / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_whose_file_by_file_export_was_cut_short_is_refused_clearly(tmp_path):
    """A writer killed between two renames of a file-by-file export (no exchange) left one
    export's config beside the other's weights, which a reader loaded as one model (or failed on
    with an error about neither). A reader is told the export was cut short."""
    import subprocess
    import sys

    from streamgen.folders import read_folder

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "config.json").write_text("old")
    code = f"""
import os
import streamgen.folders as folders
folders.exchange = lambda a, b: False
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if os.path.basename(dst) == "weights":
        os._exit(9)  # (killed: the new weights in place, the old config beside them)
os.replace = replace
def write(folder):
    (folder / "weights").write_text("new")
    (folder / "config.json").write_text("new")
folders.write_folder_atomically({str(d)!r}, write)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    assert done.returncode == 9 and (d / "weights").read_text() == "new"

    def read(folder):
        return (folder / "config.json").read_text(), (folder / "weights").read_text()

    with pytest.raises(Exception, match="cut short") as refused:  # (not the mix, ("old", "new"))
        read_folder(d, read)
    assert type(refused.value).__name__ == "ExportUnderWay"


def test_a_folder_written_in_place_by_a_writer_that_failed_before_changing_it_still_reads(
    tmp_path, monkeypatch
):
    """A writer into the folder itself (no staging folder beside it: a read-only root's volume)
    that fails before its first rename (a full disk) leaves the folder whole: it is read, not
    refused as an export cut short. One that fails after it is refused."""
    import errno

    from streamgen import files, folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "a").write_text("old")
    (d / "b").write_text("old")

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path).parent))

    def disk_full_after(renames):
        def in_place(folder):
            for name in ("a", "b")[:renames]:
                files.write_text_atomically(folder / name, "new")
            raise OSError(errno.ENOSPC, "No space left on device")

        return in_place

    def read(folder):
        return (folder / "a").read_text(), (folder / "b").read_text()

    monkeypatch.setattr(folders, "new_folder_beside", read_only)
    with pytest.raises(OSError, match="No space"):
        folders.write_folder_atomically(d, lambda f: None, in_place=disk_full_after(0))
    assert folders.read_folder(d, read) == ("old", "old")
    with pytest.raises(OSError, match="No space"):
        folders.write_folder_atomically(d, lambda f: None, in_place=disk_full_after(1))
    with pytest.raises(folders.ExportUnderWay, match="cut short"):
        folders.read_folder(d, read)


def test_a_folder_put_in_place_whole_leaves_an_older_export_stamp_behind(tmp_path, monkeypatch):
    """A folder once written file by file holds the stamp of that export; exchanged whole later,
    the new folder is the writer's alone: the old stamp is not carried into it."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    with monkeypatch.context() as m:
        m.setattr(folders, "exchange", lambda a, b: False)
        folders.write_folder_atomically(d, lambda new: (new / "weights").write_text("first"))
    assert (d / folders.EXPORT_STAMP).exists()
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("second"), carry=lambda n: True
    )
    assert sorted(p.name for p in d.iterdir()) == ["weights"]
    assert folders.read_folder(d, lambda f: (f / "weights").read_text()) == "second"


def test_two_exports_into_a_folder_file_by_file_at_once_are_refused_clearly(tmp_path, monkeypatch):
    """Two exports written into one folder file by file at the same time (no exchange) interleave
    their renames, and the last to finish marked the folder whole: a reader got one export's
    config beside the other's weights. A folder two exports went into at once is refused."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    for name in ("weights", "config.json"):
        (d / name).write_text("old")
    real_move_over, second = folders.move_over, []

    def another_export_meanwhile(src, dst, trash):
        if not second:  # (the first export's first rename done, the second export runs whole)
            second.append(dst)
            real_move_over(src, dst, trash)
            folders.write_folder_atomically(
                d, lambda new: [(new / n).write_text("second") for n in ("weights", "config.json")]
            )
            return
        real_move_over(src, dst, trash)

    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(folders, "move_over", another_export_meanwhile)
    folders.write_folder_atomically(
        d, lambda new: [(new / n).write_text("first") for n in ("weights", "config.json")]
    )
    monkeypatch.undo()
    assert second and [(d / n).read_text() for n in ("weights", "config.json")] == ["second", "first"]
    with pytest.raises(Exception, match="at the same time") as refused:  # (not the mix)
        folders.read_folder(d, lambda f: [(f / n).read_text() for n in ("weights", "config.json")])
    assert type(refused.value).__name__ == "ExportUnderWay"


def test_an_export_after_another_hosts_unfinished_one_says_so_and_the_next_export_is_whole(tmp_path, monkeypatch):
    """A "writing" stamp of a process on another host (a container killed mid-export) cannot be
    told dead: readers wait for it, and the export after it cannot tell whether they overlapped.
    That export ends "cut short" with that reason (it said "another export went into it at the
    same time", which had not happened); the next one is whole."""
    import json

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("old")
    (d / folders.EXPORT_STAMP).write_text(json.dumps({"export": "x", "host": "elsewhere", "pid": 1, "state": "writing"}))
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(folders, "READ_AGAIN_AFTER_S", 0.0)

    def read(f):
        return (f / "config.json").read_text()

    with pytest.raises(folders.ExportUnderWay, match="being written.*another host"):
        folders.read_folder(d, read)
    folders.write_folder_atomically(d, lambda new: (new / "config.json").write_text("new"))
    with pytest.raises(folders.ExportUnderWay, match="process 1 on another host was under way or cut short"):
        folders.read_folder(d, read)
    folders.write_folder_atomically(d, lambda new: (new / "config.json").write_text("newer"))
    assert folders.read_folder(d, read) == "newer"
