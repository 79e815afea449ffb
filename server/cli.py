"""`streamgen serve`: run the server with uvicorn."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from streamgen.cli import (
    FRAME_SIZE_RULE,
    add_dtype_option,
    check_session_options,
    frame_size,
    number_where,
    positive_int,
    positive_number,
    require_models,
    thread_count,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-avatar", help="model name or directory (default tiny-avatar)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port to listen on; 0: any free one, said in the log's 'Uvicorn running on' line "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--max-sessions", type=int, default=8,
                        help="upper bound on concurrent sessions (default: 8)")  # fmt: skip
    parser.add_argument("--max-connections", type=positive_int, default=None, metavar="N",
                        help="connections open at once (WebSockets too): a request on another is answered 503 "
                        "with Retry-After, so a flood of clients cannot use up the process (default 256, or "
                        "twice --max-sessions if more)")  # fmt: skip
    # (the environment rather than the command line, which every user of the machine reads in `ps`)
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' to create sessions (default: ${TOKEN_ENV}, "
                        "which, unlike the command line, other users of the machine cannot read)")  # fmt: skip
    parser.add_argument("--ssl-certfile", default=None, metavar="PEM",
                        help="serve HTTPS/WSS with this certificate (chain); browsers give a page of another "
                        "machine the microphone only over HTTPS")  # fmt: skip
    parser.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the certificate's private key")
    parser.add_argument("--size", type=frame_size, default=None,
                        help=f"output height and width, {FRAME_SIZE_RULE} (default: the model's)")  # fmt: skip
    parser.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to run on: cpu, cuda, cuda:N (default: %(default)s)")  # fmt: skip
    parser.add_argument("--attention", default=None, metavar="BACKEND",
                        help="attention backend: sdpa (the default), flex, triton, flash, cudnn, or in FP8 "
                        "fp8_qk and fp8 (on a CPU triton, flash and cudnn run as sdpa, and the FP8 ones are "
                        "emulated; `streamgen bench gpu` times them)")  # fmt: skip
    add_dtype_option(parser, "--dtype", "the DiT's weights and cache (auto: float32, and bfloat16 from 224x224 up "
                     "on CPUs with AMX; on a GPU the model's own, float32 for ours: give bfloat16 there)")  # fmt: skip
    parser.add_argument("--fp8", action="store_true",
                        help="the DiT's block linears in FP8 (sm_89+ GPUs with --dtype bfloat16; on a CPU it runs, "
                        "slower than float32)")  # fmt: skip
    parser.add_argument("--cache-from", choices=["reencode", "last_step"], default=None,
                        help="each chunk's keys/values in the KV cache: from a clean re-encode or from its last "
                        "denoising step (one forward fewer per chunk; default: the model's own)")  # fmt: skip
    add_dtype_option(parser, "--decode-dtype", "the autoencoder's decoder (auto: bfloat16 on CPUs with AMX or "
                     "AVX512-BF16, 2-3x faster with AMX, 1.2-1.35x without)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="run the DiT's blocks under torch.compile, compiled in the warm-up, which it "
                        "makes several times longer (CPU; 1.15-1.23x the frames at 256x256-320x320 on 2 "
                        "cores, 1.08x at 128x128; the warm-up measured: docs/serving.md)")  # fmt: skip
    parser.add_argument(
        "--threads", type=thread_count, default=None,
        help="torch CPU threads (default on CPU: 1, leaving the other cores to encoding and networking; "
        "torch's spinning thread pool is many times slower on a shared CPU)",
    )  # fmt: skip
    parser.add_argument("--lanes", type=positive_int, default=1,
                        help="threads that generate, each for its own sessions: 2 made 1.6-1.8x the frames of 1 "
                        "at 192x192 and 256x256 on 2 cores, 0.95x at 64x64 (docs/serving.md; "
                        "default: 1)")  # fmt: skip
    parser.add_argument("--no-align-batches", dest="align_batches", action="store_false",
                        help="generate each session's chunks when they fall due, rather than lining sessions up to "
                        "generate together (a session's first frame then waits for no schedule; docs/serving.md)")  # fmt: skip
    # (0 closed every session within a second, read as "no limit" as --peer-timeout's 0 is; nan was
    # a traceback in the log and a close "by the client")
    parser.add_argument("--idle-timeout", type=positive_number, default=60.0,
                        help="seconds without input or viewer (default: 60)")  # fmt: skip
    parser.add_argument("--peer-timeout", type=peer_timeout, default=10.0,
                        help="seconds without a packet from a WebRTC peer (a killed tab) before its session is "
                        "closed; players send RTCP reports every second or so (0: ICE consent checks only, "
                        "~30 s; default: 10)")  # fmt: skip
    parser.add_argument("--max-duration", type=positive_number, default=3600.0,
                        help="seconds a session may last (default: 3600)")  # fmt: skip
    parser.add_argument("--body-timeout", type=positive_number, default=30.0, metavar="SECONDS",
                        help="seconds a request body (a session's JSON or picture, a WHEP offer) may take to arrive, "
                        "plus 1 s per 64 KiB it declares; one that stops coming is answered 408 (default 30)")  # fmt: skip
    parser.add_argument("--header-timeout", type=positive_number, default=20.0, metavar="SECONDS",
                        help="seconds a request's line and headers may take to arrive, and a new connection may "
                        "wait before sending one; one that does not is answered 408 (default 20)")  # fmt: skip
    parser.add_argument("--loopback", action="store_true", help="offer 127.0.0.1 for WebRTC (same machine)")
    parser.add_argument("--ice-servers", default="", metavar="JSON|FILE|stun:URL",
                        help="STUN/TURN servers for WebRTC behind NATs, as the browser's RTCIceServer list, e.g. "
                        "'[{\"urls\": \"stun:stun.example.org:3478\"}, {\"urls\": \"turn:turn.example.org:3478\", "
                        "\"username\": \"u\", \"credential\": \"p\"}]', a file holding it, or one stun: URL; "
                        "clients get it too; a TURN entry with \"secret\" (coturn's static-auth-secret) in place of "
                        "a username gives each session a credential of its own (docs/serving.md)")  # fmt: skip
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages of ORIGIN (e.g. https://app.example.org; '*' for any) call the API: "
                        "sessions, WHEP, control (repeatable; default: this server's own page only)")  # fmt: skip
    parser.add_argument("--ws-compression", action="store_true",
                        help="offer WebSocket clients permessage-deflate (off by default: the frames are JPEG or raw "
                        "RGB, which deflate shrinks by a fifth to a half at a CPU cost the server's cores pay)")  # fmt: skip
    parser.add_argument("--model-process", action="store_true",
                        help="run the model in a child process instead of a thread of the server")
    parser.add_argument("--model-timeout", type=model_timeout, default=None, metavar="SECONDS",
                        help="with --model-process or --sp: a model process (or follower rank) that answers no "
                        "operation for this long (once the server is ready) is stuck; /healthz reports the server "
                        "down, for its supervisor to restart (a model process is killed; 0: no limit; default: 60)")  # fmt: skip
    parser.add_argument("--sp", type=positive_int, default=1,
                        help="shard the model over N processes (sequence parallelism; restarts under "
                        "torchrun; default: 1)")  # fmt: skip
    # (a name logging does not know, uvicorn's own "trace" too, was a traceback after the checks)
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS,
                        help="debug adds late chunks and playout-delay changes (aiortc and aioice stay at "
                        "info; default: info)")  # fmt: skip
    # benchmark switches (bench/server.py)
    parser.add_argument("--stamp-frames", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--admit-max", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import logging
    import re

    from streamgen.cli import HEAVY_IMPORTS, UserError, check_device, import_with_ctrl_c_held

    import_with_ctrl_c_held(HEAVY_IMPORTS)  # (a Ctrl-C inside torch's import aborted the process)
    from .config import ServerConfig

    if args.max_sessions < 1:
        raise UserError("--max-sessions must be at least 1")
    # (an empty variable counts as none, as an unset one; the checks name where the token came from)
    token_from = "--token" if args.token is not None else f"${TOKEN_ENV}"
    if args.token is None:
        args.token = os.environ.get(TOKEN_ENV) or None
    if args.token is not None and (bad := sorted(set(args.token) & set(URL_SPECIAL))):
        # (the web page and WHEP send it as ?token=, where '+' reads as a space: a 403 "wrong token")
        raise UserError(f"{token_from}: {bad[0]!r} changes meaning in a URL's ?token= (the web page, WHEP): use "
                        "letters, digits and -._~ (e.g. openssl rand -hex 24)")  # fmt: skip
    if args.token is not None and not re.fullmatch(r"[!-~]+", args.token):
        # ("" from an unset variable counts as no token in a request: nothing could be created)
        raise UserError(f"{token_from} {args.token!r}: a token is one or more printable ASCII characters, "
                        "no spaces (it is sent in 'Authorization: Bearer'); "
                        + ("leave --token out" if token_from == "--token" else f"unset ${TOKEN_ENV}") + " for none")  # fmt: skip
    require_models(args.model)  # (one line that says what it is instead, before anything loads)
    from streamgen.models import model_kind

    if model_kind(args.model) == "teacher":  # (after uvicorn had started and a rank or thread had loaded it)
        from streamgen.stream import teacher_cannot_stream

        raise UserError(teacher_cannot_stream(args.model))
    if not 0 <= args.port < 65536:  # (0: the system picks a free one, said in uvicorn's "running on" line)
        raise UserError(f"--port {args.port} is not a TCP port (0: any free one)")
    # ('[::1]', as a URL writes it, did not resolve: uvicorn and asyncio take the address bare)
    args.host = _unbracketed(args.host)
    if not args.host.strip():  # (uvicorn took "" for every interface: `--host "$UNSET"` served the network)
        raise UserError(f"--host {args.host!r} names no address: give 127.0.0.1 (this machine only, the default) "
                        "or 0.0.0.0 (every interface)")  # fmt: skip
    if problem := _host_problem(args.host):  # (they were 'cannot listen on ...: Name or service not known')
        raise UserError(f"--host {args.host!r} {problem}")
    # an --sp follower rank serves nothing: rank 0 listens, maybe already (torchrun starts them apart)
    follower = args.sp > 1 and int(os.environ.get("RANK", 0)) > 0
    if not follower:
        _check_address(args.host, args.port)
    if args.max_connections is None:  # (a fixed 256 refused --max-sessions 300, which had served before it)
        args.max_connections = max(ServerConfig.max_connections, 2 * args.max_sessions)
    if args.max_connections <= args.max_sessions:  # (each session's WebSocket holds one, and its page more)
        raise UserError(f"--max-connections {args.max_connections} leaves no room for --max-sessions "
                        f"{args.max_sessions}'s clients: give more connections than sessions")  # fmt: skip
    if args.lanes > args.max_sessions:
        # a session goes to the lane with the most room, so lanes past --max-sessions never get one;
        # yet the warm-up ran a stream on every lane at once, and the chunk time it measured (the
        # capacity, the playout delays, /readyz's real_time) counted them all: --lanes 4 --max-sessions 2
        # said 455 ms a chunk and "not real time" where 2 lanes measured 226 ms
        raise UserError(f"--lanes {args.lanes} is more than --max-sessions {args.max_sessions}: a lane past "
                        "the sessions never gets one, and its warm-up slows the others'")  # fmt: skip
    if args.lanes > 1 and (args.model_process or args.sp > 1):
        raise UserError("--lanes runs the model in this process: it cannot be combined with --model-process or --sp")
    if args.sp > 1 and args.model_process:
        raise UserError("--model-process and --sp cannot be combined: with --sp the model runs in its own ranks")
    if args.model_timeout is not None and not args.model_process and args.sp == 1:  # (taken, and nothing timed)
        raise UserError(f"--model-timeout {args.model_timeout:g} applies with --model-process or --sp only (a model "
                        "in this process cannot be killed apart from the server): add one or leave it out")  # fmt: skip
    if args.fp8 and args.device.startswith("cuda") and args.dtype != "bfloat16":
        raise UserError("--fp8 on a GPU needs --dtype bfloat16 (its FP8 products give bfloat16)")
    on_cpu = args.device.split(":")[0] == "cpu"  # (cpu:0 was taken for a GPU)
    if args.compile and (not on_cpu or args.sp > 1):
        raise UserError("--compile runs on the CPU in one process: it cannot be combined with --sp or a GPU device")
    check_session_options(args.model, args.steps, args.cache_from)  # (a teacher is refused above)
    check_device(args.device)  # (after the options' own conflicts, which hold on any machine)
    from .origins import scheme_and_host

    for origin in args.cors_origin:
        # (scheme_and_host: a port out of range passed here, and then matched no page's Origin)
        if origin != "*" and not (re.fullmatch(r"https?://[^/\s]+", origin) and scheme_and_host(origin)):
            raise UserError(f"--cors-origin {origin!r}: an origin is scheme://host[:port], e.g. https://app.example.org")
        if origin != "*" and "*" in origin:  # (taken as a host named '*.example.org': no page's Origin matched)
            raise UserError(f"--cors-origin {origin!r}: a '*' in an origin matches nothing: give each origin "
                            "(--cors-origin is repeatable), or '*' alone for any")  # fmt: skip
    tls = _tls_files(args.ssl_certfile, args.ssl_keyfile)
    from .ice import IceConfigError, parse_ice_servers

    try:
        ice_servers = parse_ice_servers(args.ice_servers)
    except IceConfigError as e:
        raise UserError(f"--ice-servers: {e}") from None
    for i, server in enumerate(ice_servers):  # a relay is refreshed with its credential while the session lasts
        if "secret" in server and server["ttl"] < args.max_duration:
            raise UserError(f"--ice-servers: ICE server {i + 1}: 'ttl' {server['ttl']} s is shorter than "
                            f"--max-duration {args.max_duration:g} s: a session's relay would end with its credential")  # fmt: skip
    from streamgen.models import (
        check_model_environment,
        use_attention_backend,
        use_cache_from,
        use_compile,
        use_precision,
    )

    try:
        use_attention_backend(args.attention)  # in the environment: the model process and ranks inherit it
        use_precision(None if args.dtype == "auto" else args.dtype, args.fp8)  # likewise
        use_cache_from(args.cache_from)
        use_compile("inductor" if args.compile else None)
        check_model_environment()  # (else refused as the model loaded, in the started server: a traceback)
        from streamgen.parallel.launch import (
            check_sequence_parallel,
            check_torchrun_world,
            relaunch_under_torchrun,
        )

        check_torchrun_world(args.sp)  # (under plain torchrun, before the model loads)
        if args.sp > 1:
            # now, in one line, rather than from the ranks once they have loaded the model (and rank 0 listens)
            check_sequence_parallel(args.sp, args.model, args.size, args.size)
            # does not return in the launcher
            relaunch_under_torchrun(args.sp, args._argv, device=args.device, model=args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if tls and (problem := _certificate_dates_problem(tls["ssl_certfile"])):
        logging.getLogger("streamgen.server").warning("--ssl-certfile %s: %s", tls["ssl_certfile"], problem)
    for name in ("aiortc", "aioice", "PIL"):  # at debug they log every packet: enough to make streams late
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    threads = args.threads or (1 if on_cpu else None)
    if follower:
        from .sp_host import ModelNotLoaded, follow

        try:
            return follow(args.model, args.device, threads, args.sp, args.size, args.decode_dtype)  # no server here
        except ModelNotLoaded as e:
            raise UserError(f"the model did not load: {e} (the log above has all of it)") from None
    # held from here until uvicorn listens on them: let go, the port could be taken by anything in
    # the meantime (in CI another test's server), and serve ended with uvicorn's own error
    listeners = _check_address(args.host, args.port, keep=True)
    if listeners:  # (--port 0: the one the system picked, for uvicorn's line and serve's errors)
        args.port = listeners[0].getsockname()[1]
    try:
        return _serve(args, listeners, threads=threads, ice_servers=ice_servers, tls=tls)
    finally:
        for sock in listeners:  # (uvicorn's shutdown closed them, unless it never listened)
            sock.close()


def _serve(args: argparse.Namespace, listeners: list, threads: int | None, ice_servers: list, tls: dict) -> int:
    """Runs the server on `listeners` (the sockets `_check_address` bound) until it stops."""
    import uvicorn

    from streamgen.cli import UserError

    from .app import create_app
    from .config import ServerConfig
    from .protocol import MAX_WEBSOCKET_MESSAGE_BYTES
    from .uvicorn_server import SessionClosingServer

    config = ServerConfig(
        model=args.model, height=args.size, width=args.size, steps=args.steps, device=args.device,
        decode_dtype=args.decode_dtype,
        max_sessions=args.max_sessions, max_connections=args.max_connections, token=args.token,
        torch_threads=threads, lanes=args.lanes, loopback=args.loopback or _is_loopback(args.host), sp=args.sp,
        idle_timeout_s=args.idle_timeout, max_duration_s=args.max_duration, peer_timeout_s=args.peer_timeout,
        body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
        stamp_frames=args.stamp_frames, measure_capacity=not args.admit_max, inference_process=args.model_process,
        model_timeout_s=ServerConfig.model_timeout_s if args.model_timeout is None else args.model_timeout,
        ice_servers=ice_servers, cors_origins=args.cors_origin, align_batches=args.align_batches,
    )  # fmt: skip
    app = create_app(config)
    try:
        # permessage-deflate (uvicorn's default) would compress every frame in the event loop's
        # thread: raw RGB at 256x256 took 7.5-10.6 ms a frame for 1.33x; a JPEG is compressed already
        # (NO_COLOR, https://no-color.org: uvicorn coloured its log on a terminal all the same)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5, ws_per_message_deflate=args.ws_compression,
                                ws_max_size=MAX_WEBSOCKET_MESSAGE_BYTES,
                                use_colors=False if os.environ.get("NO_COLOR") else None, **tls)  # fmt: skip
        server = SessionClosingServer(config, listeners)
        # (a Ctrl-C: uvicorn shuts down, then raises it again as KeyboardInterrupt, which ends the
        # command as Ctrl-C ends any, exit code 130; a SIGTERM it raises again as the signal, 143)
        server.run()
    except OSError as e:
        raise UserError(f"cannot listen on {_host_port(args.host, args.port)}: {e}") from None
    if not server.started:  # (uvicorn logged why)
        raise UserError("the server did not start: see the log above")
    if server.load_error:
        raise UserError(f"the model did not load: {server.load_error} (the log above has all of it)")
    return 0


def _is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine alone: then WebRTC must offer 127.0.0.1 too
    (`--loopback`). Only 127.0.0.1 counted: `--host localhost` served the page, and its WebRTC
    offered the other interfaces only (none, in a container without a network: no stream). A name
    counts by the addresses it resolves to (`ip6-localhost`: ::1)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        addresses = [host] if _ip_address(host) else [info[4][0] for info in _listen_addresses(host, 0)]
    except (OSError, UnicodeError):  # (one that does not resolve: serve refused it before)
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _ip_address(text: str):
    import ipaddress

    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unbracketed(host: str) -> str:
    """An IPv6 address as a URL brackets it (`[::1]`), bare; any other host as it is."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else None
    return inner if inner and ":" in inner and _ip_address(inner.split("%")[0]) else host


