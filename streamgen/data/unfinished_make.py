"""What an unfinished `data make` leaves in its folder, and how the next make of the same settings
goes on from it: PARTIAL, the record of the shards finished so far, and the shards a killed make
finished but had not recorded yet (known by their own record, MADE_FOR), adopted or removed.

(The shards' own machinery, `check_shard`, `plan_shards` and the like, is imported from shards.py
where it is used: shards.py imports this module.)
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path
from typing import TextIO

import numpy as np

from streamgen.files import write_text_atomically

from . import SPLITS

# A make that did not finish (Ctrl-C, kill -9, a full disk) leaves PARTIAL beside its shards: its
# settings and the shards finished so far, each with its size and sha256. The same command run
# again goes on from them (the clips are a pure function of the settings) where the whole make was
# done again; a make with other settings is refused, the folder holding another make's work.
# One JSON object a line: {"settings": ...} first, then a shard's record as each is finished,
# appended (the whole file written again for each shard was quadratic: 3000 shards wrote 900 MB
# and took 2.5 times as long as the same clips in 3 shards).
PARTIAL = "partial.json"
# the settings a make's clips are a function of, and the option that gives each (not --workers)
_SETTING_FLAGS = {
    "seed": "--seed", "clips": "--clips", "height": "--size", "width": "--size", "seconds": "--seconds",
    "identities": "--identities", "shard_size": "--shard-size",
}  # fmt: skip


def _finished_shards(out: Path, settings: dict, changed: set[str] | None = None) -> dict[str, dict]:
    """The shards an unfinished make of these `settings` left in `out` (PARTIAL) that are still
    there as it wrote them, by file; a DataError if it was a make of other settings. `changed`: given
    the files PARTIAL records that are gone or not as it recorded them."""
    from .shards import DataError, check_shard

    path = out / PARTIAL
    if not path.is_file():
        return {}
    try:
        kept, shards = _read_partial(path)
    except OSError as e:  # (no permission, an I/O error: it said to delete the record, or the dataset)
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{path}: unreadable ({e}); delete it, or {out}, to make the dataset again") from None
    speech = kept.setdefault("speech", settings["speech"])  # (an older make's records none: taken as ours)
    if speech != settings["speech"]:  # (going on, it mixed clips spoken by two, without a word)
        raise DataError(
            f"{out} holds a dataset partly made by another speech engine ({speech} there, "
            f"{settings['speech']} now), whose clips these would not match: delete {out} to make it again "
            "(or choose another --out)"
        )
    if kept != settings:
        other = ", ".join(
            f"{_SETTING_FLAGS.get(k, k)} {kept.get(k)} there, {v} now"
            for k, v in settings.items()
            if kept.get(k) != v and not (k == "width" and kept.get("height") != settings["height"])
        )
        raise DataError(
            f"{out} holds a dataset partly made with other settings ({other or 'another format'}): run "
            f"`data make` again with those to finish it, or delete {out} (or choose another --out)"
        )
    finished = {}
    for shard in shards:
        try:
            check_shard(out / shard["file"], shard["bytes"], shard["sha256"])
        except DataError:  # (gone or changed since: made again)
            if changed is not None:
                changed.add(shard["file"])
            continue
        if "indices" in shard:  # (recorded by an older make: every clip's index)
            indices = shard.pop("indices")
            shard["first_index"], shard["last_index"] = indices[0], indices[-1]
        finished[shard["file"]] = shard
    return finished


def _read_partial(path: Path) -> tuple[dict, list[dict]]:
    """The settings and the shard records of PARTIAL at `path` (or of the one JSON object an older
    make wrote). A last line cut short (a kill while it was appended) is no shard's."""
    text = path.read_text()
    with contextlib.suppress(ValueError):
        older = json.loads(text)
        if isinstance(older, dict) and "shards" in older:
            return older["settings"], older["shards"]
    lines = text.splitlines()
    settings, shards = json.loads(lines[0])["settings"], []
    for n, line in enumerate(lines[1:], 2):
        try:
            shards.append(json.loads(line))
        except ValueError:
            if n < len(lines) or text.endswith("\n"):
                raise
    # (an edited one: an AttributeError's or a TypeError's traceback where it was read)
    if not isinstance(settings, dict):
        raise ValueError("its settings are not an object")
    for shard in shards:
        if not (isinstance(shard, dict) and {"file", "clips", "bytes", "sha256"} <= shard.keys()):
            raise ValueError(f"{json.dumps(shard)[:80]} is not a shard's record")
    return settings, shards


