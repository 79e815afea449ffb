import json
import re

import numpy as np
import pytest

from streamgen.cli import main
from streamgen.data.dataset import AvatarWorldDataset, collate_clips
from streamgen.data.manifest import load_manifest
from streamgen.data.shards import DataError, ShardReader, iter_clips, make_dataset, plan_shards
from streamgen.data.world import identity_split, make_clip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    make_dataset(root, 20, seed=3, height=32, width=32, seconds=1.0, shard_size=8, n_identities=40)
    return root


def test_manifest_and_splits_disjoint_by_identity_and_sentence(world):
    manifest = load_manifest(world)
    assert manifest["clips"] == 20 and manifest["frames"] == 25
    assert {s: v["clips"] for s, v in manifest["splits"].items()} == {"train": 16, "val": 2, "test": 2}
    seen = {}
    for split in ("train", "val", "test"):
        metas = [c["meta"] for c in iter_clips(world, split)]
        assert all(identity_split(m["identity_id"]) == split for m in metas)
        seen[split] = ({m["identity_id"] for m in metas}, {m["text"] for m in metas})
    assert not seen["train"][0] & seen["test"][0] and not seen["train"][1] & seen["test"][1]
    assert not seen["val"][1] & seen["test"][1]


def test_torch_dataset_items_and_ground_truth(world):
    import torch

    ds = AvatarWorldDataset(world, "train")
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 16
    item = ds[5]
    assert item["video"].shape == (25, 32, 32, 3) and item["video"].dtype == np.uint8
    assert item["audio"].shape == (16000,) and item["audio"].dtype == np.float32
    assert item["reference"].shape == (32, 32, 3)
    assert item["motion"].shape == (25, len(ds.motion_names))
    assert isinstance(item["caption"], str) and item["meta"]["phonemes"]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_clips)))
    assert batch["video"].shape == (4, 25, 32, 32, 3) and len(batch["caption"]) == 4


def test_dataset_is_deterministic_per_seed(world):
    first = next(iter_clips(world, "train"))
    again = make_clip(3, first["meta"]["index"], "train", 32, 32, 1.0, 40)
    assert np.array_equal(first["video"], again.video) and np.array_equal(first["audio"], again.audio)
    other = make_clip(4, first["meta"]["index"], "train", 32, 32, 1.0, 40)
    assert not np.array_equal(first["video"], other.video)


