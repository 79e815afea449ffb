"""The folder espeak-ng reads its data from when `streamgen.data.speech` speaks: a view of its data
directory whose voice variants have no pitch flutter, made once a process, and the views of processes
gone (or, where the process cannot be asked after, unused for days) removed.

espeak-ng modulates pitch with a "flutter" table whose read position is a static variable that carries
over from one sentence to the next (and survives re-initialisation), so the same text would sound
slightly different depending on what was spoken before; its roughness reads a static counter too.
Variants with `flutter 0` make synthesis a pure function of (text, voice), which the dataset's
per-seed determinism needs. The view is a temporary folder of symlinks plus our variant files
"sg_<variant>" (`speech.Voice.espeak_name` names them).
"""

from __future__ import annotations

import contextlib
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
        self._marked = time.monotonic()  # (made just now: its folder's time is now)
        weakref.finalize(self, _remove_view, self.path, self.owner)

    def mark_used(self) -> None:
        """The folder's modification time set to now, at most once every `_MARK_EVERY_S`: what tells
        a view in use from one its process left, where that process cannot be asked after
        (`_stale_view`), on a file system that keeps read times once a day (relatime) or never
        (noatime) as on any other."""
        now = time.monotonic()
        if now - self._marked >= _MARK_EVERY_S:
            self._marked = now
            with contextlib.suppress(OSError):  # (gone: `gone` tells the speaker, which makes another)
                os.utime(self.path)

    def gone(self) -> bool:
        """Whether the folder was removed under its process (as unused for days, by a view made on
        another host that shares the temp folder): espeak-ng could load no voice from it."""
        return not self.path.is_dir()


# how often a process that speaks marks its view as used (`DataView.mark_used`): far more often
# than a view must go unused to be removed (`_VIEW_STALE_AFTER_S`)
_MARK_EVERY_S = 3600.0


_VIEW_PREFIX = "streamgen-espeak-"
_VIEW_NAME = re.compile(rf"^{_VIEW_PREFIX}(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+$")


def _remove_view(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # (not in a forked child, whose exit runs the finalizers it inherited)
        shutil.rmtree(path, ignore_errors=True)


def _remove_abandoned_views(temp: Path) -> None:
    """The views in `temp` whose process has ended (on this host), and stale ones (`_stale_view`)
    whose process cannot be asked after: of another host (or PID namespace), which may share the
    temp folder (a shared home, a /tmp that outlives containers), or of the previous naming, which
    named none; removed."""
    for path in temp.glob(f"{_VIEW_PREFIX}*"):
        m = _VIEW_NAME.match(path.name)
        if m and path.is_dir() and not path.is_symlink() and process_ended(m["host"], int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
        elif (_OLD_VIEW_NAME.match(path.name) or (m and _unaskable(m["host"]))) and _stale_view(path):
            shutil.rmtree(path, ignore_errors=True)


def _unaskable(host: str) -> bool:
    """Whether `process_ended` cannot tell of a view's process: another host's, or no POSIX signals."""
    return host != HOST_TAG or os.name != "posix"


# the views before each named its process: a TemporaryDirectory's, mkdtemp's 8 characters after the prefix
_OLD_VIEW_NAME = re.compile(rf"^{_VIEW_PREFIX}[a-z0-9_]{{8}}$")
# (relatime, Linux's default, moves a file's read time on at most once a day: twice the day it
# leaves a writer's temp file alone)
_VIEW_STALE_AFTER_S = 2 * ABANDONED_AFTER_S


def _stale_view(path: Path) -> bool:
    """Whether `path`, named as a view whose process cannot be asked after, is one of ours no process
    uses: a folder (no link) of this user's, with our variant files, none of which (nor the folder)
    was read or written for `_VIEW_STALE_AFTER_S`. A process that speaks through it marks its folder
    hourly (`DataView.mark_used`), and one of the previous code reads a variant file at every voice
    it sets; one idle for longer, whose view is removed, makes another as it speaks again (`gone`)."""
    since = time.time() - _VIEW_STALE_AFTER_S
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
    """This process's view, made of the data directory `find_src()` finds where there is none (or it
    was removed); in a forked child, its parent's while that one lives (the same data: a view of its
    own, never removed by a child's os._exit, was left behind)."""
    global _view
    if _view is None or _view.gone() or (_view.owner != os.getpid() and process_ended(HOST_TAG, _view.owner)):
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
