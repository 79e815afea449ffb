"""`generate` (and the commands beside it) stopped: Ctrl-C, SIGTERM or SIGHUP at any moment, while
torch or an extension imports, with the audio from a FIFO no one writes: the exit code of the stop,
one line, and no unfinished output left."""

import contextlib
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from test_media_inputs import write_wav

from streamgen.cli import main


def video_so_far(folder) -> int:
    """The bytes in `folder`'s files: a writer's temp file, which its end may take away meanwhile."""
    size = 0
    for f in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            size += f.stat().st_size
    return size


@pytest.mark.parametrize("stop, code, said", [("SIGTERM", 143, "terminated"), ("SIGHUP", 129, "hung up")])
def test_a_run_ended_by_sigterm_leaves_no_file(tmp_path, stop, code, said):
    """`timeout`, `kill` or a scheduler's SIGTERM, or SIGHUP (the terminal closed), left the
    unfinished MP4 beside --out (a hidden temp file as big as the video so far); it ends as Ctrl-C
    does now, exit code 128 + the signal's."""
    import signal
    import subprocess
    import sys
    import time

    wav = tmp_path / "long.wav"
    # long enough that generate is still running at the signal: 120 s of speech are 375 chunks, and
    # a run of 60 s ended some two minutes after its file first held bytes (a loaded 2-core machine,
    # 1.5 chunks a second). The 600 s this was cost 2.6 CPU s a case to write here and read there
    write_wav(wav, 0.3 * np.sin(np.arange(16000 * 120) / 16000 * 2 * np.pi * 200))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["generate", "--model", "debug", "--audio", str(wav), "--out", str(out_dir / "a.mp4"), "--quiet"]
    p = subprocess.Popen([sys.executable, "-m", "streamgen", *argv], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # until the writer has put some of the video in its file (a fixed 0.5 s past the file's making
        # was taken for it, which a loaded machine need not honour)
        while not video_so_far(out_dir) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None and video_so_far(out_dir), "generate ended, or wrote no video, before the signal"
        p.send_signal(getattr(signal, stop))
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == code, err
    # (the handler says the signal at once; generate says what became of --out as it ends)
    said_last = err.strip().splitlines()[-2:]
    assert list(out_dir.iterdir()) == [] and said_last[0] == said, err
    assert said_last[1].startswith(f"streamgen generate: stopped: {out_dir / 'a.mp4'} not written, "), err


def test_a_ctrl_c_that_came_through_a_dataclass_made_ends_with_exit_code_130(tmp_path):
    """About one Ctrl-C in 16 ended `python -m streamgen generate` by SIGINT (exit -2) after its
    "interrupted": the KeyboardInterrupt had come up through an exec (a dataclass made as a module
    imported), which set CPython's unhandled-interrupt flag though the command caught it."""
    import subprocess
    import sys

    (tmp_path / "runs_streamgen").mkdir()
    (tmp_path / "runs_streamgen" / "__main__.py").write_text(
        "import sys\n"
        "from streamgen import cli\n"
        "from streamgen.commands import generate\n"
        "generate.run = lambda args: exec('raise KeyboardInterrupt')\n"
        "sys.exit(cli.main(['generate']))\n"
    )  # (run with -m, as `python -m streamgen`: a script or -c exits at once on SystemExit)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, "-m", "runs_streamgen"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": path})  # fmt: skip
    assert (ended.returncode, ended.stderr) == (130, "interrupted\n")


def test_a_ctrl_c_while_torch_imports_waits_for_the_import(tmp_path, monkeypatch, capsys):
    """A Ctrl-C inside torch's C++ import aborted generate (pybind11's "terminate called", exit -6),
    inside numpy's it was an ImportError's traceback: it is raised once they are in."""
    import signal
    import sys

    from streamgen.commands import generate

    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\nwhole = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(generate, "HEAVY_IMPORTS", ("slow_to_import",))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["generate", "--model", "debug", "--out", str(tmp_path / "a.mp4"), "--quiet"]) == 130
        assert sys.modules["slow_to_import"].whole  # (imported whole, then interrupted)
    finally:
        signal.signal(signal.SIGINT, before)
        sys.modules.pop("slow_to_import", None)
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"
    assert not (tmp_path / "a.mp4").exists()