def test_latent_cache_hook(world):
    calls = []

    def encode(video):
        calls.append(1)
        return video.astype(np.float32).mean(axis=(1, 2))  # [T, 3]

    ds = AvatarWorldDataset(world, "test")
    ds.cache_latents(encode, "mean-colour")
    assert len(calls) == len(ds)
    ds.cache_latents(encode, "mean-colour")  # cached: not encoded again
    assert len(calls) == len(ds)
    cached = AvatarWorldDataset(world, "test", latents="mean-colour")
    item = cached[1]
    assert np.allclose(item["latents"], item["video"].astype(np.float32).mean(axis=(1, 2)))
    with pytest.raises(DataError, match="latent cache"):
        AvatarWorldDataset(world, "test", latents="never-made")
    # the same, from the dataset already made (its shards not hashed again)
    reused = ds.with_latents("mean-colour")
    assert reused.latents == "mean-colour" and ds.latents is None
    assert np.array_equal(reused[1]["latents"], item["latents"])
    with pytest.raises(DataError, match="latent cache"):
        ds.with_latents("never-made")
    # a dataset made again in the same place: its old latents are not taken for the new clips
    remade = AvatarWorldDataset(world, "test")
    remade.shards = [{**shard, "sha256": "0" * 64} for shard in remade.shards]
    with pytest.raises(DataError, match="holds the latents of an earlier"):
        remade.cache_latents(encode, "mean-colour")
    manifest_path = world / "manifest.json"  # ... nor read as theirs (they were, without a word)
    kept = manifest_path.read_text()
    manifest = json.loads(kept)
    for shard in manifest["splits"]["test"]["shards"]:
        shard["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(DataError, match="holds the latents of an earlier"):
            AvatarWorldDataset(world, "test", latents="mean-colour")
    finally:
        manifest_path.write_text(kept)


def test_a_corrupted_latent_cache_file_is_one_error_naming_it(world, tmp_path):
    """A latent file cut short (a copy that stopped, a full disk under another tool) was zipfile's
    BadZipFile ('File is not a zip file') with no file named, through the latents stage too."""
    import shutil

    root = tmp_path / "world"
    shutil.copytree(world, root)
    ds = AvatarWorldDataset(root, "train")
    ds.cache_latents(lambda video: video[:, :2, :2, 0].astype(np.float32), "tiny")
    cut = root / "latents" / "tiny" / "train" / "shard-00001.npz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    says = rf"corrupted latent cache file {re.escape(str(cut))}: .*: delete it to encode it again"
    with pytest.raises(DataError, match=says):
        AvatarWorldDataset(root, "train", latents="tiny")
    with pytest.raises(DataError, match=says):
        ds.cache_latents(lambda video: video, "tiny")


def test_a_latent_cache_file_the_system_will_not_read_is_not_called_corrupted(world, tmp_path, monkeypatch):
    """Too many open files, no permission or an I/O error on a latent file was "corrupted latent cache
    file ...: delete it to encode it again": minutes of encoding to redo, for a limit or a disk to
    look at (as a shard's: test_a_shard_the_system_will_not_read_is_not_called_corrupted)."""
    import errno
    import shutil

    from streamgen.data import dataset

    root = tmp_path / "world"
    shutil.copytree(world, root)
    AvatarWorldDataset(root, "train").cache_latents(lambda video: video[:, :2, :2, 0].astype(np.float32), "tiny")

    def refused(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(dataset.np, "load", refused)
    says = r"^cannot read latent cache file .*shard-00000\.npz: Too many open files$"
    with pytest.raises(DataError, match=says):
        AvatarWorldDataset(root, "train", latents="tiny")


@pytest.mark.parametrize("text", ["[]", '{"format": "streamgen-avatar-world/1"}', '{"format": '])
def test_a_manifest_that_is_not_one_is_one_error_naming_it(tmp_path, text, capsys):
    """A manifest.json of valid JSON but no manifest's (a list, an object without its splits) was an
    AttributeError's or a KeyError's traceback in data preview, the Dataset and the latents stage."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=r"corrupted manifest .*manifest.json: "):
        AvatarWorldDataset(tmp_path / "ds", "train")
    assert main(["data", "preview", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "pv")]) == 2
    assert "corrupted manifest" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["splits"].update(train=5),
        lambda m: m["splits"]["train"].pop("shards"),
        lambda m: m["splits"]["train"]["shards"][0].pop("file"),
        lambda m: m["splits"]["train"]["shards"][0].update(clips="8"),
        lambda m: m["splits"]["train"]["shards"].append(None),
        lambda m: m.pop("motion_names"),
    ],
)
def test_an_edited_manifest_is_one_error_naming_it(world, tmp_path, edit, capsys):
    """A manifest edited by hand (a split or a shard record not an object, a field gone) was a
    TypeError's or a KeyError's traceback in data preview and the Dataset."""
    manifest = json.loads((world / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"corrupted manifest .*manifest.json: "):
        AvatarWorldDataset(tmp_path / "ds", "train")
    assert main(["data", "preview", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "pv")]) == 2
    assert "corrupted manifest" in capsys.readouterr().err


def test_a_shard_the_system_will_not_read_is_not_called_corrupted(world, monkeypatch):
    """Too many open files, an I/O error or no permission was "corrupted shard ...": a whole
    dataset to remake, for a limit or a disk to look at."""
    import errno

    from streamgen.data import shards

    shard = world / load_manifest(world)["splits"]["train"]["shards"][0]["file"]

    def refused(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(shards.np, "load", refused)
    with pytest.raises(DataError, match=r"^cannot read shard .*shard-00000\.npz: Too many open files$"):
        ShardReader(shard)


def test_a_shard_the_system_will_not_read_for_its_hash_is_one_line(world, monkeypatch):
    """The same, as its sha256 is checked (the dataset checks every shard as it is made; a reader
    given the manifest's sha256, as iter_clips does): no permission or an I/O error there was the
    OSError's traceback."""
    import errno

    from streamgen.data import shards

    record = load_manifest(world)["splits"]["train"]["shards"][0]

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shards, "open", refused, raising=False)  # (the hash's: found before the builtin)
    with pytest.raises(DataError, match=r"^cannot read shard .*shard-00000\.npz: Permission denied$"):
        ShardReader(world / record["file"], record["bytes"], record["sha256"])
    with pytest.raises(DataError, match=r"^cannot read shard .*shard-00000\.npz: Permission denied$"):
        AvatarWorldDataset(world, "train")


def test_a_manifest_the_system_will_not_read_is_one_line(world, monkeypatch):
    """No permission (another user's dataset, its files 0600) or an I/O error on manifest.json was
    the OSError's traceback, from every reader of the dataset (data preview, distill, eval)."""
    import errno
    from pathlib import Path

    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == world / "manifest.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(DataError, match=r"^cannot read .*manifest\.json: Permission denied$"):
        load_manifest(world)
    with pytest.raises(DataError, match=r"^cannot read .*manifest\.json: Permission denied$"):
        AvatarWorldDataset(world, "train")


def test_corrupted_shard_is_one_clear_error(world, tmp_path):
    import struct

    manifest = load_manifest(world)
    shard = world / manifest["splits"]["train"]["shards"][0]["file"]
    method = bytearray(shard.read_bytes())  # a compression method zipfile does not know: its own error
    central = method.find(b"PK\x01\x02")
    method[central + 10 : central + 12] = struct.pack("<H", 99)
    (tmp_path / "method.npz").write_bytes(bytes(method))
    with pytest.raises(DataError, match="corrupted shard .*method.npz"):
        ShardReader(tmp_path / "method.npz").clip(0)
    broken = tmp_path / "broken.npz"
    data = bytearray(shard.read_bytes())
    broken.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DataError, match="corrupted shard .*broken.npz"):
        ShardReader(broken).clip(0)
    flipped = tmp_path / "flipped.npz"
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
    flipped.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupted shard .*flipped.npz"):
        reader = ShardReader(flipped)
        for i in range(8):
            reader.clip(i)
    with pytest.raises(DataError, match="checksum"):
        ShardReader(flipped, sha256=manifest["splits"]["train"]["shards"][0]["sha256"])


def test_cli_make_warns_of_a_train_split_with_no_clips(tmp_path, capsys):
    """`data make --clips 2` made test 1, val 1, train 0 without a word: distill, which trains on
    train, refused the dataset only when a stage started on it."""
    out = tmp_path / "ds"
    assert main(["data", "make", "--out", str(out), "--clips", "2", "--size", "16", "--seconds", "0.2",
                 "--workers", "1", "--identities", "20"]) == 0  # fmt: skip
    assert "warning: its train split holds no clips" in capsys.readouterr().err
    assert main(["data", "make", "--out", str(tmp_path / "ds3"), "--clips", "3", "--size", "16", "--seconds",
                 "0.2", "--workers", "1", "--identities", "20"]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().err


def test_cli_make_preview_and_errors(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "make", "--out", str(out), "--clips", "3", "--size", "32", "--seconds", "0.4",
                 "--workers", "1", "--identities", "20"]) == 0  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["clips"] == 3
    assert re.search(r"speed: [0-9]+(\.[0-9]+)? clips of 4 s per minute", capsys.readouterr().out)
    assert main(["data", "make", "--out", str(out), "--clips", "3"]) == 2  # refuses to overwrite
    err = capsys.readouterr().err
    # one line, of the error alone (its bar, "data make: 0%| ... 0/3", showed before it)
    assert err.startswith("streamgen data make: error: ") and "already holds a dataset" in err, err
    assert len(err.strip().splitlines()) == 1 and "0/3" not in err and "%|" not in err, err
    assert main(["data", "make", "--out", str(out / "manifest.json"), "--clips", "3"]) == 2  # a file
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (
        main(["data", "preview", "--data", str(out), "--split", "train", "--out", str(tmp_path / "p")]) == 0
    )
    assert (tmp_path / "p" / "contact_sheet.png").stat().st_size > 1000
    assert (tmp_path / "p" / "preview.mp4").stat().st_size > 1000
    assert main(["data", "preview", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "q")]) == 2
    assert "is not a finished dataset: there is no such folder" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()  # (it was made, and left empty)


