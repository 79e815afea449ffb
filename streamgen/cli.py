"""The `streamgen` command.

Each subcommand lives in its own module, which keeps its heavy imports (torch,
aiortc, ...) inside `run`, so `streamgen --help` stays fast. A subcommand module
exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from streamgen.session_limits import MAX_CAPTION_CHARS, SEED_END, SEED_RANGE, text_problem

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": (
        "streamgen.commands.generate",
        "generate an avatar video from speech audio and a face image",
    ),
    "bench": ("streamgen.commands.bench", "run a benchmark and print JSON"),
    "serve": ("server.cli", "serve avatars over WebRTC and WebSocket"),
    "data": ("streamgen.data.cli", "make and preview the avatar-world dataset"),
    "models": ("streamgen.commands.models", "list the models a --model NAME can name, where from, flavor and size"),
    "eval": ("streamgen.eval.cli", "evaluate a model on the avatar world"),
    "distill": ("distill.cli", "run a training / distillation stage"),
}


# the command-line spelling of a session's dtypes (its DiT's, decoder's, reference encoder's):
# "auto" is what a session picks on this machine (streamgen.precision: default_dit_dtype,
# default_decode_dtype)
SESSION_DTYPES = ("auto", "float32", "bfloat16")


def add_dtype_option(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    parser.add_argument(flag, choices=SESSION_DTYPES, default="auto", help=help)


MAX_FRAME_SIZE = 4096  # 3x past Wan's largest side (1280): a typo, not a video, beyond it
# what `frame_size` takes, said in the help of every option of that type
FRAME_SIZE_RULE = f"a multiple of 16 up to {MAX_FRAME_SIZE}"


def frame_size(text: str) -> int:
    """argparse type of a frame height, width or square size: a positive multiple of 16 (the
    autoencoders' downsampling times the DiT's 2x2 patches), at most MAX_FRAME_SIZE."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 16")
    if value > MAX_FRAME_SIZE:
        raise argparse.ArgumentTypeError(f"{value} is larger than {MAX_FRAME_SIZE} pixels")
    return value


def number_where(text: str, accept: Callable[[float], bool], what: str) -> float:
    """The number `text` spells if `accept` takes it; else argparse's error, "'text' is not `what`"
    (text that is no number at all is nan: refused by any test written as `not ...` of a range)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_number(text: str) -> float:
    """An argparse type: a rate, a length, a time: finite and above zero (nan, inf, 0 or a negative
    one ran on into a division by zero, a NaN in the JSON, or a figure for nothing)."""
    return number_where(text, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def _count_at_least(text: str, lowest: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = lowest - 1
    if n < lowest:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return n


def whole_number(text: str) -> int:
    """An argparse type: a count that may be zero."""
    return _count_at_least(text, 0, "a whole number (0 or more)")


def positive_int(text: str) -> int:
    """An argparse type: a count of at least one."""
    return _count_at_least(text, 1, "a positive whole number")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; a container's share), at least one."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_count(text: str) -> int:
    """An argparse type: torch's threads, at least one and no more than the CPUs this process may
    use (99999 crashed the process inside OpenMP with no message; more than the CPUs only
    oversubscribes them)."""
    n, most = positive_int(text), usable_cpus()
    if n > most:
        raise argparse.ArgumentTypeError(
            f"{n} threads: this process may use {most} CPUs; give at most {most}"
        )
    return n


def seed_number(text: str) -> int:
    """An argparse type: a seed, as the API takes it (`SEED_END`)."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < SEED_END:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed: give a whole number in {SEED_RANGE}")
    return seed


def caption(text: str) -> str:
    """An argparse type: a caption no longer than the API takes (`MAX_CAPTION_CHARS`)."""
    if len(text) > MAX_CAPTION_CHARS:
        raise argparse.ArgumentTypeError(f"longer than {MAX_CAPTION_CHARS} characters ({len(text)})")
    problem = text_problem(text)  # (bytes that are not UTF-8 on the command line)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


class UserError(Exception):
    """An error the user caused (bad file, bad argument): printed as one line, exit code 2."""


def named_folder(text: str) -> Path:
    """A folder's name, not empty (Path("") is the current folder: `--out "$UNSET"` wrote eval's
    report into it and removed the one an earlier run had left there; `data make` made its
    dataset there). A leading `~` is the home folder: `--out=~/ds`, which no shell expands, made a
    folder named "~" in the current one."""
    from streamgen.files import home_expanded

    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names no folder: give the folder to write into")
    return home_expanded(text)


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a folder to write in, or None."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return (
            f"{path} is a file, not a folder"
            if existing == path
            else f"{path}: a file is in its way ({existing})"
        )
    if not os.access(existing, os.W_OK):
        return f"{path}: cannot write in {existing}"
    return None


