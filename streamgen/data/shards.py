"""The avatar-world dataset on disk: sharded clips, written and read with numpy only.

Layout written by `streamgen data make --out DIR`:

    DIR/manifest.json          written last: a folder without it is incomplete
    DIR/partial.json           while it is: the shards finished so far (a line each), which a rerun keeps
    DIR/train/shard-00000.npz  (and val/, test/)
    DIR/latents/NAME/train/shard-00000.npz   optional latent cache (see cache_latents)

Each shard is an uncompressed-index, zlib-compressed `.npz` holding, for every clip i
of the shard, the members

    {i:04d}.video      uint8  [T, H, W, 3]   RGB, 25 fps
    {i:04d}.audio      float32 [T * 640]      16 kHz mono in [-1, 1], aligned with frame 0
    {i:04d}.reference  uint8  [H, W, 3]       the identity, frontal and neutral
    {i:04d}.motion     float32 [T, K]         per-frame ground truth, columns = manifest
                                              "motion_names" (mouth_open, mouth_width,
                                              mouth_round, yaw, pitch, roll, blink, brow,
                                              smile, gaze_x, gaze_y; see motion.py)
    {i:04d}.meta       JSON bytes             caption, text, voice, identity id, split,
                                              phonemes [(ipa, start_s, end_s)], ...

and last, `made_for` (JSON bytes): the settings its clips are made of (`clip_settings`), its file and
its clips (a shard a killed make finished but did not record is known by it: unfinished_make.py).

Members load lazily, so random access reads one clip. manifest.json records the format,
seed, sizes, motion names and, per split, each shard's file, clip count, size and
sha256 (written and read by manifest.py). Splits are disjoint by identity and by sentence (see
world.py).

Generation is deterministic per seed: clip i is `world.make_clip(seed, i)` whatever
the number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from streamgen.files import write_atomically
from streamgen.folder_lock import no_other_writer

from . import SPLITS
from .manifest import FORMAT, _made_already, _write_manifest, load_manifest
from .motion import FPS
from .unfinished_make import (
    MADE_FOR,
    _append_to_partial,
    _finished_shards,
    _finished_unrecorded,
    _read_partial,  # noqa: F401  (the tests read a make's PARTIAL as shards._read_partial)
    _remove_unrecorded,
    _write_partial,
    clip_settings,
    partly_made,
)
from .world import Clip, clip_split, make_clip


class DataError(ValueError):
    """A dataset on disk is missing, incomplete or corrupted."""


class MadeAlready(DataError):
    """The folder holds the dataset of the make asked for, finished."""


class FolderBusy(DataError):
    """Another `data make` is writing into the folder."""


# ---------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(path: Path, clips: Iterable[Clip], made_for: dict | None = None) -> None:
    """Write clips to `path`, whole or not at all (`write_atomically`), each as it comes and let go:
    the shard's clips, all made first and held together, were a shard's worth of memory (32 clips of
    256x256 and 4 s: 630 MB). The members and their bytes are np.savez_compressed's. `made_for`,
    the shard's own record of what it was made for, is its last member."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as npz:
            i = 0  # (not enumerate: its tuple, kept for the next item, held a clip while the next was made)
            for clip in clips:
                meta = dict(clip.meta, caption=clip.caption)
                members = {
                    "video": clip.video,
                    "audio": clip.audio.astype(np.float32),
                    "reference": clip.reference,
                    "motion": clip.motion.as_array(),
                    "meta": np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), np.uint8),
                }
                del clip, meta  # (the clip goes as the next one is made)
                for name, array in members.items():
                    with npz.open(f"{i:04d}.{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(array))
                del members
                i += 1
            if made_for is not None:
                _write_made_for(npz, made_for)

    write_atomically(path, write)


def _write_made_for(npz: zipfile.ZipFile, made_for: dict) -> None:
    with npz.open(f"{MADE_FOR}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.frombuffer(json.dumps(made_for).encode(), np.uint8))


def _with_made_for(out: Path, settings: dict, shard: dict) -> dict:
    """The record of `shard`, one PARTIAL records, once its file ends with its MADE_FOR member: one an
    older make wrote has none (a dataset going on from it mixed shards with and without, no longer the
    same, byte for byte, as one made in one go, nor its shards those of a make of more clips). Appended
    to a copy, the bytes are those of a shard written whole: zipfile dates its members 1980 and writes
    its central directory again after the new one."""
    path = out / shard["file"]
    with zipfile.ZipFile(path) as npz:
        if f"{MADE_FOR}.npy" in npz.namelist():
            return shard
    made = {k: shard[k] for k in ("file", "clips", "first_index", "last_index")}

    def write(tmp: Path) -> None:
        shutil.copyfile(path, tmp)
        with zipfile.ZipFile(tmp, "a", zipfile.ZIP_DEFLATED, allowZip64=True) as npz:
            _write_made_for(npz, {"of": clip_settings(settings), **made})

    write_atomically(path, write)
    return _shard_record(path, made)


def save_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool = False) -> None:
    """An .npz of `arrays` at `path`, whole or not at all (`write_atomically`)."""
    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # (np.savez given a name would add .npz to it)
            save(f, **arrays)

    write_atomically(path, write)


def _make_shard(job) -> dict:
    seed, indices, split, path, height, width, seconds, n_identities, *made_of = job
    clips = (make_clip(seed, i, split, height, width, seconds, n_identities) for i in indices)
    made = {
        "file": f"{split}/{Path(path).name}",
        "clips": len(indices),
        # the first and last only: the rest follow from the plan (plan_shards), and a list per shard
        # made the manifest, read whole by every reader, 47 MiB at 1M clips
        "first_index": indices[0],
        "last_index": indices[-1],
    }
    made_for = {"of": made_of[0], **made} if made_of else None
    _write_shard(Path(path), clips, made_for)  # (made one at a time, as they are written)
    return _shard_record(Path(path), made)


def _shard_record(path: Path, made: dict) -> dict:
    return {
        **made,
        "bytes": path.stat().st_size,
        "sha256": _sha256(Path(path)),  # (hashed in the worker that wrote it, while it is in the page cache)
    }


def plan_shards(n_clips: int, shard_size: int) -> Iterator[tuple[str, int, list[int]]]:
    """The shards of a make of `n_clips`: (split, the shard's number in it, its clip indices), each
    split's clips cut into shards in order. Lazy, each shard given as soon as its last clip is known:
    the whole plan, built first, held every index in lists (`--clips 10000000`: 580 MB and 6 s
    before the first clip; 100M: about 5 GB and a minute)."""
    filling: dict[str, list[int]] = {s: [] for s in SPLITS}
    made = dict.fromkeys(SPLITS, 0)
    for i in range(n_clips):
        split = clip_split(i)
        filling[split].append(i)
        if len(filling[split]) == shard_size:
            yield split, made[split], filling[split]
            filling[split], made[split] = [], made[split] + 1
    for split in SPLITS:
        if filling[split]:
            yield split, made[split], filling[split]


def planned_shards(n_clips: int, shard_size: int) -> dict[str, int]:
    """How many shards `plan_shards` gives each split (without walking the plan)."""
    test, val = (n_clips + 9) // 10, (n_clips + 8) // 10  # (clip_split: i % 10 == 0 and == 1)
    counts = {"train": n_clips - test - val, "val": val, "test": test}
    return {s: -(-counts[s] // shard_size) for s in SPLITS}


def shard_file(split: str, k: int) -> str:
    return f"{split}/shard-{k:05d}.npz"


# what reading a damaged .npz raises (cut short, a byte flipped: zipfile says NotImplementedError
# for a compression method byte it does not know, zlib.error for a spoilt stream)
NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, NotImplementedError)


def clip_count(n: int) -> str:
    return f"{n} clip" if n == 1 else f"{n} clips"


def too_long_for_an_array(seconds: float) -> bool:
    """Whether a clip of `seconds` has more sound (float32 at 16 kHz) than a numpy array may hold: a
    shorter one too big for the memory is a MemoryError (said as such), this a ValueError."""
    return round(seconds * FPS) * (16000 // FPS) * 4 > np.iinfo(np.intp).max


def make_dataset(
    out: Path,
    n_clips: int,
    seed: int = 0,
    height: int = 64,
    width: int = 64,
    seconds: float = 4.0,
    shard_size: int = 32,
    n_identities: int = 500,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    resumed: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate `n_clips` clips into `out`; returns the manifest. Goes on from the shards an
    unfinished make of the same settings left there (PARTIAL), their clips and shards given to `resumed`
    (those still there as it wrote them); if this one does not finish, the shards it finished
    are kept for the next (and nothing else: no folder made for nothing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder; choose another --out")
    if n_clips < 1:
        raise DataError("--clips must be at least 1")
    if n_identities < 10:
        raise DataError("need at least 10 identities so every split has some")
    if n_identities > np.iinfo(np.int64).max:  # (numpy's draw of one: "high is out of bounds", a traceback)
        raise DataError(f"--identities {n_identities} is more than 2**63 - 1 (numpy's largest integer)")
    if shard_size < 1:
        raise DataError("--shard-size must be at least 1")
    if min(height, width) < 16:
        raise DataError(f"frames of {height}x{width} are too small to draw a face (16x16 at least)")
    if height % 16 or width % 16:  # (as the CLI's --size: a dataset no model could be trained on)
        raise DataError(
            f"frames of {height}x{width} are not multiples of 16 on each side (the autoencoders' "
            "downsampling times the DiT's 2x2 patches)"
        )
    if not (math.isfinite(seconds) and round(seconds * FPS) >= 1):
        raise DataError(f"clips of {seconds} s are shorter than one frame (1/{FPS} s)")
    if too_long_for_an_array(seconds):
        raise DataError(f"clips of {seconds} s are too long: no array could hold a clip's sound")
    from .speech import engine_version

    settings = {
        "format": FORMAT, "seed": seed, "clips": n_clips, "height": height, "width": width,
        "seconds": seconds, "identities": n_identities, "shard_size": shard_size,
        "speech": engine_version(),  # (another espeak-ng speaks the same clips otherwise)
    }  # fmt: skip
    if (out / "manifest.json").exists():
        if made := _made_already(out, settings):  # (run again: a make stopped as it ended said "interrupted")
            speech = made.get("speech", settings["speech"])  # (an older make's records none: taken as ours)
            if speech != settings["speech"]:  # (it was "made with these settings": nothing to do)
                raise DataError(
                    f"{out} holds this dataset spoken by another speech engine ({speech} there, "
                    f"{settings['speech']} now): delete {out} to make it again (or choose another --out)"
                )
            raise MadeAlready(f"{out} already holds this dataset, made with these settings")
        raise DataError(f"{out} already holds a dataset (manifest.json); choose another --out or delete it")
    _finished_shards(out, settings)  # (another make's work: refused before anything is made)
    made_out = not out.exists()
    # (two makes into one folder wrote over each other's shards, one's clean-up removed the other's,
    # and the manifest of the last to end recorded some of the other's)
    busy = f"another `data make` is writing into {out}: let it finish, or choose another --out"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with no_other_writer(out, lambda: FolderBusy(busy)):
            written = _write_shards(out, settings, workers, progress, resumed)
            return _write_manifest(out, settings, written)  # (before another make may begin)
    except BaseException as e:
        made = [out / split for split in SPLITS] + ([out] if made_out else [])
        # (not where another make holds the folder: an empty split folder there may be its, just made)
        for folder in [] if isinstance(e, FolderBusy) else made:
            try:  # the folders made for it, where nothing else was put in them (no shard kept)
                folder.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):  # (a folder that cannot be made, a full disk: the user's to fix)
            kept = partly_made(out)
            again = f" ({clip_count(kept)} made so far kept: run it again to go on from them)"
            raise DataError(
                f"cannot write the dataset into {out}: {e.strerror or e}{again if kept else ''}"
            ) from None
        raise


def _write_shards(out: Path, settings: dict, workers: int, progress, resumed=None) -> list[dict]:
    """The shards of the make of `settings` that `out` lacks, written (those an unfinished make left
    are kept), each recorded in PARTIAL as it is finished; every shard's record."""
    if (out / "manifest.json").exists():  # (made by a make that held the lock before this one)
        raise DataError(f"{out} already holds a dataset (manifest.json); choose another --out or delete it")
    changed: set[str] = set()  # (recorded, and not as recorded since: made again, not taken)
    finished = _finished_shards(out, settings, changed)
    upgraded = {file: _with_made_for(out, settings, shard) for file, shard in finished.items()}
    if upgraded != finished:  # (recorded at once: a kill before would leave their records not as they are)
        _write_partial(out, settings, list(upgraded.values())).close()
        finished = upgraded
    finished.update(_finished_unrecorded(out, settings, finished.keys() | changed))
    made_like = settings["height"], settings["width"], settings["seconds"], settings["identities"]
    made_of = clip_settings(settings)  # (each shard's record of what it was made for: MADE_FOR)
    jobs = (  # (lazy, as the plan: a job is made when a worker is free for it)
        (settings["seed"], indices, split, str(out / shard_file(split, k)), *made_like, made_of)
        for split, k, indices in plan_shards(settings["clips"], settings["shard_size"])
        if shard_file(split, k) not in finished
    )
    written = list(finished.values())
    kept = sum(w["clips"] for w in written)
    resumed and resumed(kept, len(finished))  # (first: every check passed, the work begins)
    progress and kept and progress(kept)

    partial = None  # (written anew at the first shard finished, with those still there, then appended to)

    def keep(info: dict) -> None:
        nonlocal partial
        written.append(info)
        if partial is None:
            partial = _write_partial(out, settings, written)
        else:
            _append_to_partial(partial, info)

    def record(info: dict) -> None:
        keep(info)
        progress and progress(info["clips"])

    try:
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
        # (no more processes than shards to make: each of the others was started, and imported torch,
        # for nothing)
        shards_left = sum(planned_shards(settings["clips"], settings["shard_size"]).values()) - len(finished)
        workers = min(workers, shards_left)
        if workers <= 1:
            for job in jobs:
                record(_make_shard(job))
        else:
            from .pool import pool_processes, results_as_done, worker_pool

            before = pool_processes()
            with worker_pool(workers, "streamgen-make-") as pool:  # (their temp files removed after them)
                watched = pool_processes() - before  # (the pool's own: not other children of a caller's)
                for info in results_as_done(pool, _make_shard, jobs, ahead=2 * workers, processes=watched):
                    record(info)
    except BaseException:
        # the whole shards finished but not recorded yet (a Ctrl-C between a shard put in place and
        # its record; the pool's workers, ended with it: nothing writes beside this now) are kept,
        # recorded, not removed and made again; one that cannot be is removed, as the others
        with contextlib.suppress(Exception):
            for info in _finished_unrecorded(out, settings, {w["file"] for w in written} | changed).values():
                keep(info)
        _remove_unrecorded(out, settings, {w["file"] for w in written})
        raise
    finally:
        if partial is not None:
            partial.close()
    return written


# ---------------------------------------------------------------- reading


def check_shard(
    path: Path, expected_bytes: int | None = None, sha256: str | None = None, checked: tuple | None = None
) -> tuple:
    """A DataError naming the shard unless `path` is there with the manifest's byte count and
    sha256 (its signature, `file_signature`, is returned: what it was checked as). `checked`: the
    signature the file had when it was last checked; a file that still has it is not hashed again.

    The sha256 because the zip's CRCs cover only the members read, and only their bytes, and a
    shard written again (a tool, another run) has CRCs of its own. Hashing a shard takes under a
    tenth of the time reading its clips does (64x64: 7 ms for 9 MB against 87 ms for its 32 clips),
    about two clips' worth."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"missing shard {path}")
    try:  # (no permission, an I/O error: the OSError's traceback, where ShardReader says it in a line)
        signature = file_signature(path)
        size = signature[2]
        if expected_bytes is not None and size != expected_bytes:
            raise DataError(f"corrupted shard {path}: {size} bytes, manifest says {expected_bytes}")
        if sha256 is not None and signature != checked and _sha256(path) != sha256:
            raise DataError(
                f"corrupted shard {path}: its sha256 is not the one the manifest records "
                "(checksum mismatch: changed since it was written)"
            )
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e.strerror or e}") from None
    return signature


def file_signature(path: Path) -> tuple:
    """Which file `path` is and whether it was written since: a shard rewritten in place gets a new
    ctime (which no tool sets back, unlike mtime), one replaced gets a new inode."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ShardReader:
    """Random access to the clips of one shard; every failure names the shard.

    The manifest's `sha256` is checked once, here (`check_shard`), unless `checked` is the
    signature the file had when it was checked before and it still has it.
    """

    def __init__(
        self,
        path: Path,
        expected_bytes: int | None = None,
        sha256: str | None = None,
        checked: tuple | None = None,
    ):
        self.path = Path(path)
        check_shard(self.path, expected_bytes, sha256, checked)
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except NPZ_ERRORS as e:
            raise self._error(e) from None

    def _error(self, e: Exception, key: str | None = None) -> DataError:
        """A read that failed, said as corruption only where the bytes are at fault: the system's
        refusal (too many open files, an I/O error, no permission) was "corrupted shard" too."""
        what = f"{key}: " if key else ""
        if isinstance(e, OSError) and e.errno is not None:
            return DataError(f"cannot read shard {self.path}: {what}{e.strerror or e}")
        return DataError(f"corrupted shard {self.path}: {what}{e}")

    def _get(self, key: str) -> np.ndarray:
        try:
            return self._npz[key]
        except KeyError:
            raise DataError(f"corrupted shard {self.path}: member {key} is missing") from None
        except NPZ_ERRORS as e:
            raise self._error(e, key) from None

    def clip(self, i: int) -> dict:
        meta_bytes = self._get(f"{i:04d}.meta").tobytes()
        try:
            meta = json.loads(meta_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"corrupted shard {self.path}: clip {i} metadata: {e}") from None
        return {
            "video": self._get(f"{i:04d}.video"),
            "audio": self._get(f"{i:04d}.audio"),
            "reference": self._get(f"{i:04d}.reference"),
            "motion": self._get(f"{i:04d}.motion"),
            "caption": meta.get("caption", ""),
            "meta": meta,
        }

    def close(self) -> None:
        self._npz.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_clips(root: Path, split: str, limit: int | None = None):
    """Yield clip dicts of a split in order (plain numpy, no torch)."""
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"unknown split {split!r}; the dataset has {', '.join(manifest['splits'])}")
    n = 0
    for shard in manifest["splits"][split]["shards"]:
        if limit is not None and n >= limit:
            return  # (before opening the next shard, not after)
        # closed however iteration ends: a limit, an error, or a consumer that stops reading
        # (the generator's close) each left the file open
        with ShardReader(Path(root) / shard["file"], shard.get("bytes"), shard.get("sha256")) as reader:
            for i in range(shard["clips"]):
                if limit is not None and n >= limit:
                    return
                yield reader.clip(i)
                n += 1
