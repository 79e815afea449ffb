"""A chunk's audio cross-attention keys/values computed once (`Block.kept_kv`) against once per
forward, in the same process: one session, sessions one by one, and a batch (`next_chunks`).

    python -m bench.kept_kv --json [--model tiny-avatar] [--size 64] [--batch 16] [--rounds 8]

The arms alternate round by round on the same started sessions (this machine is shared and
noisy); "every_forward" is the model before the change, its audio keys/values made again by each
of a chunk's denoising steps and by its clean re-encode (the caption's stay kept in both).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import numpy as np
import torch

from bench.rounds import balanced_order, ratio_rounds
from streamgen.cli import frame_size, positive_int
from streamgen.model.model import Block
from streamgen.models import load_model
from streamgen.stream import StreamSession
from streamgen.stream_batch import next_chunks

_KEPT_KV = Block.kept_kv


def _audio_every_forward(self, ctx, audio, cache):
    text_kv, _ = _KEPT_KV(self, ctx, None, cache)
    return text_kv, None  # None: the block computes the audio's keys/values itself


@contextmanager
def audio_kept(kept: bool):
    Block.kept_kv = _KEPT_KV if kept else _audio_every_forward
    try:
        yield
    finally:
        Block.kept_kv = _KEPT_KV


def started_sessions(model, n: int, size: int, chunks: int) -> list[StreamSession]:
    """`n` sessions with a full ring and speech buffered for `chunks` more chunks."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        s = StreamSession(model, height=size, width=size)
        s.start((rng.random((size, size, 3)) * 255).astype(np.uint8), seed=i)
        seconds = (s.chunks_to_full_ring + 1 + chunks) * s.chunk_seconds + 2.0
        s.push_audio((rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32))
        for _ in range(s.chunks_to_full_ring + 1):
            s.next_chunk()
        out.append(s)
    return out


def alternating(run_chunks, sessions: int, chunks: int, rounds: int) -> dict:
    """Median ms per session-chunk of each arm, `rounds` rounds in alternating order; `speedup`
    the ratio of the medians, `speedup_rounds` each round's, their median, min and max."""
    times = {"kept": [], "every_forward": []}
    for _, arm in balanced_order(times, rounds):
        with audio_kept(arm == "kept"), torch.no_grad():
            t = time.perf_counter()
            for _ in range(chunks):
                run_chunks()
            times[arm].append((time.perf_counter() - t) / chunks / sessions * 1e3)
    med = {arm: float(np.median(ts)) for arm, ts in times.items()}
    return {
        "ms_per_session_chunk": {arm: round(ms, 2) for arm, ms in med.items()},
        "speedup": round(med["every_forward"] / med["kept"], 3),
        "speedup_rounds": ratio_rounds(times["every_forward"], times["kept"]),
    }


def run(model_name="tiny-avatar", size=64, batch=16, rounds=8, chunks=8) -> dict:
    model = load_model(model_name)
    many_chunks = max(1, chunks // 4)
    one = started_sessions(model, 1, size, 2 * rounds * chunks)
    many = started_sessions(model, batch, size, 4 * rounds * many_chunks)

    def one_by_one():
        for s in many:
            s.next_chunk()

    return {
        "model": model_name,
        "size": size,
        "rounds": rounds,
        "one_session": alternating(one[0].next_chunk, 1, chunks, rounds),
        f"{batch}_sessions_one_by_one": alternating(one_by_one, batch, many_chunks, rounds),
        f"{batch}_sessions_batched": alternating(lambda: next_chunks(many), batch, many_chunks, rounds),
    }


def main(argv=None) -> dict:
    # (named as it is run, and its first sentence whole: it said "usage: kept_kv.py" and cut the
    # sentence at its line end, "... computed once (`Block.kept_kv`) against once per")
    first_sentence = " ".join(__doc__.split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog="python -m bench.kept_kv", description=first_sentence)
    p.add_argument("--model", default="tiny-avatar", help="model name or directory (default: %(default)s)")
    p.add_argument("--size", type=frame_size, default=64, help="frame side (default: %(default)s)")
    p.add_argument("--batch", type=positive_int, default=16, help="sessions batched (default: %(default)s)")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=8,
        help="timed rounds, the arms alternating (default: %(default)s)",
    )
    p.add_argument("--chunks", type=positive_int, default=8, help="chunks a round of one session (default 8)")
    p.add_argument("--json", action="store_true", help="(the output is JSON either way)")
    args = p.parse_args(argv)
    return run(args.model, args.size, args.batch, args.rounds, args.chunks)


if __name__ == "__main__":
    print(json.dumps(main()))
