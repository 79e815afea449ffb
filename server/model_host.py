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
import signal
import sys
import uuid

import numpy as np

# errors a client causes (bad reference, unknown stream): reported to that client; the host carries on
CLIENT_ERRORS = {"ValueError": ValueError, "BufferError": BufferError, "KeyError": KeyError}

log = logging.getLogger("streamgen.server")


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
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        oom = ", as the kernel's out-of-memory killer does" if -code == signal.SIGKILL else ""
        return f"the model process exited (code {code}: killed by {name}{oom})"
    return f"the model process exited (code {code})"


class HostDown(RuntimeError):
    """The model host can no longer run operations (its process died, or the ranks fell out of step)."""


class ModelHost:
    # the child process writes each chunk into its stream's cache right after replying with its
    # frames (ModelOps.after_reply), while the server publishes them
    writes_chunks_itself = True

    def __init__(self, model: str, device: str, threads: int | None, decode_dtype: str = "auto"):
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no copied threads or locks
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(child, model, device, threads, decode_dtype, log_setup()),
                                   daemon=True, name="streamgen-model")  # fmt: skip
        self.process.start()
        child.close()
        self._down: str | None = None  # why the host can run nothing more (the server reports it unhealthy)
        # seconds an operation may take before the process is taken for stuck and killed; None
        # while the model loads and warms up (a first chunk may take minutes): the server sets it
        # once it is ready (ServerConfig.model_timeout_s)
        self.answer_timeout: float | None = None
        self.call("ping")  # waits until the model is loaded; raises what loading raised

    @property
    def down(self) -> str | None:
        """Why the host can run nothing more, or None. A process that died between operations
        (killed while no session streamed: the OOM killer) is found here, not only by the next
        operation: /healthz and /readyz said ok, and its sessions waited, until one was asked for."""
        if self._down is None and self.process.exitcode is not None:
            self._down = exit_line(self.process.exitcode)
        return self._down

    def call(self, op: str, *args):
        if self.down:
            raise HostDown(self.down)
        try:
            self._conn.send((op, args))
            if self.answer_timeout is not None and not self._conn.poll(self.answer_timeout):
                self._stop_stuck(op)
            ok, result = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(1)
            self._down = exit_line(self.process.exitcode)
            raise HostDown(self.down) from None
        if ok:
            return result
        raise_reported(result)

    def _stop_stuck(self, op: str) -> None:
        """A model process that does not answer (a deadlock, a driver hang, a stopped process) held
        the worker, and with it every session, while /healthz said ok: it is killed, and the host
        is down, as it is when the process dies, so that a supervisor restarts the server."""
        self.process.kill()  # (SIGKILL: a stuck process may not run a SIGTERM handler)
        self.process.join(5)
        self._down = f"the model process gave no answer to {op!r} in {self.answer_timeout:g} s (stuck: it was killed)"
        raise HostDown(self._down)

    def stop(self) -> None:
        self._down = self._down or "the model process was stopped (the server is shutting down)"
        try:
            self._conn.send(("exit", ()))
        except (OSError, ValueError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


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
        if op == "exit":
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
