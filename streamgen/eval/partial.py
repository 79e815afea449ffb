"""What an evaluation has measured so far, kept in OUT/partial/ so that the same command run again
after a Ctrl-C or a kill goes on from there (`streamgen eval` scores clip after clip for minutes to
hours: a student's 60-minute drift stream, a teacher's 50 steps).

    OUT/partial/settings.json   what the results are a function of (`eval_settings`)
    OUT/partial/clip-00003.npz  one clip's measurements (written whole: `write_atomically`)
    OUT/partial/stream-1.5.npz  the --minutes stream's (of 1.5 minutes)
    OUT/partial/stream-1.5-so-far.npz  its scores so far, while it is made (`StreamScores.state`)
    OUT/partial/stream-1.5-so-far.pt   a model's session state with them (`streamgen.stream_state`)

Clip i of a split is the same clip whatever --clips says, so a run of more clips goes on from the
ones of a run of fewer, finished or not (and whatever --minutes says). The measurements stay once
report.json is written (the progress files of the stream go); the same command run after that finds
report.json of the same settings (`EVAL_VERSION` among them) and clips, and measures nothing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from streamgen.files import write_atomically, write_text_atomically

FOLDER = "partial"


def weights_digest(*modules) -> str | None:
    """A digest of the modules' weights (and dtypes): a model exported again at the same path, or run
    in another precision, is another evaluation. None without a module (the renderer's clips)."""
    import torch

    modules = [m for m in modules if m is not None]
    if not modules:
        return None
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def files_digest(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def json_digest(value) -> str:
    """A digest of a JSON value, whatever the order of its objects' keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def changed_settings(saved, settings: dict) -> list[str]:
    """The keys whose values differ between `saved` (anything read back: not a dict has none) and
    `settings`."""
    theirs = saved if isinstance(saved, dict) else {}
    return [k for k in sorted(set(theirs) | set(settings)) if theirs.get(k) != settings.get(k)]


class MeasuredFolderError(RuntimeError):
    """OUT/partial cannot be the folder of measured clips (a file of that name is there)."""


class Measured:
    """The per-clip (and stream) results in OUT/partial of the evaluation of `settings`."""

    def __init__(self, out: Path, settings: dict):
        self.folder, self.settings = Path(out) / FOLDER, settings

    def open(self, note=None) -> int:
        """Keep the results of these settings (how many clips there are), or start the folder
        afresh; the other settings' results are removed (another evaluation into this --out
        replaces the earlier one's, as its report does), said through `note`."""
        if self.folder.exists() and not self.folder.is_dir():  # (mkdir's FileExistsError, a traceback)
            raise MeasuredFolderError(
                f"{self.folder} is a file, where eval keeps the clips it has measured: move it, or give another --out"
            )
        saved = None
        try:
            saved = json.loads((self.folder / "settings.json").read_text())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            pass
        except OSError as e:  # (no permission, an I/O error: taken as "does not read", every clip went)
            raise MeasuredFolderError(
                f"cannot read {self.folder / 'settings.json'}: {e.strerror or e} (the clips measured beside it "
                "are kept: eval goes on from them once it reads)"
            ) from None
        if saved != self.settings:
            others = len(list(self.folder.glob("clip-*.npz")))
            if others and note:  # (not without a word: the same command would have gone on from them)
                # (one that does not read was said to be of other settings, every key named as changed)
                of = (f"an evaluation of other settings ({', '.join(changed_settings(saved, self.settings))})"
                      if isinstance(saved, dict) else "an evaluation whose settings.json does not read")  # fmt: skip
                note(f"removing the {others} clip{'s' * (others != 1)} {of} left in {self.folder}")
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if saved != self.settings:
            write_text_atomically(self.folder / "settings.json", json.dumps(self.settings, indent=1))
            return 0
        return len(list(self.folder.glob("clip-*.npz")))

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def load(self, name: str, needs=()) -> dict | None:
        """The arrays saved as `name`, or None (not measured, or unreadable, or without one of the
        arrays `needs`, a file of something else: measured again)."""
        try:
            with np.load(self._path(name), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
            return None
        # (one without them ended the evaluation in a KeyError's traceback)
        return arrays if set(needs) <= set(arrays) else None

    def save(self, name: str, arrays: dict) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomically(self._path(name), lambda tmp: tmp.write_bytes(buffer.getvalue()))

    def keep_finished(self) -> None:
        """Once the report is written: the measurements stay (a later run of more clips, or with a
        stream, measures only what they lack), the stream's progress files go (its results are in
        their place)."""
        for path in self.folder.glob("*-so-far.*"):
            path.unlink(missing_ok=True)
