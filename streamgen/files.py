"""Files written whole or not at all: everything that something reads later or in another process
(model exports, dataset shards and their manifest, latent caches, training checkpoints, reports).

Each write goes to a temp file of its own beside the target, which is fsynced, renamed over the
target and its folder fsynced; on any error the temp file is removed and the target is untouched.
So a kill, a full disk or a power cut mid-write leaves the previous file, not a truncated one, and
two writers of one file never write (or rename away) each other's temp file, as they did through
fixed `.tmp` names. The temp files of writers killed before they could remove their own are
removed by the next writer beside them (`remove_abandoned`).

A folder of files written whole (a model export) is `streamgen.folders`' job, built on this one.
No torch here: the dataset code that writes through this reads and writes with numpy alone.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

# whose a temp file is, in its name (`.NAME.HOST-PID-XXXX.tmp`): each has a name of its own, so a
# writer killed before it could remove its file (SIGKILL, the OOM killer, a power cut) would leave
# one more every time, as big as a model's weights; the next writer of NAME removes those whose
# writer is gone (on this host: a process of another one cannot be asked after)


def _host_tag() -> str:
    """HOST in a temp file's name: where its PID means the writer's process. The host name's start
    (readable) and a digest of the whole name and of this process's PID namespace: a PID is looked
    up only there. The name cut short made hosts whose names start alike (the pods of one
    deployment, a node pool's machines) one host, and a container of the host's name (--uts=host,
    --network=host) has PIDs of its own: each removed the other's live writers' files."""
    name = socket.gethostname()
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # (no /proc: not Linux)
        namespace = 0
    digest = hashlib.sha256(f"{name}\0{namespace}".encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9]', '_', name)[:20]}_{digest}"


# (the writer's host in `folders`' staging folders and export stamps too: one naming for both)
HOST_TAG = _host_tag()
_WRITER = re.compile(r"^(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.tmp$")
# The temp files whose writer cannot be asked after: another host's, a container's of this host's
# name whose PID namespace may have gone, and the previous naming's, which named no writer
# (`.NAME.<12 hex>.tmp` files; `.autoencoder.<mkdtemp's 8>.tmp`, an export's staging folder), and
# the fixed names before that (`fixed_temp_names`: `.NAME.tmp`, `NAME.tmp`, `.loss_curves.tmp.png`,
# `NAME.part`).
# Each is removed once nothing in it has been written for this long: no writer leaves its temp file
# untouched for a day (they write theirs through, a muxed stream chunk by chunk, then rename it),
# and removing a live writer's file fails its write, worse than leaving junk a day longer.
ABANDONED_AFTER_S = 24 * 3600
_OLD_FILE, _OLD_FOLDER = re.compile(r"^[0-9a-f]{12}\.tmp$"), re.compile(r"^[a-z0-9_]{8}\.tmp$")


def write_atomically(path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file to the path `tmp`, a new file beside `path`, which then
    replaces `path` (`put_in_place`). On any error the temp file is removed and `path` is untouched.
    A symlink at `path` stays: the file it points to is the one replaced (`followed`)."""
    path = followed(path)
    tmp = new_file_beside(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        # (a writer that renames a file of its own over `tmp` (safetensors' save_file) leaves that
        # file's mode, 0600: set back to the umask's that new_file_beside gave `tmp`, so that a
        # server run as another user can read an exported model)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        put_in_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def new_file_beside(path) -> Path:
    """A new empty file of a name no other writer has, in `path`'s folder (a rename is atomic
    within one file system only). mkstemp's way (O_EXCL), but with open()'s permissions, by the
    umask: mkstemp's 0600 would make an exported model unreadable to a server run as another user.
    For a writer that cannot hand its writing to `write_atomically` (a stream muxed over minutes);
    it calls `put_in_place` and removes the file on error itself. Beside a symlink's target (`followed`)."""
    path = followed(path)
    remove_abandoned(path)
    while True:
        tmp = path.with_name(f".{path.name}.{HOST_TAG}-{os.getpid()}-{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def with_umask_mode(folder) -> None:
    """The files under `folder` with the mode open() gives a new file there (by the umask), which
    `write_atomically`'s have: a writer of a whole folder that renames files of its own into it
    (diffusers' save_pretrained, through safetensors' save_file) leaves them 0600, the writer's alone,
    so that a server run as another user could not read them. (The mode of a file made to see it:
    reading the umask means setting it, under every other thread's feet.)"""
    probe = new_file_beside(Path(folder) / ".mode")
    try:
        mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        probe.unlink()
    for parent, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(parent, name)
            if not os.path.islink(p) and stat.S_IMODE(os.stat(p).st_mode) != mode:
                os.chmod(p, mode)


def put_in_place(tmp, path) -> None:
    """Renames the written file `tmp` over `path`, its bytes on disk first (without the fsync a
    power cut soon after can leave the renamed file empty) and the rename itself after. Over a
    symlink's target, not the symlink (`followed`)."""
    path = followed(path)
    fd = os.open(tmp, os.O_RDWR)  # (fsync needs a writable descriptor on some systems)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)


def home_expanded(path) -> Path:
    """`path` with a leading `~` or `~user` as the home folder, as a shell would (`--model=~/m`, a
    config's `model.init: wan:~/...` reach the code unexpanded). os.path's: pathlib's raised a
    RuntimeError, a traceback, for a `~user` of no such user (a config from another machine); this
    leaves it as it is, a folder that is not there."""
    return Path(os.path.expanduser(path))


def followed(path) -> Path:
    """`path`, or where the symlink at `path` leads (through links to links; a dangling one's target
    too, which open() would have created). The writers that wrote in place (results.json,
    scalars.jsonl, the latents' autoencoder.json) wrote through a symlink to the file it points to
    (a run's log kept on another disk); renamed over the path, they put a file in the link's place
    and left the linked file as it was."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def temp_files_beside(path) -> list[Path]:
    """The temp files (and folders) `new_file_beside(path)` and `folders.new_folder_beside(path)`
    made that are still there: a live writer's, or those of a writer killed before it could remove
    its own."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def remove_abandoned(path, folder: bool = False) -> None:
    """Remove the temp files and folders beside `path` whose writer, on this host, has ended, and
    those whose writer cannot be asked after (the older writers' fixed names too) once untouched
    for `ABANDONED_AFTER_S`. `folder`: `path` is a folder's (`folders.new_folder_beside`), not a
    file's."""
    path = Path(path)
    since = time.time() - ABANDONED_AFTER_S
    for tmp in temp_files_beside(path):
        tag = tmp.name[len(path.name) + 2 :]
        if _writer_gone(tag) or (_unaskable(tag, tmp) and _untouched(tmp, since)):
            _remove(tmp)
    for tmp in fixed_temp_names(path, folder):
        # (of the kind the older writer made: a folder of that name beside a file is not its)
        if os.path.lexists(tmp) and tmp.is_dir() == folder and _untouched(tmp, since):
            _remove(tmp)


def fixed_temp_names(path, folder: bool = False) -> list[Path]:
    """The temp files the writers of `path` had before each had a name of its own: a file's
    `.NAME.tmp` (weights, checkpoints) and `NAME.tmp` (model.json, the dataset's manifest, a
    shard's .npz), the training monitor's `.loss_curves.tmp.png` (the suffix kept for
    matplotlib), and `NAME.part` of the writers in `_PART_WRITTEN`; a folder's, only the
    autoencoder's staging folder `.autoencoder.tmp`. No writer makes them now; a killed one left
    them. No other: `NAME.tmp` beside a model folder NAME is no writer's (a user's copy of it, say,
    which `cp -a` leaves a day old at once), nor is `dit.safetensors.part` (a browser's download
    of it, paused)."""
    path = Path(path)
    if folder:
        return [path.with_name(".autoencoder.tmp")] if path.name == "autoencoder" else []
    names = [path.with_name(f".{path.name}.tmp"), path.with_name(f"{path.name}.tmp")]
    if path.name == "loss_curves.png":
        names.append(path.with_name(".loss_curves.tmp.png"))
    if path.suffix in _PART_WRITTEN or path.name in _PART_WRITTEN:
        names.append(path.with_name(f"{path.name}.part"))
    return names


# the files written through `NAME.part` before this module (renamed into place, no fsync): MP4s
# (generate's, the dataset preview's: any name), PNG sheets (save_png: any name), the eval report
# and the evaluators' checkpoints
_PART_WRITTEN = frozenset({".mp4", ".png", "report.json", "syncnet.safetensors", "identity.safetensors"})


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _writer_gone(tag: str) -> bool:
    """Whether the writer named in a temp file's `HOST-PID-XXXX.tmp` has ended. Not where it cannot
    be told: another host's, a name of another shape, or a system without POSIX signals (os.kill
    there ends the process instead of asking after it)."""
    m = _WRITER.match(tag)
    return m is not None and process_ended(m["host"], int(m["pid"]))


def process_ended(host: str, pid: int) -> bool:
    """Whether the process `pid` of the host (and PID namespace) tagged `host` has ended; not where
    it cannot be told (another host's, a system without POSIX signals)."""
    if os.name != "posix" or host != HOST_TAG or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # OSError: another user's process, alive; OverflowError: no PID there can be (a name of another
    # shape, which made every write of its file fail)
    except (OSError, OverflowError):
        return False
    return False


def _unaskable(tag: str, tmp: Path) -> bool:
    """Whether `tmp` is a writer's temp file (of either naming) whose writer `_writer_gone` cannot
    ask after: no PID (the previous naming), or another host's or PID namespace's."""
    m = _WRITER.match(tag)
    if m is not None:
        return m["host"] != HOST_TAG or os.name != "posix"
    return (_OLD_FOLDER if tmp.is_dir() and not tmp.is_symlink() else _OLD_FILE).match(tag) is not None


def _untouched(tmp: Path, since: float) -> bool:
    """Whether nothing in `tmp` (a file, or a folder and everything in it) was written after `since`."""
    try:
        if tmp.lstat().st_mtime >= since:
            return False
        if tmp.is_dir() and not tmp.is_symlink():
            for folder, names, files in os.walk(tmp):
                for name in (*names, *files):
                    if os.lstat(os.path.join(folder, name)).st_mtime >= since:
                        return False
    except OSError:  # (gone meanwhile: its writer's rename, or another remover's)
        return False
    return True


def fsync_folder(folder: Path) -> None:
    """Makes a rename durable; skipped where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
