"""`streamgen data make` of many clips: what it holds in memory stays that of a few shards."""

import json

import pytest

from streamgen.data import pool as pool_module
from streamgen.data import shards
from streamgen.data.shards import make_dataset


class Stop(Exception):
    pass


TINY = dict(height=16, width=16, seconds=0.04, n_identities=20)  # a make's smallest clips: 16x16, a frame


def stop_at(shard: int):
    """A make's `progress` that stops it (raises Stop) as its `shard`th shard is finished."""
    finished = []

    def progress(clips):
        finished.append(clips)
        if len(finished) == shard:
            raise Stop

    return progress


def test_the_plan_of_a_huge_make_is_walked_as_its_shards_are_made(tmp_path, monkeypatch):
    """`--clips 100000000` built its whole plan (every clip's index, in lists) before its first clip:
    about 5 GB and a minute. The plan is walked as the shards are made."""
    walked = []
    split_of = shards.clip_split

    def walking(i):
        walked.append(i)
        if len(walked) > 1000:
            raise AssertionError("the plan was walked far ahead of the shards made")
        return split_of(i)

    def first_shard(path, clips, *made_for):
        raise Stop

    monkeypatch.setattr(shards, "clip_split", walking)
    monkeypatch.setattr(shards, "_write_shard", first_shard)
    with pytest.raises(Stop):
        make_dataset(tmp_path / "ds", 10**12, height=16, width=16, seconds=0.04, shard_size=2)
    assert len(walked) < 10


def test_the_plan_cuts_each_split_into_shards_in_order():
    plan = shards.plan_shards(23, 3)
    assert iter(plan) is plan  # (lazy)
    by_split = {}
    for split, k, indices in plan:
        assert k == len(by_split.setdefault(split, []))
        by_split[split].append(indices)
    assert by_split["test"] == [[0, 10, 20]] and by_split["val"] == [[1, 11, 21]]
    assert sum(by_split["train"], []) == [i for i in range(23) if i % 10 > 1]
    assert [len(s) for s in by_split["train"]] == [3, 3, 3, 3, 3, 2]
    for n, size in [(23, 3), (1, 5), (2, 1), (20, 2), (0, 4)]:
        counts = {s: 0 for s in ("train", "val", "test")}
        for split, _, _ in shards.plan_shards(n, size):
            counts[split] += 1
        assert shards.planned_shards(n, size) == counts


def test_a_pool_is_handed_jobs_as_it_finishes_them():
    """The pool was handed every job of the plan up front."""
    from multiprocessing.pool import ThreadPool

    drawn = []

    def jobs():
        for i in range(200):
            drawn.append(i)
            yield i

    with ThreadPool(2) as pool:
        results = pool_module.results_as_done(pool, abs, jobs(), ahead=4)
        first = [next(results) for _ in range(3)]
        assert len(drawn) <= 4 + 2
        assert sorted(first + list(results)) == list(range(200))

        def fails(job):
            if job == 5:
                raise Stop
            return job

        with pytest.raises(Stop):
            list(pool_module.results_as_done(pool, fails, range(10), ahead=3))


def test_a_shard_holds_one_clip_in_memory_at_a_time(tmp_path, monkeypatch):
    """A shard's clips were all made first and held together until it was written (32 clips of
    256x256 and 4 s: 800 MB); each is written as it is made, and let go. The file is the one
    np.savez_compressed writes."""
    import weakref

    import numpy as np

    from streamgen.data.shards import make_clip

    alive, most = set(), [0]

    def made(*args):
        clip = make_clip(*args)
        alive.add(id(clip))
        weakref.finalize(clip, alive.discard, id(clip))
        most[0] = max(most[0], len(alive))
        return clip

    monkeypatch.setattr(shards, "make_clip", made)
    path = tmp_path / "shard.npz"
    info = shards._make_shard((0, [2, 3, 4], "train", str(path), 16, 16, 0.2, 20))
    assert info["clips"] == 3 and most[0] == 1
    with np.load(path) as written:
        arrays = {name: written[name] for name in written.files}
    assert list(arrays)[:5] == [f"0000.{m}" for m in ("video", "audio", "reference", "motion", "meta")]
    assert json.loads(arrays["0002.meta"].tobytes())["index"] == 4
    np.savez_compressed(tmp_path / "saved.npz", **arrays)
    assert path.read_bytes() == (tmp_path / "saved.npz").read_bytes()


