"""torchrun, where Ctrl-C (or SIGTERM) is a stop and not a crash.

`--sp N` commands restart themselves under this instead of plain torchrun.
When a signal arrives, torchrun's agent stops every rank and then raises
`SignalException` out of its `main`, which Python prints as a traceback and
exit code 1. Here that exception ends the launcher with the shell's code for
the signal (130 for SIGINT, 143 for SIGTERM) and one line. Anything else,
a rank that failed above all, is reported by torchrun as usual.
A rank that fails has already printed its own error; torchrun's report of
it (a traceback of the launcher and a table) is cut to one line naming the
rank, and the launcher ends with that rank's exit code, so `--sp 2` fails
the way `--sp 1` does (2 for a usage error).

    python -m streamgen.parallel.torchrun --standalone --nproc-per-node=2 -m streamgen.cli ...
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SignalException as e:
        print(f"streamgen: stopped by {e.sigval.name}; every rank has ended", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        print(f"streamgen: rank {rank} failed ({how}); the other ranks were stopped", file=sys.stderr)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
