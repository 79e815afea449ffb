"""A model export's folder is written whole or not at all (streamgen.folders): staged beside the
old one and exchanged with it, or, where it cannot be, written into it file by file under an export
stamp that readers check (`read_folder`). What the old folder holds beside the export (a report,
samples) is carried into the new one, and what another process writes into it meanwhile is kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_a_folder_put_in_place_keeps_the_old_folders_permissions(tmp_path):
    """The new folder is made by the writer with the umask's mode: put in the old one's place, a
    model directory kept private (0700) became readable to all, and one shared with a group
    (setgid, group-writable) was no longer writable by the group. It takes the old one's mode."""
    from streamgen.folders import write_folder_atomically

    d = tmp_path / "model"
    d.mkdir()
    (d / "a").write_text("old")
    os.chmod(d, 0o2771)  # (a mode no umask gives a new folder)
    write_folder_atomically(d, lambda new: (new / "a").write_text("new"))
    assert (d / "a").read_text() == "new"
    assert oct(os.stat(d).st_mode & 0o7777) == oct(0o2771)


def _can_be_another_user() -> bool:
    import sys

    return sys.platform.startswith("linux") and hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(not _can_be_another_user(), reason="needs root on Linux, to write as another user")
def test_a_folder_that_cannot_be_exchanged_for_its_permissions_is_written_in_place(tmp_path):
    """In a sticky folder (/tmp, a shared models folder), a user may write in another's folder that
    lets them, but not rename it: the exchange failed with EPERM and so did the export, which
    wrote in place before. Where the exchange is not permitted, the folder is written in place."""
    import shutil
    import tempfile

    from streamgen.folders import write_folder_atomically

    shared = Path(tempfile.mkdtemp())
    try:
        os.chmod(shared, 0o1777)  # sticky, like /tmp
        d = shared / "model"
        d.mkdir()
        os.chmod(d, 0o777)  # root's, writable by all
        (d / "a").write_text("old")
        os.chmod(d / "a", 0o666)

        def write(folder):
            (folder / "a").write_text("new")

        pid = os.fork()
        if pid == 0:  # (the child: as nobody)
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                write_folder_atomically(d, write, in_place=write)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (d / "a").read_text() == "new"
        assert sorted(p.name for p in shared.iterdir()) == ["model"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_folder_beside_which_nothing_can_be_made_is_written_in_place(tmp_path, monkeypatch):
    """A model directory mounted writable in a read-only file system (a container's `--read-only`
    root with a volume at the model's path): no staging folder can be made beside it (EROFS, not a
    PermissionError), and the export failed where it wrote in place before."""
    import errno

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "a").write_text("old")

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path).parent))

    monkeypatch.setattr(folders, "new_folder_beside", read_only)
    folders.write_folder_atomically(
        d, lambda folder: (folder / "a").write_text("new"), in_place=lambda f: (f / "a").write_text("new")
    )
    assert (d / "a").read_text() == "new"


