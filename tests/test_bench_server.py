"""The serving benchmark's stutter count, from the run lengths of the chunk stamps."""

import asyncio
import json

import pytest

from bench.server_figures import _on_time, _stutter


def frames(*runs):
    """One (monotonic, wall, stamp) entry per frame; chunk i's frames carry the stamp i."""
    return [(0.0, 0.0, float(i)) for i, n in enumerate(runs) for _ in range(n)]


def test_stutter_counts_repeats_and_skips_but_not_the_runs_cut_by_the_watch():
    assert _stutter(frames(3, 8, 8, 8, 5), 8) == {"repeated": 0, "skipped": 0}
    # chunk 1 shown 2 frames too long (chunk 2 came late); chunk 3 lost 3 frames (the clock jumped back)
    assert _stutter(frames(1, 10, 8, 5, 8, 30), 8) == {"repeated": 2, "skipped": 3}
    assert _stutter(frames(12), 8) == {"repeated": 0, "skipped": 0}


async def test_server_counters_read_the_servers_metrics():
    """What `bench server` reads per probe exists under these names on a real server, and moves."""
    import httpx
    from server_helpers import live_server

    from bench.server import _server_counters

    with live_server() as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            before = await _server_counters(http)
            assert set(before) == {"busy_s", "late", "chunk_ms", "cpu_s", "batched", "batches"}
            assert before["chunk_ms"] > 0  # measured in the warm-up
            app.state.metrics.worker_busy.inc(0.25)
            app.state.metrics.late_chunks.inc()
            after = await _server_counters(http)
    assert after["busy_s"] - before["busy_s"] == 0.25 and after["late"] - before["late"] == 1


def test_on_time_sessions_need_the_frames_and_few_late_chunks():
    per_n = {1: {"fps": 25.0, "late_chunks": 0, "chunks": 63}, 2: {"fps": 24.9, "late_chunks": 1, "chunks": 125},
             3: {"fps": 24.8, "late_chunks": 1, "chunks": 188}, 4: {"fps": 24.6, "late_chunks": 9, "chunks": 250}}  # fmt: skip
    assert _on_time(per_n, seconds=20) == 3  # 9 of 250 chunks late at 4: over 1%
    assert _on_time({**per_n, 2: {"fps": 23.0, "late_chunks": 0, "chunks": 125}}, seconds=20) == 1
    assert _on_time({**per_n, 2: {"fps": None, "late_chunks": 0, "chunks": 2}}, seconds=20) == 1  # untimed


async def test_each_transports_watch_counts_the_chunks_its_session_got():
    """A watch reads its session's chunk count before it hangs up: a WebSocket client's hang-up
    ends the session, and a count read after it was 0 (every probe then said 0 frames/s)."""
    import httpx
    from server_helpers import live_server

    from bench.server import WATCH, _generated_fps

    async def unhurried(request):  # the hang-up's teardown wins any race with the count's request
        if request.method == "GET":
            await asyncio.sleep(0.5)

    with live_server(stamp_frames=True) as (url, _):  # (as `bench server` serves: the fps reads the stamps)
        async with httpx.AsyncClient(base_url=url, timeout=10, event_hooks={"request": [unhurried]}) as http:
            for transport, watch in WATCH.items():
                # (2 s: a timed fps needs two chunk starts in the watch; on a loaded machine a
                # chunk took 0.8 s and a 1 s watch saw one, _generated_fps None)
                result = await watch(http, 2.0, seed=0)
                assert result["chunks"] >= 2 and result["playout_delay"] > 0, transport
                assert len(result["frames"]) > 1 and _generated_fps(result) > 0, transport
                status = await http.get(result["session"]["resource"], headers={"Authorization": "Bearer x"})
                assert status.status_code in (401, 404), transport  # ended


