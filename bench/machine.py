"""What machine a CPU benchmark ran on, recorded in its JSON.

The CPU figures depend on the processor more than on anything else: the shipped model ran at
147 frames/s (128x128) on the 2-core machine of 2026-12-02, whose bf16 products ran on AMX
tiles, and at 104 on the 2-core AMD EPYC of 2026-12-05 (AVX512-BF16, no AMX), and the gain of
each default (threads per stage, bf16 decoding, a bf16 DiT) differs between them. So a result
says which processor it came from.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The processor's name as the kernel reports it ("model name" in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> dict:
    """The CPU a benchmark ran on: its name, its cores (all, and those this process may use), the
    bfloat16 units torch finds (AMX tiles, AVX512-BF16) and torch's version."""
    import torch

    from streamgen.cli import usable_cpus
    from streamgen.cpu_threads import cpu_has_amx, cpu_has_avx512_bf16

    return {
        "model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cpus(),
        "amx": cpu_has_amx(),
        "avx512_bf16": cpu_has_avx512_bf16(),
        "torch": torch.__version__,
    }


def model_settings(model) -> dict:
    """What a loaded model's sessions run with, wherever it was set: an option, or the
    environment a shell exported for every model this process loads (STREAMGEN_ATTENTION,
    STREAMGEN_DTYPE, STREAMGEN_FP8, STREAMGEN_CACHE_FROM, STREAMGEN_COMPILE, streamgen/models.py;
    STREAMGEN_KERNELS=reference). An FP8 DiT or another attention backend changes every figure,
    so a result names the settings it was measured with, and the STREAMGEN_ variables set."""
    from streamgen.model.float8 import float8_layers

    return {
        "attention": model.cfg.attn_backend,
        "fp8_linears": float8_layers(model.dit),
        "cache_from": model.meta.get("cache_from", "reencode"),
        "compile_backend": model.compile_backend,
        "environment": streamgen_environment(),
    }


def streamgen_environment() -> dict:
    """The STREAMGEN_ variables set here: the settings of every model this process and its children
    (a served model) load without options of their own (attention, dtype, FP8, cache, compile)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("STREAMGEN_")}