def _one_clip_for_all(monkeypatch):
    """Every clip the same small one (made once): for tests of the shards' bookkeeping."""
    clip = shards.make_clip(0, 2, "train", 16, 16, 0.04, 20)
    monkeypatch.setattr(shards, "make_clip", lambda *args: clip)


def test_partial_json_is_appended_to_as_each_shard_is_finished(tmp_path, monkeypatch):
    """partial.json was written again, whole, for every shard finished: 3000 shards wrote 900 MB and
    the make took 2.5 times as long as the same clips in 3 shards. It is written once, then
    appended to; a rerun reads it, a last line cut short (a kill while it was appended) included."""
    import os

    _one_clip_for_all(monkeypatch)
    out = tmp_path / "ds"
    files = []

    def finished(clips):
        files.append(os.stat(out / "partial.json").st_ino)
        if len(files) == 6:
            raise Stop

    with pytest.raises(Stop):
        make_dataset(out, 40, shard_size=2, **TINY, progress=finished)
    assert len(set(files)) == 1  # (one file: appended to, not written anew)
    lines = (out / "partial.json").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["settings"]["clips"] == 40
    assert shards.partly_made(out) == 12
    with open(out / "partial.json", "a") as partial:
        partial.write(lines[-1][:20])  # a kill while a line was appended
    assert shards.partly_made(out) == 12
    made = []
    write = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", lambda path, *clips: (made.append(path), write(path, *clips)))
    manifest = make_dataset(out, 40, shard_size=2, **TINY)
    assert len(made) == 20 - 6 and sum(v["clips"] for v in manifest["splits"].values()) == 40
    assert not (out / "partial.json").exists()


def test_an_older_makes_partial_json_is_gone_on_from(tmp_path, monkeypatch):
    """partial.json as makes before wrote it: one JSON object, rewritten for each shard."""
    _one_clip_for_all(monkeypatch)
    out = tmp_path / "ds"
    with pytest.raises(Stop):
        make_dataset(out, 8, shard_size=2, **TINY, progress=stop_at(1))
    settings, records = shards._read_partial(out / "partial.json")
    (out / "partial.json").write_text(json.dumps({"settings": settings, "shards": records}, indent=1))
    assert shards.partly_made(out) == 2
    made = []
    write = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", lambda path, *clips: (made.append(path), write(path, *clips)))
    make_dataset(out, 8, shard_size=2, **TINY)
    assert len(made) == 5 - 1  # (of 5 shards: train 3, val 1, test 1)
    (out / "manifest.json").unlink()
    (out / "partial.json").write_text('{"settings": {"seed": 0}}\n{"file": "train/sh')
    with pytest.raises(shards.DataError, match="other settings"):
        make_dataset(out, 8, shard_size=2, **TINY)
    (out / "partial.json").write_text('{"settings": {"seed": 0}}\n{"file": \n{"file": "x"}\n')
    with pytest.raises(shards.DataError, match="partial.json: unreadable"):
        make_dataset(out, 8, shard_size=2, **TINY)


@pytest.mark.parametrize("edited", ["5", "[1]", '{"file": "train/shard-00000.npz"}'])
def test_an_edited_partial_json_is_one_error_naming_it(tmp_path, monkeypatch, edited):
    """A partial.json whose settings or a shard's line is not an object of theirs (edited by hand)
    was an AttributeError's or a TypeError's traceback from the next `data make`."""
    _one_clip_for_all(monkeypatch)
    out = tmp_path / "ds"
    with pytest.raises(Stop):
        make_dataset(out, 8, shard_size=2, **TINY, progress=stop_at(1))
    settings, _ = shards._read_partial(out / "partial.json")
    first = json.dumps({"settings": 5 if edited == "5" else settings})
    (out / "partial.json").write_text(first + "\n" + ("" if edited == "5" else edited + "\n"))
    with pytest.raises(shards.DataError, match="partial.json: unreadable"):
        make_dataset(out, 8, shard_size=2, **TINY)
    assert shards.partly_made(out) == 0


def test_a_make_with_workers_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    """Each pool worker's espeak-ng data view (a temp folder of 244 files) was left behind: the pool's
    exit terminated its workers (SIGTERM), which ran no clean-up."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # (the spawned workers' temp folder)
    make_dataset(tmp_path / "ds", 2, shard_size=1, **TINY, workers=2)
    assert list(temp.iterdir()) == []


def test_an_interrupted_make_with_workers_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    """A make interrupted (Ctrl-C, SIGTERM, a worker killed) terminates its pool's workers, which run
    no clean-up: each left its espeak-ng data view (a temp folder of 244 files) behind."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # (the spawned workers' temp folder)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # (and this process's)
    with pytest.raises(Stop):
        make_dataset(tmp_path / "ds", 20, shard_size=1, **TINY, workers=2, progress=stop_at(1))
    assert list(temp.iterdir()) == []


