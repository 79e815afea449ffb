"""A dataset's manifest.json: written last by `streamgen data make` (a folder without it is
unfinished), read by every reader of the dataset, and checked for what readers index.

(The shards' machinery, `plan_shards`, `DataError` and the like, is imported from shards.py where it
is used: shards.py imports this module.)
"""

from __future__ import annotations

import json
from pathlib import Path

from streamgen.files import write_text_atomically

from . import SPLITS
from .motion import FPS, Motion
from .unfinished_make import PARTIAL, partly_made

FORMAT = "streamgen-avatar-world/1"


def _made_already(out: Path, settings: dict) -> dict | None:
    """The manifest in `out` where it is that of the make of `settings` (else None): its settings, and
    its shards those it plans (the shard size is not recorded otherwise); the speech engine aside."""
    from .shards import plan_shards, shard_file

    try:
        manifest = json.loads((out / "manifest.json").read_text())
        made = sorted((s["file"], s["clips"], s["first_index"], s["last_index"])
                      for split in SPLITS for s in manifest["splits"][split]["shards"])  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if any(manifest.get(k) != v for k, v in settings.items() if k not in ("shard_size", "speech")):
        return None
    plan = plan_shards(settings["clips"], settings["shard_size"])
    planned = sorted((shard_file(split, k), len(ix), ix[0], ix[-1]) for split, k, ix in plan)
    return manifest if made == planned else None


def _write_manifest(out: Path, settings: dict, written: list[dict]) -> dict:
    manifest = {
        "format": FORMAT,
        "seed": settings["seed"],
        "clips": settings["clips"],
        "height": settings["height"],
        "width": settings["width"],
        "fps": FPS,
        "seconds": settings["seconds"],
        "frames": int(round(settings["seconds"] * FPS)),
        "sample_rate": 16000,
        "identities": settings["identities"],
        "speech": settings["speech"],  # (the espeak-ng that spoke the clips)
        "motion_names": Motion.names(),
        "splits": {},
    }
    for split in SPLITS:
        # in the order of their numbers: by name, shard-100000 came before shard-10001 (a split of more
        # than 100000 shards read its clips out of order)
        shards = sorted((w for w in written if w["file"].startswith(split + "/")), key=_shard_number)
        manifest["splits"][split] = {"clips": sum(w["clips"] for w in shards), "shards": shards}
    write_text_atomically(out / "manifest.json", json.dumps(manifest, indent=1))
    (out / PARTIAL).unlink(missing_ok=True)  # (after: a kill between the two leaves a dataset)
    return manifest


def load_manifest(root: Path) -> dict:
    from .shards import DataError, clip_count

    root = Path(root)
    path = root / "manifest.json"
    if not path.exists():
        if (root / PARTIAL).exists():  # (said as any other folder, it read as if nothing were there)
            raise DataError(
                f"{root} is not a finished dataset: the `streamgen data make` that wrote it did not finish "
                f"({clip_count(partly_made(root))} made, in {root / PARTIAL}); run it again to finish it"
            )
        # (a path mistyped, or a file, was told to run `streamgen data make`, as an empty folder is)
        if not root.exists():
            raise DataError(f"{root} is not a finished dataset: there is no such folder")
        if not root.is_dir():
            raise DataError(f"{root} is not a finished dataset: it is a file, not a dataset's folder")
        if (dataset := _dataset_above(root)) is not None:  # (a split's folder: told to make a dataset there)
            raise DataError(f"{root} is not a finished dataset: it is a folder inside the dataset {dataset}; "
                            f"give the dataset's own folder, {dataset} (a split is chosen apart)")  # fmt: skip
        raise DataError(f"{root} is not a finished dataset (no manifest.json); run `streamgen data make`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupted manifest {path}: {e}") from None
    except OSError as e:  # (no permission, an I/O error: the OSError's traceback in every reader)
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):  # (an AttributeError)
        raise DataError(f"corrupted manifest {path}: not the JSON object of a dataset's manifest")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    wrong = _manifest_fault(manifest)
    if wrong:  # (an edited manifest: a TypeError's or a KeyError's traceback where it was read)
        raise DataError(f"corrupted manifest {path}: {wrong}")
    return manifest


def _dataset_above(folder: Path) -> Path | None:
    """The dataset (a folder with manifest.json) that `folder` is inside, up to three levels up (a
    split's shards, a latent cache's split: DIR/latents/NAME/train), or None."""
    for above in list(folder.absolute().parents)[:3]:
        if (above / "manifest.json").is_file():
            return above
    return None


def _manifest_fault(manifest: dict) -> str | None:
    """What in `manifest` is not as `_write_manifest` writes it, of what readers index (None: nothing)."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(manifest.get("motion_names"), list):
        return "its motion_names are missing or not a list"
    for split, entry in manifest["splits"].items():
        if not (
            isinstance(entry, dict) and count(entry.get("clips")) and isinstance(entry.get("shards"), list)
        ):
            return f"split {split!r} is not an object with a clip count and a list of shards"
        for k, shard in enumerate(entry["shards"]):
            if not (
                isinstance(shard, dict) and isinstance(shard.get("file"), str) and count(shard.get("clips"))
            ):
                return f"shard {k} of split {split!r} is not an object with a file and a clip count"
    return None


def _shard_number(record: dict) -> int:
    return int(record["file"].rsplit("/shard-", 1)[1].removesuffix(".npz"))
