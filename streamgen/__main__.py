"""`python -m streamgen` and the installed `streamgen` command (pyproject's [project.scripts] names
`main` here): the command line loaded behind a catch for Ctrl-C. This module and streamgen/__init__.py
import next to nothing, so the window before that catch is as short as it can be (the script pip
writes imports its entry's module first, with no catch of its own)."""

import sys


def main() -> int:
    try:
        from streamgen.cli import main as run_command_line
    except KeyboardInterrupt:  # a Ctrl-C as the command line loads, before it handles its own
        from streamgen.parallel.torchrun import is_launcher_rank

        if not is_launcher_rank():  # (an --sp N rank: the launcher says it once, for every rank)
            print("interrupted", file=sys.stderr)
        exec("")  # (clears CPython's unhandled-Ctrl-C flag, set where it came up through an exec: see cli.main)
        return 130
    return run_command_line()


if __name__ == "__main__":
    sys.exit(main())
