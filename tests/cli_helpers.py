"""Running the `streamgen` command line in a fresh process or in this one, for the tests (no
third-party imports at the top: tests/test_gpu_check.py uses it where only the GPU image's packages
exist)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def streamgen(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgen", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def terminated_once(args, under_way, env: dict | None = None, polls: int = 2400, settle: float = 0.0):
    """`streamgen *args` in a process of its own, sent SIGTERM (as `timeout` and `kill` send it, to
    the command's process alone) once `under_way()` is true, looked at every 50 ms (`polls` times at
    most), and `settle` seconds after: its exit code and its stderr."""
    command = [sys.executable, "-m", "streamgen", *args]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(polls):
            if under_way() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"`streamgen {' '.join(args[:2])}` ended before it could be stopped"
        time.sleep(settle)
        os.kill(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    return proc.returncode, err


def streamgen_without_a_compiler(tmp_path, *args) -> subprocess.CompletedProcess:
    """`streamgen *args` where inductor finds no C++ compiler (and a compile cache of its own, so
    that no earlier compile is found instead)."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    return streamgen(*args, env=env)


def refused(capsys, *argv: str) -> str:
    """What `streamgen *argv`, run in this process, says as it refuses its command line: an exit 2
    with nothing on stdout (checked), and this on stderr. (pytest imported here: see above.)"""
    import pytest

    from streamgen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == "", captured.err
    return captured.err


def no_teacher_loads(monkeypatch) -> None:
    """A teacher's load fails the test (AssertionError "the model loaded"): for options a command
    must refuse before it loads one (a Wan teacher's load takes minutes)."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr("streamgen.teacher.load_model", load_model)
