"""`streamgen serve --sp N`: the model sharded over N processes (sequence parallelism).

`serve --sp N` restarts itself under torchrun (`streamgen.parallel.launch`).
Every process loads the model and shards it the same way (the DiT's tokens
by Ulysses/Ring, the VAE decode by bands); rank 0 also runs the server. A
parallel forward needs every process to make the same calls in the same
order, so the followers replay rank 0's model operations:

    inference worker (rank 0)                     followers (ranks 1..N-1)
    SequenceParallelHost.call(op, args) --------> conn.recv() -> ModelOps.handle
        -> ModelOps.handle(op, args)                    (collectives meet here)
        <- result (RemoteStream, as with --model-process)

The operations are ModelHost's (create, chunk, caption, close, ...), so the
registry and scheduler use `RemoteStream` exactly as for `--model-process`.
Commands travel on plain local connections, not on the process group: a
follower waits for its next command for as long as the server is idle, which
a collective's timeout would not allow, and it sees EOF when rank 0 is gone.
Stream seeds are drawn on rank 0 before a command is sent, so every replica
draws the same noise. Errors a client causes (a bad reference) are raised on
every process alike; rank 0 reports them, the followers carry on.
"""

from __future__ import annotations

import logging
import random
import secrets
from multiprocessing.connection import Client, Listener

import torch
import torch.distributed as dist

from .model_host import ModelOps

log = logging.getLogger("streamgen.server")


def load_sharded(model_name: str, device: str, threads: int | None, sp: int, height: int | None):
    """The same on every process, in the same order (the mesh and groups are collective):
    load the model, shard the DiT, decode in bands (when the latent height divides)."""
    from streamgen.models import load_model
    from streamgen.parallel.apply import apply_sequence_parallel
    from streamgen.parallel.launch import init_process_group, init_sequence_parallel
    from streamgen.parallel.vae import parallel_decoder

    if threads:
        torch.set_num_threads(threads)
    init_process_group()
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    model = load_model(model_name, device=device)
    mesh, mode = init_sequence_parallel(sp, model.cfg.num_heads)
    apply_sequence_parallel(model.dit, mesh, mode)
    latent_height, _ = model.vae.latent_hw(height or model.height, height or model.width)
    model.vae = parallel_decoder(model.vae, latent_height)
    log.info("rank %d of %d: %s sharded (%s)", dist.get_rank(), sp, model_name, mode)
    return model, device


class SequenceParallelHost:
    """ModelHost's interface, on rank 0: each operation is sent to the followers, then run here."""

    def __init__(self, model: str, device: str, threads: int | None, sp: int, height: int | None = None):
        self.model, device = load_sharded(model, device, threads, sp, height)
        self.ops = ModelOps(self.model, device)
        authkey = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        dist.broadcast_object_list([listener.address, authkey], src=0)
        self.followers = [listener.accept() for _ in range(sp - 1)]
        listener.close()

    def call(self, op: str, *args):
        if op == "create" and args[3] is None:  # seed: one draw, shared by every replica
            args = (*args[:3], random.randrange(2**31), *args[4:])
        for conn in self.followers:
            conn.send((op, args))
        return self.ops.handle(op, args)

    def stop(self) -> None:
        for conn in self.followers:
            try:
                conn.send(("exit", ()))
                conn.close()
            except OSError:
                pass  # that follower is already gone
        self.followers = []
        self.ops.close_all()
        if dist.is_initialized():
            dist.destroy_process_group()


def follow(model: str, device: str, threads: int | None, sp: int, height: int | None = None) -> int:
    """Ranks 1..N-1: replay rank 0's operations until it says exit or goes away."""
    loaded, device = load_sharded(model, device, threads, sp, height)
    ops = ModelOps(loaded, device)
    box = [None, None]
    dist.broadcast_object_list(box, src=0)
    address, authkey = box
    with Client(address, authkey=authkey) as conn:
        while True:
            try:
                op, args = conn.recv()
            except (EOFError, OSError):
                break
            if op == "exit":
                break
            try:
                ops.handle(op, args)
            except Exception:  # rank 0 raised the same and reports it to the client
                log.debug("rank %d: %s failed", dist.get_rank(), op, exc_info=True)
    ops.close_all()
    dist.destroy_process_group()
    return 0
