"""`streamgen bench resources --json`: the Triton kernels compiled for a GPU that need not be here.

Triton's own compiler, with the ptxas it ships, compiles every kernel and every
autotune config at the Wan2.1-1.3B shapes of `bench/kernels.py` for a target
architecture (Hopper, sm_90, by default), into an empty cache so that each is
really built (a binary two cases build alike, once: the second reads it and its
report); ptxas's report gives the registers, stack frame and spills, and
Triton's metadata the shared memory. Nothing is launched, so this runs on a
CPU-only machine. It finds, before a GPU is lent:
- kernels the compiler rejects where the interpreter (the CPU tests) does not;
- configs asking for more shared memory than the chip gives one block (they
  cannot launch: the autotuner drops them, after paying for their compile);
- configs that spill registers to local memory (slow);
- how many fp32 instructions of each kind the PTX holds beside the tensor-core products
  (`float_ops`: a static count, each loop body once), which the softmax of the attention
  kernel issues per score.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import tempfile
import time
from unittest import mock

import torch

# the compute capabilities NVIDIA has made, as ptxas names them sm_XX (another, 0 say, aborted the
# process inside Triton's LLVM with no message)
NVIDIA_ARCHS = (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 101, 103, 110, 120, 121)
# shared memory one block may use (the opt-in maximum Triton checks at launch), by compute capability
SHARED_BYTES_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# the constexprs and launch options that tell one compiled variant from another
VARIANT_KEYS = tuple(
    "BLOCK_M BLOCK_N BLOCK_D BLOCK BLOCK_CAUSAL DOT_FP32 WITH_NORM num_warps num_stages".split()
)


@contextlib.contextmanager
def compile_only(arch: int, cache_dir: str | None = None):
    """Within: a Triton launch compiles for `arch` and returns without running; an autotuned
    launch compiles every config instead of timing them. Yields the list of (kernel name,
    variant, compiled kernel, seconds, ptxas report) it fills. Builds go to `cache_dir`, by
    default an empty cache of its own; a build already in `cache_dir` is read from it, with no
    ptxas report."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class OfflineDriver:  # what JITFunction.run asks of a driver before it would launch
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    compiled, touched = [], set()
    jit_run, tuner_run = JITFunction.run, Autotuner.run
    # restored as it was: `reset_active` would create the default driver, which needs a GPU
    active = driver._active

    def run(self, *args, grid, warmup, **kwargs):
        touched.add(self)
        t0, report = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(report):
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        variant = {k: kwargs[k] for k in VARIANT_KEYS if k in kwargs}
        compiled.append((self.fn.__name__, variant, kernel, time.perf_counter() - t0, report.getvalue()))
        return kernel

    def tune(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        return self.warmup(*args, **kwargs)

    # an empty cache (or the caller's), so every kernel is really built, and Triton prints ptxas -v
    # for each
    with (
        tempfile.TemporaryDirectory(prefix="triton-offline-") as empty_cache,
        mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache_dir or empty_cache, TRITON_DUMP_PTXAS_LOG="1"),
    ):
        try:
            driver.set_active(OfflineDriver())
            JITFunction.run, Autotuner.run = run, tune
            yield compiled
        finally:
            JITFunction.run, Autotuner.run = jit_run, tuner_run
            driver._active = active
            for fn in touched:  # binaries for another chip must not serve a real device 0 later
                fn.device_caches.clear()