def test_realtime_sessions_stop_at_the_first_probe_out_of_real_time():
    from bench.server import _realtime

    ok, slow = {"fps": 25.0, "elapsed_s": 21}, {"fps": 23.9, "elapsed_s": 21}
    dragged = {"fps": 25, "elapsed_s": 81}
    assert _realtime({1: ok, 2: ok, 3: slow}, seconds=20) == 2
    assert _realtime({1: ok, 2: dragged, 3: ok}, seconds=20) == 1  # setups queued for over a minute
    assert _realtime({1: slow}, seconds=20) == 0


async def test_against_probes_two_servers_in_alternation(monkeypatch):
    """`bench server --against`: both servers up at once, each load probed on one and then the
    other with the order flipped at each step, and the speedup is the ratio of the two worker
    times per chunk at the same load."""
    import argparse
    import contextlib

    import httpx
    from server_helpers import live_server

    import bench.server as bench

    @contextlib.asynccontextmanager
    async def served(args, model, extra=()):
        with live_server() as (url, _):
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                yield http, (await http.get("/readyz")).json(), 0.5

    probed, probe = [], bench._probe

    async def recording_probe(http, args, n):
        figures = await probe(http, args, n)
        probed.append((str(http.base_url), n))
        return figures | {"fps": 25.0}  # the ladder's stop rule is tested above; here both go on

    monkeypatch.setattr(bench, "_served", served)
    monkeypatch.setattr(bench, "_probe", recording_probe)
    args = argparse.Namespace(model="debug", against="debug-too", against_args="", max_probe=3, seconds=1.0,
                              transport="ws")  # fmt: skip
    out = await bench._bench_against(args)

    first, second = probed[0][0], probed[1][0]
    assert first != second and [n for _, n in probed] == [1, 1, 2, 2, 3, 3]
    assert [url for url, _ in probed] == [first, second, second, first, first, second]  # A B, B A, A B
    assert out["model"] == "debug" and out["against"] == "debug-too"
    for side in ("model", "against"):
        figures = out[f"{side}_figures"]
        assert figures["max_realtime_sessions"] == 3
        assert set(figures["sessions_worker_ms_per_chunk"]) == {1, 2, 3}
        assert all(ms > 0 for ms in figures["sessions_worker_ms_per_chunk"].values())
    own = out["model_figures"]["sessions_worker_ms_per_chunk"]
    other = out["against_figures"]["sessions_worker_ms_per_chunk"]
    assert out["against_speedup"] == {n: round(own[n] / other[n], 3) for n in (1, 2, 3)}
    assert set(out["against_cpu_speedup"]) == {1, 2, 3}


async def test_against_args_serve_the_same_model_another_way(monkeypatch):
    """`--against-args`: the second server runs the first one's model with those options, on
    its command line after the benchmark's own."""
    import argparse
    import contextlib

    import bench.server as bench

    started = []

    @contextlib.asynccontextmanager
    async def served(args, model, extra=()):
        started.append(bench._start_server(args, 0, model, extra).args)
        yield None, {}, 0.0

    async def no_probe(http, args, n):
        raise asyncio.CancelledError  # both servers are up: that is all this test reads

    class Popen:  # the command, not a process
        def __init__(self, args, **kwargs):
            self.args = args

    async def chunk_shape(http):
        return 8, 0.32

    monkeypatch.setattr(bench, "_served", served)
    monkeypatch.setattr(bench, "_probe", no_probe)
    monkeypatch.setattr(bench, "_chunk_shape", chunk_shape)
    monkeypatch.setattr(bench.subprocess, "Popen", Popen)
    args = argparse.Namespace(model="tiny-avatar", against=None, against_args="--ws-compression --lanes 2",
                              max_probe=1, seconds=1.0, transport="ws", size=None, lanes=3, threads=None,
                              model_process=False, compile=False, align_batches=True)  # fmt: skip
    with contextlib.suppress(asyncio.CancelledError):
        await bench._bench_against(args)
    other, own = started  # the second first: serve refuses its options before the first warms up
    assert own[own.index("--model") + 1] == other[other.index("--model") + 1] == "tiny-avatar"
    assert "--ws-compression" not in own and other[-3:] == ["--ws-compression", "--lanes", "2"]
    # (serve refuses more lanes than sessions: `--lanes 3 --max-probe 1` was refused)
    assert own[own.index("--max-sessions") + 1] == "3" and own[own.index("--lanes") + 1] == "3"


