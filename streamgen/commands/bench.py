"""`streamgen bench NAME [options]`: run a benchmark from bench/ and print its JSON object.

Each benchmark module has `add_arguments(parser)` and `main(args) -> dict`; it is
imported only when it runs (they import torch, triton, aiortc...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = {
    "engine": ("bench.engine", "StreamSession fps/latency, cache and teacher speedups on this machine"),
    "decoder": (
        "bench.decoder",
        "the tiny autoencoder's decoder: phase conv, compiled, bf16 vs the reference",
    ),
    "server": ("bench.server", "WebRTC first frame, glass-to-glass, fps, A/V offset, sessions"),
    "kernels": ("bench.kernels", "fused kernels vs eager and torch.compile"),
    "gpu": ("bench.gpu", "wan2.1-1.3b streaming on one GPU (832x480, 4 steps)"),
    "wan-decoder": ("bench.wan_decoder", "the Wan VAE decoder each way WanVAE can run it, on any device"),
    "fp8": ("bench.fp8", "a stream's frames with the DiT's linears in FP8 (and bf16) against float32"),
    "floor": (
        "bench.floor",
        "the least time a chunk can take: FLOPs and bytes per stage over a device's ceilings",
    ),
    "resources": (
        "bench.resources",
        "registers, spills, shared memory of each Triton kernel built for a GPU architecture (--arch; sm_90 by default)",
    ),
    "speech-room": (
        "bench.speech_room",
        "fit the speech queue's room pre-check (server/speech.py SPEECH_FLOOR_MS) to espeak-ng's speech",
    ),
}


def add_arguments(p) -> None:
    # (`streamgen bench --json engine` said "streamgen: error: unrecognized arguments: --json":
    # every benchmark takes it, so before the name it is taken as after it)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    # (optional to argparse: `streamgen bench` alone said "the following arguments are required:
    # benchmark"; `run` lists them)
    p.add_argument(
        "benchmark", nargs="?", choices=list(BENCHMARKS),
        help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()),
    )  # fmt: skip
    options = p.add_argument(
        "options", nargs=argparse.REMAINDER, help="the benchmark's own options (--help lists them)"
    )
    # (argparse counts a REMAINDER positional as required: `streamgen bench` alone said "the
    # following arguments are required: benchmark, options", though none of the options are)
    options.required = False


def _check_output(flag: str, path, example: str, UserError) -> None:
    """A file the benchmark writes (--plot's PNG, bench gpu's --out JSON), checked before it
    measures: a plot is written last, and a folder that is not there lost every measurement after
    tens of minutes; bench gpu's --out failed after the device's ceilings were measured."""
    if path is None:
        return
    if not str(path).strip():  # (`--plot "$UNSET"`: the benchmark ran, and no plot was written without a word)
        raise UserError(f"{flag} {path!r} names no file: give the file to write, e.g. {example}")
    file, folder = Path(path), Path(path).parent
    if file.is_dir():
        raise UserError(f"{flag} {file} is a directory; give the file to write, e.g. {file / example}")
    if flag == "--plot" and not file.suffix:  # (matplotlib wrote NAME.png instead, over any there)
        raise UserError(f"--plot {file}: give the file's format in its name, e.g. {file}.png")
    if flag == "--plot" and file.suffix:  # (matplotlib's ValueError, after the whole benchmark)
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if file.suffix[1:].lower() not in formats:
            raise UserError(
                f"--plot {file}: no plot is written as {file.suffix}; give a .png (or {', '.join(sorted(formats))})"
            )
    if not folder.is_dir():
        raise UserError(f"{flag}: the folder {folder} does not exist")
    if flag == "--out":
        _check_replaceable_json(file, UserError)
    from streamgen.files import new_file_beside

    try:  # (a file made and removed: os.access says yes to root where none can be made, as in /proc)
        new_file_beside(file).unlink()
    except OSError as e:
        raise UserError(f"{flag}: cannot write {file}: {e.strerror}") from None


def _check_replaceable_json(file: Path, UserError) -> None:
    """A UserError where --out names a file that is not empty and not a JSON object (what every
    benchmark writes): it was replaced whatever it held, /etc/passwd run as root. An earlier result
    is replaced. (As generate's _check_replaceable does for its MP4.)"""
    if not file.is_file():
        return
    try:
        with open(file, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError as e:
        raise UserError(f"--out: cannot write {file}: {e.strerror or e}") from None
    if head and not head.startswith(b"{"):
        raise UserError(f"--out {file} is a file that is not JSON: bench replaces only a JSON result it "
                        "could have written; give another name (or remove the file)")  # fmt: skip


def _benchmarks_list() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in BENCHMARKS.items()]
    return "\n".join(["streamgen bench: name a benchmark: streamgen bench NAME [--json] [options] "
                       "(streamgen bench NAME --help: its options). The benchmarks:", *lines])  # fmt: skip


def run(args) -> int:
    import logging

    from streamgen.cli import UserError

    if args.benchmark is None:
        print(_benchmarks_list(), file=sys.stderr)
        return 2
    module, help_text = BENCHMARKS[args.benchmark]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise UserError(f"benchmark {args.benchmark!r} is not available: {e}") from None
    parser = argparse.ArgumentParser(prog=f"streamgen bench {args.benchmark}", description=help_text)
    args._prog = parser.prog  # (main's error lines name it, as argparse's do: not "streamgen bench")
    parser.add_argument("--json", action="store_true", help="print the JSON object on one line, no logs")
    mod.add_arguments(parser)
    opts = parser.parse_args(["--json"] * args.json + args.options)
    _check_output("--plot", getattr(opts, "plot", None), "plot.png", UserError)
    _check_output("--out", getattr(opts, "out", None), "result.json", UserError)
    disabled = logging.root.manager.disable
    if opts.json:
        logging.disable(logging.WARNING)
    try:
        result = mod.main(opts)
    finally:  # (this command's own setting: a caller in the same process, a test, gets its logs back)
        logging.disable(disabled)
    print(json.dumps(result) if opts.json else json.dumps(result, indent=2))
    return 0