def output_folder(path, flag: str = "--out", make: bool = True) -> Path:
    """The folder a command writes into, made now (`make`; else only checked): a file in its way
    is one line before the work, not a NotADirectoryError when its results are written."""
    path = Path(path)
    problem = folder_problem(path)
    if problem:
        raise UserError(f"{flag} {problem}")
    if make:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag}: cannot make {path}: {e.strerror}") from None
    return path


def require_models(*names: str | None) -> None:
    """Each of `names` (None: not asked for) a model `streamgen.models` can load, or a UserError
    naming the first that is not: one line before a benchmark measures anything."""
    from streamgen.models import require_model

    try:
        for name in filter(None, names):
            require_model(name)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def check_cache_from(cache_from: str | None, steps: int | None, model: str) -> None:
    """A UserError where `--cache-from` meets a teacher (which has no KV cache), or `last_step` meets
    1 step (`--steps`, or without it the model's own, read without loading it): said before a long
    start, not once the model has loaded."""
    if cache_from is None:
        return
    from streamgen.models import model_kind

    if model_kind(model) == "teacher":
        raise UserError(f"--cache-from {cache_from}: {model} is a teacher, which samples whole windows without "
                        "a KV cache; --cache-from applies to students")  # fmt: skip
    if cache_from != "last_step":
        return
    given = steps is not None
    if not given:
        from streamgen.models import model_settings

        try:
            steps = model_settings(model)["steps"]
        except (OSError, ValueError):  # (loading the model says what is wrong with it)
            return
    if steps == 1:  # (a 1-step student would quietly re-encode instead)
        runs = "" if given else f" ({model} runs 1 step unless --steps says otherwise)"
        raise UserError(
            f"--cache-from last_step needs 2 or more --steps{runs}: a 1-step chunk's last step sees only noise"
        )


def check_teacher_precision(model: str, **asked) -> None:
    """A UserError where a teacher (float32 only, decoding and encoding as loaded) is asked for another
    precision: `asked` maps an option's dest (dtype, decode_dtype, encode_dtype, fp8) to its value. Said
    in the options' own spelling before the model loads, not once it had ("asked: torch.bfloat16")."""
    given = [f"--{dest.replace('_', '-')}" + ("" if value is True else f" {value}")
             for dest, value in asked.items() if value not in (None, False, "auto", "float32")]  # fmt: skip
    if not given:
        return
    from streamgen.models import model_kind

    if model_kind(model) == "teacher":
        they = "it applies" if len(given) == 1 else "they apply"
        raise UserError(f"{', '.join(given)}: {model} is a teacher, which runs in float32 only; {they} to students")


def check_session_options(model: str, steps: int | None, cache_from: str | None, **precision) -> None:
    """A UserError where a model's session options do not fit the model, read without loading it
    (generate, serve and eval, before a long start): `--cache-from` (`check_cache_from`), `--steps`
    (`check_steps`), and a teacher's precision options (`precision`: `check_teacher_precision`)."""
    check_cache_from(cache_from, steps, model)
    check_steps(steps, model)
    check_teacher_precision(model, **precision)


def check_steps(steps: int | None, model: str) -> None:
    """A UserError where a student (any model but a teacher) is asked for steps off the schedule it was
    distilled for: its k steps are the levels of its own n (`student_sigmas`) only where k divides n
    (2 of 4: 1000 and 500; 3 would be 1000, 667, 333, levels it never learned). A teacher samples
    any number of Euler steps (--steps had taken 1, 2 or 4 for every model, so no teacher's 25)."""
    from streamgen.models import model_kind, model_settings

    if steps is None or model_kind(model) == "teacher":
        return
    try:
        distilled = model_settings(model)["steps"]
    except (OSError, ValueError):  # (loading the model says what is wrong with it)
        return
    if distilled % steps:
        counts = [str(k) for k in range(1, distilled + 1) if distilled % k == 0]
        said = " or ".join(counts) if len(counts) < 3 else f"{', '.join(counts[:-1])} or {counts[-1]}"
        raise UserError(f"--steps {steps}: {model} runs {said} steps, the levels of the {distilled}-step "
                        "schedule it was distilled for (a teacher takes any number)")  # fmt: skip


