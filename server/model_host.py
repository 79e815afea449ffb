"""Optional (`streamgen serve --model-process`): the model in a child process, off the server's GIL.

PyTorch's eager ops keep the GIL while they run, so with the model in a thread
the event loop (signalling, packet pacing) waits whenever an op is running. In
the child, the model and every session's StreamSession live apart; the inference
worker thread talks to it over one pipe (only that thread does) and a
`RemoteStream` stands in for the StreamSession with the same interface.

Measured on the shared 2-core machine this did not help (the WHEP answer took
300-460 ms either way while a chunk was generating: the CPU, not the GIL, was
the bottleneck there), so it is off by default; it is meant for machines with
spare cores or a GPU.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import uuid
from functools import partial

import numpy as np

from streamgen.session_limits import CaptionError, CaptionsUnavailable

from .stop_event import StopsWithTheServer
from .watchdog import DeadlineWatchdog

# errors a client causes (bad reference, unknown stream), or that it is told of (captions this install
# cannot encode): reported to that client; the host carries on
CLIENT_ERRORS = {"ValueError": ValueError, "CaptionError": CaptionError, "BufferError": BufferError, "KeyError": KeyError,
                 "CaptionsUnavailable": CaptionsUnavailable}  # fmt: skip

log = logging.getLogger("streamgen.server")

# seconds `ModelHost.stop` waits for the operation running (after the server's worker has waited
# 10 s for it), then for the answer to `exit`, which the model process gives as it leaves its loop
STOP_WAIT = 10.0
# once it has answered, its teardown (the model, torch: 2 s on an idle 2-core machine, 5.4 s beside
# two busy loops) is waited for as long as it uses the CPU, up to EXIT_LIMIT_S in all; a process
# that uses none for EXIT_STALL_S is taken for stuck
EXIT_STALL_S = 5.0
EXIT_LIMIT_S = 60.0
# seconds a model process whose pipe closed under an operation is waited for to end: one killed with
# a GPU context (the out-of-memory killer) closes its pipe as the kernel tears it down and releases its
# device memory after, seconds more. (With the kill's 2 s, under STOP_WAIT: the stop waits for the call.)
EXIT_AFTER_PIPE_S = 5.0
# why the host is down while such a process is waited for: its exit, once known, says more
PIPE_CLOSED = "the model process closed its pipe"


# why the host is down once its stop has begun (`ModelHost.stop`)
STOPPED = "the model process was stopped (the server is shutting down)"


def during_the_stop(what: str) -> str:
    """Why the host is down when its process ended while the server stopped (a SIGTERM to the whole
    process group): the stop first, as the sessions it streamed end with it, then what was seen."""
    return f"the server is shutting down; {what}"


def freeze_loaded_heap() -> None:
    """Keep what a process has loaded (torch, the model: ~170k objects) out of the collector's
    sight: it lives as long as the process. A full collection of it took 50-70 ms holding the
    GIL, a stall in whatever chunk set it off (one over 120 chunks of three 64x64 streams)."""
    gc.collect()
    gc.freeze()


def load_error_line(e: Exception) -> str:
    """Why the model did not load, in a line: the error's type and its first line (a compiler's
    error runs to pages; the log has all of it). The same on every `--sp` rank that meets it."""
    first_line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first_line}"[:300]


def exit_line(code: int | None) -> str:
    """How the model process ended, for /healthz and the sessions it ends: a signal by its name
    (Python's exit code -9 said nothing of the out-of-memory killer, which sends SIGKILL)."""
    if code is not None and code < 0:
        from streamgen.parallel.torchrun import killed_by

        return f"the model process exited (code {code}: {killed_by(-code)})"
    return f"the model process exited (code {code})"


class HostDown(RuntimeError):
    """The model host can no longer run operations (its process died, or the ranks fell out of step)."""


class HostStopped(HostDown):
    """The model host ended with the server's stop, not by a failure: a SIGINT/SIGTERM reaches every
    `serve --sp` rank at once, and a follower that has ended is found gone by rank 0's next call."""


class ModelHost(StopsWithTheServer):
    # the child process writes each chunk into its stream's cache right after replying with its
    # frames (ModelOps.after_reply), while the server publishes them
    writes_chunks_itself = True

    def __init__(self, model: str, device: str, threads: int | None, decode_dtype: str = "auto",
                 stopping: threading.Event | None = None):  # fmt: skip
        """stopping: set once the server's stop begins (the registry's `StopBegun`; `stop` sets it too): a
        process that ends from then on ends with the stop (a SIGTERM to the whole process group), not as
        a failure."""
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no copied threads or locks
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(child, model, device, threads, decode_dtype, log_setup()),
                                   daemon=True, name="streamgen-model")  # fmt: skip
        self.process.start()
        child.close()
        self._down: str | None = None  # why the host can run nothing more (the server reports it unhealthy)
        self._calling = threading.Lock()  # held while an operation is on the pipe: `stop` waits for it
        self._killed_at_stop: str | None = None  # why the stop killed the process, once it has
        self.share_the_stop(stopping)
        # seconds an operation may take before the process is taken for stuck and killed; None
        # while the model loads and warms up (a first chunk may take minutes): the server sets it
        # once it is ready (ServerConfig.model_timeout_s)
        self.answer_timeout: float | None = None
        self._watchdog = DeadlineWatchdog("streamgen-model-watchdog")  # (its thread: from the first bounded send)
        self.call("ping")  # waits until the model is loaded; raises what loading raised

    @property
    def down(self) -> str | None:
        """Why the host can run nothing more, or None. A process that died between operations
        (killed while no session streamed: the OOM killer) is found here, not only by the next
        operation: /healthz and /readyz said ok, and its sessions waited, until one was asked for."""
        if self._down in (None, PIPE_CLOSED, during_the_stop(PIPE_CLOSED)) and self.process.exitcode is not None:
            ended = exit_line(self.process.exitcode)  # (a pipe lost before the stop is a failure: said as one)
            self._down = during_the_stop(ended) if self._down != PIPE_CLOSED and self.stop_begun() else ended
        return self._down

    def _ended_with_the_stop(self) -> bool:
        """Whether the host is down by the stop, not by a failure before it (a kill at the stop is one)."""
        return self._down in (STOPPED, self._killed_at_stop) or self._down.startswith(during_the_stop(""))

    def call(self, op: str, *args):
        with self._calling:  # (the worker's operation, and the stop's `exit`, one at a time)
            if self.down:  # (one that ended with the stop before this operation: as one that ends under it)
                raise (HostStopped if self._ended_with_the_stop() else HostDown)(self.down)
            try:
                if self.answer_timeout is None:
                    self._conn.send((op, args))
                else:  # (the operation's send and its answer, within the one timeout)
                    answer_by = time.monotonic() + self.answer_timeout
                    self._send_by(op, args, answer_by)
                    if not self._conn.poll(max(0.0, answer_by - time.monotonic())):
                        self._stop_stuck(op)
                ok, result = self._conn.recv()
            except (EOFError, OSError):
                # (one the stop killed keeps the stop's reason: its SIGKILL read as the OOM killer's)
                if self._killed_at_stop:  # (the stop's: HostStopped, as every operation after it)
                    self._down = self._killed_at_stop
                    raise HostStopped(self.down) from None
                if self.stop_begun():
                    # it ended with the stop, which waits for its end (`stop`): said as "exited (code -15)",
                    # an ERROR, its sessions ended as "host_down", the stop's own reason overwritten
                    self._down = self._down or during_the_stop(PIPE_CLOSED)
                    raise HostStopped(self.down) from None
                self._down = self._pipe_lost()
                raise HostDown(self.down) from None
        if ok:
            return result
        raise_reported(result)

    def _pipe_lost(self) -> str:
        """Why the host is down once the model process's pipe has closed under an operation: its exit,
        waited for (EXIT_AFTER_PIPE_S). Its exit code was read after a join(1), for good: a process
        not reaped by then made the host down as "the model process exited (code None)". One still
        running then (it closed its pipe itself and hangs in its teardown) can answer nothing, and
        holds the memory a restarted server needs: it is killed, and said to have been. The host is
        down from the pipe's loss: while it waited, /healthz and admission said ok, and a create was
        queued for the dead pipe."""
        self._down = PIPE_CLOSED  # (refined by `down` to its exit as soon as that is known)
        self.process.join(EXIT_AFTER_PIPE_S)
        if self.process.exitcode is None and not self._has_exited():
            # why, before the kill (as `_stop_stuck`): a read of `down` meanwhile took its SIGKILL for the OOM killer's
            self._down = f"{PIPE_CLOSED} and had not exited {EXIT_AFTER_PIPE_S:g} s later (it was killed)"
            self.process.kill()
            self.process.join(2)
            if self.process.exitcode in (None, -signal.SIGKILL):
                return self._down
            # (another code: it ended by itself in the instant before the kill, which found it gone)
        return exit_line(self._exit_code_once_stored())

    def _has_exited(self) -> bool:
        """Whether the model process has exited, whoever reaped it. Its exit code does not say: the
        event loop's read of `down` reaps it as it reads, and a join at that moment finds no child
        (its waitpid fails) and no code stored yet. It read as "had not exited 5 s later (it was
        killed)", and was sent SIGKILL, a process that had exited. Its sentinel closes as it exits."""
        return bool(multiprocessing.connection.wait([self.process.sentinel], 0))

    def _exit_code_once_stored(self) -> int | None:
        """The exit code of a process that has exited, once the thread that reaped it (the event
        loop's read of `down`) has stored it: at once but for a thread switch."""
        stored_by = time.monotonic() + 2.0
        while self.process.exitcode is None and time.monotonic() < stored_by:
            time.sleep(0.01)
        return self.process.exitcode

    def _send_by(self, op: str, args: tuple, deadline: float) -> None:
        """Send an operation, the process taken for stuck where it has not read it by `deadline`. A
        message larger than the pipe holds (~210 KB on Linux's defaults; a 512x512 reference is ~786
        KB) waits in the send until the process reads it: one that read no more (stuck in its
        re-encode after its last answer) held the send, and with it the worker and every session,
        for good while /healthz said ok. The host's watchdog bounds it: at the deadline it kills
        the process and shuts this end of the pipe for writing, which ends the send (`_kill_stuck`)."""
        bound = self._watchdog.arm(deadline, partial(self._kill_stuck, f"did not read {op!r}"))
        try:
            self._conn.send((op, args))
        except OSError:
            if not self._watchdog.disarm(bound):
                raise  # (the caller's to say why: the process closed its pipe)
        finally:
            overdue = self._watchdog.disarm(bound)  # (the send's error, if any, was the kill's)
        if overdue:
            self.process.join(5)
            raise HostDown(self._down)

    def _stop_stuck(self, op: str) -> None:
        """A model process that does not answer (a deadlock, a driver hang, a stopped process) held
        the worker, and with it every session, while /healthz said ok: it is killed, and the host is
        down, as it is when the process dies, so that a supervisor restarts the server."""
        self._kill_stuck(f"gave no answer to {op!r}")
        self.process.join(5)
        raise HostDown(self._down)

    def _kill_stuck(self, what: str) -> None:
        """Kill a model process that did not do `what` within the timeout (on the watchdog's thread
        for a send), the host down as stuck. This end of the pipe is shut for writing too: a send
        waiting in it ends at once, where the kill alone would not end it while another process
        holds the model process's end (one it started, which inherited the pipe)."""
        # why, before the kill: from it on the process reads as exited by SIGKILL, and the limits'
        # check or /healthz reading `down` meanwhile ended the sessions as the out-of-memory killer's
        self._down = f"the model process {what} in {self.answer_timeout:g} s (stuck: it was killed)"
        self.process.kill()  # (SIGKILL: a stuck process may not run a SIGTERM handler)
        shut_for_writing(self._conn)

    def stop(self) -> None:
        """End the model process: it answers `exit` between operations, then tears down. It is
        waited for while it works: a flat 5 s, then SIGTERM, ended it mid-teardown on a loaded
        machine (exit code -15), and its `exit` raced an operation the worker still had running.
        One that does not answer, or stops using the CPU, is killed. The stop has begun from here
        (`stop_begun`), whoever calls it."""
        self.stopping.set()
        self._down = self._down or STOPPED
        stuck = self._ask_to_exit()
        if stuck is None and self.process.exitcode is None:
            stuck = self._wait_for_exit()
        self._watchdog.stop()  # (an operation still running is the stop's to end from here: its kill)
        if stuck is not None:  # (its reason before the operation still running ends: it says it)
            log.warning("the model process %s: killing it", stuck)
            self._down = self._killed_at_stop = f"the model process {stuck}: it was killed at the stop"
            shut_for_writing(self._conn)  # (a send waiting in it ends, whoever holds the other end)
        self._conn.close()
        if stuck is None:
            return
        self.process.kill()  # (SIGKILL: SIGTERM runs no handler in it, and a stopped process ignores it)
        self.process.join(5)

    def _ask_to_exit(self) -> str | None:
        """Send `exit` once no operation is running, and wait for its answer; None once it is
        answered (or the process is gone already), else why the process is taken for stuck."""
        if self.process.exitcode is not None:
            return None
        if not self._calling.acquire(timeout=STOP_WAIT):
            return f"was still running an operation {STOP_WAIT:g} s into the stop"
        try:
            self._conn.send(("exit", ()))
            if not self._conn.poll(STOP_WAIT):
                return f"gave no answer to 'exit' in {STOP_WAIT:g} s"
            self._conn.recv()
        except (EOFError, OSError):  # it ended meanwhile (it died, or was killed as stuck)
            pass
        finally:
            self._calling.release()
        return None

    def _wait_for_exit(self) -> str | None:
        """Wait for a process that has answered `exit` to end, as long as it uses the CPU (where
        /proc tells: elsewhere up to EXIT_LIMIT_S); None once it has ended, else why not."""
        pid = self.process.pid
        used, last_used_at = cpu_seconds(pid), time.monotonic()
        deadline = last_used_at + EXIT_LIMIT_S
        while True:
            self.process.join(min(0.5, EXIT_STALL_S))
            if self.process.exitcode is not None:
                return None
            now, used_now = time.monotonic(), cpu_seconds(pid)
            if used_now is None or used_now != used:
                used, last_used_at = used_now, now
            elif now - last_used_at >= EXIT_STALL_S:
                return f"used no CPU for {EXIT_STALL_S:g} s after it answered 'exit' (stuck)"
            if now >= deadline:
                return f"had not ended {EXIT_LIMIT_S:g} s after it answered 'exit'"