def test_the_manifest_lists_a_splits_shards_in_the_order_of_their_numbers(tmp_path):
    """By name, shard-100000 came before shard-10001: a split of more than 100000 shards (a million
    clips in shards of 8) read its clips out of order."""
    from streamgen.data.manifest import _write_manifest

    settings = {"seed": 0, "clips": 10, "height": 16, "width": 16, "seconds": 1.0, "identities": 20,
                "speech": "espeak-ng 1.52"}  # (a make's settings)
    numbers = [100000, 9999, 10001, 0, 99999, 100001]
    written = [{"file": shards.shard_file("train", k), "clips": 1} for k in numbers]
    written.append({"file": shards.shard_file("val", 3), "clips": 1})
    manifest = _write_manifest(tmp_path, settings, written)
    listed = [shard["file"] for shard in manifest["splits"]["train"]["shards"]]
    assert listed == [shards.shard_file("train", k) for k in sorted(numbers)]
    assert [shard["file"] for shard in manifest["splits"]["val"]["shards"]] == ["val/shard-00003.npz"]


def _ends_its_process(job):
    import os

    if job == 3:
        os._exit(9)  # (as a worker the out-of-memory killer ends)
    return job


def test_a_make_whose_worker_is_killed_says_so_and_does_not_wait_for_ever(monkeypatch):
    """A pool worker killed (the out-of-memory killer, a kill -9) took its job with it: the pool
    started another worker, and the make waited for that job's shard for ever."""
    import multiprocessing
    import threading

    monkeypatch.setattr(pool_module, "WORKER_CHECK_S", 0.05)
    outcome = []

    def consume(pool, processes):
        try:
            results = pool_module.results_as_done(pool, _ends_its_process, range(8), ahead=4, processes=processes)
            outcome.append(sorted(results))
        except shards.DataError as e:
            outcome.append(e)

    import time

    fork = multiprocessing.get_context("fork")
    other = fork.Process(target=time.sleep, args=(60,))
    other.start()
    before = pool_module.pool_processes()
    with fork.Pool(2) as pool:
        processes = pool_module.pool_processes() - before
        assert len(processes) == 2 and other.pid not in processes
        other.kill()  # a child of the caller's, not the pool's, that ends: none of the make's
        other.join()
        results = pool_module.results_as_done(pool, time.sleep, [0.2] * 4, ahead=2, processes=processes)
        assert list(results) == [None] * 4
        waiting = threading.Thread(target=consume, args=(pool, processes), daemon=True)
        waiting.start()
        waiting.join(120)  # (a bound on the hang, not a time asserted)
        assert not waiting.is_alive(), "still waiting for the killed worker's job"
    assert isinstance(outcome[0], shards.DataError), outcome
    assert "ended before its shard was finished" in str(outcome[0]) and "run the same command again" in str(
        outcome[0]
    )


def test_a_make_starts_no_more_workers_than_shards_to_make(tmp_path, monkeypatch, capsys):
    """`--clips 3 --workers 8` started 8 processes (each importing torch) for 3 shards, and said the
    speed was that of 8 workers."""
    import multiprocessing
    from multiprocessing.pool import ThreadPool

    from streamgen.cli import main

    sizes = []

    class Context:
        def Pool(self, processes, initializer=None, initargs=()):
            sizes.append(processes)
            return ThreadPool(processes)

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: Context())
    argv = ["data", "make", "--clips", "3", "--size", "16", "--seconds", "0.04", "--identities", "20"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--workers", "8"]) == 0  # (a shard a split)
    assert sizes == [3] and "with 3 workers" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "b"), "--workers", "8", "--clips", "1"]) == 0
    assert sizes == [3] and "with 1 worker\n" in capsys.readouterr().out  # (made in this process)


def test_a_make_gone_on_from_says_the_workers_it_used(tmp_path, capsys):
    """A make with one shard left to make said "with 2 workers" (of --workers 2) and made it in one."""
    from streamgen.cli import main

    out = tmp_path / "ds"
    with pytest.raises(Stop):  # (2 of its 3 shards made: a split's each)
        make_dataset(out, 3, shard_size=1, **TINY, progress=stop_at(2))
    argv = ["data", "make", "--out", str(out), "--clips", "3", "--size", "16", "--seconds", "0.04"]
    assert main([*argv, "--identities", "20", "--shard-size", "1", "--workers", "2"]) == 0
    assert "2 of them made before" in (said := capsys.readouterr().out) and "with 1 worker\n" in said, said


