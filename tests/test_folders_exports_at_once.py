"""Two exports into one folder at once, or one after another's unfinished one: the export stamps that tell
readers and writers of the other (this host's or another's), and the lock a writer file by file takes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_two_exports_into_a_folder_file_by_file_at_once_are_refused_clearly(tmp_path, monkeypatch):
    """Two exports written into one folder file by file at the same time (no exchange) interleave
    their renames, and the last to finish marked the folder whole: a reader got one export's
    config beside the other's weights. A folder two exports went into at once is refused. (Those
    of one host wait for each other (`one_export_at_a_time`); not where the folder cannot be
    locked, a network file system's shared by two hosts, as here.)"""
    import fcntl

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    for name in ("weights", "config.json"):
        (d / name).write_text("old")
    real_move_over, second = folders.move_over, []

    def another_export_meanwhile(src, dst, trash):
        if not second:  # (the first export's first rename done, the second export runs whole)
            second.append(dst)
            real_move_over(src, dst, trash)
            folders.write_folder_atomically(
                d, lambda new: [(new / n).write_text("second") for n in ("weights", "config.json")]
            )
            return
        real_move_over(src, dst, trash)

    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(folders, "move_over", another_export_meanwhile)
    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: None)  # (no lock between the two)
    folders.write_folder_atomically(
        d, lambda new: [(new / n).write_text("first") for n in ("weights", "config.json")]
    )
    monkeypatch.undo()
    assert second and [(d / n).read_text() for n in ("weights", "config.json")] == ["second", "first"]
    with pytest.raises(Exception, match="at the same time") as refused:  # (not the mix)
        folders.read_folder(d, lambda f: [(f / n).read_text() for n in ("weights", "config.json")])
    assert type(refused.value).__name__ == "ExportUnderWay"


def test_an_export_after_another_hosts_unfinished_one_says_so_and_the_next_export_is_whole(
    tmp_path, monkeypatch
):
    """A "writing" stamp of a process on another host (a container killed mid-export) cannot be
    told dead: readers wait for it, and the export after it cannot tell whether they overlapped.
    That export ends "cut short" with that reason (it said "another export went into it at the
    same time", which had not happened); the next one is whole."""
    import json

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("old")
    (d / folders.EXPORT_STAMP).write_text(
        json.dumps({"export": "x", "host": "elsewhere", "pid": 1, "state": "writing"})
    )
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(folders, "READ_AGAIN_AFTER_S", 0.0)

    def read(f):
        return (f / "config.json").read_text()

    with pytest.raises(folders.ExportUnderWay, match="being written.*another host"):
        folders.read_folder(d, read)
    folders.write_folder_atomically(d, lambda new: (new / "config.json").write_text("new"))
    with pytest.raises(folders.ExportUnderWay, match="process 1 on another host was under way or cut short"):
        folders.read_folder(d, read)
    folders.write_folder_atomically(d, lambda new: (new / "config.json").write_text("newer"))
    assert folders.read_folder(d, read) == "newer"


class _Script:
    """Threads that stop at named points until the test lets them on: `point(name)` marks `name`
    reached and waits until it is allowed (a name never paused at is allowed from the start)."""

    def __init__(self, paused: set[str]):
        import threading

        self.paused, self.reached, self.allowed = paused, set(), set()
        self.changed = threading.Condition()

    def point(self, name: str) -> None:
        with self.changed:
            self.reached.add(name)
            self.changed.notify_all()
            if name in self.paused:
                assert self.changed.wait_for(lambda: name in self.allowed, timeout=60), name

    def wait(self, *names: str) -> str:
        with self.changed:
            assert self.changed.wait_for(lambda: self.reached & set(names), timeout=60), names
            return sorted(self.reached & set(names))[0]

    def allow(self, *names: str) -> None:
        with self.changed:
            self.allowed.update(names)
            self.changed.notify_all()


def test_two_exports_file_by_file_that_both_read_the_old_stamp_never_show_a_mix_as_done(tmp_path, monkeypatch):
    """Two exports into one folder file by file (no exchange) that both read its stamp before
    either wrote its own: the one that finished first found its own "writing" stamp and wrote
    "done" while the other still renamed its files in, so a reader took one export's config
    beside the other's weights as whole until that one ended "cut short". The second now waits
    for the first (a lock on the folder): it reads the first one's stamp, and both are whole."""
    import fcntl
    import threading

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    for name in ("weights", "config.json"):
        (d / name).write_text("old")
    script = _Script(paused={"A:writing", "A:config", "A:check", "B:writing"})

    def at(point, real):
        def hooked(*args, **kwargs):
            who = threading.current_thread().name
            if who in ("A", "B") and point(who, *args):
                script.point(f"{who}:{point(who, *args)}")
            return real(*args, **kwargs)

        return hooked

    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(
        folders, "write_text_atomically",
        at(lambda who, path, text: "writing" if '"writing"' in text else None, folders.write_text_atomically),
    )  # fmt: skip
    monkeypatch.setattr(
        folders, "move_over", at(lambda who, src, dst, trash: "config" if dst.name == "config.json" else None,
                                 folders.move_over),
    )  # fmt: skip
    monkeypatch.setattr(
        folders, "_under_way_by_another", at(lambda who, text: "check", folders._under_way_by_another)
    )
    monkeypatch.setattr(
        fcntl, "flock", at(lambda who, fd, op: "lock" if op & fcntl.LOCK_EX else None, fcntl.flock)
    )
    errors = []

    def export(text):
        try:
            folders.write_folder_atomically(
                d, lambda new: [(new / n).write_text(text) for n in ("weights", "config.json")]
            )
        except Exception as e:
            errors.append(e)

    def read_now():
        try:
            return folders.read_folder(
                d, lambda f: [(f / n).read_text() for n in ("weights", "config.json")], attempts=1
            )
        except folders.ExportUnderWay:
            return None  # (refused: fine)

    first, second = (
        threading.Thread(target=export, args=(text,), name=who)
        for who, text in (("A", "first"), ("B", "second"))
    )
    first.start()
    script.wait("A:writing")  # (A has read the old stamp)
    second.start()
    # B waits for A's lock before it reads the stamp: it never gets to write its own meanwhile
    assert script.wait("B:writing", "B:lock") == "B:lock"
    assert "B:writing" not in script.reached
    read = [read_now()]
    script.allow("A:writing")
    script.wait("A:config")  # (A's weights in, its config not yet)
    read.append(read_now())
    assert "B:writing" not in script.reached
    script.allow("A:config", "A:check", "B:writing")
    first.join(60)
    second.join(60)
    assert errors == [] and not first.is_alive() and not second.is_alive()
    assert [r for r in read if r is not None and len(set(r)) > 1] == [], read  # (no mix read as whole)
    assert read_now() == ["second", "second"]  # (B after A, whole)


