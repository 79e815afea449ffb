"""`streamgen data make` stopped and run again: what a stop keeps, what the same command goes on from, and the
makes it refuses (another speech engine's clips, a folder it cannot write)."""

import json

import pytest

from streamgen.cli import main
from streamgen.data.manifest import load_manifest
from streamgen.data.shards import DataError


def test_a_make_that_cannot_write_is_one_line_and_keeps_finished_shards(tmp_path, capsys, monkeypatch):
    """A --out no folder can be made in (/proc) and a disk that fills while the shards are written
    were tracebacks (FileNotFoundError from mkdir; the OSError of the shard's write, after the
    clean-up). Each is one line naming the folder; the shards finished before are kept for the run
    that goes on (partial.json), no other is left, and no folder made for nothing."""
    import errno

    from streamgen.data import shards

    argv = ["data", "make", "--clips", "3", "--size", "32", "--seconds", "0.4", "--workers", "1",
            "--identities", "20"]  # fmt: skip
    assert main([*argv, "--out", "/proc/streamgen-data"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (  # (after the progress bar's lines)
        "streamgen data make: error: cannot write the dataset into /proc/streamgen-data: No such file or directory"
    )
    written = shards._write_shard
    full_at = ["val"]

    def fills_the_disk(path, clips, *made_for):
        if path.parent.name in full_at:  # (after the train shards are written)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written(path, clips, *made_for)

    monkeypatch.setattr(shards, "_write_shard", fills_the_disk)
    out = tmp_path / "ds"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = f"cannot write the dataset into {out}: No space left on device (1 clip made so far kept: run"
    assert said in err
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.npz")] == ["train/shard-00000.npz"]
    assert not (out / "manifest.json").exists() and not (out / "val").exists()
    full_at[:] = ["train", "val", "test"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")  # a folder the user made: kept, with what is theirs
    assert main([*argv, "--out", str(mine)]) == 2
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    capsys.readouterr()
    full_at[:] = []  # space freed: the same command goes on from the shard kept
    assert main([*argv, "--out", str(out)]) == 0
    assert "1 of them made before" in capsys.readouterr().out
    assert load_manifest(out)["splits"]["train"]["clips"] == 1 and not (out / "partial.json").exists()


def a_make_under_way(out):
    """`data make` of 400 clips into `out` on 2 workers, in a process group of its own, once its
    first shard is recorded."""
    import subprocess
    import sys
    import time

    argv = ["data", "make", "--out", str(out), "--clips", "400", "--size", "32", "--seconds", "2",
            "--shard-size", "2", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "streamgen", *argv], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        for _ in range(1200):  # (the workers' imports: seconds)
            if (out / "partial.json").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the make ended before it could be stopped"
    except BaseException:
        proc.kill()
        raise
    return proc


@pytest.mark.slow
def test_a_ctrl_c_is_one_line_not_a_traceback_per_worker(tmp_path):
    """A Ctrl-C goes to the terminal's whole process group: each pool worker printed its
    KeyboardInterrupt's traceback ('Process SpawnPoolWorker-1: Traceback ...') over what the
    command said. The workers leave it to the command, which stops them."""
    import os
    import signal

    proc = a_make_under_way(tmp_path / "ds")
    try:
        os.killpg(proc.pid, signal.SIGINT)  # (as a terminal's Ctrl-C: the whole group)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "made so far kept in" in err


def test_an_interrupted_make_is_gone_on_from_by_the_same_command(tmp_path, capsys, monkeypatch):
    """A Ctrl-C (or a kill -9) removed every shard written, and the make was done again from the
    first clip: the shards finished are kept (partial.json records them) and the same command makes
    only the others, the same dataset, byte for byte, as one made in one go. Other settings are
    refused, not mixed in; two makes at once into one folder are refused too."""
    import fcntl
    import os

    from streamgen.data import shards

    argv = ["data", "make", "--clips", "6", "--size", "16", "--seconds", "0.2", "--shard-size", "2",
            "--workers", "1", "--identities", "20"]  # fmt: skip
    whole, out = tmp_path / "whole", tmp_path / "ds"
    assert main([*argv, "--out", str(whole)]) == 0
    written, made = shards._write_shard, []

    def interrupted(path, clips, *made_for):
        if len(made) == 2:
            raise KeyboardInterrupt
        written(path, clips, *made_for)
        made.append(path)

    monkeypatch.setattr(shards, "_write_shard", interrupted)
    assert main([*argv, "--out", str(out)]) == 130
    assert "4 clips made so far kept in" in capsys.readouterr().err
    assert sorted(out.rglob("*.npz")) == sorted(made) and not (out / "manifest.json").exists()
    refused = main([*argv, "--seed", "1", "--clips", "5", "--out", str(out)])
    assert refused == 2 and sorted(out.rglob("*.npz")) == sorted(made)
    err = capsys.readouterr().err
    assert "partly made with other settings (--seed 0 there, 1 now, --clips 6 there, 5 now)" in err
    fd = os.open(out, os.O_RDONLY)  # another make writing there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main([*argv, "--out", str(out)]) == 2
        assert f"another `data make` is writing into {out}" in capsys.readouterr().err
    finally:
        os.close(fd)
    with pytest.raises(DataError, match=r"did not finish \(4 clips made, in .*partial.json\); run it again"):
        load_manifest(out)  # (said 'no manifest.json; run `streamgen data make`', as of any folder)
    made.pop().unlink()  # a kept shard deleted since: made again, and not counted as made before
    made.clear()
    monkeypatch.setattr(shards, "_write_shard", lambda path, *clips: (made.append(path), written(path, *clips)))
    assert main([*argv, "--out", str(out)]) == 0
    assert "2 of them made before" in capsys.readouterr().out and len(made) == 3  # (of 4 shards)
    for path in whole.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (out / path.relative_to(whole)).read_bytes(), path
    assert not (out / "partial.json").exists()


def test_a_sigterm_that_failed_an_import_says_what_make_kept(tmp_path, monkeypatch, capsys):
    """A SIGTERM that came while an extension imported failed that import (an ImportError caused by
    it): the make ended as the stop, 143, without its line saying the clips made so far are kept."""
    from streamgen.cli import Terminated
    from streamgen.data import shards

    written, made = shards._write_shard, []

    def stopped(path, clips, *made_for):
        if made:
            raise ImportError("initialization failed") from Terminated(15)
        written(path, clips, *made_for)
        made.append(path)

    monkeypatch.setattr(shards, "_write_shard", stopped)
    out = tmp_path / "ds"
    with pytest.raises(SystemExit) as ended:
        main(["data", "make", "--clips", "4", "--size", "16", "--seconds", "0.2", "--shard-size", "2",
              "--workers", "1", "--identities", "20", "--out", str(out)])  # fmt: skip
    assert ended.value.code == 143 and sorted(out.rglob("*.npz")) == made
    assert f"data make: 2 clips made so far kept in {out}: run the same command again" in capsys.readouterr().err


def test_a_make_going_on_from_an_older_makes_shards_is_the_dataset_made_in_one_go(tmp_path, monkeypatch):
    """The shards an older streamgen recorded in partial.json have no made_for member: going on
    from them made a dataset that mixed shards with and without it, not the same, byte for byte, as
    one made in one go (nor its shards those of a make of more clips, whose cached latents are kept)."""
    from streamgen.data import shards

    argv = ["data", "make", "--clips", "6", "--size", "16", "--seconds", "0.2", "--shard-size", "2",
            "--workers", "1", "--identities", "20"]  # fmt: skip
    whole, out = tmp_path / "whole", tmp_path / "ds"
    assert main([*argv, "--out", str(whole)]) == 0
    written, made = shards._write_shard, []

    def older(path, clips, made_for=None):  # (as an older make wrote them, stopped after two)
        if len(made) == 2:
            raise KeyboardInterrupt
        written(path, clips)
        made.append(path)

    monkeypatch.setattr(shards, "_write_shard", older)
    assert main([*argv, "--out", str(out)]) == 130
    assert len(made) == 2 and (out / "partial.json").exists()
    monkeypatch.setattr(shards, "_write_shard", written)
    assert main([*argv, "--out", str(out)]) == 0
    for path in whole.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (out / path.relative_to(whole)).read_bytes(), path


def test_a_finished_make_run_again_by_another_speech_engine_is_refused(tmp_path, monkeypatch, capsys):
    """A finished dataset made under one espeak-ng, its make run again under another, said it held
    "this dataset, made with these settings: nothing to do", though the clips this one speaks are not
    those (the manifest recorded no engine). The manifest records it; another engine's is refused,
    the make's own still has nothing to do (and one that records none is taken as its)."""

    from streamgen.data import speech

    out = tmp_path / "ds"
    argv = ["data", "make", "--clips", "3", "--size", "16", "--seconds", "0.04", "--shard-size", "2",
            "--workers", "1", "--identities", "20", "--out", str(out)]  # fmt: skip
    engine, other = speech.engine_version(), "espeak-ng 1.49 (espeakng-loader not installed)"
    monkeypatch.setattr(speech, "engine_version", lambda: other)
    assert main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["speech"] == other
    monkeypatch.setattr(speech, "engine_version", lambda: engine)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"holds this dataset spoken by another speech engine ({other} there, {engine} now)" in err, err
    monkeypatch.setattr(speech, "engine_version", lambda: other)
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["speech"]  # (as an older make wrote it)
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(speech, "engine_version", lambda: engine)
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out


def test_the_same_make_run_again_once_finished_has_nothing_to_do(tmp_path, monkeypatch, capsys):
    """A make stopped as it ended (its manifest written, "interrupted" said) and run again, as one
    goes on from a stopped make, was refused: "already holds a dataset; choose another --out or
    delete it", the finished dataset to be deleted. Another make's dataset is refused still."""
    from streamgen.data import shards

    argv = ["data", "make", "--clips", "5", "--size", "16", "--seconds", "0.2", "--shard-size", "2",
            "--workers", "1", "--identities", "20", "--out", str(tmp_path / "ds")]  # fmt: skip
    written = shards._write_manifest

    def stopped(*args):
        written(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_write_manifest", stopped)
    assert main(argv) == 130
    monkeypatch.setattr(shards, "_write_manifest", written)
    before = {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'ds'} already holds this dataset (5 clips), made with")
    assert {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()} == before
    for other in (["--seed", "1"], ["--shard-size", "3"], ["--clips", "6"]):
        assert main([*argv, *other]) == 2
        assert "already holds a dataset (manifest.json); choose another --out" in capsys.readouterr().err


def test_a_make_partly_made_by_another_speech_engine_is_refused_not_mixed(tmp_path, monkeypatch, capsys):
    """The clips are spoken by espeak-ng (the pip package's library or the system's): a make stopped
    before it changed went on after, its dataset's clips spoken by two without a word."""
    from streamgen.data import shards, speech

    argv = ["data", "make", "--clips", "4", "--size", "16", "--seconds", "0.2", "--shard-size", "2",
            "--workers", "1", "--identities", "20", "--out", str(tmp_path / "ds")]  # fmt: skip
    written, made = shards._write_shard, []

    def stopped(path, *rest):
        if made:
            raise KeyboardInterrupt
        written(path, *rest)
        made.append(path)

    monkeypatch.setattr(shards, "_write_shard", stopped)
    assert main(argv) == 130
    monkeypatch.setattr(shards, "_write_shard", written)
    engine = speech.engine_version()
    monkeypatch.setattr(speech, "engine_version", lambda: "espeak-ng 1.49 (espeakng-loader not installed)")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"partly made by another speech engine ({engine} there, espeak-ng 1.49 (espeakng-loader" in err, err
    assert sorted((tmp_path / "ds").rglob("*.npz")) == made  # (kept, for the engine that made them)
    monkeypatch.setattr(speech, "engine_version", lambda: engine)
    assert main(argv) == 0 and "2 of them made before" in capsys.readouterr().out


def test_a_partial_json_the_system_will_not_read_is_not_said_to_be_deleted(tmp_path, monkeypatch):
    """No permission or an I/O error on partial.json was "unreadable (...); delete it, or DIR, to make
    the dataset again": the record of the shards made so far, or the dataset, deleted for a
    permission or a disk to look at."""
    import errno
    from pathlib import Path

    from streamgen.data.shards import make_dataset

    out = tmp_path / "ds"
    out.mkdir()
    (out / "partial.json").write_text("{}\n")
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == out / "partial.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(DataError) as refused:
        make_dataset(out, 4, height=16, width=16, seconds=0.04, shard_size=2, n_identities=20)
    assert str(refused.value) == f"cannot read {out / 'partial.json'}: Permission denied"