def test_serve_options_the_server_refuses_are_one_line(capsys):
    """`--against-args` that `streamgen serve` refuses (it exits 2 with its usage line) were a
    RuntimeError traceback carrying the server's whole stderr; they are one line with its reason."""
    from streamgen.cli import main

    argv = ["bench", "server", "--json", "--model", "debug", "--max-probe", "1", "--seconds", "1",
            "--against-args=--no-such-option"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the server would not start" in err and "unrecognized arguments: --no-such-option" in err, err


def test_serve_options_a_shell_cannot_split_are_refused_by_the_options(capsys):
    # an unclosed quote was shlex's ValueError traceback
    from streamgen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "server", "--json", "--against-args=--text 'smiling"])
    assert exit_.value.code == 2
    assert "argument --against-args: \"--text 'smiling\" is not a command line" in capsys.readouterr().err


def test_the_figures_name_the_cpu_they_ran_on(monkeypatch):
    """Served figures are figures of the processor (bench/machine.py) and of the settings the
    environment gives the served model: the JSON says which."""
    import argparse

    import bench.server as bench

    async def measured(args, kept):
        return {"model": args.model, "max_realtime_sessions": 3}

    monkeypatch.setattr(bench, "_bench", measured)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    monkeypatch.setenv("STREAMGEN_FP8", "1")  # the served model's linears in FP8
    out = bench.main(parser.parse_args(["--model", "debug", "--browser", ""]))
    assert out["max_realtime_sessions"] == 3
    assert out["cpu"]["model"] and isinstance(out["cpu"]["amx"], bool)
    assert out["environment"]["STREAMGEN_FP8"] == "1"


async def test_server_cpu_counts_the_model_process_too():
    # under --model-process the chunks are generated in the model process, whose CPU seconds the
    # server reports apart: server_cpu_ms_per_chunk counted only the front process (4 ms a chunk)
    import httpx

    from bench.server import _server_counters

    metrics = ("process_cpu_seconds_total 2.5\nstreamgen_model_process_cpu_seconds_total 30.0\n"
               "streamgen_worker_busy_seconds_total 1.0\n")  # fmt: skip

    def answer(request):
        if request.url.path == "/metrics":
            return httpx.Response(200, text=metrics)
        return httpx.Response(200, json={"chunk_ms": 100.0})

    async with httpx.AsyncClient(base_url="http://bench", transport=httpx.MockTransport(answer)) as http:
        counters = await _server_counters(http)
    assert counters["cpu_s"] == 32.5 and "model_cpu_s" not in counters