def _stamp_of_another_writer(folder: Path, host: str, pid: int) -> None:
    """`folder`'s export stamp: an export by process `pid` of `host` under way."""
    import json

    from streamgen import folders

    stamp = {"export": "x", "host": host, "pid": pid, "state": "writing"}
    (folder / folders.EXPORT_STAMP).write_text(json.dumps(stamp))


def test_an_export_waiting_for_another_exports_lock_names_it_and_gives_up_clearly(
    tmp_path, monkeypatch, caplog
):
    """An export into a folder in place whose lock another export holds waited for it for ever,
    saying so at INFO, which the commands do not show: a stuck holder hung the export silently. It
    warns, naming the holder's process from its stamp, and gives up after `LOCK_WAIT_S` with an
    error that names it, the folder as it was."""
    import fcntl
    import logging
    import threading

    from streamgen import files, folder_lock, folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("old")
    holder = os.getppid()  # (a live process of this host, not this one)
    _stamp_of_another_writer(d, files.HOST_TAG, holder)
    stamp = (d / folders.EXPORT_STAMP).read_text()
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(folder_lock, "LOCK_WAIT_S", 0.5)
    held = os.open(d, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    # (without a limit the export would wait for ever: the lock goes, late, so that it fails instead)
    release = threading.Timer(30, fcntl.flock, (held, fcntl.LOCK_UN))
    release.start()
    try:
        with caplog.at_level(logging.WARNING, logger="streamgen.folders"):
            with pytest.raises(Exception, match=f"process {holder} on this host") as gave_up:
                folders.write_folder_atomically(d, lambda new: (new / "config.json").write_text("new"))
    finally:
        release.cancel()
        os.close(held)
    assert type(gave_up.value).__name__ == "ExportLocked" and str(d) in str(gave_up.value)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"process {holder} on this host" in m for m in warned), warned
    assert (d / "config.json").read_text() == "old" and (d / folders.EXPORT_STAMP).read_text() == stamp


def test_an_export_whose_wait_for_the_lock_fails_with_enolck_goes_on_with_the_stamps(tmp_path, monkeypatch):
    """A file system that refuses a lock only once one is waited for (ENOLCK: no lock left) failed
    the export with that OSError; it goes on as where the folder locks not at all, the stamps alone
    telling."""
    import errno
    import fcntl

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("old")
    tries = []

    def busy_then_no_lock(fd, operation):
        tries.append(operation)
        if len(tries) == 1:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(fcntl, "flock", busy_then_no_lock)
    folders.write_folder_atomically(d, lambda new: (new / "config.json").write_text("new"))
    monkeypatch.undo()
    assert len(tries) == 2
    assert folders.read_folder(d, lambda f: (f / "config.json").read_text()) == "new"


def test_an_error_of_an_export_into_an_unlockable_folder_is_not_chained_to_the_lock(tmp_path, monkeypatch):
    """Where the folder could not be locked, the export was written inside the except block of the
    lock's error: its own error came with "During handling of the above exception, another
    exception occurred" and the lock's, which had nothing to do with it."""
    import errno
    import sys

    from streamgen import folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("old")

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path).parent))

    def in_place(folder):
        raise RuntimeError("the writer's own error")

    monkeypatch.setattr(folders, "new_folder_beside", read_only)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # (not POSIX: no lock)
    with pytest.raises(RuntimeError, match="the writer's own error") as failed:
        folders.write_folder_atomically(d, lambda new: None, in_place=in_place)
    assert failed.value.__context__ is None and failed.value.__cause__ is None


def test_an_export_that_holds_the_lock_takes_a_writing_stamp_of_this_host_as_ended(tmp_path, monkeypatch):
    """A "writing" stamp of this host whose process id is alive (reused since its writer died, or
    another user's process) made the export after it end "cut short", and readers refused the
    folder, though that export held the lock, which a live writer of this host would hold: the
    stamp's export had ended. It ends "done". Where the folder cannot be locked it still cannot
    tell, and ends "cut short"."""
    import errno
    import fcntl

    from streamgen import files, folders

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("old")
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)

    def read(f):
        return (f / "config.json").read_text()

    def export(text):
        folders.write_folder_atomically(d, lambda new: (new / "config.json").write_text(text))

    _stamp_of_another_writer(d, files.HOST_TAG, os.getppid())  # (alive, not this process)
    export("new")
    assert folders.read_folder(d, read) == "new"

    def no_lock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    _stamp_of_another_writer(d, files.HOST_TAG, os.getppid())
    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_lock)
        export("newer")
    with pytest.raises(folders.ExportUnderWay, match=f"process {os.getppid()} on this host"):
        folders.read_folder(d, read)