def test_the_extensions_generate_imports_are_imported_with_ctrl_c_held():
    """A Ctrl-C inside av's (Cython) import was an ImportError, "Failed to import 'zlib.decompress' -
    cannot initialise module strings", and generate's traceback."""
    from streamgen.commands import generate

    assert {"numpy", "torch", "av"} <= set(generate.HEAVY_IMPORTS)


def test_a_hang_up_whose_terminal_is_gone_ends_with_its_exit_code(tmp_path, monkeypatch):
    """SIGHUP: its terminal closed, the line saying that --out was not written cannot be written
    (EIO); the run ends by the signal's exit code all the same, not by that OSError."""
    import signal
    import sys

    from streamgen.stream import StreamSession

    class Gone:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            pass

    def next_chunk(self):
        sys.stderr = Gone()  # (as the terminal goes)
        raise SystemExit(128 + signal.SIGHUP)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # (put back after)
    with pytest.raises(SystemExit) as ended:
        main(["generate", "--model", "debug", "--out", str(tmp_path / "a.mp4"), "--quiet"])
    assert ended.value.code == 129 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("there_before", [False, True])
def test_a_ctrl_c_says_that_out_was_not_written(tmp_path, monkeypatch, capsys, there_before):
    """All it said was "interrupted": whether --out was made, whole or in part, or an older file
    replaced, was left to its user to find out."""
    from streamgen.stream import StreamSession

    made = StreamSession.next_chunk
    chunks = []

    def next_chunk(self):
        if len(chunks) == 2:
            raise KeyboardInterrupt
        chunks.append(1)
        return made(self)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    out = tmp_path / "a.mp4"
    if there_before:
        out.write_bytes(b"an older video")
    assert main(["generate", "--model", "debug", "--out", str(out), "--quiet"]) == 130
    before = " (the file there is the one from before)" if there_before else ""
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"streamgen generate: stopped: {out} not written, 0.64 s of 4.12 s of video made{before}",
        "interrupted",
    ]
    assert [p.name for p in tmp_path.iterdir()] == (["a.mp4"] if there_before else [])


def test_a_stop_that_failed_an_import_says_that_out_was_not_written(tmp_path, monkeypatch, capsys):
    """A Ctrl-C that came while a chunk imported an extension failed that import (an ImportError
    caused by it): the command ended as the stop, 130, but without its line saying --out was not written."""
    from streamgen.stream import StreamSession

    made = StreamSession.next_chunk
    chunks = []

    def next_chunk(self):
        if len(chunks) == 2:
            raise ImportError("initialization failed") from KeyboardInterrupt()
        chunks.append(1)
        return made(self)

    monkeypatch.setattr(StreamSession, "next_chunk", next_chunk)
    out = tmp_path / "a.mp4"
    assert main(["generate", "--model", "debug", "--out", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"streamgen generate: stopped: {out} not written, 0.64 s of 4.12 s of video made",
        "interrupted",
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["serve", "--model", "debug", "--port", "70000"], ["eval", "--model", "debug"], ["distill", "teacher", "--config", "nonesuch"]],
)
def test_serve_eval_and_distill_hold_a_ctrl_c_while_torch_imports(command, tmp_path, monkeypatch, capsys):
    """As generate: a Ctrl-C inside torch's C++ import aborted them (exit -6); it is raised once the
    extensions are in, "interrupted" and 130."""
    import signal
    import sys

    import streamgen.cli

    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\nwhole = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(streamgen.cli, "HEAVY_IMPORTS", ("slow_to_import",))
    if command[0] == "eval":  # (its checks that need no torch come first: a command they pass)
        command = [*command, "--out", str(tmp_path / "e")]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # (the commands as given would be refused, in one line, were the Ctrl-C not raised first)
        assert main(command) == 130
        assert sys.modules["slow_to_import"].whole
    finally:
        signal.signal(signal.SIGINT, before)
        sys.modules.pop("slow_to_import", None)
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_a_stop_that_failed_an_extensions_import_ends_the_command_as_the_stop(stop, monkeypatch, capsys):
    """A stop while an extension module initialised (matplotlib's, at a run's first plot) failed
    that import: an ImportError "initialization failed" caused by it, which ended the command in a
    traceback and exit 1 (a CI run's SIGTERM of distill) where the stop's 130 or 143 was due."""
    import streamgen.cli
    from streamgen.commands import generate

    cause = KeyboardInterrupt() if stop == "ctrl_c" else streamgen.cli.Terminated(15)

    def run(args):
        raise ImportError("initialization failed") from cause

    monkeypatch.setattr(generate, "run", run)
    if stop == "ctrl_c":
        assert main(["generate"]) == 130
        assert capsys.readouterr().err.splitlines()[-1] == "interrupted"
    else:
        with pytest.raises(SystemExit) as ended:
            main(["generate"])
        assert ended.value.code == 143
    # an error of its own, not a stop's, is still the traceback it is
    monkeypatch.setattr(generate, "run", lambda args: (_ for _ in ()).throw(ImportError("no such module")))
    with pytest.raises(ImportError, match="no such module"):
        main(["generate"])