# (--port 0, and the port read from uvicorn's "running on" line in the server's log, read where it
# lies without moving the file's offset, which the server writes at: a port from _free_port, let
# go, could be taken by another test process before serve bound it, and serve refused it, or this
# waited on that process's server)
_STARTS_A_SERVER = """
import argparse, asyncio, os, re, sys, time, httpx
from bench.server import _start_server, _wait_ready
args = argparse.Namespace(max_probe=1, size=None, lanes=1, threads=None, model_process=False, compile=False,
                          align_batches=True)
proc = _start_server(args, 0, "debug", ["--log-level", "info"])
deadline = time.monotonic() + 120
while not (running := re.search(rb"Uvicorn running on (http://\\S+)", os.pread(proc.stderr_log.fileno(), 1 << 20, 0))):
    if proc.poll() is not None or time.monotonic() > deadline:
        sys.exit(f"serve did not listen (exit code {proc.poll()})")
    time.sleep(0.1)
async def ready():
    async with httpx.AsyncClient(base_url=running.group(1).decode(), timeout=10) as http:
        await _wait_ready(http, proc, timeout=120)
asyncio.run(ready())
print(proc.pid, flush=True)
sys.stdin.read()  # until the test kills it
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_benchmark_does_not_leave_its_server_running():
    # SIGTERM (`timeout`, a CI job's end) or SIGKILL of `bench server` left `streamgen serve`
    # running, its port held, for good (Ctrl-C reached both: they share the terminal's group)
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    bench = subprocess.Popen(
        [sys.executable, "-c", _STARTS_A_SERVER], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        server = int(bench.stdout.readline())
        bench.kill()
        bench.wait(10)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{server}") and _state(server) != "Z":
            assert time.monotonic() < deadline, "the server outlived its benchmark"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)  # (the server is in its group)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def test_the_chunk_is_the_one_the_server_says(monkeypatch):
    """A Wan flavor's chunks are 12 frames (3 latent frames), not tiny-avatar's 8: the watches take
    the chunk from the server's "ready" message, and a probe of a clean WebSocket watch (its
    chunks come whole) counts no repeated frames (with 8-frame chunks it counted 4 a chunk)."""
    import argparse

    import httpx
    import server_helpers
    from server_helpers import live_server

    from bench.server import WATCH, _probe
    from streamgen.models import load_model

    monkeypatch.setattr(server_helpers, "small_model", lambda: load_model("debug", frames_per_chunk=3))
    with live_server(stamp_frames=True) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for transport, watch in WATCH.items():
                result = await watch(http, 1.5, seed=0)
                assert (result["frames_per_chunk"], result["chunk_seconds"]) == (12, 0.48), transport
            args = argparse.Namespace(transport="ws", seconds=1.5)
            figures = await _probe(http, args, 1)
    assert figures["repeated_frames"] == [0]


def _watched(chunks: int, frames_per_chunk: int, generated_every: float, arrived_every: float) -> dict:
    """A watch's frames: chunk k generated (stamped) at k * generated_every and arriving at
    k * arrived_every, its frames together (a WebSocket client's)."""
    frames = [(k * arrived_every + i * 1e-4, 0.0, 100.0 + k * generated_every)
              for k in range(chunks) for i in range(frames_per_chunk)]  # fmt: skip
    return {"frames": frames, "chunks": chunks, "frames_per_chunk": frames_per_chunk,
            "chunk_seconds": frames_per_chunk / 25}  # fmt: skip


def test_fps_counts_the_frames_per_chunk_the_watch_was_told():
    from bench.server import _generated_fps

    wan = _watched(8, 12, generated_every=0.48, arrived_every=0.48)  # 12-frame chunks on time: 25 fps
    assert _generated_fps(wan) == pytest.approx(25.0)


def test_fps_of_a_short_watch_is_not_inflated_by_the_chunks_made_ahead():
    """Chunks made ahead of their play time reach a WebSocket client together: the server's
    chunk count over the watch's few milliseconds was thousands of frames a second (`--seconds
    0.1` gave 3117 fps). The fps is the chunks' generation rate, whatever the watch's length."""
    from bench.server import _decoded_fps, _generated_fps

    burst = _watched(4, 8, generated_every=0.32, arrived_every=0.01)
    assert _generated_fps(burst) == pytest.approx(25.0)
    assert _generated_fps(_watched(2, 8, generated_every=0.32, arrived_every=0.01)) is None  # one interval: none
    assert _decoded_fps(_watched(4, 8, generated_every=0.32, arrived_every=0.32)["frames"]) == pytest.approx(25.0)


def test_a_watch_too_short_to_time_a_chunk_is_refused_in_one_line(capsys):
    from streamgen.cli import main

    argv = ["bench", "server", "--json", "--model", "debug", "--max-probe", "1", "--seconds", "0.5",
            "--transport", "ws", "--browser", ""]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert "--seconds 0.5 is too short to measure debug" in captured.err and "0.96 s" in captured.err, captured.err


@pytest.mark.parametrize("against", [[], ["--against", "tiny-avatar"]])
def test_a_watch_too_short_for_the_models_chunks_is_refused_before_a_server_starts(against, monkeypatch, capsys):
    """The models' files say their chunk: the served check came after the start and warm-up."""
    import bench.server
    from streamgen.cli import main

    def no_server(*_):
        raise AssertionError("a server was started")

    monkeypatch.setattr(bench.server, "_start_server", no_server)
    argv = ["bench", "server", "--json", "--max-probe", "1", "--seconds", "0.9", "--transport", "ws",
            "--browser", "", *against]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "--seconds 0.9 is too short to measure tiny-avatar" in captured.err and "0.96 s" in captured.err


async def test_the_ladder_says_each_probe_on_stderr_unless_json(monkeypatch, capsys):
    # minutes without a word until the JSON: each probe says its figures as it ends
    import argparse

    import bench.server as bench

    async def probe(http, args, n):
        return {"fps": 25.0 if n < 2 else 20.5, "late_chunks": n - 1, "elapsed_s": 3.0}

    monkeypatch.setattr(bench, "_probe", probe)
    for json_output in (False, True):
        args = argparse.Namespace(max_probe=4, seconds=2.0, json=json_output)
        assert (await bench._max_sessions(None, args))[0] == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        if json_output:
            assert captured.err == ""
        else:
            assert captured.err.splitlines() == [
                "bench server: 1 session: the slowest 25.0 fps, 0 chunks late",
                "bench server: 2 sessions: the slowest 20.5 fps, 1 chunks late",
            ]


async def test_a_ladder_that_ends_at_max_probe_in_real_time_says_the_most_may_be_more(monkeypatch, capsys):
    # `--max-probe 2` on a machine that serves more: "max_realtime_sessions": 2, read as its limit
    import argparse

    import bench.server as bench
    from bench.server_figures import _one_model_figures

    async def probe(http, args, n):
        return {"fps": 25.0, "late_chunks": 0, "chunks": 10, "elapsed_s": 3.0}

    monkeypatch.setattr(bench, "_probe", probe)
    args = argparse.Namespace(max_probe=2, seconds=2.0, json=False)
    most, per_n = await bench._max_sessions(None, args)
    assert most == 2 and capsys.readouterr().err.splitlines()[-1] == (
        "bench server: every probe up to --max-probe 2 in real time: the most may be more"
    )
    figures = {key: {} for key in ("first_frame_ms", "glass_to_glass_ms", "playout_delay_ms", "av_offset_ms")}
    figures |= dict.fromkeys(("repeated_frames", "worker_busy", "worker_ms_per_chunk", "server_cpu_ms_per_chunk"))
    figures |= dict.fromkeys(("chunk_ms", "server_cpu_cores", "batch_mean"))
    ladder = {n: {**figures, **f} for n, f in per_n.items()}
    assert _one_model_figures({}, ladder, args)["ladder_capped"] is True
    args.max_probe = 3  # the same two probes, the third out of real time
    ladder[3] = {**ladder[2], "fps": 20.0}
    out = _one_model_figures({}, ladder, args)
    assert out["max_realtime_sessions"] == 2 and out["ladder_capped"] is False


@pytest.mark.parametrize("against", [False, True])
def test_a_ctrl_c_during_the_ladder_prints_the_figures_so_far(against, monkeypatch, capsys):
    """Minutes of probes were lost to a Ctrl-C: only "interrupted". The JSON of the probes
    finished is printed, saying where the ladder stopped, and the command still ends as Ctrl-C."""
    import argparse
    import contextlib

    import bench.server as bench

    @contextlib.asynccontextmanager
    async def served(args, model, extra=()):
        yield None, {"chunk_ms": 100.0}, 0.5

    async def probe(http, args, n):
        if n == 3:
            raise KeyboardInterrupt
        figures = dict.fromkeys(("first_frame_ms", "glass_to_glass_ms", "playout_delay_ms", "av_offset_ms",
                                 "repeated_frames", "worker_busy", "server_cpu_ms_per_chunk", "chunk_ms",
                                 "server_cpu_cores", "batch_mean"), 1.0)  # fmt: skip
        return figures | {"fps": 25.0, "late_chunks": 0, "chunks": 40, "elapsed_s": 2.0, "worker_ms_per_chunk": 50.0 * n}

    async def chunk_shape(http):
        return 3, 0.12

    monkeypatch.setattr(bench, "_served", served)
    monkeypatch.setattr(bench, "_probe", probe)
    monkeypatch.setattr(bench, "_chunk_shape", chunk_shape)
    options = ["--model", "debug", "--browser", "", "--transport", "ws", "--seconds", "2"]
    options += ["--against", "debug"] if against else []
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(options)
    args.json = True  # (the bench command's own option: no progress lines)
    if not against:  # the one session watched first, then the ladder

        async def watch(http, seconds, seed):
            return {"first_frame": 0.2, "frames": [], "markers": [], "chunk_seconds": 0.12, "frames_per_chunk": 3}

        monkeypatch.setattr(bench, "WATCH", {"ws": watch})
    from streamgen.cli import main

    # as `streamgen bench server` runs it (main, not run: there the figures were lost), then as
    # `python -m bench.server` does
    assert main(["bench", "server", "--json", *options]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        bench.run(args)
    for printed in (captured.out, capsys.readouterr().out):
        out = json.loads(printed)
        assert out["interrupted"] == "Ctrl-C after the probe of 2 sessions: the ladder stops there"
        figures = [out["model_figures"], out["against_figures"]] if against else [out]
        for f in figures:
            assert f["max_realtime_sessions"] == 2 and set(f["sessions_worker_ms_per_chunk"]) == {"1", "2"}
        assert out["cpu"]["model"]


async def test_a_server_that_says_much_on_stderr_is_not_held_up_by_it(tmp_path, monkeypatch):
    """The server's stderr was a pipe nobody read: past 64 KiB (late-chunk lines at a load past
    real time) the server blocked at its next line. Here a stand-in says 200 KB and exits: it was
    blocked until the wait gave up; now its exit is seen, with the end of what it said."""
    import argparse
    import stat
    import sys

    import httpx

    import bench.server as bench

    talker = tmp_path / "python"
    talker.write_text("#!/bin/sh\nyes x | head -c 200000 | tr -d '\\n' >&2\necho ' the end' >&2\nexit 1\n")
    talker.chmod(talker.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(talker))
    args = argparse.Namespace(max_probe=1, size=None, lanes=1, threads=None, model_process=False, compile=False,
                              align_batches=True)  # fmt: skip
    proc = bench._start_server(args, bench._free_port(), "debug")  # (never bound: "python" here only talks)
    try:
        async with httpx.AsyncClient(base_url="http://127.0.0.1:9", timeout=1) as http:
            with pytest.raises(RuntimeError, match="server exited: x+ the end"):
                await bench._wait_ready(http, proc, timeout=10)
    finally:
        proc.kill()
        proc.wait()


async def test_a_server_never_ready_is_one_line_naming_its_warm_up_stage():
    """A server still warming up when the wait ran out was a traceback ("RuntimeError: server did
    not become ready") after 300 s, which a --compile warm-up from an empty inductor cache passed
    on a busy machine; it is one line now, saying what the warm-up was doing, and under --compile
    the wait is longer."""
    import types

    import httpx

    import bench.server as bench
    from streamgen.cli import UserError

    def warming(request):
        return httpx.Response(503, json={"ready": False, "stage": "compiling batches of up to 5 sessions"})

    running = types.SimpleNamespace(poll=lambda: None)
    async with httpx.AsyncClient(base_url="http://bench", transport=httpx.MockTransport(warming)) as http:
        with pytest.raises(UserError, match=r"not ready after 0.3 s \(its /readyz: compiling batches of up to 5"):
            await bench._wait_ready(http, running, timeout=0.3)
    assert bench.COMPILE_READY_TIMEOUT_S > 418 > bench.READY_TIMEOUT_S  # (the slowest cold warm-up measured)
