"""Test processes that share a gloo process group, spawned so that they end cleanly, and the
environment a launcher of ranks starts in (as a user's shell has it)."""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp


def gloo_threads(settle_s: float = 5.0) -> int | None:
    """How many gloo worker threads (`pt_gloo_runloop`) this process runs; None where /proc
    cannot tell. A thread that was joined is still listed for a moment: pthread_join returns when
    the kernel clears the thread's id, before it takes the task off the list, and a loaded 2-core
    machine stretched that moment enough to count both of a destroyed group's threads (one CI run
    in many). A count above 0 is taken again until `settle_s` has passed; the threads of a group
    that something still holds wait for work for ever, so they are still counted then."""
    deadline = time.monotonic() + settle_s
    while True:
        count = _gloo_threads_now()
        if not count or time.monotonic() >= deadline:
            return count
        time.sleep(0.05)


def _gloo_threads_now() -> int | None:
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except OSError:  # (a thread that ended since listed)
            pass
    return count


# In a process that `spawn` forked from its server: the modules the server had imported (none of them
# imports this module); what the process imported itself is the rest.
MODULES_BEFORE = frozenset(sys.modules)

# What the forked server imports for the processes of every test file that spawns them (torch._dynamo
# first: see join_process_group), whichever file starts it: it keeps the preload of the first spawn,
# and a process of another file imported what only that file's preload named itself (the Wan VAE's
# diffusers, ~3 CPU s, in each of test_parallel's six after test_server_sp or test_distill_distributed).
PRELOAD = [
    "torch", "torch._dynamo", "torch.distributed", "pytest",
    "diffusers.models.autoencoders.autoencoder_kl_wan", "streamgen.model.wan_vae", "streamgen.parallel.vae",  # test_parallel
    "distill.trainer", "distill.ode", "distill.dmd",  # test_distill_distributed
    "server.app", "server.model_host", "server.sp_host", "streamgen.models",  # test_server_sp
]  # fmt: skip


def spawn(fn, args: tuple, nprocs: int, preload: tuple[str, ...] = ()) -> None:
    """`mp.spawn(fn, args, nprocs)`, each process's process group gone before its interpreter
    shuts down (`_run_then_collect`).

    With `preload` (module names), the processes are forked from a fresh server process that
    imported torch and those modules once (multiprocessing's forkserver), not started as fresh
    interpreters that each import them again: seconds of a 2-core machine per process. The server
    is this test process's, started by the first such spawn: `preload` counts only there (PRELOAD
    always), and the processes' stdout and stderr are the server's (a capfd of a later test does not
    see them). A test module's own name is not found there (Python 3.11's forkserver does not take
    this process's sys.path): each process imports that module itself, hundredths of a second."""
    if not preload:
        mp.spawn(_run_then_collect, args=(fn, *args), nprocs=nprocs)
        return
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload([*PRELOAD, *preload])
    mp.start_processes(_run_then_collect, args=(fn, *args), nprocs=nprocs, start_method="forkserver")


def _run_then_collect(rank: int, fn, *args) -> None:
    fn(rank, *args)
    # A gloo worker thread still holding a finished collective's tensors when the interpreter shuts
    # down needs the GIL to free them, is ended there, and std::terminate aborts the process after
    # its work passed (a core dump of one CI run: 1 spawn in about 200 under load). A process group
    # that only a reference cycle keeps after destroy_process_group lives until the interpreter's
    # last collection; collected here, its destructor joins those threads while Python still runs.
    gc.collect()
    left = gloo_threads()
    if left:
        raise RuntimeError(f"{left} gloo worker threads outlive the process group: something still holds it")


def launcher_env() -> dict[str, str]:
    """This environment as a user's shell has it: not inside a torchrun worker, one thread per rank."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def process_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # (a zombie has ended: its parent, the init process here, reaps it)


def signal_once_started(proc, started: Path, sig: int, what: str) -> None:
    """Send `sig` to `proc` once it has made the file `started` (bounded: 60 s), and wait for it to
    end (60 s); killed in any case. `what`: the step it must still be in, for the failure's message."""
    try:
        for _ in range(600):
            if started.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"it ended before {what}"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
