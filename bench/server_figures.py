"""`bench server`'s figures from what its clients saw: chunk starts, fps, stutter, latency, A/V
offset, and the probe ladder's real-time and on-time counts (bench/server.py measures)."""

from __future__ import annotations

import statistics


def _on_time(per_n: dict, seconds: float, late_share: float = 0.01) -> int:
    """Most concurrent sessions that all generated >= 24 frames/s while the server published no
    more than `late_share` of their chunks after their play time (real time by the fps alone
    lets a saturated server through whose chunks come late, now and then, to every session)."""
    best = 0
    for n, figures in sorted(per_n.items()):
        late = figures["late_chunks"] > late_share * figures["chunks"]
        if figures["fps"] is None or figures["fps"] < 24 or late:
            break
        best = n
    return best


def _generated_fps(watch: dict) -> float | None:
    """Frames the server generated for the session per second: the chunks the client got, over
    the time between their generation (each one's stamp: when its input was cut off). The
    server's chunk count over the watch's length counted the chunks generated ahead of their play
    time too, which on a short watch was most of them (`--seconds 0.1`: 3117 fps). None where the
    watch saw too few chunks to time (bench/server.py's `MIN_WATCH_CHUNKS` keeps a user's watch from being that short)."""
    starts = _chunk_starts(watch["frames"])
    span = starts[-1][2] - starts[0][2] if len(starts) > 1 else 0.0
    return watch["frames_per_chunk"] * (len(starts) - 1) / span if span > 0 else None


def _decoded_fps(frames) -> float | None:
    """Frames the client got per second, repeats of a late chunk's last picture included, between
    the first and the last chunk start it saw (a WebSocket client gets a chunk's frames at once:
    counted from the first frame to the last, a short watch's fps was thousands)."""
    starts = _chunk_starts(frames)
    if len(starts) < 2 or starts[-1][0] <= starts[0][0]:
        return None
    first, last = starts[0][0], starts[-1][0]
    return sum(first <= mono < last for mono, _, _ in frames) / (last - first)


def _stutter(frames, per_chunk: int) -> dict:
    """Frames shown twice (a chunk came late) and frames never shown (the clock jumped back), from
    the run lengths of the chunk stamps; the first and last runs are cut by the watch and skipped."""
    runs, last = [], None
    for _, _, stamp in frames:
        if stamp == last:
            runs[-1] += 1
        else:
            runs.append(1)
            last = stamp
    inner = runs[1:-1]
    return {"repeated": sum(max(0, n - per_chunk) for n in inner),
            "skipped": sum(max(0, per_chunk - n) for n in inner)}  # fmt: skip


def _chunk_starts(frames):
    """Frames where the stamp changes: the first frame of each chunk."""
    starts, last = [], None
    for mono, wall, stamp in frames:
        if stamp != last:
            starts.append((mono, wall, stamp))
            last = stamp
    return starts[1:]  # the first one may be a repeat of a late start


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _glass_to_glass_ms(starts) -> float | None:
    return round(1000 * statistics.median(w - s for _, w, s in starts), 1) if starts else None


def _av_offset(starts, markers, chunk_seconds: float) -> float | None:
    offsets = []
    for mono, _, _ in starts:
        near = [m for m in markers if abs(m - mono) < chunk_seconds / 2]
        if near:
            offsets.append(mono - min(near, key=lambda m: abs(m - mono)))
    return 1000 * statistics.median(offsets) if offsets else None


def _in_real_time(figures: dict, seconds: float) -> bool:
    """Every session of a probe generated >= 24 frames/s, and the probe did not drag on (its
    sessions' setups queued for a minute)."""
    return figures["fps"] is not None and figures["fps"] >= 24 and figures["elapsed_s"] <= seconds + 60


def _realtime(per_n: dict, seconds: float) -> int:
    """Most concurrent sessions in real time, and every smaller number too."""
    best = 0
    for n, figures in sorted(per_n.items()):
        if not _in_real_time(figures, seconds):
            break
        best = n
    return best


def _ladder_figures(per_n: dict, seconds: float) -> dict:
    """The probe ladder's figures, one dict per figure keyed by the number of sessions."""
    out = {"max_on_time_sessions": _on_time(per_n, seconds)}
    for key in ("fps", "first_frame_ms", "glass_to_glass_ms", "playout_delay_ms", "av_offset_ms", "repeated_frames",
                "worker_busy", "worker_ms_per_chunk", "server_cpu_ms_per_chunk", "late_chunks", "chunk_ms",
                "server_cpu_cores", "batch_mean"):  # fmt: skip
        out[f"sessions_{key}"] = {n: figures[key] for n, figures in per_n.items()}
    return out


def _realtime_figures(per_n: dict, args) -> dict:
    """`max_realtime_sessions`, and `ladder_capped`: whether the ladder ended at --max-probe with
    every probe in real time (then the most is that many or more: a bare 6 read as the machine's
    limit)."""
    most = _realtime(per_n, args.seconds)
    return {"max_realtime_sessions": most, "ladder_capped": most == args.max_probe}


def _one_model_figures(one: dict, per_n: dict, args) -> dict:
    return one | _realtime_figures(per_n, args) | _ladder_figures(per_n, args.seconds)


def _against_figures(args, names: dict, ready: dict, per_n: dict) -> dict:
    """`_bench_against`'s figures from each side's (/readyz, start seconds) and probe ladder."""
    out = {"model": args.model, "against": names["against"], "against_args": args.against_args,
           "transport": args.transport, "order": "alternating"}  # fmt: skip
    for side in names:
        ladder = per_n[side]
        out[f"{side}_figures"] = {
            "ready_s": round(ready[side][1], 1),
            "chunk_ms": ready[side][0].get("chunk_ms"),
            **_realtime_figures(ladder, args),
            **_ladder_figures(ladder, args.seconds),
        }
    # > 1: the second server's chunks cost less at that load, the worker's time (against_speedup)
    # or the whole process's CPU time (against_cpu_speedup)
    for key, figure in (("against_speedup", "worker_ms_per_chunk"), ("against_cpu_speedup", "server_cpu_ms_per_chunk")):
        own, other = (out[f"{side}_figures"][f"sessions_{figure}"] for side in names)
        out[key] = {n: round(own[n] / other[n], 3) for n in own if own[n] and other.get(n)}
    return out