def shut_for_writing(conn: multiprocessing.connection.Connection) -> None:
    """Shut a pipe's end for writing (the socket, not this file descriptor: a duplicate is shut):
    a send waiting in it on another thread fails at once (EPIPE), as every send after it does."""
    try:
        with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as end:
            end.shutdown(socket.SHUT_WR)
    except OSError:  # (closed already, by the stop; or not a socket, off Linux and macOS: the kill's alone)
        pass


def cpu_seconds(pid: int) -> float | None:
    """The CPU seconds a process has used (user and system), or None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # (after the name, which may hold spaces)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class RemoteStream:
    """StreamSession's interface (as the server uses it), forwarded to the child process."""

    def __init__(self, host: ModelHost, reference: np.ndarray, caption, seed, height, width, steps):
        self.host = host
        self.id = uuid.uuid4().hex
        info = host.call("create", self.id, reference, caption, seed, height, width, steps)
        self.width, self.height = info["width"], info["height"]
        self.frames_per_chunk = info["frames_per_chunk"]
        self.chunk_seconds = info["chunk_seconds"]
        self.audio_lookahead_seconds = info["audio_lookahead_seconds"]
        self.chunks_to_full_ring = info["chunks_to_full_ring"]
        self._pcm: list[np.ndarray] = []

    def push_audio(self, pcm) -> None:
        self._pcm.append(np.asarray(pcm, np.float32))  # sent with the next chunk request

    def next_chunk(self):
        pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.float32)
        self._pcm = []
        return self.host.call("chunk", self.id, pcm)

    def write_pending_chunk(self) -> None:
        """The last chunk's clean re-encode, once its frames are published (the scheduler): a host
        that does not write it itself after replying runs it as one more operation."""
        if not self.host.writes_chunks_itself:
            self.host.call("write_pending", self.id)

    def set_caption(self, text: str | None) -> None:
        self.host.call("caption", self.id, text)

    def close(self) -> None:
        self.host.call("close", self.id)


