"""Start a `streamgen` command on N processes (`--sp N`), and set up the
processes once they run.

    # in a command's run(args), before anything heavy:
    relaunch_under_torchrun(args.sp, args._argv, device=args.device)  # returns at once: sp <= 1, a worker
    device = init_process_group(args.device)  # this rank's device: load the model onto it
    mesh, mode = init_sequence_parallel(args.sp, model.cfg.num_heads)
    apply_sequence_parallel(model, mesh, mode)
    if is_main_process(): write the output
    leave_process_group(finished=True)        # every rank, before it exits

`relaunch_under_torchrun` makes the current process the launcher of
`python -m streamgen.parallel.torchrun --standalone --nproc-per-node N -m streamgen <same arguments>`
(torchrun, ending quietly on Ctrl-C), run in it rather than in a new Python;
the workers parse the same arguments, see that they are torchrun workers and
carry on. One machine only (--standalone); NCCL for a CUDA --device (one
GPU per worker, by LOCAL_RANK), gloo for a CPU one.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist


def is_torchrun_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def torchrun_command(nproc: int, argv: list[str] | None = None, module: str = "streamgen") -> list[str]:
    """The command line that runs `python -m module argv...` on `nproc` local processes. `streamgen`, not
    `streamgen.cli`: its __main__ loads the command line behind a catch for Ctrl-C, where a Ctrl-C as the
    processes started was a KeyboardInterrupt's traceback from each (`-m streamgen.cli` imports it bare)."""
    return [sys.executable, "-m", "streamgen.parallel.torchrun", *torchrun_arguments(nproc, argv, module)]


