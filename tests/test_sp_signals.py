"""`--sp N` stopped while it starts: the launcher before it relaunches (reading the inputs, sizing
a meta DiT for the memory check) and the ranks as they load are gc-heavy, and a stop that lands in a
finalizer must still end the command (the stops of a running `--sp` command: test_parallel_launch_signals)."""

from __future__ import annotations

import os
import subprocess
import sys

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
