"""The folder espeak-ng reads its data from when `streamgen.data.speech` speaks: a view of its data
directory whose voice variants have no pitch flutter, made once a process, and the views of processes
gone removed.

espeak-ng modulates pitch with a "flutter" table whose read position is a static variable that carries
over from one sentence to the next (and survives re-initialisation), so the same text would sound
slightly different depending on what was spoken before; its roughness reads a static counter too.
Variants with `flutter 0` make synthesis a pure function of (text, voice), which the dataset's
per-seed determinism needs. The view is a temporary folder of symlinks plus our variant files
"sg_<variant>" (`speech.Voice.espeak_name` names them).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

from streamgen.files import ABANDONED_AFTER_S, HOST_TAG, process_ended

# appended to every variant: no pitch flutter, no roughness modulation (both read static counters)
_STEADY = "\nflutter 0\nroughness 8\n"


class DataView:
    """A view of espeak-ng's data directory `src` with steady copies of its `variants`.

    The folder is its maker's (`owner`, in its name): removed at that process's exit and by no other
    (a forked child's exit, or its collection of the engine it inherited, removed its parent's view
    under it: the parent's next voice failed to load); one left by a process that ended with no
    clean-up (os._exit, a kill) is removed by the next view made in the same temp folder.
    """

    def __init__(self, src: Path, variants: Iterable[str]):
        temp = Path(tempfile.gettempdir())
        _remove_abandoned_views(temp)
        self.owner = os.getpid()
        self.path = Path(tempfile.mkdtemp(prefix=f"{_VIEW_PREFIX}{HOST_TAG}-{self.owner}-", dir=temp))
        try:
            _fill_view(self.path, src, variants)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        weakref.finalize(self, _remove_view, self.path, self.owner)


_VIEW_PREFIX = "streamgen-espeak-"
_VIEW_NAME = re.compile(rf"^{_VIEW_PREFIX}(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+$")


def _remove_view(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # (not in a forked child, whose exit runs the finalizers it inherited)
        shutil.rmtree(path, ignore_errors=True)


def _remove_abandoned_views(temp: Path) -> None:
    """The views in `temp` whose process has ended (on this host), and stale ones of the previous
    naming (`_stale_old_view`), removed."""
    for path in temp.glob(f"{_VIEW_PREFIX}*"):
        m = _VIEW_NAME.match(path.name)
        if m and path.is_dir() and not path.is_symlink() and process_ended(m["host"], int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
        elif _OLD_VIEW_NAME.match(path.name) and _stale_old_view(path):
            shutil.rmtree(path, ignore_errors=True)


# the views before each named its process: a TemporaryDirectory's, mkdtemp's 8 characters after the prefix
_OLD_VIEW_NAME = re.compile(rf"^{_VIEW_PREFIX}[a-z0-9_]{{8}}$")
# (relatime, Linux's default, moves a file's read time on at most once a day: twice the day it
# leaves a writer's temp file alone)
_OLD_VIEW_STALE_AFTER_S = 2 * ABANDONED_AFTER_S


def _stale_old_view(path: Path) -> bool:
    """Whether `path`, named as a view of the previous naming, is one of ours no process uses: a folder
    (no link) of this user's, with our variant files, none of which (nor the folder) was read or
    written for `_OLD_VIEW_STALE_AFTER_S`. Its name says no process to ask after; a process that still
    speaks through it reads a variant file at every voice it sets."""
    since = time.time() - _OLD_VIEW_STALE_AFTER_S
    try:
        folder = path.lstat()
        variants = path / "voices" / "!v"
        if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.getuid():
            return False
        ours = [variants / entry.name for entry in os.scandir(variants) if entry.name.startswith("sg_")]
        if not stat.S_ISREG((variants / "sg_default").lstat().st_mode):
            return False
        used = [folder, *(p.lstat() for p in ours)]
    except OSError:  # (no view's shape, or removed meanwhile by another)
        return False
    return all(max(s.st_mtime, s.st_atime) < since for s in used)


_view: DataView | None = None


def data_view(find_src: Callable[[], Path], variants: Iterable[str]) -> DataView:
    """This process's view, made of the data directory `find_src()` finds where there is none; in a
    forked child, its parent's while that one lives (the same data: a view of its own, never removed
    by a child's os._exit, was left behind)."""
    global _view
    if _view is None or (_view.owner != os.getpid() and process_ended(HOST_TAG, _view.owner)):
        _view = DataView(find_src(), variants)
    return _view


def _fill_view(root: Path, src: Path, variants: Iterable[str]) -> None:
    for entry in src.iterdir():
        if entry.name != "voices":
            (root / entry.name).symlink_to(entry.resolve())
    (root / "voices").mkdir()
    for entry in (src / "voices").iterdir():
        if entry.name != "!v":
            (root / "voices" / entry.name).symlink_to(entry.resolve())
    copies = root / "voices" / "!v"
    copies.mkdir()
    for entry in (src / "voices" / "!v").iterdir():
        (copies / entry.name).symlink_to(entry.resolve())
    for name in variants:
        original = (src / "voices" / "!v" / name).read_text(encoding="utf-8", errors="replace")
        (copies / f"sg_{name}").write_text(original + _STEADY, encoding="utf-8")
    (copies / "sg_default").write_text("language variant\nname default\n" + _STEADY, encoding="utf-8")