class ModelOps:
    """The operations a host runs for RemoteStreams: one StreamSession per stream id."""

    def __init__(self, model, device: str, decode_dtype: str | None = "auto"):
        """decode_dtype: a DECODE_DTYPES name, or None to decode as the model's autoencoder was loaded."""
        self.model, self.device = model, device
        self.decode_dtype = decode_dtype
        self.streams = {}

    def handle(self, op: str, args: tuple):
        from streamgen.stream import StreamSession

        if op == "ping":  # the host is up; what it keeps out of collections (freeze_loaded_heap)
            return {"frozen_objects": gc.get_freeze_count()}
        if op == "create":
            sid, reference, caption, seed, height, width, steps = args
            stream = StreamSession(self.model, height, width, steps, device=self.device,
                                   decode_dtype=self.decode_dtype)  # fmt: skip
            stream.start(reference, text=caption, seed=seed)
            self.streams[sid] = stream
            return {
                "width": stream.width, "height": stream.height, "frames_per_chunk": stream.frames_per_chunk,
                "chunk_seconds": stream.chunk_seconds, "audio_lookahead_seconds": stream.audio_lookahead_seconds,
                "chunks_to_full_ring": stream.chunks_to_full_ring,
            }  # fmt: skip
        if op == "chunk":
            sid, pcm = args
            stream = self.streams[sid]
            if len(pcm):
                stream.push_audio(pcm)
            return stream.next_chunk()
        if op == "write_pending":  # a stream closed since its chunk has nothing to write
            stream = self.streams.get(args[0])
            if stream is not None:
                stream.write_pending_chunk()
            return None
        if op == "caption":
            sid, text = args
            self.streams[sid].set_text(text or None)
            return None
        if op == "close":
            stream = self.streams.pop(args[0], None)
            if stream is not None:
                stream.close()
            return None
        if op == "warm_text":
            from streamgen.model.text import TEXT_DIM, text_context

            if self.model.cfg.text_dim == TEXT_DIM:
                text_context("warm up", self.model.cfg.text_dim)
            return None
        raise ValueError(f"unknown operation {op!r}")

    def after_reply(self, op: str, args: tuple) -> None:
        """After a chunk's frames went back: its clean re-encode into the stream's cache, so the
        next chunk starts with its denoising (as the server's worker does for its own streams). A
        failure here stays pending and comes back in band with that next chunk."""
        if op == "chunk" and args[0] in self.streams:
            try:
                self.streams[args[0]].write_pending_chunk()
            except Exception:  # reported by the next chunk, which retries the write
                pass

    def close_all(self) -> None:
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()