def test_a_ctrl_c_while_the_command_line_loads_is_interrupted_and_130(tmp_path):
    """`python -m streamgen` interrupted in its first moments, while streamgen/__main__.py imported
    streamgen.cli (before main() handles a Ctrl-C), printed a traceback and ended by SIGINT (-2)."""
    import signal
    import subprocess
    import sys

    (tmp_path / "argparse.py").write_text(  # (one of streamgen.cli's imports, stood in for)
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, "-m", "streamgen", "--help"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": path},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert (ended.returncode, ended.stderr) == (130, "interrupted\n")


def test_a_ctrl_c_while_the_installed_command_loads_is_interrupted_and_130(tmp_path):
    """The installed `streamgen` script (pip writes it from pyproject's [project.scripts]: it imports
    the entry's module, then calls it) printed a traceback for a Ctrl-C inside `import streamgen.cli`:
    its entry was cli.main, whose module that import is."""
    import signal
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    entry = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, function = entry["project"]["scripts"]["streamgen"].split(":")
    script = tmp_path / "streamgen"  # as pip's console script has it
    script.write_text(f"import sys\nfrom {module} import {function}\nif __name__ == '__main__':\n"
                      f"    sys.exit({function}())\n")  # fmt: skip
    (tmp_path / "stand_in").mkdir()
    (tmp_path / "stand_in" / "argparse.py").write_text(  # (one of streamgen.cli's imports, stood in for)
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as it imports\n"
    )
    path = os.pathsep.join([str(tmp_path / "stand_in"), os.environ.get("PYTHONPATH", "")])
    ended = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": path},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert (ended.returncode, ended.stderr) == (130, "interrupted\n")


def test_ctrl_c_while_the_audio_fifo_has_no_writer_is_an_interrupt(tmp_path):
    """FFmpeg waiting to open a FIFO nothing writes to: Ctrl-C was said by PyAV as its own error,
    "cannot read audio from ...: Interrupted system call" with exit 2, not "interrupted" and 130."""
    import signal
    import subprocess
    import sys
    import time

    fifo = tmp_path / "speech.wav"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "streamgen", "generate", "--model", "debug", "--audio", str(fifo),
            "--out", str(tmp_path / "x.mp4"), "--quiet"]  # fmt: skip
    # (a child of a shell started in the background ignores SIGINT: as a terminal's would, it takes it)
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as p:  # fmt: skip
        try:
            # the Ctrl-C only once it waits in the FIFO's open (Linux: wait_for_partner, in whichever
            # thread opens it): sent after a fixed time, it came before the open on a loaded machine
            # (its start took longer) and the test passed without reaching its case; a start that never
            # gets there fails the test
            deadline = time.monotonic() + 300
            while not any("wait_for_partner" in waits for waits in _what_its_threads_wait_in(p.pid)):
                assert p.poll() is None, f"generate ended before it opened the FIFO: {p.communicate()[1]}"
                assert time.monotonic() < deadline, "generate did not wait in the FIFO's open in 300 s"
                time.sleep(0.05)
            p.send_signal(signal.SIGINT)
            err = p.communicate(timeout=60)[1]
        finally:
            p.kill()
    assert (p.returncode, err) == (130, "interrupted\n")


def _what_its_threads_wait_in(pid: int) -> list[str]:
    """The kernel function each thread of process `pid` sleeps in (/proc/PID/task/*/wchan; "0"
    for a thread that runs), those of threads that ended meanwhile left out."""
    waits = []
    with contextlib.suppress(FileNotFoundError):  # (the process ended: it is reaped by poll())
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                waits.append(Path(f"/proc/{pid}/task/{task}/wchan").read_text())
    return waits
