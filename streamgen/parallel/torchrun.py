"""torchrun, where Ctrl-C (or SIGTERM) is a stop and not a crash.

`--sp N` commands restart themselves under this instead of plain torchrun.
When a signal arrives, torchrun's agent stops every rank and then raises
`SignalException` out of its `main`, which Python prints as a traceback and
exit code 1. Here that exception ends the launcher with the shell's code for
the signal (130 for SIGINT, 143 for SIGTERM) and one line. Anything else,
a rank that failed above all, is reported by torchrun as usual.

    python -m streamgen.parallel.torchrun --standalone --nproc-per-node=2 -m streamgen.cli ...
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SignalException as e:
        print(f"streamgen: stopped by {e.sigval.name}; every rank has ended", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