@pytest.mark.skipif(not _can_be_another_user(), reason="needs root on Linux, to mount a file system")
def test_a_mount_point_is_written_in_place_once(tmp_path):
    """A folder that is a mount point (a volume mounted at the model's path) cannot be exchanged
    (EXDEV, EBUSY): the whole export was written into a staging folder on the parent's file system
    (a container's small root: ENOSPC), thrown away, and written again in place. It is written in
    place, once."""
    import subprocess

    from streamgen.folders import write_folder_atomically

    d = tmp_path / "model"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (d / "a").write_text("old")
        written = []

        def write(folder):
            written.append(folder)
            (folder / "a").write_text("new")

        write_folder_atomically(d, write, in_place=write)
        assert (d / "a").read_text() == "new"
        assert written == [d]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_a_file_written_into_the_old_folder_while_the_new_one_is_synced_is_kept(tmp_path, monkeypatch):
    """What the old folder holds is carried into the new one before its files are fsynced (seconds
    for a model's weights): a file another process wrote into the directory meanwhile (a report, a
    sample beside the model) stayed in the old folder, and went with it. The old folder's carried
    entries the new one lacks after the exchange are moved in."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "notes.txt").write_text("kept")
    real = folders._fsync_tree

    def meanwhile(folder):
        (d / "report.json").write_text("written meanwhile")
        return real(folder)

    monkeypatch.setattr(folders, "_fsync_tree", meanwhile)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new" and (d / "notes.txt").read_text() == "kept"
    assert (d / "report.json").read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_carried_file_replaced_in_the_old_folder_while_the_new_one_is_synced_is_kept(tmp_path, monkeypatch):
    """A file already carried into the new folder (hard linked: the old file's inode) and then
    replaced in the old one by a rename (another writer's atomic write) while the new folder is
    fsynced: its new version went with the old folder, and the directory kept the one it replaced.
    Only what the new folder lacked was moved over. A carried file written again in the directory
    after the exchange is that writer's latest, and stays."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    for name in ("report.json", "notes.txt", "log.txt", "kept.txt"):
        (d / name).write_text(f"{name} before")
    (d / "samples").mkdir()
    (d / "samples" / "0.png").write_text("before")
    real_fsync, real_exchange = folders._fsync_tree, folders.exchange

    def replaced(path, text):
        (path.parent / f"{path.name}.writer").write_text(text)
        os.replace(path.parent / f"{path.name}.writer", path)

    def meanwhile(folder):
        for name in ("report.json", "log.txt"):
            replaced(d / name, f"{name} replaced meanwhile")
        (d / "samples.writer").mkdir()  # a folder put in place whole (moved aside, the new one in)
        (d / "samples.writer" / "0.png").write_text("replaced meanwhile")
        os.rename(d / "samples", tmp_path / "samples.old")
        os.rename(d / "samples.writer", d / "samples")
        return real_fsync(folder)

    def then_written_again(a, b):
        done = real_exchange(a, b)
        replaced(d / "log.txt", "log.txt written after the exchange")
        return done

    monkeypatch.setattr(folders, "_fsync_tree", meanwhile)
    monkeypatch.setattr(folders, "exchange", then_written_again)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new"
    assert (d / "report.json").read_text() == "report.json replaced meanwhile"
    assert (d / "log.txt").read_text() == "log.txt written after the exchange"
    assert (d / "samples" / "0.png").read_text() == "replaced meanwhile"
    assert [(d / name).read_text() for name in ("notes.txt", "kept.txt")] == [
        "notes.txt before",
        "kept.txt before",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "samples.old"]


def test_a_sample_added_to_a_carried_folder_while_it_is_copied_is_kept(tmp_path, monkeypatch):
    """A carried folder (samples/ beside a model) is copied file by file, as listed at the start; a
    file another process adds to it meanwhile is not in the copy. The old folder's version was
    taken after the copy, so the change went unseen and the file went with the old folder."""
    from streamgen import folders

    d = tmp_path / "model"
    (d / "samples").mkdir(parents=True)
    (d / "weights").write_text("old")
    (d / "samples" / "0.png").write_text("first")
    os.utime(d / "samples", (1, 1))  # (its time before the write below, on any clock's grain)
    real = folders._link_copy

    def then_added(src, dst):
        real(src, dst)
        if src.name == "samples":
            (src / "1.png").write_text("added while copied")

    monkeypatch.setattr(folders, "_link_copy", then_added)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new"
    assert sorted(p.name for p in (d / "samples").iterdir()) == ["0.png", "1.png"]


def test_a_file_added_deep_in_a_carried_folder_while_the_new_one_is_synced_is_kept(tmp_path, monkeypatch):
    """A carried folder's version was its own entry's alone: a sample written into a folder inside
    it (samples/run1/) while the new folder was fsynced changed no time of samples/ itself, and went
    with the old folder."""
    from streamgen import folders

    d = tmp_path / "model"
    (d / "samples" / "run1").mkdir(parents=True)
    (d / "weights").write_text("old")
    (d / "samples" / "run1" / "0.png").write_text("first")
    real = folders._fsync_tree

    def meanwhile(folder):
        (d / "samples" / "run1" / "1.png").write_text("written meanwhile")
        return real(folder)

    monkeypatch.setattr(folders, "_fsync_tree", meanwhile)
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("new"), carry=lambda n: n != "weights"
    )
    assert (d / "weights").read_text() == "new"
    assert sorted(p.name for p in (d / "samples" / "run1").iterdir()) == ["0.png", "1.png"]


def test_an_entry_gone_from_the_old_folder_while_it_is_carried_fails_no_export(tmp_path, monkeypatch):
    """What the old folder holds is listed, then carried entry by entry: one removed meanwhile (a
    tool's transient file renamed to its final name, a note deleted) made the link and the copy
    fail, and with them the whole export, its weights written for nothing."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "report.json.part").write_text("being written")
    (d / "notes.txt").write_text("kept")
    (d / "samples").mkdir()
    for name in ("0.png", "1.png"):
        (d / "samples" / name).write_text(name)
    real_link = os.link

    def link(src, dst, *args, **kwargs):
        if os.fspath(src) == str(d / "samples" / "1.png"):  # deleted as the folder is copied
            os.unlink(src)
        return real_link(src, dst, *args, **kwargs)

    def carry(name: str) -> bool:
        if name == "report.json.part" and (d / name).exists():  # its writer renames it just now
            os.replace(d / name, d / "report.json")
        return name != "weights"

    monkeypatch.setattr(os, "link", link)
    folders.write_folder_atomically(d, lambda new: (new / "weights").write_text("new"), carry=carry)
    assert (d / "weights").read_text() == "new" and (d / "notes.txt").read_text() == "kept"
    assert (d / "report.json").read_text() == "being written"
    assert [p.name for p in (d / "samples").iterdir()] == ["0.png"]


def test_a_folder_that_cannot_be_exchanged_is_written_once(tmp_path, monkeypatch):
    """Where the folder could not be exchanged (not Linux, overlayfs' lower layers), the export
    written into the staging folder was thrown away and written again into the folder in place:
    a model's weights written twice. The staged files are moved in, one rename each."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "stale").write_text("the old export's, which the new one lacks")
    (d / "notes.txt").write_text("kept")
    written = []

    def write(folder):
        written.append(folder)
        (folder / "weights").write_text("new")
        (folder / "config.json").write_text("new")

    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    folders.write_folder_atomically(d, write, carry=lambda name: name == "notes.txt", in_place=write)
    assert len(written) == 1
    assert (d / "weights").read_text() == "new" and (d / "config.json").read_text() == "new"
    assert (d / "notes.txt").read_text() == "kept" and not (d / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_whose_file_by_file_export_was_cut_short_is_refused_clearly(tmp_path):
    """A writer killed between two renames of a file-by-file export (no exchange) left one
    export's config beside the other's weights, which a reader loaded as one model (or failed on
    with an error about neither). A reader is told the export was cut short."""
    import subprocess
    import sys

    from streamgen.folders import read_folder

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "config.json").write_text("old")
    code = f"""
import os
import streamgen.folders as folders
folders.exchange = lambda a, b: False
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if os.path.basename(dst) == "weights":
        os._exit(9)  # (killed: the new weights in place, the old config beside them)
os.replace = replace
def write(folder):
    (folder / "weights").write_text("new")
    (folder / "config.json").write_text("new")
folders.write_folder_atomically({str(d)!r}, write)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    assert done.returncode == 9 and (d / "weights").read_text() == "new"

    def read(folder):
        return (folder / "config.json").read_text(), (folder / "weights").read_text()

    with pytest.raises(Exception, match="cut short") as refused:  # (not the mix, ("old", "new"))
        read_folder(d, read)
    assert type(refused.value).__name__ == "ExportUnderWay"


def test_a_folder_written_in_place_by_a_writer_that_failed_before_changing_it_still_reads(
    tmp_path, monkeypatch
):
    """A writer into the folder itself (no staging folder beside it: a read-only root's volume)
    that fails before its first rename (a full disk) leaves the folder whole: it is read, not
    refused as an export cut short. One that fails after it is refused."""
    import errno

    from streamgen import files, folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "a").write_text("old")
    (d / "b").write_text("old")

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path).parent))

    def disk_full_after(renames):
        def in_place(folder):
            for name in ("a", "b")[:renames]:
                files.write_text_atomically(folder / name, "new")
            raise OSError(errno.ENOSPC, "No space left on device")

        return in_place

    def read(folder):
        return (folder / "a").read_text(), (folder / "b").read_text()

    monkeypatch.setattr(folders, "new_folder_beside", read_only)
    with pytest.raises(OSError, match="No space"):
        folders.write_folder_atomically(d, lambda f: None, in_place=disk_full_after(0))
    assert folders.read_folder(d, read) == ("old", "old")
    with pytest.raises(OSError, match="No space"):
        folders.write_folder_atomically(d, lambda f: None, in_place=disk_full_after(1))
    with pytest.raises(folders.ExportUnderWay, match="cut short"):
        folders.read_folder(d, read)


def test_a_folder_put_in_place_whole_leaves_an_older_export_stamp_behind(tmp_path, monkeypatch):
    """A folder once written file by file holds the stamp of that export; exchanged whole later,
    the new folder is the writer's alone: the old stamp is not carried into it."""
    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")
    with monkeypatch.context() as m:
        m.setattr(folders, "exchange", lambda a, b: False)
        folders.write_folder_atomically(d, lambda new: (new / "weights").write_text("first"))
    assert (d / folders.EXPORT_STAMP).exists()
    folders.write_folder_atomically(
        d, lambda new: (new / "weights").write_text("second"), carry=lambda n: True
    )
    assert sorted(p.name for p in d.iterdir()) == ["weights"]
    assert folders.read_folder(d, lambda f: (f / "weights").read_text()) == "second"


def test_the_file_and_folder_modules_import_no_private_name_of_another_module():
    """`folders` took the writer's host tag, its process check and the folder fsync from `files` by
    their private names, which say that no other module depends on them. What one module takes
    from another is public in it."""
    import ast

    root = Path(__file__).resolve().parent.parent
    private = []
    for module in ("streamgen/files.py", "streamgen/folders.py", "streamgen/models.py"):
        for node in ast.walk(ast.parse((root / module).read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("streamgen")
            ):
                private += [f"{module}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