def ptxas_usage(report: str) -> dict:
    """Registers, stack frame and spills from ptxas's verbose report of one kernel."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    registers = re.search(r"Used (\d+) registers", report)
    if frame is None or registers is None:
        return {}
    stack, stores, loads = map(int, frame.groups())
    return {
        "registers": int(registers.group(1)),
        "stack_frame_bytes": stack,
        "spill_stores": stores,
        "spill_loads": loads,
    }


def run(arch: int = 90, dtype: str = "bfloat16", only: tuple[str, ...] = ()) -> dict:
    from streamgen.cli import UserError

    try:
        import triton
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        raise UserError(f"needs Triton with its NVIDIA backend ({e})") from None

    from bench.kernels import kernel_cases, kernel_shapes, triton_function
    from streamgen.kernels import triton_ops

    if triton_ops.INTERPRET:
        # (the user's environment: a RuntimeError's traceback said it)
        raise UserError("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled; unset it")
    limit = SHARED_BYTES_PER_BLOCK.get(arch)
    # the names from the small shapes: the Wan-size cases' tensors took 28 s to build, before a
    # typo in --only was refused
    names = list(kernel_cases(kernel_shapes(quick=True), torch.device("cpu"), torch.float32))
    if unknown := sorted(set(only) - set(names)):
        raise UserError(f"--only: unknown case(s) {', '.join(unknown)}; the cases are {', '.join(names)}")
    cases = kernel_cases(kernel_shapes(quick=False), torch.device("cpu"), getattr(torch, dtype), values=False)
    rows, reports, started = [], {}, time.perf_counter()
    # one cache for every case: a binary two cases build alike (the FP8 attention's quantization of
    # its q and k in both FP8 cases, of its v as the `quantize_fp8_values` case's) is built once,
    # and read from the cache in the second, with the report of its build (`reports`, by its hash)
    with tempfile.TemporaryDirectory(prefix="triton-offline-") as cache:
        for name, (_eager, op_name, args, _nbytes, _flops) in cases.items():
            if only and name not in only:
                continue
            with compile_only(arch, cache) as compiled:
                triton_function(op_name)(*args)
            rows += _case_rows(name, compiled, reports, limit)
    return {
        "target": f"sm_{arch}",
        "triton": triton.__version__,
        "dtype": dtype,
        "shapes": "wan2.1-1.3b at 832x480 (bench/kernels.py)",
        "shared_bytes_per_block": limit,
        "ptxas_reports": sum("registers" in r for r in rows),
        "compiled": len(rows),
        "spilling": [f"{r['case']} {r['kernel']} {_variant_text(r)}" for r in rows if r["spills"]],
        "over_shared_memory": [
            f"{r['case']} {r['kernel']} {_variant_text(r)}" for r in rows if r.get("fits_shared") is False
        ],
        "seconds": round(time.perf_counter() - started, 1),
        "kernels": rows,
    }


def _case_rows(case: str, compiled: list, reports: dict, limit: int | None) -> list[dict]:
    """A row for each binary a case built (`compile_only`'s list); `reports`: ptxas's reports by
    binary hash, the builds' of earlier cases, which a binary read from the cache takes."""
    rows, built = [], set()
    for kernel_name, variant, kernel, seconds, report in compiled:
        if id(kernel) in built:  # launched again in the case (fp8 attention quantizes q and k)
            continue
        built.add(id(kernel))
        report = reports.setdefault(kernel.hash, report) if report else reports.get(kernel.hash, "")
        row = {"case": case, "kernel": kernel_name, **variant, "compile_s": round(seconds, 2)}
        row.update(ptxas_usage(report), shared_bytes=int(kernel.metadata.shared))
        row["tensor_cores"] = _tensor_core_instruction(kernel.asm.get("ptx", ""))
        row["float_ops"] = float_ops(kernel.asm.get("ptx", ""))
        if limit is not None:
            row["fits_shared"] = row["shared_bytes"] <= limit
        row["spills"] = row.get("spill_stores", 0) + row.get("spill_loads", 0) > 0
        rows.append(row)
    return rows


def _tensor_core_instruction(ptx: str) -> str | None:
    """Hopper's warpgroup MMA, the older warp-level MMA, or none (a dot lowered to FMAs)."""
    return "wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else None


FLOAT_OPS = ("fma", "mul", "add", "sub", "max", "ex2")


def float_ops(ptx: str) -> dict:
    """Static counts of the fp32 arithmetic instructions in `ptx`, by kind (fma.rn.f32 -> fma)."""
    found = re.findall(r"^\s*(?:@%p\d+\s+)?(" + "|".join(FLOAT_OPS) + r")(?:\.[a-z0-9]+)*\.f32\b", ptx, re.M)
    return {op: found.count(op) for op in FLOAT_OPS}


def _variant_text(row: dict) -> str:
    return " ".join(f"{k}={row[k]}" for k in VARIANT_KEYS if k in row)


def add_arguments(p: argparse.ArgumentParser) -> None:
    archs = ", ".join(map(str, NVIDIA_ARCHS))
    p.add_argument("--arch", type=int, default=90, choices=NVIDIA_ARCHS, metavar="ARCH",
                   help=f"compute capability x10 (default: 90, H100/H200), one of {archs}")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the dtype of the kernels' tensors (default: %(default)s)")  # fmt: skip
    p.add_argument("--only", nargs="+", default=[], help="case names of bench/kernels.py")


def main(args) -> dict:
    return run(args.arch, args.dtype, tuple(args.only))