@pytest.mark.parametrize(
    "seconds, said",
    [("1e7", "10000000 s at 16x16 (179 GiB of frames"), ("1e9", "1000000000 s at 16x16 (17881 GiB of frames")],
)
def test_clips_too_long_for_the_memory_are_one_line(tmp_path, monkeypatch, capsys, seconds, said):
    """`--seconds 1e7` was numpy's MemoryError traceback ('Unable to allocate 596. GiB'); then a line
    that said '1e+07 s' and, longer, '1.79e+04 GiB': plain numbers, as the user would write them."""
    from streamgen.cli import main

    def too_long(*args):
        raise MemoryError("Unable to allocate 596. GiB for an array with shape (160000000000,)")

    monkeypatch.setattr(shards, "make_clip", too_long)
    out = tmp_path / "ds"
    argv = [
        "data",
        "make",
        "--out",
        str(out),
        "--clips",
        "1",
        "--size",
        "16",
        "--seconds",
        seconds,
        "--workers",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"not enough memory to make clips of {said}" in err.splitlines()[-1]
    assert not out.exists()


@pytest.mark.slow
def test_a_make_sent_sigterm_ends_as_a_ctrl_c_does(tmp_path):
    """SIGTERM (`timeout`, `kill`, a job scheduler) ended the command's process alone: its pool's
    workers went on with their shards, unrecorded, and each printed a traceback when it found its
    parent gone. It ends as a Ctrl-C does: the workers stopped, the shards finished kept, exit 143."""
    import os
    import signal
    import time

    from test_data_make_resume import a_make_under_way

    proc = a_make_under_way(tmp_path / "ds")
    try:
        os.kill(proc.pid, signal.SIGTERM)  # (the command's process alone, as `timeout` does)
        err = proc.communicate(timeout=120)[1]
        for _ in range(1200):  # (its workers, in its process group: gone with it)
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the make's workers outlived it")
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "made so far kept in" in err


def test_the_speed_of_a_make_of_short_clips_is_not_said_to_be_0(tmp_path, monkeypatch, capsys):
    """Clips of 0.04 s count a hundredth of a clip of 4 s each: a make of a few said 'speed: 0 clips
    of 4 s per minute'."""
    from streamgen.cli import main
    from streamgen.data import cli

    monkeypatch.setattr(cli, "clips_of_4s_per_minute", lambda *args: 0.2934)
    argv = ["data", "make", "--clips", "1", "--size", "16", "--seconds", "0.04", "--identities", "20"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "speed: 0.29 clips of 4 s per minute at 16x16 with 1 worker\n" in capsys.readouterr().out
    monkeypatch.setattr(cli, "clips_of_4s_per_minute", lambda *args: 181.6)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert "speed: 182 clips of 4 s per minute" in capsys.readouterr().out


@pytest.mark.parametrize(
    "per_minute, said",
    [(1e-05, "0.00001"), (1.234e-05, "0.000012"), (0.0004567, "0.00046"), (9.96, "10"), (3.0, "3")],
)
def test_the_speed_of_a_very_slow_make_is_said_in_plain_decimals(tmp_path, monkeypatch, capsys, per_minute, said):
    """Below 10 clips a minute the speed was printed with two significant digits in Python's general
    format, which turns to scientific notation under 0.0001: a make of long clips on a slow machine
    said 'speed: 1e-05 clips of 4 s per minute'."""
    from streamgen.cli import main
    from streamgen.data import cli

    monkeypatch.setattr(cli, "clips_of_4s_per_minute", lambda *args: per_minute)
    argv = ["data", "make", "--clips", "1", "--size", "16", "--seconds", "0.04", "--identities", "20"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert f"speed: {said} clips of 4 s per minute at 16x16 with 1 worker\n" in capsys.readouterr().out


def test_the_manifest_records_no_list_of_every_clip(tmp_path, monkeypatch):
    """Each shard's record listed its clips' indices: the manifest, read whole by every reader,
    was 47 MiB at 1M clips. It records the first and last (the others follow from the plan); a
    make that goes on from an older make's partial.json (lists there) records them the same way."""
    _one_clip_for_all(monkeypatch)
    out = tmp_path / "ds"
    with pytest.raises(Stop):
        make_dataset(out, 30, shard_size=2, **TINY, progress=stop_at(2))
    lines = (out / "partial.json").read_text().splitlines()
    older = [json.loads(lines[0])]
    for line in lines[1:]:  # as an older make recorded them
        record = json.loads(line)
        first, last = record.pop("first_index"), record.pop("last_index")
        older.append({**record, "indices": [first, last]})
    (out / "partial.json").write_text("".join(json.dumps(r) + "\n" for r in older))
    manifest = make_dataset(out, 30, shard_size=2, **TINY)
    planned = {shards.shard_file(split, k): indices for split, k, indices in shards.plan_shards(30, 2)}
    records = [r for split in manifest["splits"].values() for r in split["shards"]]
    assert len(records) == len(planned)
    for r in records:
        assert not any(isinstance(v, list) for v in r.values()), r
        assert (r["first_index"], r["last_index"]) == (planned[r["file"]][0], planned[r["file"]][-1])


@pytest.mark.parametrize("height, width", [(20, 32), (32, 40)])
def test_the_library_refuses_frames_that_are_not_multiples_of_16(tmp_path, height, width):
    """The CLI's --size refuses them; make_dataset made such a dataset, which no model could train on."""
    with pytest.raises(ValueError, match=f"frames of {height}x{width} are not multiples of 16"):
        make_dataset(tmp_path / "ds", 1, height=height, width=width, seconds=0.04, n_identities=10)
    assert not (tmp_path / "ds").exists()


def test_a_make_with_more_workers_than_cpus_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """`--workers 8` on 2 CPUs was not warned of (distill refuses run.threads above the CPUs, --sp warns):
    the workers past the CPUs only wait for a core, each holding a clip's memory."""
    import multiprocessing
    from multiprocessing.pool import ThreadPool

    from streamgen import cli
    from streamgen.cli import main

    class Context:
        def Pool(self, processes, initializer=None, initargs=()):
            return ThreadPool(processes)

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: Context())
    monkeypatch.setattr(cli, "usable_cpus", lambda: 2)
    argv = ["data", "make", "--clips", "3", "--size", "16", "--seconds", "0.04", "--identities", "20"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--workers", "8"]) == 0  # (3 shards: 3 workers)
    err = capsys.readouterr().err
    assert "warning: 3 workers on 2 CPUs" in err and "--workers 2" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_shard_a_killed_make_finished_but_did_not_record_is_not_made_again(tmp_path, monkeypatch):
    """A make killed (kill -9, the out-of-memory killer) after a worker put its shard in place and
    before the make recorded it in partial.json: the shard was made again. Its own record of what it
    was made for (settings, file) lets the next make take it; another make's shard, one cut short, one
    with a member spoilt and a recorded one changed since are made again, and the dataset is the one
    made in one go."""
    import shutil

    _one_clip_for_all(monkeypatch)
    kw = dict(shard_size=2, **TINY)
    whole, other, out = tmp_path / "whole", tmp_path / "other", tmp_path / "ds"
    make_dataset(whole, 8, **kw)
    make_dataset(other, 8, seed=1, **kw)
    with pytest.raises(Stop):
        make_dataset(out, 8, **kw, progress=stop_at(1))
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.npz")] == ["train/shard-00000.npz"]
    (out / "val").mkdir(), (out / "test").mkdir()
    shutil.copy(whole / "train/shard-00001.npz", out / "train")  # finished, not recorded
    shutil.copy(other / "train/shard-00002.npz", out / "train")  # another make's (seed 1)
    cut = (whole / "val/shard-00000.npz").read_bytes()
    (out / "val/shard-00000.npz").write_bytes(cut[: len(cut) // 2])
    spoilt = bytearray((whole / "test/shard-00000.npz").read_bytes())
    spoilt[200] ^= 0xFF  # (in the first member's data: its CRC no longer holds)
    (out / "test/shard-00000.npz").write_bytes(bytes(spoilt))
    # the recorded shard written again since, whole and of these settings by its own record, but not as
    # partial.json records it (another streamgen's clips): made again, not taken
    settings, _ = shards._read_partial(out / "partial.json")
    made_for = {"of": shards.clip_settings(settings), "file": "train/shard-00000.npz", "clips": 2, "first_index": 2, "last_index": 3}
    from streamgen.data.world import make_clip

    other_clip = make_clip(1, 2, "train", 16, 16, 0.04, 20)
    shards._write_shard(out / "train/shard-00000.npz", [other_clip, other_clip], made_for)
    made, kept = [], []
    write = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", lambda path, *clips: (made.append(path), write(path, *clips)))
    make_dataset(out, 8, **kw, resumed=lambda clips, shards_kept: kept.append(shards_kept))
    assert kept == [1]
    assert sorted(p.relative_to(out).as_posix() for p in made) == [
        "test/shard-00000.npz", "train/shard-00000.npz", "train/shard-00002.npz", "val/shard-00000.npz"
    ]  # fmt: skip
    for path in whole.rglob("*.npz"):
        assert path.read_bytes() == (out / path.relative_to(whole)).read_bytes(), path
    manifests = [json.loads((root / "manifest.json").read_text()) for root in (whole, out)]
    assert manifests[0] == manifests[1]


def test_a_shard_another_speech_engine_finished_but_did_not_record_is_made_again(tmp_path, monkeypatch):
    """A shard a killed make finished but did not record was taken by the next make if its own record
    (made_for) was of these settings' clips, whatever espeak-ng spoke them: one written under another
    engine (no partial.json left to refuse it by, or an older one that records no engine) went into a
    dataset of this one's clips. The engine is in the shard's record: another's is made again, its
    own taken."""
    import shutil

    from streamgen.data import speech

    _one_clip_for_all(monkeypatch)
    kw = dict(shard_size=2, **TINY)
    engine, other = speech.engine_version(), "espeak-ng 1.49 (espeakng-loader not installed)"
    made = []
    write = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", lambda path, *clips: (made.append(path), write(path, *clips)))
    for spoken_by, taken in ((other, False), (engine, True)):
        monkeypatch.setattr(speech, "engine_version", lambda spoken_by=spoken_by: spoken_by)
        make_dataset(tmp_path / spoken_by, 8, **kw)
        out = tmp_path / f"ds-{taken}"
        (out / "train").mkdir(parents=True)
        shutil.copy(tmp_path / spoken_by / "train/shard-00001.npz", out / "train")  # finished, not recorded
        monkeypatch.setattr(speech, "engine_version", lambda: engine)
        made.clear()
        make_dataset(out, 8, **kw)
        assert (out / "train/shard-00001.npz" in made) is not taken, made


def test_a_shard_finished_but_not_recorded_at_a_ctrl_c_is_kept(tmp_path, monkeypatch):
    """A Ctrl-C after a shard was put in place and before it was recorded (a pool's workers finish
    theirs meanwhile) removed it with the shards cut short: it was made again. Whole, it is recorded
    and kept; the next make goes on after it."""
    _one_clip_for_all(monkeypatch)
    kw = dict(shard_size=2, **TINY)
    out = tmp_path / "ds"
    make_shard = shards._make_shard

    def interrupted_after_the_second(job):
        info = make_shard(job)
        if (out / "partial.json").exists():  # (the first one recorded)
            raise KeyboardInterrupt
        return info

    monkeypatch.setattr(shards, "_make_shard", interrupted_after_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(out, 8, **kw)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == [
        "train/shard-00000.npz", "train/shard-00001.npz"
    ]  # fmt: skip
    assert shards.partly_made(out) == 4
    monkeypatch.setattr(shards, "_make_shard", make_shard)
    kept = []
    make_dataset(out, 8, **kw, resumed=lambda clips, shards_kept: kept.append(shards_kept))
    assert kept == [2]


def test_an_interrupted_make_says_what_it_kept_last_not_above_its_bar(tmp_path, monkeypatch, capsys):
    """The progress bar was closed after the interrupted make said what it kept: drawn again under
    the line that says to run the command again (which began on the bar's line), the bar was the last
    thing on the terminal before "interrupted"."""
    from streamgen.cli import main

    _one_clip_for_all(monkeypatch)
    written, made = shards._write_shard, []

    def interrupted(path, clips, *made_for):
        if made:
            raise KeyboardInterrupt
        written(path, clips, *made_for)
        made.append(path)

    monkeypatch.setattr(shards, "_write_shard", interrupted)
    out = tmp_path / "ds"
    argv = ["data", "make", "--out", str(out), "--clips", "6", "--size", "16", "--seconds", "0.04",
            "--shard-size", "2", "--workers", "1", "--identities", "20"]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "data make:" in err  # (its bar)
    kept = f"data make: 2 clips made so far kept in {out}: run the same command again to go on from them"
    assert err.replace("\r", "\n").rstrip().splitlines()[-2:] == [kept, "interrupted"]
