"""Files written whole or not at all: everything that something reads later or in another process
(model exports, dataset shards and their manifest, latent caches, training checkpoints, reports).

Each write goes to a temp file of its own beside the target, which is fsynced, renamed over the
target and its folder fsynced; on any error the temp file is removed and the target is untouched.
So a kill, a full disk or a power cut mid-write leaves the previous file, not a truncated one, and
two writers of one file never write (or rename away) each other's temp file, as they did through
fixed `.tmp` names.

No torch here: the dataset code that writes through this reads and writes with numpy alone.
"""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomically(path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file to the path `tmp`, a new file beside `path`, which then
    replaces `path` (`put_in_place`). On any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    tmp = new_file_beside(path)
    try:
        write(tmp)
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
    it calls `put_in_place` and removes the file on error itself."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def put_in_place(tmp, path) -> None:
    """Renames the written file `tmp` over `path`, its bytes on disk first (without the fsync a
    power cut soon after can leave the renamed file empty) and the rename itself after."""
    fd = os.open(tmp, os.O_RDWR)  # (fsync needs a writable descriptor on some systems)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_folder(Path(path).parent)


def temp_files_beside(path) -> list[Path]:
    """The temp files `new_file_beside(path)` made that are still there: those of a writer killed
    before it could remove its own (a pool's worker ended by its parent)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def _fsync_folder(folder: Path) -> None:
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