def test_a_preview_whose_video_fails_leaves_no_contact_sheet(tmp_path, monkeypatch, capsys):
    import errno

    from streamgen.data import media

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(media, "write_mp4", full_disk)
    out = tmp_path / "p"
    assert main(["data", "preview", "--clips", "1", "--size", "32", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (out / "contact_sheet.png").exists()


def test_the_speed_is_counted_in_clips_of_4_seconds():
    """Clips of 0.4 s counted ten each, not a tenth: the speed said was 100 times too high."""
    from streamgen.data.cli import clips_of_4s_per_minute

    assert clips_of_4s_per_minute(clips=10, seconds=0.4, elapsed=60.0) == pytest.approx(1.0)
    assert clips_of_4s_per_minute(clips=10, seconds=8.0, elapsed=30.0) == pytest.approx(40.0)


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["data", "preview", "--split", "bogus"],
            "argument --split: invalid choice: 'bogus'",
        ),  # hung for good
        (
            ["data", "make", "--clips", "1", "--shard-size", "0"],
            "argument --shard-size: '0' is not a positive",
        ),
        (
            ["data", "make", "--clips", "1", "--seconds", "0"],
            "argument --seconds: 0 s is shorter than one frame",
        ),
        (
            ["data", "make", "--clips", "1", "--seconds", "-1"],
            "argument --seconds: -1 s is shorter than one frame",
        ),
        (
            ["data", "make", "--clips", "1", "--seconds", "nan"],
            "argument --seconds: 'nan' is not a finite number of seconds",
        ),
        (  # (was "inf s is shorter than one frame")
            ["data", "make", "--clips", "1", "--seconds", "inf"],
            "argument --seconds: 'inf' is not a finite number of seconds",
        ),
        (  # (was numpy's "Maximum allowed dimension exceeded" traceback, as the clip was made)
            ["data", "make", "--clips", "1", "--seconds", "1e20"],
            "argument --seconds: 1e20 s is too long: no array could hold a clip's sound",
        ),
        (["data", "make", "--clips", "0"], "argument --clips: '0' is not a positive"),
        (["eval", "train-evaluators", "--sync-steps", "0"], "argument --sync-steps: '0' is not a positive"),
        (["eval", "train-evaluators", "--identity-steps", "-3"], "argument --identity-steps: '-3' is not a"),
        (["eval", "--model", "debug", "--steps", "0"], "argument --steps: '0' is not a positive"),
        (["serve", "--steps", "0"], "argument --steps: '0' is not a positive"),  # (both took the default)
    ],
)
def test_bad_numbers_are_refused_before_any_work(tmp_path, argv, says, capsys):
    """Each of these was a traceback after work was done (`--seconds 0` wrote a dataset of empty clips
    and its manifest, then divided by zero), or a hang (a split no identity belongs to)."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_library_refuses_what_the_command_line_does(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'bogus'"):
        make_clip(0, 0, "bogus")
    for kwargs, says in [
        ({"shard_size": 0}, "--shard-size"),
        ({"seconds": 0.01}, "shorter than one frame"),
        ({"seconds": 1e20}, "too long"),
        ({"height": 8}, "too small"),
        # (was numpy's "high is out of bounds for int64" traceback, as the first clip was made)
        ({"n_identities": 2**63}, r"--identities 9223372036854775808 is more than 2\*\*63 - 1"),
    ]:
        with pytest.raises(DataError, match=says):
            make_dataset(tmp_path / "ds", 2, **kwargs)
        assert not (tmp_path / "ds" / "manifest.json").exists()


def test_a_forked_worker_opens_its_own_shard_readers(world):
    """Forked DataLoader workers inherited the parent's open readers (one file position for all)
    once the parent had read an item, and read each other's bytes as corrupt shards."""
    import multiprocessing

    ds = AvatarWorldDataset(world, "train")
    ds[0]  # the parent opens its reader

    def child(queue):
        inherited = ds._readers[0]
        item = ds[1]  # (shard 0's)
        queue.put((ds._readers[0] is not inherited, item["video"].shape))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    own, shape = queue.get(timeout=60)
    proc.join(60)
    assert own and shape == ds[1]["video"].shape


