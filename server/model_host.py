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

import multiprocessing
import uuid

import numpy as np

_ERRORS = {"ValueError": ValueError, "BufferError": BufferError, "KeyError": KeyError}


class ModelHost:
    def __init__(self, model: str, device: str, threads: int | None):
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no copied threads or locks
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(child, model, device, threads), daemon=True,
                                   name="streamgen-model")  # fmt: skip
        self.process.start()
        child.close()
        self.call("ping")  # waits until the model is loaded; raises what loading raised

    def call(self, op: str, *args):
        self._conn.send((op, args))
        ok, result = self._conn.recv()
        if ok:
            return result
        kind, message = result
        raise _ERRORS.get(kind, RuntimeError)(message)

    def stop(self) -> None:
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
        self._pcm: list[np.ndarray] = []

    def push_audio(self, pcm) -> None:
        self._pcm.append(np.asarray(pcm, np.float32))  # sent with the next chunk request

    def next_chunk(self):
        pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.float32)
        self._pcm = []
        return self.host.call("chunk", self.id, pcm)

    def set_caption(self, text: str | None) -> None:
        self.host.call("caption", self.id, text)

    def close(self) -> None:
        self.host.call("close", self.id)


def _child_main(conn, model_name: str, device: str, threads: int | None) -> None:
    import torch

    from streamgen.models import load_model
    from streamgen.stream import StreamSession

    if threads:
        torch.set_num_threads(threads)
    try:
        model = load_model(model_name, device=device)
    except Exception as e:
        conn.recv()
        conn.send((False, (type(e).__name__, str(e))))
        return
    streams: dict[str, StreamSession] = {}
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if op == "exit":
            return
        try:
            if op == "ping":
                result = True
            elif op == "create":
                sid, reference, caption, seed, height, width, steps = args
                stream = StreamSession(model, height, width, steps, device=device)
                stream.start(reference, text=caption, seed=seed)
                streams[sid] = stream
                result = {
                    "width": stream.width, "height": stream.height, "frames_per_chunk": stream.frames_per_chunk,
                    "chunk_seconds": stream.chunk_seconds, "audio_lookahead_seconds": stream.audio_lookahead_seconds,
                }  # fmt: skip
            elif op == "chunk":
                sid, pcm = args
                stream = streams[sid]
                if len(pcm):
                    stream.push_audio(pcm)
                result = stream.next_chunk()
            elif op == "caption":
                sid, text = args
                streams[sid].set_text(text or None)
                result = None
            elif op == "close":
                stream = streams.pop(args[0], None)
                if stream is not None:
                    stream.close()
                result = None
            elif op == "warm_text":
                from streamgen.model.text import text_context

                if model.cfg.text_dim == 384:
                    text_context("warm up", model.cfg.text_dim)
                result = None
            else:
                raise ValueError(f"unknown operation {op!r}")
            conn.send((True, result))
        except Exception as e:  # reported to the caller in the server, which decides
            conn.send((False, (type(e).__name__, str(e))))
