"""Serving benchmark: `streamgen bench server --json` (entry point: `run(args)`; options: `add_arguments`).

Starts `streamgen serve` in a subprocess on 127.0.0.1 with benchmark stamps
(each picture carries the wall time its chunk's input was cut off, each chunk's
audio starts with a 20 ms tone) and connects pure-Python aiortc clients (`--transport ws`:
WebSocket clients taking raw RGB frames instead, which cost next to nothing, so the session
probe measures the server rather than the clients sharing its machine; their frames arrive a
chunk at a time, so there is no A/V offset, answer, or stutter to read):

- ready_s: `streamgen serve` started -> /readyz answered 200 (loading, warm-up, `--compile`'s compiling)
- first_frame_ms: offer posted (WebSocket: start sent) -> first video frame in the client
- glass_to_glass_ms: chunk input cut-off -> its first frame decoded in the client (median). WebRTC
  plays each chunk at its play time, so this includes the playout delay; a WebSocket client gets
  a chunk as soon as it is made, so there it is the time to make it (a batch's, when batched)
- first_frame_ms (per probe): each session's first frame, as above (sessions started together:
  their setups queue on the worker)
- playout_delay_ms (per probe): each session's playout delay at the end of its watch, how far
  ahead of its play time each chunk is generated (the latency a viewer gets beyond the transport)
- fps: frames generated per second for one session, timed by the stamps of the chunks the client
  got (decoded_fps: frames the client decoded, which include repeats of the last picture when
  generation is late); --seconds must span 3 of the model's chunks
- av_offset_ms: arrival of a chunk's first frame minus arrival of its audio marker (median; > 0: video late)
- max_realtime_sessions: most concurrent sessions that all generate >= 24 fps (server-side count;
  ladder_capped: every probe up to --max-probe was in real time, so the most may be more);
  max_on_time_sessions: the same with no more than 1% of their chunks published late;
  sessions_fps / _glass_to_glass_ms / _av_offset_ms / _repeated_frames: per number of concurrent
  sessions, the slowest one's fps and each one's latency, A/V offset and repeated frames;
  sessions_worker_busy / _late_chunks / _chunk_ms / _server_cpu_cores: the server's side of each
  (the share of the time it generated, chunks it published after their play time, after the
  probe the per-session chunk time its capacity estimate rests on, the benchmark admitting past
  the estimate, the CPU cores its processes used (a --model-process server's model process too):
  the rest of the machine is the clients', and the mean number of sessions per batch it generated)
- sessions_worker_ms_per_chunk: the worker's busy time over the chunks it generated in a probe
  (its cost per session-chunk at that load, which batching lowers as sessions are added);
  sessions_server_cpu_ms_per_chunk: the server's CPU time over the same chunks, its model
  process's included (the worker's and the event loop's: transports, encoding, framing)
- --against MODEL / --against-args ARGS: two servers (another model, or the same served with other
  options), the probes alternating between them (A B, B A, ...); per server the
  probe figures above (model_figures, against_figures), and against_speedup / against_cpu_speedup:
  A's worker time / server CPU time per chunk over B's at each load
- repeated_frames / skipped_frames: stutter over the watch: frames shown twice because their
  chunk came late, frames never shown because the clock jumped back (the playout delay came down)
- browser_*: the web client in headless chromium (when /usr/bin/chromium exists): first frame,
  fps, A/V offset (estimatedPlayoutTimestamp of the two tracks) and RTT from getStats()

Numbers are printed as one JSON object; nothing is asserted. A Ctrl-C during the probes prints
the figures of those finished (`interrupted` says where the ladder stopped) and exits with 130.
The clients are bench/server_clients.py's, the figures from what they saw bench/server_figures.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time

from bench.machine import cpu_description, streamgen_environment
from bench.server_clients import WATCH, _chunk_shape
from bench.server_figures import (
    _against_figures,
    _av_offset,
    _chunk_starts,
    _decoded_fps,
    _generated_fps,
    _glass_to_glass_ms,
    _in_real_time,
    _one_model_figures,
    _realtime,
    _rounded,
    _stutter,
)
from streamgen.cli import frame_size, positive_int, positive_number, thread_count

DEFAULT_BROWSER = "/usr/bin/chromium"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-avatar", help="model to serve (default: %(default)s)")
    parser.add_argument("--size", type=frame_size, default=None, help="output size (default: the model's)")
    parser.add_argument(
        "--seconds", type=positive_number, default=20.0,
        help="seconds to watch per measurement (fps times whole chunks, tiny-avatar's 0.32 s long: at least "
        "3 of them; default: %(default)g)",
    )
    parser.add_argument(
        "--max-probe",
        type=positive_int,
        default=6,
        help="most concurrent sessions to try (default: %(default)s)",
    )
    parser.add_argument("--threads", type=thread_count, default=None, help="torch threads in the server")
    parser.add_argument("--lanes", type=positive_int, default=1,
                        help="the server's generating threads (serve --lanes; default: 1)")  # fmt: skip
    parser.add_argument("--model-process", action="store_true", help="serve with the model in a child process")
    parser.add_argument("--compile", action="store_true", help="serve with the DiT's blocks compiled (serve --compile)")
    parser.add_argument("--no-align-batches", dest="align_batches", action="store_false",
                        help="serve with --no-align-batches (each session's chunks when they fall due)")
    parser.add_argument("--browser", default=None,
                        help=f"chromium for the browser figures (default: {DEFAULT_BROWSER} where there is one; '' skips)")  # fmt: skip
    parser.add_argument("--against", default=None, metavar="MODEL",
                        help="a second model served beside the first, probed in alternation with it at each number "
                        "of sessions (A B, then B A, ...), so both meet the same machine: each model's probe "
                        "figures and the worker time per generated chunk, A's over B's (the single-session "
                        "and browser figures are skipped)")  # fmt: skip
    parser.add_argument("--against-args", type=_serve_options, default="", metavar="ARGS",
                        help="serve options for the second server only, e.g. --against-args=--ws-compression: "
                        "the same model (or --against's) served another way, probed as --against says")  # fmt: skip
    parser.add_argument("--transport", choices=list(WATCH), default="webrtc",
                        help="the clients: WebRTC (WHEP, decoding VP8), or the WebSocket API with raw RGB frames, "
                        "which costs the clients next to nothing (a probe of the server alone; "
                        "default: %(default)s)")  # fmt: skip


def _serve_options(text: str) -> str:
    """argparse type of --against-args: serve options as a shell splits them (an unclosed quote was
    shlex's traceback)."""
    try:
        shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a command line: {e}") from None
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args, port: int, model: str, extra: list[str] = ()) -> subprocess.Popen:
    """`streamgen serve` for the benchmark; its stderr goes to a temporary file (`proc.stderr_log`,
    which `_wait_ready` reads if it exits): a pipe nobody read filled at 64 KiB of log lines (late
    chunks at a load past real time) and blocked the server at its next one."""
    import tempfile
    cmd = [sys.executable, "-m", "streamgen.cli", "serve", "--port", str(port), "--loopback", "--stamp-frames",
           "--admit-max", "--max-sessions", str(max(args.max_probe + 1, args.lanes)), "--model", model, "--log-level", "warning"]  # fmt: skip
    # (serve refuses more --lanes than --max-sessions: a lane past them never gets a session)
    if args.size:
        cmd += ["--size", str(args.size)]
    if args.lanes > 1:
        cmd += ["--lanes", str(args.lanes)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.model_process:
        cmd += ["--model-process"]
    if args.compile:
        cmd += ["--compile"]
    if not args.align_batches:
        cmd += ["--no-align-batches"]
    cmd += list(extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from streamgen.parallel.torchrun import LAUNCHER_ENV

    # it ends with this process (`end_with_the_launcher`): a benchmark stopped by SIGTERM (`timeout`,
    # a CI job's end) or SIGKILL left its server running, holding its port, with nothing to stop it
    env = {**os.environ, LAUNCHER_ENV: str(os.getpid())}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.stderr_log = log
    return proc


# seconds a served model may take to be ready: --compile's warm-up from an empty inductor cache took
# 325-418 s on a loaded 2-core machine (bench/results/cpu-2026-12-07-serve-compile-warmup.json)
READY_TIMEOUT_S = 300.0
COMPILE_READY_TIMEOUT_S = 1800.0


async def _wait_ready(http, proc, timeout=READY_TIMEOUT_S) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    stage = None  # (what the warm-up said it was doing, for a server that is never ready)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.stderr_log.seek(0)
            said = proc.stderr_log.read().decode(errors="replace")
            if proc.returncode == 2:  # serve refused its options (--against-args): the user's to fix
                from streamgen.cli import UserError

                last = [line for line in said.splitlines() if line.strip()][-1:]
                raise UserError(f"the server would not start: {last[0] if last else 'exit 2'}")
            raise RuntimeError("server exited: " + said[-2000:])
        try:
            r = await http.get("/readyz")
            if r.status_code == 200:
                return r.json()
            stage = r.json().get("stage", stage)
        except (httpx.TransportError, ValueError):
            pass
        await asyncio.sleep(0.2)
    from streamgen.cli import UserError

    # (it was a traceback, "server did not become ready", after minutes of a cold --compile)
    doing = f" (its /readyz: {stage})" if stage else ""
    raise UserError(f"the server was not ready after {timeout:g} s{doing}; a machine busy with other work "
                    "warms up slower")  # fmt: skip


@contextlib.asynccontextmanager
async def _served(args, model: str, extra: list[str] = ()):
    """`streamgen serve --model MODEL` on a free 127.0.0.1 port until the block ends: an HTTP
    client for it, its /readyz answer, and the seconds it took to become ready."""
    import httpx

    port = _free_port()
    started = time.monotonic()
    proc = _start_server(args, port, model, extra)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            ready = await _wait_ready(http, proc, COMPILE_READY_TIMEOUT_S if args.compile else READY_TIMEOUT_S)
            yield http, ready, time.monotonic() - started
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stderr_log.close()


async def _bench(args, kept: dict) -> dict:
    """The figures; `kept` holds those measured so far, for a Ctrl-C's output (`run`)."""
    from server.loopback import use_loopback_ice

    use_loopback_ice()  # the clients, too, talk over 127.0.0.1 only
    if args.against or args.against_args:
        return await _bench_against(args, kept)
    async with _served(args, args.model) as (http, ready, ready_s):
        _progress(args, f"{args.model} served, ready in {ready_s:.1f} s; watching one session for {args.seconds:g} s")
        await _require_measurable_watch(http, args, args.model)
        webrtc = args.transport == "webrtc"
        one = await WATCH[args.transport](http, args.seconds, seed=1)
        starts = _chunk_starts(one["frames"])
        out = {
            "model": args.model,
            "transport": args.transport,
            "ready_s": round(ready_s, 1),  # the server's start: loading, warm-up, compiling
            "chunk_ms": ready.get("chunk_ms"),
            "first_frame_ms": round(1000 * one["first_frame"], 1),
            "answer_ms": round(1000 * one["answer"], 1) if webrtc else None,
            "connected_ms": round(1000 * one["connected"].result(), 1) if webrtc and one["connected"].done() else None,
            "glass_to_glass_ms": _glass_to_glass_ms(starts),
            # generated frames per second (the client also counts repeats of a late frame)
            "fps": _rounded(_generated_fps(one), 2),
            "decoded_fps": _rounded(_decoded_fps(one["frames"]), 2),
            "av_offset_ms": _av_offset(starts, one["markers"], one["chunk_seconds"]),
            **{f"{k}_frames": v for k, v in _stutter(one["frames"], one["frames_per_chunk"]).items()},
        }
        if out["av_offset_ms"] is not None:
            out["av_offset_ms"] = round(out["av_offset_ms"], 1)
        _progress(args, f"one session: {out['fps']} fps; adding sessions until one falls out of real time")
        if args.browser and os.path.exists(args.browser):
            out.update(await asyncio.to_thread(_browser_figures, f"http://127.0.0.1:{http.base_url.port}", args))
        kept["one"], kept["per_n"] = out, {}
        await _max_sessions(http, args, kept["per_n"])
        return _one_model_figures(out, kept["per_n"], args)


async def _bench_against(args, kept: dict | None = None) -> dict:
    """Both models served at once (the idle one waits without work), each number of sessions
    probed on one and then the other, the order flipped at every step (A B, B A, A B, ...): the
    machine's speed drifts by the hour here, and a ratio of figures taken a minute apart is what
    survives it. A model's ladder stops where its sessions fall out of real time."""
    kept = {} if kept is None else kept
    names = {"model": args.model, "against": args.against or args.model}
    extra = {"model": [], "against": shlex.split(args.against_args)}
    async with contextlib.AsyncExitStack() as stack:
        # the second server first: options serve refuses (--against-args) end the run at once, not
        # after the first one's warm-up (a minute on a loaded machine); either way one warms up at
        # a time, each timing its chunk on a machine the other leaves idle
        served = {
            side: await stack.enter_async_context(_served(args, names[side], extra[side]))
            for side in ("against", "model")
        }
        for side, model in names.items():
            await _require_measurable_watch(served[side][0], args, model)
        per_n = {side: {} for side in names}
        kept["against"] = (names, {side: served[side][1:] for side in names}, per_n)
        going = set(names)
        for n in range(1, args.max_probe + 1):
            order = ("model", "against") if n % 2 else ("against", "model")
            for side in (s for s in order if s in going):
                per_n[side][n] = await _probe(served[side][0], args, n)
                _said_probe(args, n, per_n[side][n], f"{side} {names[side]}: ")
                if not _in_real_time(per_n[side][n], args.seconds):
                    going.discard(side)
            if not going:
                break
    return _against_figures(args, *kept["against"])


MIN_WATCH_CHUNKS = 3  # the fps times the chunks after the first: a watch must span two more


async def _require_measurable_watch(http, args, model: str) -> None:
    """A UserError where --seconds is too short for a watch to time the served model's chunks."""
    _require_watch_of(args, model, *await _chunk_shape(http))


def _require_measurable_watch_before_serving(args, model: str) -> None:
    """`_require_measurable_watch` from the model's files, where they say its chunk: the served
    check came after the server's start and warm-up (two minutes on a loaded 2-core machine)."""
    from streamgen.model.audio import VIDEO_FPS
    from streamgen.models import model_shape

    shape = model_shape(model)
    if shape is not None:
        frames = shape[0].frames_per_chunk * shape[0].temporal_compression
        _require_watch_of(args, model, frames, frames / VIDEO_FPS)


def _require_watch_of(args, model: str, frames: int, seconds: float) -> None:
    from streamgen.cli import UserError

    if args.seconds < MIN_WATCH_CHUNKS * seconds:
        raise UserError(
            f"--seconds {args.seconds:g} is too short to measure {model}: its fps is timed over whole chunks of "
            f"{frames} frames ({seconds:g} s); watch at least {MIN_WATCH_CHUNKS * seconds:.2f} s"
        )


def _browser_figures(url: str, args) -> dict:
    """The web client in headless chromium: startup, fps, A/V offset and RTT from its getStats() overlay."""
    import shutil
    import tempfile

    from playwright.sync_api import sync_playwright

    wav = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "streamgen", "assets",
                       "sample_speech.wav")  # fmt: skip
    flags = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}", "--allow-loopback-in-peer-connection",
             "--disable-features=WebRtcHideLocalIpsWithMdns", "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--autoplay-policy=no-user-gesture-required"]  # fmt: skip
    profile = tempfile.mkdtemp(prefix="streamgen-bench-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(profile, executable_path=args.browser, args=flags)
            page = context.new_page()
            page.goto(f"{url}/?autostart=1&avatar=ada")
            page.wait_for_function("window.streamgenStats && window.streamgenStats.framesDecoded > 0", timeout=60_000)
            page.wait_for_timeout(int(args.seconds * 1000))
            stats = page.evaluate("window.streamgenStats")
            page.click("#hangup")
            page.wait_for_timeout(300)
            context.close()
    except Exception as e:  # a benchmark figure, not a test: report why it is missing
        return {"browser_error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    r = lambda v: None if v is None else round(v, 1)  # noqa: E731
    return {
        "browser_first_frame_ms": r(stats.get("firstFrameMs")), "browser_fps": r(stats.get("fps")),
        "browser_av_offset_ms": r(stats.get("avOffsetMs")), "browser_rtt_ms": r(stats.get("rttMs")),
    }  # fmt: skip


async def _server_counters(http) -> dict[str, float]:
    """The server's own view: seconds its worker spent generating, chunks that came after their
    play time, its processes' CPU seconds (its model process's too) and its batches (/metrics),
    and the per-session chunk time its capacity estimate rests on (/readyz)."""
    wanted = {"streamgen_worker_busy_seconds_total": "busy_s", "streamgen_late_chunks_total": "late",
              "process_cpu_seconds_total": "cpu_s", "streamgen_batch_sessions_sum": "batched",
              "streamgen_batch_sessions_count": "batches",
              # `--model-process`: the generating is the model process's, whose CPU seconds
              # process_* leaves out (its server_cpu_ms_per_chunk was 4 ms of a 200 ms chunk)
              "streamgen_model_process_cpu_seconds_total": "model_cpu_s"}  # fmt: skip
    found = {}
    for line in (await http.get("/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    found["cpu_s"] = found.get("cpu_s", 0.0) + found.pop("model_cpu_s", 0.0)
    return found | {"chunk_ms": (await http.get("/readyz")).json()["chunk_ms"]}


async def _probe(http, args, n: int) -> dict:
    """n sessions watched at once: the slowest one's fps, each one's glass-to-glass latency,
    A/V offset (ms; the playout delay grows with the load) and repeated frames, and the server's
    side: the share of the time its worker was generating (summed over lanes), the worker's
    seconds per chunk it generated (batching makes it fall with n), the chunks it published
    after their play time, the per-session chunk time it measured (its capacity estimate's
    basis) at the end, and its mean batch."""
    before = await _server_counters(http)
    started = time.monotonic()
    results = await asyncio.gather(*(WATCH[args.transport](http, args.seconds, seed=i) for i in range(n)))
    elapsed = time.monotonic() - started
    after = await _server_counters(http)
    fps = [_generated_fps(r) for r in results]
    starts = [_chunk_starts(r["frames"]) for r in results]
    offsets = [_av_offset(st, r["markers"], r["chunk_seconds"]) for st, r in zip(starts, results)]
    chunks = sum(r["chunks"] for r in results)  # each session lived inside the counters' window
    busy = after["busy_s"] - before["busy_s"]
    return {
        # (None: a session that got too few chunks in its watch to time them, far from real time)
        "fps": None if None in fps else round(min(fps), 1),
        "elapsed_s": round(elapsed, 1),
        "glass_to_glass_ms": [_glass_to_glass_ms(st) for st in starts],
        "av_offset_ms": [None if o is None else round(o, 1) for o in offsets],
        "repeated_frames": [_stutter(r["frames"], r["frames_per_chunk"])["repeated"] for r in results],
        "playout_delay_ms": [round(1000 * r["playout_delay"]) for r in results],
        "first_frame_ms": [round(1000 * r["first_frame"]) for r in results],
        "worker_busy": round(busy / elapsed, 3),
        "worker_ms_per_chunk": round(1000 * busy / chunks, 2) if chunks else None,
        # the whole process: the worker and the event loop's part (transports, encoding, framing)
        "server_cpu_ms_per_chunk": round(1000 * (after["cpu_s"] - before["cpu_s"]) / chunks, 2) if chunks else None,
        "server_cpu_cores": round((after["cpu_s"] - before["cpu_s"]) / elapsed, 2),
        "late_chunks": int(after["late"] - before["late"]),
        "chunks": chunks,
        "chunk_ms": after["chunk_ms"],
        "batch_mean": round((after["batched"] - before["batched"]) / max(1, after["batches"] - before["batches"]), 2),
    }


def _progress(args, text: str) -> None:
    """A line on stderr as the benchmark goes (minutes in all, silent until the JSON), unless --json."""
    if not getattr(args, "json", False):
        print(f"bench server: {text}", file=sys.stderr, flush=True)


def _said_probe(args, n: int, figures: dict, model: str = "") -> None:
    fps = "untimed" if figures["fps"] is None else f"{figures['fps']} fps"
    _progress(args, f"{model}{n} session{'s' * (n > 1)}: the slowest {fps}, {figures['late_chunks']} chunks late")


async def _max_sessions(http, args, per_n: dict | None = None) -> tuple[int, dict]:
    """Add sessions until one of them generates fewer than 24 frames per second (`_probe` at
    each number, its figures into `per_n`). A slow session whose server was neither busy nor
    late was held back elsewhere: the transport, or the clients, which share this machine."""
    per_n = {} if per_n is None else per_n
    for n in range(1, args.max_probe + 1):
        per_n[n] = await _probe(http, args, n)
        _said_probe(args, n, per_n[n])
        if not _in_real_time(per_n[n], args.seconds):
            break
    else:  # (the JSON's `ladder_capped`)
        _progress(args, f"every probe up to --max-probe {args.max_probe} in real time: the most may be more")
    return _realtime(per_n, args.seconds), per_n


def main(args: argparse.Namespace, kept: dict | None = None) -> dict:
    """`streamgen bench server`: the measured figures as one dict (those so far into `kept`). A
    Ctrl-C during the probes prints the figures of those finished, then goes on as a Ctrl-C (it
    was caught in `run` alone, which `streamgen bench server` does not call: its figures were lost)."""
    from streamgen.cli import UserError, require_models

    # (a server that will not start was a RuntimeError with its stderr, after the other's probes)
    require_models(args.model, args.against)
    if args.browser is None:
        args.browser = DEFAULT_BROWSER if os.path.exists(DEFAULT_BROWSER) else ""
    elif args.browser and not os.path.isfile(args.browser):  # (its figures were left out, unsaid)
        raise UserError(f"--browser {args.browser}: no such file ('' skips the browser figures)")
    if any(a == "--model" or a.startswith("--model=") for a in shlex.split(args.against_args)):
        # (the second server served it, and the JSON named the first's model as `against`)
        raise UserError("--against-args: give the second server's model with --against MODEL")
    for model in dict.fromkeys([args.model, args.against or args.model]):
        _require_measurable_watch_before_serving(args, model)
    kept = {} if kept is None else kept
    try:
        # the figures are this CPU's, and of the settings the environment gives the served model
        # (STREAMGEN_FP8, STREAMGEN_ATTENTION, ...: the JSON did not say)
        return asyncio.run(_bench(args, kept)) | _machine_figures()
    except KeyboardInterrupt:  # (minutes of probes were lost: the figures so far, and said so)
        so_far = _figures_so_far(args, kept)
        if so_far is not None:  # as the bench command prints its JSON: one line with --json
            print(json.dumps(so_far, indent=None if getattr(args, "json", False) else 2), flush=True)
        raise


def _figures_so_far(args, kept: dict) -> dict | None:
    """The figures of the probes finished before a Ctrl-C, and where the ladder stopped; None
    before the first."""
    if "against" in kept:
        so_far = _against_figures(args, *kept["against"])
    elif "one" in kept:
        so_far = _one_model_figures(kept["one"], kept["per_n"], args)
    else:
        return None
    probed = max((max(p, default=0) for p in _ladders(kept)), default=0)
    said = f"Ctrl-C after the probe of {probed} session{'s' * (probed != 1)}: the ladder stops there"
    return so_far | {"interrupted": said} | _machine_figures()


def _machine_figures() -> dict:
    return {"cpu": cpu_description(), "environment": streamgen_environment()}


def run(args: argparse.Namespace) -> int:
    print(json.dumps(main(args)))
    return 0


def _ladders(kept: dict) -> list[dict]:
    return list(kept["against"][2].values()) if "against" in kept else [kept["per_n"]]


if __name__ == "__main__":
    # run as a file, this folder would shadow the `server` package with this module
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