def _host_problem(host: str) -> str | None:
    """What is wrong with `host` (after `_unbracketed`) as one to listen on, as `--host` says it:
    a URL, a port (`localhost:8000`), spaces; None for an address or a name."""
    if "://" in host:
        return "is a URL: give its host alone (e.g. 127.0.0.1), and its port as --port"
    if host != host.strip() or any(c.isspace() for c in host):
        return "holds spaces: give the address or name alone"
    named, _, port = host.rpartition(":")
    if named and port.isdigit() and not _ip_address(host.split("%")[0]):  # (an IPv6 address holds colons)
        return f"holds a port: give --host {named.removeprefix('[').removesuffix(']')} --port {port}"
    return None


def _host_port(host: str, port: int) -> str:
    """`host:port` as a URL writes it: an IPv6 address in brackets (`::1:8000` read as an address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_addresses(host: str, port: int) -> list:
    """The addresses a server on `host` listens on, as asyncio's create_server (uvicorn's) resolves
    them: every family, so a name of IPv6 addresses alone (`ip6-localhost`) is found. Raises
    socket.gaierror (or UnicodeError, for a name IDNA cannot encode) for one that does not resolve."""
    import socket

    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    return list(dict.fromkeys(infos))


def _check_address(host: str, port: int, keep: bool = False) -> list:
    """A port in use or a host that does not resolve, found now: uvicorn binds after the app's
    start-up, which loads, warms and measures the model (minutes for a large one), and then ended
    with its own error. It binds as asyncio's create_server does: every address the host resolves
    to (the IPv4 one alone was tried, with IPv4 for any name: `ip6-localhost`, a name of ::1, was
    refused as 'Name or service not known', and a port taken on ::1 alone by another server was
    found only once the model had loaded), SO_REUSEADDR, IPv6 sockets IPv6 only.

    With `keep`, returns the sockets listening, for uvicorn to serve on (`SessionClosingServer(config,
    listeners)`, which hands them to uvicorn's run):
    a socket bound with SO_REUSEADDR and not listening yet let another one bind the port with it
    too (uvicorn, a second serve), as Linux allows while neither listens; a connection meanwhile
    waits in the backlog until the server accepts it. Without, closes them. Port 0: the system
    picks the first address's port, and the others are bound on that one too (another picked where
    it is taken on one of them, `_bind_every_address`)."""
    from streamgen.cli import UserError

    where = _host_port(host, port)
    try:
        infos = _listen_addresses(host, port)
    except (OSError, UnicodeError) as e:
        raise UserError(f"cannot listen on {where}: {getattr(e, 'strerror', None) or e}") from None
    for _ in range(PORT_0_TRIES - 1):
        try:
            held, skipped = _bind_every_address(infos, port, keep, where)
            break
        except _PickedPortTaken:  # (port 0 only: the system picks another)
            continue
    else:  # the last try says its error, as any bind's
        held, skipped = _bind_every_address(infos, port, keep, where, may_pick_again=False)
    if not held:  # every address skipped: uvicorn, given no socket, said "running on" and listened on none
        why = (skipped.strerror or skipped) if skipped is not None else "it has no address"
        raise UserError(f"cannot listen on {where}: {why}")
    if not keep:
        for sock in held:
            sock.close()
    return held if keep else []


LISTEN_BACKLOG = 2048  # uvicorn's own (Config.backlog), which its create_server sets again
# ports the system is asked for under --port 0 before a port taken on a later address is an error
PORT_0_TRIES = 10


class _PickedPortTaken(Exception):
    """The port the system picked for the first address is in use on another one."""


def _bind_every_address(infos: list, port: int, keep: bool, where: str, may_pick_again: bool = True):
    """(the sockets bound, one per address a socket can be made for; the error of the first that could
    not be made, or None) for `_check_address`. Port 0: the first address's port, picked by the system,
    may be in use on another address (another server's on ::1 alone): _PickedPortTaken, where
    `may_pick_again`, for the caller to ask for another; the user never asked for that port."""
    import errno
    import socket

    from streamgen.cli import UserError

    held, skipped = [], None
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as e:  # (a family this kernel lacks, IPv6 switched off: asyncio skips it too)
                skipped = skipped or e
                continue
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            picked = port == 0 and len(held) > 1
            if picked:  # (each address on a port of its own was not one server)
                address = (address[0], held[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as e:
                if picked and may_pick_again and e.errno == errno.EADDRINUSE:
                    raise _PickedPortTaken from None
                bound = _host_port(address[0], address[1])
                said = where if bound == where else f"{where} ({bound})"
                raise UserError(f"cannot listen on {said}: {e.strerror or e}") from None
            if keep:
                sock.listen(LISTEN_BACKLOG)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held, skipped

# players send RTCP reports every 0.5-1.5 s: under this a live viewer's session was cut (2 of 3 at 1 s)
MIN_PEER_TIMEOUT_S = 3.0


TOKEN_ENV = "STREAMGEN_TOKEN"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
URL_SPECIAL = "+&#%?"  # what a URL's query does not carry as it is


def model_timeout(text: str) -> float:
    """An argparse type: --model-timeout, 0 (no limit) or a positive number of seconds."""
    return number_where(text, lambda v: math.isfinite(v) and v >= 0, "0 (no limit) or a positive number of seconds")


def peer_timeout(text: str) -> float:
    """An argparse type: --peer-timeout, 0 (off) or at least MIN_PEER_TIMEOUT_S seconds."""
    # (`0.00` or `0e0` was refused as "not a positive finite number", where 0 and 0.0 turned it off)
    seconds = number_where(text, lambda v: math.isfinite(v) and v >= 0, "0 (off) or a positive number of seconds")
    if 0 < seconds < MIN_PEER_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"{seconds:g} s would cut live viewers (their reports come every second or so): give at least "
            f"{MIN_PEER_TIMEOUT_S:g}, or 0 for ICE's own checks only"
        )
    return seconds


def _tls_files(certfile: str | None, keyfile: str | None) -> dict:
    """uvicorn's TLS arguments, checked now: a certificate that does not load, or a key that is
    not its own, is a one-line error before anything starts (uvicorn would fail after loading)."""
    import ssl

    from streamgen.cli import UserError

    if certfile is None and keyfile is None:
        return {}
    if certfile is None or keyfile is None:
        raise UserError("--ssl-certfile and --ssl-keyfile go together")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not Path(path).is_file():
            raise UserError(f"{flag}: no such file: {path}")
    # (OpenSSL says only "[SSL] PEM lib" of a file without its PEM block: the two swapped, an empty
    # file, a DER certificate)
    _require_pem_block("--ssl-certfile", certfile, "CERTIFICATE", "a certificate")
    _require_pem_block("--ssl-keyfile", keyfile, "PRIVATE KEY", "a private key")
    class Encrypted(Exception):
        pass

    def no_passphrase():  # (asked on a terminal twice, here and by uvicorn; without one, a traceback)
        raise Encrypted

    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile, password=no_passphrase)
    except Encrypted:
        raise UserError(f"--ssl-keyfile {keyfile} is encrypted: give it decrypted "
                        f"(openssl pkey -in {keyfile} -out key.pem, kept readable by this user only)") from None  # fmt: skip
    except (ssl.SSLError, ValueError, OSError) as e:
        raise UserError(f"cannot use {certfile} with {keyfile}: {e}") from None
    return {"ssl_certfile": certfile, "ssl_keyfile": keyfile}


def _certificate_dates_problem(certfile: str, now=None) -> str | None:
    """Why browsers and WHEP players will refuse the first certificate of `certfile` for its dates
    (expired: a renewal that did not happen; not yet valid: a clock behind), or None. OpenSSL loads
    such a certificate without a word, and the server started; every page then failed to connect."""
    import datetime

    from cryptography import x509  # (aiortc's DTLS needs it: always there with the server)

    try:
        cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    except (ValueError, OSError):  # (OpenSSL took it: its dates are left to the clients)
        return None
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        return (f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: browsers and WHEP "
                "players will refuse to connect until it is renewed")  # fmt: skip
    if cert.not_valid_before_utc > now:
        return (f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this "
                "machine's clock right?): browsers and WHEP players will refuse to connect until then")  # fmt: skip
    return None


def _require_pem_block(flag: str, path: str, label: str, what: str) -> None:
    """A one-line error unless the file at `path` holds a PEM block whose label ends with `label`
    ("-----BEGIN CERTIFICATE-----", "-----BEGIN EC PRIVATE KEY-----")."""
    from streamgen.cli import UserError

    try:
        text = Path(path).read_bytes().decode("latin-1")
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    if re.search(rf"-----BEGIN [A-Z0-9 ]*{label}-----", text):
        return
    holds = "nothing" if not text.strip() else "no PEM block (DER? openssl x509 -inform der -in F -out F.pem)"
    if label == "CERTIFICATE" and "PRIVATE KEY-----" in text:
        holds = "a private key and no certificate (are --ssl-certfile and --ssl-keyfile swapped?)"
    elif label == "PRIVATE KEY" and "CERTIFICATE-----" in text:
        holds = "a certificate and no private key (are --ssl-certfile and --ssl-keyfile swapped?)"
    elif "-----BEGIN " in text:
        holds = f"no {label} block"
    raise UserError(f"{flag} {path} holds {holds}: it takes {what} in PEM form")