def _write_partial(out: Path, settings: dict, shards: list[dict]) -> TextIO:
    """PARTIAL in `out` written anew, of `settings` and `shards`; returned open for appending."""
    lines = [{"settings": settings}, *shards]
    write_text_atomically(out / PARTIAL, "".join(json.dumps(line) + "\n" for line in lines))
    return open(out / PARTIAL, "a")


def _append_to_partial(partial: TextIO, shard: dict) -> None:
    partial.write(json.dumps(shard) + "\n")
    partial.flush()
    os.fsync(partial.fileno())  # (as write_text_atomically's: a power cut does not lose it)


def partly_made(out: Path) -> int:
    """The clips an unfinished make left in `out` for the next one to go on from (0: none)."""
    try:
        return sum(s["clips"] for s in _read_partial(Path(out) / PARTIAL)[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 0



# the member of a shard that says what it was made for: the settings its clips are made of, its
# file and clips
MADE_FOR = "made_for"
_CLIP_MEMBERS = ("video", "audio", "reference", "motion", "meta")


def clip_settings(settings: dict) -> dict:
    """Of a make's `settings`, those its clips are made of, the espeak-ng that speaks them included
    (a shard another engine spoke was taken as this one's where no PARTIAL said otherwise). Not the
    count of clips nor the shard size, which say which clips a shard holds (its record says that): a
    dataset made again with more clips has the same first shards, byte for byte, whose cached latents
    are kept."""
    return {k: settings[k] for k in ("format", "seed", "height", "width", "seconds", "identities", "speech")}


def _finished_unrecorded(out: Path, settings: dict, recorded: set[str]) -> dict[str, dict]:
    """The shards of the make of `settings` in `out` that PARTIAL does not record, whole: those a make
    killed (kill -9, the out-of-memory killer) finished but had not recorded yet, made again, by
    file. A shard is taken only if its own record (MADE_FOR) is of these settings' clips and its file
    and clips are the plan's, and every member it should have is there and whole (CRCs); another
    make's, an older streamgen's (no record) or a damaged one is made again."""
    from .shards import _shard_record, plan_shards, planned_shards, shard_file

    planned = planned_shards(settings["clips"], settings["shard_size"])
    unrecorded = {}
    for split in SPLITS:
        for path in (out / split).glob("shard-*.npz"):
            number = path.name[len("shard-") : -len(".npz")]
            if not (number.isdigit() and int(number) < planned[split]):
                continue
            file = shard_file(split, int(number))
            if file == f"{split}/{path.name}" and file not in recorded:
                unrecorded[file] = path
    finished = {}
    if not unrecorded:  # (nothing to walk the plan for: it is walked as its shards are made)
        return finished
    # (the plan walked once, as far as the last of them: a shard's clips are the plan's)
    for split, k, indices in plan_shards(settings["clips"], settings["shard_size"]):
        if not unrecorded:
            break
        path = unrecorded.pop(shard_file(split, k), None)
        if path is None:
            continue
        made = {"file": shard_file(split, k), "clips": len(indices), "first_index": indices[0],
                "last_index": indices[-1]}  # fmt: skip
        if _made_for(path, {"of": clip_settings(settings), **made}):
            finished[made["file"]] = _shard_record(path, made)
    return finished


def _made_for(path: Path, made_for: dict) -> bool:
    """Whether the shard at `path` says it was made for `made_for` and is whole."""
    from .shards import NPZ_ERRORS

    try:
        with zipfile.ZipFile(path) as npz:
            with npz.open(f"{MADE_FOR}.npy") as member:
                if json.loads(np.lib.format.read_array(member, allow_pickle=False).tobytes()) != made_for:
                    return False
            members = {f"{i:04d}.{m}.npy" for i in range(made_for["clips"]) for m in _CLIP_MEMBERS}
            return set(npz.namelist()) == members | {f"{MADE_FOR}.npy"} and npz.testzip() is None
    except (*NPZ_ERRORS, KeyError):
        return False


def _remove_unrecorded(out: Path, settings: dict, recorded: set[str]) -> None:
    """Leave nothing in `out` that could pass for a finished shard of the make of `settings` but the
    `recorded` ones, and no temp file of a shard (a pool's worker that was ended before it could
    remove its own)."""
    from .shards import planned_shards, shard_file

    shards = planned_shards(settings["clips"], settings["shard_size"])
    for split in SPLITS:
        for path in (out / split).glob("shard-*.npz"):
            number = path.name[len("shard-") : -len(".npz")]
            file = number.isdigit() and int(number) < shards[split] and shard_file(split, int(number))
            if file == f"{split}/{path.name}" and file not in recorded:  # (a plan's, unrecorded)
                path.unlink(missing_ok=True)
        for path in (out / split).glob(".shard-*.npz.*.tmp"):  # (temp_files_beside's, of every shard)
            path.unlink(missing_ok=True)