def raise_reported(result) -> None:
    """Re-raise an error reported as (type name, message) with the type the server handles."""
    kind, message = result
    raise CLIENT_ERRORS.get(kind, RuntimeError)(message)


def log_setup() -> tuple[int, str | None]:
    """This process's log level and its first handler's format, for the model process to log as it
    does: a spawned process starts with no handler, and its warnings came out bare (no time, level
    or logger), its infos not at all."""
    root = logging.getLogger()
    # (the one that writes where the child's log goes, the standard error it inherits)
    writers = [h for h in root.handlers if getattr(h, "stream", None) is sys.stderr and h.formatter is not None]
    formatter = writers[0].formatter if writers else None
    return root.getEffectiveLevel(), getattr(formatter, "_fmt", None)


def _child_main(conn, model_name: str, device: str, threads: int | None, decode_dtype: str,
                logs: tuple[int, str | None] = (logging.WARNING, None)) -> None:  # fmt: skip
    logging.basicConfig(level=logs[0], format=logs[1] or logging.BASIC_FORMAT)
    # the server ends this process (`exit`, or its end of the pipe closing) once its sessions are
    # closed. A Ctrl-C in the terminal reaches the whole process group: taken here too, it printed
    # a KeyboardInterrupt traceback, and one in a chunk ended its session as the model process's
    # death ("generation failed"), an ERROR in the log, where the shutdown would have closed it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from streamgen.models import load_model

    if threads:
        torch.set_num_threads(threads)
    try:
        model = load_model(model_name, device=device)
    except Exception as e:
        log.error("model process: the model did not load", exc_info=True)  # (the server has its message only)
        conn.recv()
        conn.send((False, (type(e).__name__, str(e))))
        return
    ops = ModelOps(model, device, decode_dtype)
    freeze_loaded_heap()
    try:
        _serve_ops(conn, ops)
    finally:
        # the frozen heap given back before the interpreter ends: kept, Triton's bindings reported
        # at every stop some 30 lines of "nanobind: leaked 514 functions!"
        del ops, model
        gc.unfreeze()
        gc.collect()


def _serve_ops(conn, ops: ModelOps) -> None:
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if op == "exit":  # answered: the server waits for the teardown as long as it works
            try:
                conn.send((True, None))
            except OSError:
                pass
            return
        try:
            conn.send((True, ops.handle(op, args)))
        except Exception as e:  # reported to the caller in the server, which decides
            if type(e).__name__ not in CLIENT_ERRORS:
                # the server logs its message, with a traceback of its own pipe's: where it failed is here
                log.error("model process: %s failed", op, exc_info=True)
            conn.send((False, (type(e).__name__, str(e))))
            continue
        ops.after_reply(op, args)