def check_device(name: str, meta: bool = False) -> None:
    """A `--device` this machine has, or a UserError that says why not (before a model loads:
    torch would otherwise fail deep inside, with a traceback). `meta` (shapes, no data) only where
    the command counts rather than runs (`meta=True`): elsewhere it failed at the first value read."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        # torch spells device types in lower case only; "CPU" or "Cuda:0" is a typo worth naming
        if name != name.lower() and _parses_as_device(name.lower()):
            raise UserError(f"unknown device {name!r}: device names are lower case ({name.lower()!r})") from None
        raise UserError(f"unknown device {name!r} (cpu, cuda, cuda:N, ...)") from None
    if device.type == "meta" and not meta:
        raise UserError("--device meta holds no data, so nothing can run on it: give cpu or cuda")
    if device.type in ("cpu", "meta"):
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise UserError(
            f"no {device.type.upper()} device here (this torch {torch.__version__}); --device cpu runs on this CPU"
        )
    if device.index is not None and device.index >= backend.device_count():
        raise UserError(
            f"no device {name!r}: this machine has {backend.device_count()} {device.type} device(s)"
        )


def _parses_as_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _available(module: str) -> bool:
    return importlib.util.find_spec(module.rsplit(".", 1)[0]) is not None


class Terminated(SystemExit):
    """SystemExit(128 + the signal's number) raised by `terminate_as_exit`'s handler."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def stop_behind(error: BaseException) -> BaseException | None:
    """The Ctrl-C (KeyboardInterrupt) or SIGTERM/SIGHUP (`Terminated`) that caused `error`, or None. A
    stop that came while an extension module initialised (matplotlib's, imported by the first plot)
    failed its import: an ImportError "initialization failed" caused by the stop, which ended the
    command in a traceback and exit 1 where the stop's 130/143 was due."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def is_stop(error: BaseException) -> bool:
    """Whether `error` ends the command as a stop does: a Ctrl-C, a SystemExit (SIGTERM, SIGHUP:
    `Terminated`), or an error such a stop caused (`stop_behind`), where a command says what it kept."""
    return isinstance(error, (KeyboardInterrupt, SystemExit)) or stop_behind(error) is not None


def _raise_swallowed_stop_again(unraisable) -> None:
    """sys.unraisablehook: a signal that came while a finalizer ran (a weakref callback, a `__del__`:
    torch's run many) raised its stop inside it, Terminated or a Ctrl-C's KeyboardInterrupt, where
    Python prints "Exception ignored in" and goes on: the process went on training, the SIGTERM lost;
    an `--sp N` launch Ctrl-C'd as it checked its inputs started its ranks and made the whole video.
    The signal is sent again, a moment later, from another thread (sent from here, its handler would
    run here, in the hook: swallowed again)."""
    import signal
    import threading

    stop = unraisable.exc_value
    if isinstance(stop, (Terminated, KeyboardInterrupt)):
        signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
        again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()
    else:
        _raise_swallowed_stop_again.before(unraisable)


def raise_swallowed_stops_again() -> None:
    """From now on a stop a finalizer swallowed is sent again (`_raise_swallowed_stop_again`)."""
    if sys.unraisablehook is not _raise_swallowed_stop_again:
        _raise_swallowed_stop_again.before = sys.unraisablehook
        sys.unraisablehook = _raise_swallowed_stop_again


def terminate_as_exit():
    """SIGTERM (`timeout`, `kill`, a job scheduler) and SIGHUP (its terminal closed) end a command as
    Ctrl-C does, its `finally` blocks run (Python's default ended the process there: `generate` left
    its unfinished file beside --out, `data make` its pool's workers going on unrecorded); exit code
    128 + the signal's number (143, 129). Returns the handlers it replaced, for `restore_handlers`
    (None outside the main thread: nothing changed)."""
    import signal
    import threading

    from streamgen.parallel.torchrun import is_launcher_rank

    if threading.current_thread() is not threading.main_thread():
        return None

    said = []

    def stop(signum, frame):
        if not is_launcher_rank() and not said:  # (the launcher says it once, for every rank)
            try:  # (as Ctrl-C says "interrupted"; a closed terminal cannot be written to)
                print("terminated" if signum == signal.SIGTERM else "hung up", file=sys.stderr)
            except OSError:
                pass
        said.append(signum)  # (raised again where a finalizer swallowed it: said once)
        raise Terminated(signum)

    raise_swallowed_stops_again()
    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}


# imported before the rest of a command, a Ctrl-C held meanwhile (`import_with_ctrl_c_held`): the
# extensions a Ctrl-C inside whose import was an abort (torch) or an ImportError's traceback (numpy;
# av, Cython's "Failed to import 'zlib.decompress'")
HEAVY_IMPORTS = ("numpy", "torch", "av")


def import_with_ctrl_c_held(modules) -> None:
    """Import `modules`, a Ctrl-C (SIGINT) in the meantime held until they are in, then raised: one
    inside torch's C++ import aborted the process ("terminate called after throwing an instance of
    'pybind11::error_already_set'", exit -6), one inside numpy's became an ImportError's traceback.
    (Held by a handler that notes it, not by a signal mask: the kernel gives a signal another thread
    does not block, and its handler then ran in this one all the same.)"""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # (signal handlers are the main thread's)
        for module in modules:
            importlib.import_module(module)
        return
    asked = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        signal.signal(signal.SIGINT, before)
    if asked:
        signal.raise_signal(signal.SIGINT)  # (as the handler before would have had it)


def restore_handlers(before: dict | None) -> None:
    """Put back the signal handlers `terminate_as_exit` replaced."""
    import signal

    for signum, handler in (before or {}).items():
        if handler is not None:
            signal.signal(signum, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="streamgen 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            # only hide commands whose own module is absent, never a broken import inside one
            if e.name and module.startswith(e.name):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        # the program its errors name: a subcommand's own (`data make`) sets its own, as argparse's
        # errors name it ("streamgen data: error:" had followed "streamgen data make: error:")
        p.set_defaults(_run=mod.run, _prog=p.prog)
    return parser


# OSErrors no change to the command line or the code would mend: a full disk or quota, a
# read-only file system, a failing device (a traceback for them reads as a bug in streamgen)
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def main(argv: list[str] | None = None) -> int:
    # a name the output's encoding cannot hold (a Latin-1 locale's, of `--out ☺.mp4`) is written
    # escaped, as Python writes it to standard error: it was a UnicodeEncodeError once the work was done
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    try:  # a Ctrl-C while the subcommands load is a stop too, not a traceback
        raise_swallowed_stops_again()  # (a Ctrl-C that lands in a finalizer, as the command starts: not lost)
        from streamgen.parallel.torchrun import end_with_the_launcher

        end_with_the_launcher()  # (an --sp N rank: not left running when its launcher is killed)
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        # what `--sp N` runs again on each process: these arguments, not this process's (a program
        # calling main(argv) has its own command line)
        args._argv = argv
        try:
            return int(args._run(args) or 0)
        except UserError as e:
            from streamgen.parallel.torchrun import report_error  # (once per command, not once per --sp rank)

            report_error(f"{args._prog}: error: {e}")
            return 2
        except OSError as e:
            if e.errno not in MACHINE_ERRNOS:
                raise
            # the machine's, not the program's: a full disk under a plot or a report (the
            # commands name what they write where they can; this is the rest), one line
            from streamgen.parallel.torchrun import report_error

            where = f": {e.filename}" if e.filename else ""
            report_error(f"{args._prog}: error: {e.strerror or e}{where}")
            return 2
        except Exception as e:
            stop = stop_behind(e)
            if stop is None:
                from streamgen.parallel.torchrun import report_own_failure

                report_own_failure(e)  # (an --sp N rank: the launcher names it, even if stopped as it ends)
                raise
            raise stop from None  # (ends it as the stop does: "interrupted", 130; or 143, 129)
    except KeyboardInterrupt:
        from streamgen.parallel.torchrun import is_launcher_rank

        if not is_launcher_rank():  # (a terminal's Ctrl-C reaches every rank: the launcher says it once)
            print("interrupted", file=sys.stderr)
        # A KeyboardInterrupt that came up through code run from a string (exec, eval: each dataclass
        # made as a module imports) set CPython's "unhandled Ctrl-C" flag on its way, and `python -m
        # streamgen` then killed itself by SIGINT as it exited (-2 for its parent, not 130). Running
        # any string clears that flag.
        exec("")
        return 130
    except BrokenPipeError:
        if _stdout_is_open():
            raise  # (another pipe's: a bug of the program's, with its traceback)
        # the reader of this command's output went away (`streamgen bench ... | head`): what it did
        # not read is not wanted. A shell's command ends so, by SIGPIPE (128 + 13), without a word
        return 141


def _stdout_is_open() -> bool:
    """Whether standard output still has a reader (a pipe whose reader closed it reports an error
    to poll). Where it has none, it is pointed at /dev/null from here: Python's flush at exit
    would fail again, with an "Exception ignored" message."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # (no poll; no real descriptor: pytest's capture)
        return True
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return not gone


if __name__ == "__main__":
    # run through the package module so `UserError` is the same class everywhere
    from streamgen.cli import main as _main

    sys.exit(_main())
