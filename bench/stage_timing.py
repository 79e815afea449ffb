"""Each stage of a chunk timed and profiled against the floor `bench/floor.py` counts for it:
the steady chunk's stages, a fresh stream's first chunk (its start, then its stages), and one
chunk under `torch.profiler` (operators, kernels, the GPU's busy time, its longest kernels).
`bench floor --time N` and `bench gpu`'s `stages` report them."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

from bench.ceilings import synchronize
from bench.floor import TARGET_FPS, report, rounded
from streamgen.stream import CHUNK_STAGES, StreamSession


def _stage_timer(times: dict, sync):
    """An `observe` hook for `next_chunk` that appends each stage's seconds to times[stage],
    synchronised around the stage."""

    def timed(stage, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.setdefault(stage, []).append(time.perf_counter() - t)
        return out

    return timed


def timed_report(
    session: StreamSession,
    work: dict,
    ceilings: dict,
    chunks: int,
    target_fps=TARGET_FPS,
    restart=None,
    first_chunks: int = 3,
):
    """`report`, plus each stage of `chunks` more chunks of `session` (its ring full, as
    `chunk_work` leaves it) timed, synchronised around each stage, against its floor:
    `of_floor` is the floor over the measured time, `tflop_per_s` the rate achieved. Then one
    more chunk under the profiler (`profile_chunk`): `ops` per stage, and on CUDA `kernels`,
    `gpu_busy_ms` and `gpu_busy_share` (of the profiled stage's time). With `restart` (a fresh
    stream: reference encode and sink; it takes an `observe` as next_chunk does), `first_chunk`:
    the start (and its stages) and each stage of a fresh stream's first chunk, medians of
    `first_chunks` restarts, against their floors."""
    sync = synchronize(session.device)
    times = {stage: [] for stage in CHUNK_STAGES}
    for _ in range(chunks):
        session.next_chunk(observe=_stage_timer(times, sync))
    try:
        activity = profile_chunk(session)
    except Exception as e:  # the profiler is a diagnosis: the timings stand without it
        activity = {"error": f"{type(e).__name__}: {e}"[:300]}
    result = report(work, ceilings, target_fps)
    first = None
    if restart is not None:  # last: a restart empties the ring the steady chunks need
        first = _timed_first_chunk(session, restart, first_chunks, sync, result["floor"]["first_chunk"])
    stages = {}
    for stage, seconds in times.items():
        ms = float(np.median(seconds)) * 1000
        stages[stage] = {"ms_p50": ms, **activity.get(stage, {})}
        if stages[stage].get("gpu_busy_ms") is not None:
            # of the profiled stage's time: the same chunk's. Over the unprofiled time the copy to
            # the host came out 7x "busy" on an H200 (the profiler slowed the copy itself); the
            # profiler's host overhead makes this share a little low, never above 1
            stages[stage]["gpu_busy_share"] = stages[stage]["gpu_busy_ms"] / stages[stage]["profiled_ms"]
        w = work["steady_chunk"]["stages"].get(stage)
        if w is not None:  # the copy to the host is timed, not counted
            stage_floor = result["floor"]["steady_chunk"]["stages"][stage]["floor_ms"]
            stages[stage].update(
                tflop=w["tflop"],
                tflop_per_s=w["tflop"] / (ms / 1000),
                floor_ms=stage_floor,
                of_floor=stage_floor / ms,
            )
    chunk_ms = sum(s["ms_p50"] for s in stages.values())
    out = {"stages": rounded(stages), "chunk_ms_p50_sum": round(chunk_ms, 1), **result}
    if first is not None:
        out["first_chunk"] = first
    if "error" in activity:
        out["profile_error"] = activity["error"]
    return out


def _timed_first_chunk(session, restart, repeats: int, sync, first_floor: dict) -> dict:
    """Where a fresh stream's first chunk goes: `restart(observe)` (the start: its `START_STAGES`
    timed, the rest is bookkeeping) and each stage of the chunk after it, medians over `repeats`
    restarts, each against its floor."""
    starts, start_times, times = [], {}, {}
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        restart(observe=_stage_timer(start_times, sync))
        sync()
        starts.append(time.perf_counter() - t)
        session.next_chunk(observe=_stage_timer(times, sync))
    start_ms = float(np.median(starts)) * 1000
    start_stages = {stage: {"ms_p50": float(np.median(s)) * 1000} for stage, s in start_times.items()}
    stages = {}
    for stage, seconds in times.items():
        stages[stage] = {"ms_p50": float(np.median(seconds)) * 1000}
        stage_floor = first_floor["stages"].get(stage, {}).get("floor_ms")
        if stage_floor is not None:
            stages[stage]["floor_ms"] = stage_floor
    start_floor = first_floor["floor_ms_from_start"] - first_floor["floor_ms"]
    return rounded(
        {
            "start": {"ms_p50": start_ms, "floor_ms": start_floor, "stages": start_stages},
            "stages": stages,
            "ms_p50_sum": start_ms + sum(s["ms_p50"] for s in stages.values()),
            "floor_ms_from_start": first_floor["floor_ms_from_start"],
            "restarts": repeats,
        }
    )


def profile_chunk(session: StreamSession) -> dict:
    """One more chunk under torch.profiler, each stage in its own range and synchronised at its
    end: per stage, the operators the host dispatched and, on CUDA, the kernels the GPU ran and
    the time it was busy with them (`stage_activity`)."""
    from torch.profiler import ProfilerActivity, record_function

    cuda = session.device.type == "cuda"
    sync = synchronize(session.device)

    def observe(stage, fn):
        with record_function(STAGE_RANGE + stage):
            out = fn()
            sync()  # the stage's kernels end inside its range
        return out

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with quiet_profile(activities) as prof:
        session.next_chunk(observe=observe)
    return stage_activity(prof.events(), cuda)


# libkineto's marks of the profiler's start and stop, "USDT:2026-12-06 13:41:56 22481:22481
# SyncActivityProfilerHandler.cpp:52] profiler_start", written to stderr whatever
# KINETO_LOG_LEVEL says (it adds lines, never takes these away)
KINETO_MARK = re.compile(r"USDT:\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \S+\] profiler_(start|stop)$")


@contextlib.contextmanager
def quiet_profile(activities):
    """`torch.profiler.profile(activities=activities)`, started and stopped without libkineto's
    two marks on the terminal (`KINETO_MARK`)."""
    from torch.profiler import profile

    prof = profile(activities=activities)
    with kineto_marks_dropped():
        prof.start()
    try:
        yield prof
    finally:
        with kineto_marks_dropped():
            prof.stop()


@contextlib.contextmanager
def kineto_marks_dropped():
    """Inside it, file descriptor 2 (where libkineto writes, below Python) goes to a temporary
    file; at its end what was written there, but `KINETO_MARK`'s lines, goes on to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as written:
            os.dup2(written.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                written.seek(0)
                lines = written.read().decode(errors="replace").splitlines(keepends=True)
                kept = "".join(line for line in lines if not KINETO_MARK.match(line.rstrip("\n")))
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()
    finally:
        os.close(saved)


STAGE_RANGE = "streamgen.stage:"
TOP_KERNELS, TOP_KERNEL_NAME = 6, 100  # kernel names (templates) can run to thousands of characters


def stage_activity(events, device_kernels: bool) -> dict:
    """Per stage range in a profile: `ops`, the operators the host dispatched (aten calls not made
    by another aten call; each costs host time, so many small ones bound a chunk by the host);
    with `device_kernels`, `kernels`, the device's kernels and copies inside the range, and
    `gpu_busy_ms`, the time at least one of them ran. A GPU busy for much less than the stage
    took waited on the host: launch overhead, what CUDA graphs remove."""
    cpu, device = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    # on CUDA each range comes twice: the host's, and a GPU annotation from its first kernel to its
    # last. That copy is neither the stage's time nor a kernel (read as the range, it overwrote the
    # host's: the H200 runs' to_host had 0 ops and profiled_ms equal to its busy time)
    events = [e for e in events if not (getattr(e, "is_user_annotation", False) and e.device_type != cpu)]
    out = {}
    for rng in (e for e in events if e.name.startswith(STAGE_RANGE) and e.device_type == cpu):
        lo, hi = rng.time_range.start, rng.time_range.end
        inside = [e for e in events if e is not rng and lo <= e.time_range.start and e.time_range.end <= hi]
        ops = [
            e
            for e in inside
            if e.device_type == cpu
            and e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
        ]
        stage = {"ops": len(ops), "profiled_ms": (hi - lo) / 1000}
        if device_kernels:
            spans = sorted((e.time_range.start, e.time_range.end) for e in inside if e.device_type == device)
            busy, end = 0.0, -float("inf")
            for start, stop in spans:  # the union of the spans: kernels on two streams may overlap
                busy += max(0.0, stop - max(start, end))
                end = max(end, stop)
            stage.update(
                kernels=len(spans), gpu_busy_ms=busy / 1000, top_kernels=_top_kernels(inside, device)
            )
        out[rng.name.removeprefix(STAGE_RANGE)] = stage
    return out


def _top_kernels(events, device_type, n: int = TOP_KERNELS) -> dict:
    """The `n` kernels (by name) that ran longest in total among `events`, with their ms and calls:
    where to look first when a stage is far from its floor."""
    total, calls = {}, {}
    for e in events:
        if e.device_type == device_type:
            name = e.name[:TOP_KERNEL_NAME]
            total[name] = total.get(name, 0.0) + (e.time_range.end - e.time_range.start) / 1000
            calls[name] = calls.get(name, 0) + 1
    top = sorted(total, key=total.get, reverse=True)[:n]
    return {name: {"ms": round(total[name], 3), "calls": calls[name]} for name in top}
