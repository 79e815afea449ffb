"""A session's decode with its convolutions split over the threads ("split") against its chunk's frames
decoded side by side, one thread each ("frames"), in the same process (`StreamSession(decode_threads=...)`).

    python -m bench.decode_modes --json [--model tiny-avatar] [--height 128] [--width 128] [--rounds 8]

One started session (its ring full) runs both arms, switched round by round and in alternating order
(this machine is shared and noisy): each round times `--chunks` chunks, the decode stage alone and the
whole chunk. `speedup` is split's median over frames' (above 1: frames is faster); `speedup_rounds` each
round's ratio and their median, min and max (bench/rounds.py), so that a load that came and went shows. The load averages before and after say how quiet the
machine was (/proc/loadavg).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bench.machine import cpu_description
from bench.rounds import balanced_order, ratio_rounds
from streamgen.cli import frame_size, positive_int, thread_count
from streamgen.models import load_model
from streamgen.stream import StreamSession

# the two ways compared ("auto", the default, picks one of them: `cpu_threads.DECODE_THREADS`)
MODES = ("split", "frames")


def load_average() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def started_session(model, height: int, width: int, chunks: int) -> StreamSession:
    """A session with a full ring and speech buffered for `chunks` more chunks."""
    rng = np.random.default_rng(0)
    s = StreamSession(model, height=height, width=width, decode_threads="split")
    s.start((rng.random((height, width, 3)) * 255).astype(np.uint8), seed=0)
    seconds = (s.chunks_to_full_ring + 1 + chunks) * s.chunk_seconds + 2.0
    s.push_audio((rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32))
    for _ in range(s.chunks_to_full_ring + 1):
        s.next_chunk()
    return s


def timed_chunks(session: StreamSession, chunks: int) -> tuple[float, float]:
    """Median ms of the decode stage and of the whole chunk over `chunks` chunks."""
    decode, whole = [], []

    def observe(stage, fn):
        if stage != "decode":
            return fn()
        t = time.perf_counter()
        out = fn()
        decode.append(time.perf_counter() - t)
        return out

    for _ in range(chunks):
        t = time.perf_counter()
        session.next_chunk(observe=observe)
        whole.append(time.perf_counter() - t)
    return float(np.median(decode)) * 1e3, float(np.median(whole)) * 1e3


def run(model_name="tiny-avatar", height=128, width=128, rounds=8, chunks=4) -> dict:
    model = load_model(model_name)
    session = started_session(model, height, width, 2 * rounds * chunks + 2)
    for mode in MODES:  # each arm's first call (its pool's threads, its kernels) untimed
        session.decode_threads = mode
        session.next_chunk()
    load_before = load_average()
    times = {mode: {"decode": [], "chunk": []} for mode in MODES}
    for _, mode in balanced_order(MODES, rounds):
        session.decode_threads = mode
        decode_ms, chunk_ms = timed_chunks(session, chunks)
        times[mode]["decode"].append(decode_ms)
        times[mode]["chunk"].append(chunk_ms)
    split, frames = times["split"], times["frames"]
    out = {
        "model": model_name,
        "size": f"{height}x{width}",
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "chunks_per_round": chunks,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpu": cpu_description(),
    }
    for part in ("decode", "chunk"):
        out[part] = {
            "ms_median": {mode: round(float(np.median(times[mode][part])), 2) for mode in MODES},
            "speedup": round(float(np.median(split[part]) / np.median(frames[part])), 3),
            "speedup_rounds": ratio_rounds(split[part], frames[part]),
        }
    return out


def main(argv=None) -> dict:
    first_sentence = " ".join(__doc__.split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog="python -m bench.decode_modes", description=first_sentence)
    p.add_argument("--model", default="tiny-avatar", help="model name or directory (default: %(default)s)")
    p.add_argument("--height", type=frame_size, default=128, help="frame height (default: %(default)s)")
    p.add_argument("--width", type=frame_size, default=128, help="frame width (default: %(default)s)")
    p.add_argument(
        "--rounds", type=positive_int, default=8,
        help="timed rounds, the arms alternating (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--chunks", type=positive_int, default=4, help="chunks an arm's round times (default: %(default)s)"
    )
    p.add_argument(
        "--threads", type=thread_count, default=None,
        help="torch's threads for the process (default: torch's own, the cores it may use)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="(the output is JSON either way)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run(args.model, args.height, args.width, args.rounds, args.chunks)


if __name__ == "__main__":
    print(json.dumps(main()))