def recorded_readers(monkeypatch, module) -> list:
    """The ShardReaders `module` opens from now on, each with `closed` saying whether it was closed."""
    opened = []

    class Recorded(ShardReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            opened.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(module, "ShardReader", Recorded)
    return opened


def test_iter_clips_closes_each_shard_it_opened_however_it_stops(world, monkeypatch):
    """A limit that stopped iteration (or a consumer that stopped reading) left the shard's file
    open, one per call: the reader was closed only after a shard's last clip."""
    from streamgen.data import shards

    opened = recorded_readers(monkeypatch, shards)
    assert len(list(iter_clips(world, "train", limit=3))) == 3  # stopped inside shard 0
    assert len(opened) == 1 and all(r.closed for r in opened)
    opened.clear()
    assert len(list(iter_clips(world, "train", limit=8))) == 8  # stopped at the end of shard 0
    assert len(opened) == 1 and all(r.closed for r in opened)  # (shard 1 was opened for nothing)
    opened.clear()
    assert list(iter_clips(world, "train", limit=0)) == [] and opened == []
    clips = iter_clips(world, "train")
    next(clips)
    clips.close()  # the consumer stops reading
    assert len(opened) == 1 and all(r.closed for r in opened)
    opened.clear()
    assert len(list(iter_clips(world, "train"))) == 16
    assert len(opened) == 2 and all(r.closed for r in opened)


def _black_out_clip_0_behind_the_crcs(shard) -> None:
    """Clip 0's video blacked out, the zip written again (CRCs of the new bytes) and padded with an
    archive comment to its old size: what neither the CRCs nor the manifest's byte count can tell."""
    import io
    import zipfile

    size = shard.stat().st_size
    with zipfile.ZipFile(shard) as z:
        members = {name: z.read(name) for name in z.namelist()}
    video = io.BytesIO()
    np.save(video, np.zeros_like(np.load(io.BytesIO(members["0000.video.npy"]))))
    members["0000.video.npy"] = video.getvalue()

    def zipped(comment: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members.items():
                z.writestr(name, data)
            z.comment = comment
        return out.getvalue()

    data = zipped(b"")
    shard.write_bytes(zipped(b" " * (size - len(data))))
    assert shard.stat().st_size == size


def test_a_shard_altered_behind_its_crcs_is_caught_by_the_manifests_sha256(world, tmp_path, capsys):
    """The manifest's sha256 of each shard was never checked on read: a shard changed since
    `data make`, consistent for its zip CRCs and of the same size, was read as the dataset's."""
    import shutil

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    shard = copy / load_manifest(copy)["splits"]["train"]["shards"][0]["file"]
    _black_out_clip_0_behind_the_crcs(shard)
    assert ShardReader(shard).clip(0)["video"].max() == 0  # the zip alone takes it for sound
    says = r"corrupted shard .*train/shard-00000\.npz: .*sha256"
    with pytest.raises(DataError, match=says):
        next(iter_clips(copy, "train"))
    with pytest.raises(DataError, match=says):
        AvatarWorldDataset(copy, "train")[0]
    assert len(list(iter_clips(copy, "test"))) == 2  # the other shards read as before
    out = str(tmp_path / "out")
    assert main(["data", "preview", "--data", str(copy), "--split", "train", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "train/shard-00000.npz" in err and len(err.strip().splitlines()) == 1
    # found during training (the autoencoder stage reads clips as it goes): one line too
    assert main(["distill", "autoencoder", "--config", "debug", "--out", str(tmp_path / "ae"),
                 "--set", "data.source=world", "--set", f"data.root={copy}",
                 "--set", "model.height=32", "--set", "model.width=32"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "train/shard-00000.npz" in err and len(err.strip().splitlines()) == 1


def test_dataloader_workers_do_not_hash_every_shard_again_every_epoch(world, tmp_path, monkeypatch):
    """DataLoader workers that are not persistent are made anew every epoch with no shard open, and
    each hashed every shard it opened, every epoch (64x64: 12% of an epoch's time with 2 workers,
    32% with 8). A shard is hashed once, where the dataset is made; a worker hashes it again only
    if its file changed since, which is still caught."""
    import shutil
    from pathlib import Path

    from torch.utils.data import DataLoader

    from streamgen.data import shards

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    hashed = tmp_path / "hashed"  # (a file: the workers are other processes)
    real = shards._sha256

    def logged(path):
        with open(hashed, "a") as f:
            f.write(f"{Path(path).name}\n")
        return real(path)

    monkeypatch.setattr(shards, "_sha256", logged)
    ds = AvatarWorldDataset(copy, "train")
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork", collate_fn=collate_clips)
    for _epoch in range(2):
        assert sum(len(batch["video"]) for batch in loader) == len(ds)
    assert len(hashed.read_text().splitlines()) == len(ds.shards) == 2
    _black_out_clip_0_behind_the_crcs(copy / ds.shards[0]["file"])  # (as a worker would open it)
    with pytest.raises(DataError, match=r"corrupted shard .*train/shard-00000\.npz: .*sha256"):
        ds[0]


def test_the_dataset_holds_no_list_as_long_as_the_split(world, tmp_path, monkeypatch):
    """A (shard, clip) pair per clip was held for the item lookup (3.2M clips: 250 MB, in every
    DataLoader worker); the lookup is by the shards' first items now, and finds the same clips."""
    import tracemalloc

    from streamgen.data import dataset

    ds = AvatarWorldDataset(world, "train")
    assert len(ds) == 16 and ds.shards[0]["clips"] == 8
    planned = {k: indices for split, k, indices in plan_shards(20, 8) if split == "train"}
    assert ds[9]["meta"]["index"] == planned[1][1]
    assert ds[-1]["meta"]["index"] == planned[1][-1] == ds[15]["meta"]["index"]
    for k in (16, -17):
        with pytest.raises(IndexError):
            ds[k]
    assert len(list(iter(ds))) == 16  # (a map-style dataset iterated by index: it ends at an IndexError)
    big = tmp_path / "big"
    big.mkdir()
    shards_ = [{"file": f"train/shard-{k:05d}.npz", "clips": n} for k, n in enumerate([0, 3, 10**6, 0, 2])]
    manifest = {"format": "streamgen-avatar-world/1", "motion_names": [],
                "splits": {"train": {"clips": 10**6 + 5, "shards": shards_}}}  # fmt: skip
    (big / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(dataset, "check_shard", lambda *args, **kwargs: None)
    tracemalloc.start()
    try:
        huge = AvatarWorldDataset(big, "train")
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert held < 2_000_000, held
    assert len(huge) == 10**6 + 5
    assert [huge._locate(k) for k in (0, 2, 3, 10**6 + 2, 10**6 + 3, 10**6 + 4, -1)] == [
        (1, 0), (1, 2), (2, 0), (2, 10**6 - 1), (4, 0), (4, 1), (4, 1)
    ]  # fmt: skip


def test_the_dataset_keeps_the_most_recently_read_shards_open_not_every_one(world, monkeypatch):
    """Every shard read stayed open: a split of more shards than the open-file limit (ulimit -n,
    often 1024) failed part way through an epoch, as 'corrupted shard ...: Too many open files'."""
    from streamgen.data import dataset

    opened = recorded_readers(monkeypatch, dataset)
    monkeypatch.setattr(dataset, "MAX_OPEN_SHARDS", 1, raising=False)
    ds = AvatarWorldDataset(world, "train")
    first = [ds[k]["meta"]["index"] for k in (0, 8, 1, 9, 15)]
    assert [r.closed for r in opened] == [True, True, True, False]  # (one open at a time; 9 and 15: one)
    assert first == [AvatarWorldDataset(world, "train")[k]["meta"]["index"] for k in (0, 8, 1, 9, 15)]
    opened.clear()
    for k in (0, 1, 2):  # the same shard: opened once
        ds[k]
    assert len(opened) == 1 and not opened[0].closed
