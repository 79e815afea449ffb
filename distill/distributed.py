"""Data parallelism under torchrun: gloo on CPU, NCCL on GPU.

Gradients are averaged by an explicit all-reduce after each backward rather
than by wrapping modules in DDP: the distillation stages call the same module
many times before one backward (rollouts, critic and generator passes), which
DDP's per-forward hooks do not allow, and an explicit average is the same
arithmetic. Each rank computes its loss as a mean over its own slice of the
global batch, so the averaged gradient equals the gradient of the mean over the
whole batch (a 1-process run with the whole batch takes the same step).

Large flavors shard their transformers with FSDP2 instead (`run.fsdp`, see
`distill/fsdp.py`); the tiny flavors trained here replicate.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distill.config import ConfigError
from streamgen.parallel.launch import join_process_group


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # the DeviceMesh run.fsdp shards over (`sharding_mesh`): made once, let go of in `close_world`
    mesh: object = None

    def sharding_mesh(self):
        if self.mesh is None:
            from distill import fsdp

            self.mesh = fsdp.world_mesh(self.device)
        return self.mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str = "auto") -> World:
    """Join the torchrun process group if there is one; choose the device."""
    size = _rank_variable("WORLD_SIZE", 1)
    rank = _rank_variable("RANK", 0)
    local_rank = _rank_variable("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is available")
    if use_cuda and local_rank >= torch.cuda.device_count():  # (set_device's CUDA error: a traceback)
        raise ConfigError(
            f"the rank with LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
            "start at most one rank per GPU (torchrun --nproc_per_node)"
        )
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        try:
            join_process_group("nccl" if use_cuda else "gloo", **_run_rendezvous())
        except ValueError as e:  # torch's env:// rendezvous: RANK, MASTER_ADDR or MASTER_PORT missing or bad
            # (a WORLD_SIZE left in the shell, without torchrun: a traceback from inside torch)
            raise ConfigError(f"{e}; {RUN_UNDER_TORCHRUN}") from None
    return World(rank, size, local_rank, dev)


# The rendezvous store of this process's ranks (torchrun's MASTER_ADDR and MASTER_PORT), kept for
# every run the process joins, and how many it has joined: each run's group meets under keys of its
# own. A store made again for each run had a rank that left a run first ask for the next one's group
# at the store of the run rank 0 had not yet left (one port, one multi-tenant server), whose keys
# were that run's: the ranks waited on each other to the rendezvous's timeout.
_stores: dict[tuple, list] = {}


def _run_rendezvous() -> dict:
    """`join_process_group`'s store, rank and world size for the next run of this process (env://,
    as torch's own, torchrun's agent store included): a ValueError where its variables are missing."""
    where = tuple(os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))
    if where not in _stores:
        store, _, _ = next(dist.rendezvous("env://"))
        _stores[where] = [store, 0]
    held = _stores[where]
    held[1] += 1
    store = dist.PrefixStore(f"distill-run-{held[1]}", held[0])
    return {"store": store, "rank": int(where[2]), "world_size": int(where[3])}


RUN_UNDER_TORCHRUN = "start each rank with torchrun --nproc_per_node N, or unset WORLD_SIZE for one process"


def launch_rank() -> int:
    """This process's rank under torchrun (RANK), 0 without it; before any process group is joined."""
    return _rank_variable("RANK", 0) if _rank_variable("WORLD_SIZE", 1) > 1 else 0


def _rank_variable(name: str, default: int) -> int:
    """A whole number torchrun sets in each rank's environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number; {RUN_UNDER_TORCHRUN}") from None


def close_world(world: World) -> None:
    """Destroy the process group once nothing else holds it, so that its destroy ends its threads:
    a group still held runs its gloo threads on, into the interpreter's shutdown (where one still
    freeing a collective's tensors aborts a run that succeeded), and a process that runs several
    stages keeps one more group each time."""
    if world.mesh is not None:  # (run.fsdp) the mesh and torch's DTensor caches: `fsdp.release`
        from distill import fsdp

        fsdp.release(world.mesh)
        world.mesh = None
    if world.distributed and dist.is_initialized():
        # the stage's modules, gone as the run returns, hold the group in reference cycles (FSDP2's
        # hooks and states), which only a collection frees
        gc.collect()
        dist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Make every rank start from rank 0's weights."""
    if not world.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_text(text: str, world: World) -> str:
    """Rank 0's `text` on every rank (what each rank read of a file rank 0 also read, say a
    digest, may be of another version of it: a decision made from it must be the same on every
    rank, or a refusal on one leaves the others waiting in their next collective)."""
    if not world.distributed:
        return text
    box = [text if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params, world: World) -> None:
    """All-reduce the gradients as one flat bucket and divide by the world size.

    A parameter without a gradient on some rank counts as zero there (its share of the
    global batch did not use it). One without a gradient on every rank keeps `grad=None`,
    as it would in one process with the whole batch: the optimizer then skips it, where a
    zero gradient would still move it by Adam's momentum and the weight decay.
    """
    if not world.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    used = [p.grad is not None for p in params]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # the use flags ride in the same bucket: one collective, and counts stay exact in float
    flags = torch.tensor(used, dtype=params[0].grad.dtype, device=params[0].grad.device)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [flags])
    dist.all_reduce(flat)
    users = flat[-len(params) :].tolist()
    flat /= world.size
    offset = 0
    for p, count in zip(params, users):
        n = p.numel()
        if count > 0:
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        else:
            p.grad = None
        offset += n


def mean_across(value: torch.Tensor, world: World) -> torch.Tensor:
    """Mean of a (detached) tensor over ranks, for logging and the NaN check."""
    value = value.detach().clone()
    if world.distributed:
        dist.all_reduce(value)
        value /= world.size
    return value


# how long the other ranks wait for work rank 0 does alone (the ode stage's teacher trajectories:
# hours for a large teacher): the process group's own collectives give up after 10 minutes (NCCL)
MAIN_ALONE_TIMEOUT = timedelta(hours=12)


@contextlib.contextmanager
def others_wait_for_main(world: World):
    """Around work that rank 0 does alone while the other ranks wait: at its end every rank meets
    in a barrier of a gloo group made for it, whose timeout is MAIN_ALONE_TIMEOUT rather than the
    process group's. (The group is made before the work: its making is a collective too.) A rank 0
    that fails in the work ends the run through torchrun, which stops the waiting ranks."""
    if not world.distributed:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=MAIN_ALONE_TIMEOUT)
    try:
        yield
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
