"""`python -m streamgen` and the installed `streamgen` command (pyproject's [project.scripts] names
`main` here): the command line loaded behind a catch for Ctrl-C. This module and streamgen/__init__.py
import next to nothing, so the window before that catch is as short as it can be (the script pip
writes imports its entry's module first, with no catch of its own). An `--sp N` rank has no such
window: its launcher starts it with SIGINT blocked (streamgen/parallel/torchrun.py), held for the
catch here to take."""

import sys


def main() -> int:
    try:
        import signal

        if hasattr(signal, "pthread_sigmask"):  # (a Ctrl-C its launcher passed on as Python started: now)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        from streamgen.cli import main as run_command_line
    except KeyboardInterrupt:  # a Ctrl-C as the command line loads, before it handles its own
        from streamgen.parallel.torchrun import is_launcher_rank

        if not is_launcher_rank():  # (an --sp N rank: the launcher says it once, for every rank)
            print("interrupted", file=sys.stderr)
        exec("")  # (clears CPython's unhandled-Ctrl-C flag, set where it came up through an exec: see cli.main)
        return 130
    try:
        return run_command_line()
    finally:
        # the command has ended, whatever it kept said: a Ctrl-C now (an --sp N rank's, passed on by
        # its launcher, which says it once) ends the process at once, as the signal, not as a
        # KeyboardInterrupt's traceback from wherever Python's exit was ("Exception ignored in ...").
        # (Not where it is ignored: a shell script's job in the background takes none.)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