def torchrun_arguments(nproc: int, argv: list[str] | None = None, module: str = "streamgen") -> list[str]:
    """The launcher's arguments (`torchrun_command`'s after the launcher's module) for `python -m module
    argv...` on `nproc` local processes (argv: default this process's arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", module, *argv]


def relaunch_under_torchrun(
    nproc: int,
    argv: list[str] | None = None,
    module: str = "streamgen",
    device: str = "cpu",
    model: str | None = None,
) -> None:
    """Run the current `streamgen` command again under torchrun with `nproc` processes, on
    `device` (the command's --device: a CUDA one needs a GPU per process; ValueError otherwise).
    On a CPU, a ValueError too where `nproc` processes, each holding torch and a copy of `model`
    (the command's --model), clearly cannot fit in the memory free (`check_memory_for_processes`).

    Does not return when it relaunches: this process becomes the launcher (`streamgen.parallel.torchrun`)
    and raises SystemExit with its exit code once the processes have ended. (It had re-executed
    Python to run the launcher, which imported torch all over again: 3-4 s of each launch on a
    2-core machine, before any process started; the checks above have imported it already.)
    Returns immediately when nproc <= 1 or when this process is already a torchrun worker. argv
    defaults to this process's arguments.
    """
    if nproc <= 1 or is_torchrun_worker():
        return
    _check_no_gpu_index(device, nproc)
    if _uses_cuda(device) and torch.cuda.device_count() < nproc:
        raise ValueError(f"--sp {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    if not _uses_cuda(device):
        check_memory_for_processes(nproc, model)
        _warn_of_more_processes_than_cpus(nproc)
    from streamgen.parallel import torchrun

    raise SystemExit(torchrun.main(torchrun_arguments(nproc, argv, module)))


# The memory of its own a CPU rank holds besides its model's weights: torch, gloo, the command (each
# tiny-avatar rank of `generate --sp 2`: 265-275 MiB, USS). A floor, so that only a count that clearly
# cannot fit is refused: one that may fit is left to the warning of more processes than CPUs.
RANK_MEMORY_FLOOR = 256 * 2**20


def check_memory_for_processes(nproc: int, model: str | None = None) -> None:
    """A ValueError where `nproc` CPU processes clearly cannot fit in the memory this machine has free:
    each holds torch and a whole copy of `model`'s DiT (counted at 2 bytes a weight, bfloat16's: the
    least the weights are loaded in). Past the memory free, `--sp N` started its N processes with a warning only (of more
    processes than CPUs), for the kernel's OOM killer to end them (or the machine's other work)."""
    from streamgen.model.model import DiT
    from streamgen.models import free_memory, model_shape

    free = free_memory()
    if free is None:
        return
    shape = model_shape(model) if model else None
    weights = 0
    if shape is not None:
        with torch.device("meta"):
            weights = 2 * sum(p.numel() for p in DiT(shape[0]).parameters())
    each = RANK_MEMORY_FLOOR + weights
    if nproc * each > free:
        raise ValueError(
            f"--sp {nproc} needs at least {nproc * each / 2**30:.1f} GiB of memory ({nproc} processes, each with "
            f"torch and its own copy of the model: {each / 2**30:.2f} GiB); this machine has "
            f"{free / 2**30:.1f} GiB free"
        )


def _warn_of_more_processes_than_cpus(nproc: int) -> None:
    """One line where `nproc` CPU processes outnumber the CPUs this process may use: each rank waits
    at every layer for the others, which then wait for a core, and each holds a whole model (--sp 16
    of tiny-avatar on 2 cores: 2.8 frames/s against one process's 32; --sp 64 started 64 silently)."""
    from streamgen.cli import usable_cpus

    cpus = usable_cpus()
    if nproc > cpus:
        print(
            f"streamgen: warning: --sp {nproc} runs {nproc} processes on {cpus} CPUs: each waits for the others "
            f"at every layer and loads the whole model; at most {cpus} run at once",
            file=sys.stderr,
        )


def check_torchrun_world(sp: int) -> None:
    """In a worker of plain torchrun: a ValueError unless it started `sp` processes (--sp N). With
    --sp 1 every rank ran the whole command by itself: `generate` made the same video N times."""
    if not is_torchrun_worker():
        return
    world = os.environ.get("WORLD_SIZE", "1")
    if world != str(sp):
        raise ValueError(
            f"torchrun started {world} processes, but --sp is {sp}: give --sp {world} to shard the model "
            "over them (or leave torchrun out: --sp N starts it itself)"
        )


def choose_degrees(num_heads: int, world: int) -> tuple[int, int]:
    """(ulysses_degree, ring_degree) for `world` processes: as much Ulysses as the heads allow.

    Ulysses moves less data (two all-to-alls) than Ring (world - 1 rotations of
    K/V), so it takes the largest degree dividing both; Ring takes the rest.
    E.g. 12 heads on 8 GPUs -> 4 x 2.
    """
    ulysses = math.gcd(num_heads, world)
    return ulysses, world // ulysses


def sequence_parallel_degrees(num_heads: int, world: int, mode: str = "auto") -> tuple[int, int, str]:
    """(ulysses_degree, ring_degree, mode) of `mode` over `world` processes; mode "auto" picks
    ulysses, ring or hybrid by `choose_degrees`."""
    if mode == "auto":
        ulysses, ring = choose_degrees(num_heads, world)
        mode = "hybrid" if ulysses > 1 and ring > 1 else ("ulysses" if ulysses > 1 else "ring")
    elif mode == "ulysses":
        ulysses, ring = world, 1
    elif mode == "ring":
        ulysses, ring = 1, world
    else:
        ulysses, ring = choose_degrees(num_heads, world)
    return ulysses, ring, mode


def check_sequence_parallel(sp: int, model: str, height: int | None, width: int | None, mode: str = "auto") -> None:
    """Before `relaunch_under_torchrun`: the ValueError each of `sp` processes would raise once it
    had loaded `model` (`check_heads`, `check_tokens`) where they cannot shard it at
    height x width (None: the model's own), from its settings without loading its weights:
    --sp 3 of a 64-token frame started 3 processes that each loaded the model first. Where the
    settings do not say (or the size is one the session refuses), the processes' checks still do."""
    from streamgen.models import model_settings, model_shape
    from streamgen.parallel.apply import check_tokens
    from streamgen.parallel.ulysses import check_heads

    shape = model_shape(model) if sp > 1 else None
    if shape is None:
        return
    cfg, spatial_factor = shape
    ulysses, _, _ = sequence_parallel_degrees(cfg.num_heads, sp, mode)
    check_heads(cfg.num_heads, ulysses)
    try:
        settings = model_settings(model)
    except (OSError, ValueError):
        return
    height, width = height or settings["height"], width or settings["width"]
    _, patch_h, patch_w = cfg.patch_size
    if height % (spatial_factor * patch_h) or width % (spatial_factor * patch_w):
        return  # (the session says what is wrong with the size)
    check_tokens((height // spatial_factor // patch_h) * (width // spatial_factor // patch_w), sp)


@contextlib.contextmanager
def signals_end_the_process():
    """Within: SIGINT and SIGTERM end this process at once, as if Python had no handler.

    Joining a group (and making the mesh's subgroups) waits in C++ until every rank
    has joined, where Python cannot act on a signal: after a Ctrl-C, a rank whose
    peer had already stopped would wait there until torchrun kills it (30 s). Nothing
    needs cleaning up yet at that point. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, signal.SIG_DFL) for s in stops}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _uses_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _check_no_gpu_index(device: str, nproc: int) -> None:
    """A ValueError for a CUDA device with an index: each rank takes the GPU of its LOCAL_RANK (the
    index was ignored: `--device cuda:2 --sp 2` ran on GPUs 0 and 1, maybe beside another job)."""
    if _uses_cuda(device) and torch.device(device).index is not None:
        raise ValueError(
            f"--device {device} with --sp {nproc}: each process takes the GPU of its rank (0 to {nproc - 1}); "
            "give --device cuda, and CUDA_VISIBLE_DEVICES to choose which GPUs"
        )


def join_process_group(backend: str, **kwargs) -> None:
    """`dist.init_process_group(backend, **kwargs)`, torch._dynamo imported first. Imported after
    (torch.compile, diffusers), it keeps references to the default group that outlive
    `destroy_process_group`, so the group's worker threads run on into the interpreter's shutdown;
    one still freeing a finished collective's tensors there needs the GIL, is ended, and aborts
    the process (SIGABRT) after its work was done (a core dump of one CI run)."""
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend, **kwargs)


def init_process_group(device: str = "cpu") -> str:
    """In a torchrun worker: join the group (env:// rendezvous) unless joined already, for a
    command on `device` (its --device): NCCL with one GPU per LOCAL_RANK for a CUDA device,
    gloo otherwise (a CPU run on a machine with GPUs too). Returns this process's device, which
    the model must be loaded onto (every rank's "cuda" is its own GPU, not GPU 0)."""
    cuda = _uses_cuda(device)
    _check_no_gpu_index(device, int(os.environ.get("WORLD_SIZE", 1)))
    if cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:  # (more ranks than GPUs under plain torchrun: a CUDA error's traceback)
            raise ValueError(
                f"the rank with LOCAL_RANK {local_rank} has no GPU: this machine has {gpus}; "
                f"run at most {gpus} processes on it with --device cuda (one GPU each)"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        with signals_end_the_process():
            join_process_group("nccl" if cuda else "gloo")
    return f"cuda:{torch.cuda.current_device()}" if cuda else device


def init_sequence_parallel(sp: int, num_heads: int, mode: str = "auto"):
    """In a torchrun worker, after `init_process_group`: build the mesh for `mode`.

    Returns (mesh_or_group, mode) for `apply_sequence_parallel`; mode "auto"
    picks ulysses, ring or hybrid by `choose_degrees` (`sequence_parallel_degrees`).
    """
    from streamgen.parallel.apply import sequence_parallel_mesh

    if not dist.is_initialized():
        raise RuntimeError("init_process_group(device) first: the model is loaded onto the device it returns")
    world = dist.get_world_size()
    if world != sp:
        raise ValueError(f"--sp {sp} but torchrun started {world} processes")
    ulysses, ring, mode = sequence_parallel_degrees(num_heads, world, mode)
    with signals_end_the_process():  # the subgroups are made collectively too
        return sequence_parallel_mesh(ulysses, ring), mode


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def leave_process_group(finished: bool) -> None:
    """Tear the process group down before the interpreter does.

    A gloo worker that exits with its group alive can die of SIGABRT while
    Python shuts down (its C++ threads still hold tensors whose release
    needs the GIL), which fails the whole torchrun job after the work was
    done. When every rank `finished`, they meet at a barrier first, so no
    rank closes its sockets while another still talks; after an error the
    others may be gone, so no barrier. The barrier waits in C++ with nothing
    left to clean up, so a signal ends the process there at once, and a peer
    that ended meanwhile is one line here (torchrun reports why it ended), handed
    to `--sp N`'s launcher, which names the rank that failed instead: printed, it
    came before that rank's own error, in gloo's words ("... GLHF!"). The
    caller lets go of the sharded model first: it holds the groups too.
    """
    if not dist.is_initialized():
        return
    if finished:
        try:
            with signals_end_the_process():
                dist.barrier()
        except RuntimeError as e:
            from streamgen.parallel.torchrun import report_error

            report_error(
                f"streamgen: rank {dist.get_rank()}: a peer left before the end ({e})",
                another_rank_failed=True,
            )
    dist.destroy_process_group()
    # a sharded model the caller let go of still holds the groups in reference cycles (its
    # `new_cache` refers to the model): collected now, their threads end here
    gc.collect()


def clear_error_frames(error: BaseException) -> None:
    """Let go of the locals of the finished frames in `error`'s traceback, and in those of the errors
    it chains (their lines still print): a sharded model (a distill run's stage, a generate --sp
    session), which holds the process groups, would otherwise live as long as the error does, and
    the groups' threads with it, past `leave_process_group` into the interpreter's shutdown."""
    import traceback

    errors, seen = [error], set()
    while errors:
        e = errors.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # (the frames still running are left as they are)
        errors += [e.__cause__, e.__context__]
