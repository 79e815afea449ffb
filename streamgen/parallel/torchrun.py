"""torchrun, where Ctrl-C (or SIGTERM) is a stop and a failed rank is one line, not a crash.

`--sp N` commands restart themselves under this instead of plain torchrun.
When a signal arrives, torchrun's agent stops every rank and then raises
`SignalException` out of its `main`, which Python prints as a traceback and
exit code 1. Here that exception ends the launcher with the shell's code for
the signal (130 for SIGINT, 143 for SIGTERM) and one line. A rank that fails
has already printed its own error; torchrun's report of it (a traceback of
the launcher and a table) is cut to one line naming the rank, and the
launcher ends with that rank's exit code, so `--sp 2` fails the way `--sp 1`
does (2 for a usage error). Anything else is raised as usual.

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
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        print(f"streamgen: rank {rank} failed ({how}); the other ranks were stopped", file=sys.stderr)
        return code if code > 0 else 1
    except Exception as e:
        signal = _signal_behind(e)
        if signal is None:
            raise
        print(f"streamgen: stopped by {signal.sigval.name}; every rank has ended", file=sys.stderr)
        return 128 + int(signal.sigval)
    return 0


def _signal_behind(e: BaseException | None) -> SignalException | None:
    """The SignalException that `e` is, or that was being handled when `e` was raised.

    A signal that lands inside torchrun's metrics wrapper before it has read
    the clock comes out as an UnboundLocalError raised while handling the
    SignalException; the agent has stopped the ranks either way.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SignalException):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
