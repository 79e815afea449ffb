"""`--sp N` stopped while it starts: the launcher before it relaunches (reading the inputs, sizing
a meta DiT for the memory check) and the ranks as they load are gc-heavy, and a stop that lands in a
finalizer must still end the command; torchrun's rendezvous comes before its agent handles any signal
(the stops of a running `--sp` command: test_parallel_launch_signals)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A command of its own for the command line (streamgen.cli.COMMANDS): its run lets go of an object
# whose finalizer is where the Ctrl-C lands (as one can in the garbage a model's load or the launcher's
# checks leave), then goes on working for up to 20 s; 0 if nothing stopped it.
STOPPED_IN_A_FINALIZER = """
import os, signal, time

def add_arguments(parser):
    pass

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # (a terminal's Ctrl-C, at this moment)
        time.sleep(0.5)  # (the handler runs here, inside the finalizer)

def run(args):
    Finalized()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return 0
"""

RUN_IT = """
import sys

import pytest
from streamgen import cli
cli.COMMANDS = {"finalizing": ("finalizing", "a command whose finalizer takes a Ctrl-C")}
sys.exit(cli.main(["finalizing"]))
"""


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_the_command(tmp_path):
    """Python hands an exception raised in a finalizer (a `__del__`, a weakref callback) to
    sys.unraisablehook, which printed "Exception ignored in ..." and a KeyboardInterrupt's traceback:
    the command went on as though no Ctrl-C had come (an `--sp 2` launch, Ctrl-C'd as it checked its
    inputs, started its ranks and generated the whole video). Only a SIGTERM's was sent again."""
    (tmp_path / "finalizing.py").write_text(STOPPED_IN_A_FINALIZER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    ended = subprocess.run([sys.executable, "-c", RUN_IT], capture_output=True, text=True, timeout=120, env=env)
    assert (ended.returncode, ended.stderr) == (130, "interrupted\n"), ended.stderr


# The launcher (streamgen.parallel.torchrun.main) with torchrun stood in for by one that is sent
# `signal` at its start, before its agent has handlers of its own (as in its rendezvous), then
# works on for up to 20 s; the launcher's exit code is this process's.
SIGNALLED_BEFORE_TORCHRUN_HANDLES_IT = """
import os, signal, sys, time
import torch.distributed.run
from streamgen.parallel import torchrun

def torchrun_signalled(argv):
    os.kill(os.getpid(), signal.{signal})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.05)

torch.distributed.run.main = torchrun_signalled
sys.exit(torchrun.main(["--standalone", "--nproc-per-node=2", "-m", "streamgen", "--version"]))
"""


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_sigterm_before_torchrun_handles_it_is_one_line_and_leaves_no_folder(tmp_path, name, code):
    """Between torchrun's load (where a signal is noted) and its agent's handlers (set as it starts the
    ranks: its rendezvous comes first) a SIGTERM or SIGHUP ended the launcher by the signal, without a
    word, and left the folder it had made for torchrun's logs (streamgen-sp-*) in the temporary one."""
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    script = SIGNALLED_BEFORE_TORCHRUN_HANDLES_IT.replace("{signal}", name)
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (ended.returncode, ended.stderr) == (code, f"streamgen: stopped by {name}; every rank has ended\n"), (
        ended.returncode, ended.stderr)  # fmt: skip
    assert list(temp.iterdir()) == []
