"""Folders written whole or not at all: a model export (a model directory, a diffusers folder)
that a server reads later or in another process, several files that belong together.

A new folder is staged beside the old one, fsynced, and takes its place in one step (Linux's
renameat2 exchange). Where the system cannot exchange (not Linux, overlayfs' lower layers), the
staged entries are moved in one rename each; at a mount point, or where nothing can be made beside
it, the writer writes into the folder itself. Either way under an export stamp (`EXPORT_STAMP`)
that tells readers (`read_folder`) that the folder holds files of two exports meanwhile.
Its staging folders are named, and those of killed writers removed, as `streamgen.files`' temp
files are; the stamp is written through it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# (the writer's tag, in temp names and in export stamps, and whether its process has ended: one
# naming for the temp files and folders of both modules)
from streamgen.files import (
    HOST_TAG,
    followed,
    fsync_folder,
    process_ended,
    remove_abandoned,
    write_text_atomically,
)
from streamgen.folder_lock import one_export_at_a_time

T = TypeVar("T")
log = logging.getLogger(__name__)


def exchange(a, b) -> bool:
    """Swap the paths `a` and `b` (files or folders, on one file system) in one atomic step: Linux's
    renameat2(RENAME_EXCHANGE). False, with nothing changed, where the system or the file system
    cannot, or this user may not move them (then the caller does it some other way)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # (a C library older than glibc 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    # (EXDEV: overlayfs exchanges no folder of a lower layer, where a rename of each file works)
    # (EBUSY: a mount point)
    # (EPERM, EACCES: another user's folder, writable to this one, in a sticky folder such as /tmp,
    # or one this user cannot move: written into in place, it still takes the export)
    cannot = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EBUSY)
    if err in (*cannot, errno.EPERM, errno.EACCES):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def write_folder_atomically(
    path,
    write: Callable[[Path], object],
    carry: Callable[[str], bool] | None = None,
    in_place: Callable[[Path], object] | None = None,
) -> None:
    """`write(folder)` fills a new folder beside `path` (diffusers' save_pretrained, which fsyncs
    nothing; a model export); its files and folders are fsynced, then it takes `path`'s place
    whole: renamed in where there is none, else exchanged with the old folder in one step
    (`exchange`), which is then removed. A reader of several files in it reads them again where
    the folder changed meanwhile (`read_folder`). On any error `path` is as it was.

    carry(name): the old folder's entries of such names that the new one lacks are linked into it
    first (what is not the writer's: a report beside a model). Where the system cannot exchange
    (not Linux, overlayfs' lower layers), the new folder's entries are moved over the old ones one
    by one (`_move_entries`). Where no folder can be made beside `path`, and at a mount point at
    once, `in_place(path)` writes into the old folder itself, file by file in its own order.
    Either way the folder holds files of two exports meanwhile: `EXPORT_STAMP` tells readers
    (`read_folder`) that an export is under way, or was cut short."""
    path = followed(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if in_place is not None and path.is_dir() and os.path.ismount(path):
        # (a volume mounted at `path`: no exchange there (EXDEV, EBUSY), and a staging folder beside
        # it, on the parent's file system (a container's small root), would be written for nothing)
        _written_in_place(path, lambda: in_place(path))
        return
    try:
        staging = new_folder_beside(path)
    # (a folder of one's own in a folder one cannot write, or a read-only file system's: a
    # container's --read-only root, the model's folder a volume mounted writable in it)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or in_place is None or not path.is_dir():
            raise
        staging = None
    if staging is None:  # (written out of the except block: the writer's error is not chained to it)
        _written_in_place(path, lambda: in_place(path))
        return
    try:
        new = staging / path.name
        new.mkdir()
        write(new)
        carried = {}  # name: (the old folder's entry, its copy in the new one), as carried
        if carry is not None and path.is_dir():
            for old in path.iterdir():
                # (not the old folder's stamp of an export written in place: the new one is whole)
                if old.name != EXPORT_STAMP and carry(old.name) and not os.path.lexists(new / old.name):
                    # (its version before the copy: a change while a folder is copied is one)
                    version = _version(old)
                    try:
                        _link_copy(old, new / old.name)
                    except FileNotFoundError:  # (gone since listed: nothing to carry)
                        continue
                    except shutil.Error as e:  # (a folder's files gone since listed: a change)
                        if any(os.path.lexists(src) for src, _, _ in e.args[0]):
                            raise
                    carried[old.name] = (version, _version(new / old.name))
        if path.is_dir():
            _take_permissions(path, new)
        _fsync_tree(new)
        if _renamed_in(new, path):
            pass
        elif exchange(new, path):  # (the old folder now at `new`)
            if carry is not None:
                _carry_late(new, path, carry, carried)
        elif path.is_dir():
            # (the staged files moved in, not written again in place: a model's weights twice)
            trash = staging / "old"
            _written_in_place(path, lambda: _move_entries(new, path, trash, keep=carry, skip=carried))
        else:  # (a file where the folder goes)
            move_over(new, path, staging / "old")
        fsync_folder(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_into_folder(
    path, write: Callable[[Path], object], keep: Callable[[str], bool] | None = None
) -> None:
    """`write(folder)` fills a new folder made inside the folder `path` (on its file system: a
    mount point's), whose entries then take the place of `path`'s one by one (`_move_entries`:
    each in one rename, the config last), and `path`'s other entries go (but writers' temp files,
    and those whose name `keep` takes: `write_folder_atomically`'s `carry`).
    `write_folder_atomically`'s `in_place` for a writer that writes a whole folder in one call
    (diffusers' save_pretrained, which would write into `path` itself file by file, unsynced)."""
    path = Path(path)
    staging = new_folder_beside(path / path.name)
    try:
        new = staging / "new"
        new.mkdir()
        write(new)
        _fsync_tree(new)
        _move_entries(new, path, staging / "old", keep=keep)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# the files a reader of an export starts from (a model directory's, a diffusers folder's): moved in
# last, once the other entries are in place and the old ones the export lacks are gone
_READ_FIRST = ("model.json", "config.json")


def _move_entries(
    new: Path, path: Path, trash: Path, keep: Callable[[str], bool] | None = None, skip=()
) -> None:
    """The entries of the folder `new` (but those named in `skip`) in place of `path`'s, each in
    one rename (`move_over`); then `path`'s entries that `new` lacks go (but writers' temp files,
    the export stamp and those whose name `keep` takes), before `_READ_FIRST`'s files come in: an
    old index beside the new config read the old shards."""
    names = sorted(
        (p.name for p in new.iterdir() if p.name not in skip), key=lambda name: name in _READ_FIRST
    )
    for name in names:
        if name not in _READ_FIRST:
            move_over(new / name, path / name, trash)
    for old in list(path.iterdir()):
        if old.name in names or old.name in skip or old.name == EXPORT_STAMP or _is_temp(old.name):
            continue
        if keep is None or not keep(old.name):
            remove_whole(old, trash)
    for name in names:
        if name in _READ_FIRST:
            move_over(new / name, path / name, trash)
    fsync_folder(path)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


# A folder written into in place, file by file (`write_folder_atomically` where it cannot exchange)
# holds files of two exports until the last is in: this file in it says so. It is written (whole)
# before the first change ("writing", by this process), and after the last ("done"), or where the
# writer fails having changed something, or another export went in at the same time (their renames
# interleave) ("cut short"); each time with the export's id, so that a reader that finds the same
# stamp before and after its read knows no export went in meanwhile.
EXPORT_STAMP = ".export.json"
# how long a reader that finds an export under way waits before it reads again (doubled each time)
READ_AGAIN_AFTER_S = 0.1


class ExportUnderWay(ValueError):
    """A folder of files of two exports: one is being written into it in place, or was cut short."""


def _written_in_place(path: Path, change: Callable[[], object]) -> None:
    """change() changes the folder `path` in place, under `EXPORT_STAMP`'s states, one export at a
    time (`streamgen.folder_lock`)."""
    with one_export_at_a_time(path, holder=lambda: _lock_holder(path)) as locked:
        _stamped(path, change, locked)


def _lock_holder(path: Path) -> str:
    """Who holds the folder's lock, as its export stamp tells: the live process of its "writing"
    one (the holder writes its stamp once it has the lock: till then the stamp is another's)."""
    try:
        stamp = json.loads(_stamp_text(path / EXPORT_STAMP) or "{}")
        host, pid = stamp["host"], int(stamp["pid"])
        if stamp["state"] == "writing" and not process_ended(host, pid):
            return f"process {pid} on {'this host' if host == HOST_TAG else 'another host'}"
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return "a process that has not yet written its export stamp"


def _stamped(path: Path, change: Callable[[], object], locked: bool = False) -> None:
    """change() between this export's "writing" stamp and its last ("done" or "cut short").
    `locked`: this export holds the folder's lock (`one_export_at_a_time`)."""
    stamp = {"export": secrets.token_hex(8), "host": HOST_TAG, "pid": os.getpid()}
    before, entries = _stamp_text(path / EXPORT_STAMP), _entries_version(path)
    writing = json.dumps({**stamp, "state": "writing"})
    write_text_atomically(path / EXPORT_STAMP, writing)
    try:
        change()
    except BaseException:
        try:
            if _entries_version(path) != entries:
                write_text_atomically(path / EXPORT_STAMP, json.dumps({**stamp, "state": "cut short"}))
            elif before is None:  # (nothing changed: a full disk before the first rename)
                (path / EXPORT_STAMP).unlink()
            else:
                write_text_atomically(path / EXPORT_STAMP, before)
        except OSError:  # (left "writing": cut short, to a reader, once this process has ended)
            pass
        raise
    # (another export under way when this one began, or begun since: the renames of the two mixed)
    if _under_way_by_another(before, locked=locked):
        # (another host's writer cannot be told dead: it may be writing still, or long gone)
        other = json.loads(before)
        where = "this host" if other["host"] == HOST_TAG else "another host"
        why = f"an export by process {other['pid']} on {where} was under way or cut short when this one began"
        stamp.update(state="cut short", why=why)
    elif _stamp_text(path / EXPORT_STAMP) != writing:
        stamp.update(state="cut short", why="another export went into it at the same time")
    else:
        stamp.update(state="done")
    write_text_atomically(path / EXPORT_STAMP, json.dumps(stamp))


def _under_way_by_another(text: str | None, locked: bool = False) -> bool:
    """Whether the stamp `text` is of an export being written by a process that has not ended.
    Where this export holds the folder's lock (`locked`), one of this host has: a live writer of
    this host would hold the lock (its process id alive now is another's, reused, or this
    process's own earlier export that failed to write its last stamp)."""
    try:
        stamp = json.loads(text) if text is not None else {}
        if stamp.get("state") != "writing" or (locked and stamp["host"] == HOST_TAG):
            return False
        return not process_ended(stamp["host"], int(stamp["pid"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _entries_version(path: Path) -> tuple:
    """The `_version` of each entry of `path` but the stamp and writers' temp files."""
    names = sorted(n for n in os.listdir(path) if n != EXPORT_STAMP and not _is_temp(n))
    return tuple((name, _version(path / name)) for name in names)


def _stamp_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _export_stamps(path: Path) -> dict[str, str]:
    """The `EXPORT_STAMP`s of the folder `path` and of its folders (a diffusers folder in a model
    directory, written in place on its own), by the folder's name ("" for `path`'s own)."""
    stamps = {}
    try:
        names = sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):  # (gone: the reader's own error tells)
        return stamps
    for name in ["", *names]:
        if name and not os.path.isdir(path / name):
            continue
        text = _stamp_text(path / name / EXPORT_STAMP)
        if text is not None:
            stamps[name] = text
    return stamps


def _check_not_under_way(path: Path, stamps: dict[str, str], wait: bool) -> bool:
    """Whether an export into `path` (or one of its folders) is under way, where `wait` (a reader
    reads again later); else ExportUnderWay where one is, or was cut short."""
    for name, text in stamps.items():
        folder = path / name if name else path
        try:
            stamp = json.loads(text)
            state, host, pid = stamp["state"], stamp["host"], int(stamp["pid"])
            why = stamp.get("why", f"process {pid}")
        except (ValueError, KeyError, TypeError):
            raise ExportUnderWay(
                f"{folder / EXPORT_STAMP}: not an export stamp; export the model again"
            ) from None
        if state == "done":
            continue
        if state == "writing" and not process_ended(host, pid):
            if wait:
                return True
            raise ExportUnderWay(
                f"{folder}: an export is being written into it file by file (process {pid} on "
                f"{'this host' if host == HOST_TAG else 'another host'}); load it again once that export is done "
                "(where none is running, it was cut short: export again)"
            )
        raise ExportUnderWay(
            f"{folder}: an export into it was cut short ({why}), leaving files of two exports "
            "beside each other; export it again"
        )
    return False


def _carry_late(old: Path, path: Path, carry: Callable[[str], bool], carried: dict) -> None:
    """The entries another process put in the old folder `old` after its entries were carried
    (while the new one was fsynced) moved into the folder now at `path`: they went with the old one.
    So are those carried and then replaced there (an atomic write renames a new file over the
    carried one; another version of a copied one), where the carried copy at `path` is as it was
    carried (not written again there since the exchange)."""
    for entry in old.iterdir():
        if entry.name == EXPORT_STAMP or not carry(entry.name):
            continue
        target = path / entry.name
        try:
            if not os.path.lexists(target):
                os.rename(entry, target)
            elif entry.name in carried and _version(entry) != carried[entry.name][0]:
                if _version(target) != carried[entry.name][1]:
                    continue  # (written again at `path` meanwhile: the later one)
                if entry.is_dir() and not entry.is_symlink():
                    exchange(entry, target)  # (the carried one left in the old folder, removed with it)
                else:
                    os.replace(entry, target)
        except OSError:  # (put there meanwhile, gone, or a folder where a file was)
            pass
    fsync_folder(path)


def _version(entry: Path) -> tuple | None:
    """Which file (or folder) `entry` is and which version of it: another after a rename over it, or
    a write into it. A folder's is of everything in it too (a file written into a folder inside it
    changes no time of its own)."""
    try:
        st = os.lstat(entry)
        version = [(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)]
        if stat.S_ISDIR(st.st_mode):
            for folder, names, files in os.walk(entry):
                names.sort()  # (one order of visits for one content)
                for name in sorted((*names, *files)):
                    inner = os.path.join(folder, name)
                    st = os.lstat(inner)
                    version.append((os.path.relpath(inner, entry), st.st_ino, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    return tuple(version)


def _take_permissions(old: Path, new: Path) -> None:
    """`new` with `old`'s mode (its setgid bit too) and, where this writer may, its group and owner:
    made by the writer with the umask's mode, it opened a private folder to all, or took a group's
    write permission from a folder shared with it."""
    st = os.stat(old)
    try:
        os.chown(new, st.st_uid if os.name == "posix" and os.geteuid() == 0 else -1, st.st_gid)
    except (OSError, AttributeError):  # (a group this writer is not in; not POSIX)
        pass
    os.chmod(new, stat.S_IMODE(st.st_mode))


def _link_copy(src: Path, dst: Path) -> None:
    """`src` at `dst` too: a file hard linked (one inode: a writer appending to it goes on in the
    new folder), copied where it cannot be; a folder likewise file by file; a symlink as itself."""

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


def read_folder(path, read: Callable[[Path], T], attempts: int = 5) -> T:
    """`read(path)` of a folder that `write_folder_atomically` may replace meanwhile: a read of
    several files could take one from the old folder and the next from the new one (or find the
    old one's gone). Read again where the folder at `path` at the end is not the one opened at the
    start; the open folder's inode, held, cannot be another's meanwhile. Its error is raised where
    the folder stayed; the last attempt is taken as it is.

    Where an export is written into the folder in place (`EXPORT_STAMP`), read again once it is
    done (waiting `READ_AGAIN_AFTER_S`, doubled each time), and likewise where one went in during
    the read; ExportUnderWay where it is still under way at the last attempt, or was cut short."""
    path = Path(path)
    if attempts < 1:
        raise ValueError(f"attempts: at least 1, not {attempts}")
    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # (none there: read's own error; a system that opens no folder: the stamp alone)
            if not path.is_dir():
                return read(path)
            fd = None
        try:
            stamps = _export_stamps(path)
            if _check_not_under_way(path, stamps, wait=not last):
                time.sleep(READ_AGAIN_AFTER_S * 2**attempt)
                continue
            try:
                result = read(path)
            except Exception:
                if not last and (_moved(fd, path) or _export_stamps(path) != stamps):
                    continue
                raise
            if _moved(fd, path):
                if last:
                    return result
                continue
            if _export_stamps(path) == stamps:
                return result
            if last:
                raise ExportUnderWay(
                    f"{path}: exports went into it file by file while it was read; load it again"
                )
        finally:
            if fd is not None:
                os.close(fd)
    raise AssertionError("the last attempt returns or raises")


def _moved(fd: int | None, path: Path) -> bool:
    """Whether the folder open as `fd` is no longer the one at `path` (None: not told, no)."""
    if fd is None:
        return False
    opened = os.fstat(fd)
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino)


def _renamed_in(new: Path, path: Path) -> bool:
    """`new` renamed to `path` where nothing is there (False, nothing changed, where something is)."""
    if os.path.lexists(path):
        return False
    try:
        os.replace(new, path)
    except OSError as e:  # (a folder put there meanwhile, by another writer)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            return False
        raise
    return True


def _fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, and it, fsynced (folders last: their entries)."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            p = os.path.join(parent, name)
            if not os.path.islink(p):
                try:
                    fd = os.open(p, os.O_RDWR)
                except PermissionError:  # (a read-only file: Linux fsyncs a read-only descriptor)
                    try:
                        fd = os.open(p, os.O_RDONLY)
                    except PermissionError:  # (another's file, carried: not one this writer wrote)
                        continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_folder(Path(parent))


def move_over(src: Path, dst: Path, trash: Path) -> None:
    """`src` in `dst`'s place, each file in one rename: a file over a file, a folder where there
    is none; a folder over a folder in one exchange of the two (the old one left at `src`), or
    where the file system cannot exchange, its files one by one (config.json last: a reader
    meanwhile may find the new weights beside the old config), then the old folder's files that
    have no counterpart. (`trash`: a folder on the same file system, deleted after.)"""
    if src.is_dir() and dst.is_dir() and not dst.is_symlink() and exchange(src, dst):
        return
    if src.is_dir() and dst.is_dir():
        names = sorted((p.name for p in src.iterdir()), key=lambda name: name == "config.json")
        for name in names:
            move_over(src / name, dst / name, trash)
        for old in list(dst.iterdir()):
            if old.name not in names:
                remove_whole(old, trash)
        return
    if src.is_dir() != dst.is_dir() and dst.exists():  # (a folder where a file was, or back)
        remove_whole(dst, trash)
    os.replace(src, dst)


def remove_whole(path: Path, trash: Path) -> None:
    """A file unlinked; a folder renamed into `trash` first, gone in one step rather than file by
    file (shutil.rmtree would leave a reader half a Wan VAE)."""
    if path.is_dir() and not path.is_symlink():
        trash.mkdir(exist_ok=True)
        path.rename(trash / f"{len(list(trash.iterdir()))}-{path.name}")
    else:
        path.unlink(missing_ok=True)


def new_folder_beside(path) -> Path:
    """A new folder beside `path`, named as `new_file_beside`'s files are, for a writer that stages
    several files (and removes the folder itself). Beside a symlink's target (`followed`)."""
    path = followed(path)
    remove_abandoned(path, folder=True)
    return Path(
        tempfile.mkdtemp(prefix=f".{path.name}.{HOST_TAG}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    )
