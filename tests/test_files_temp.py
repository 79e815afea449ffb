"""The temp files streamgen.files' writers leave when they are killed: the next writer of the same
file removes those whose writer has ended, and those of older writers' names once untouched for a
day, and no other (a live writer's, another host's, a user's folder); the writers themselves:
tests/test_files.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


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
