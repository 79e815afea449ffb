"""The two ceilings a floor is counted against (`bench/floor.py`): a device's matrix rate and
its copy bandwidth, an H200's as measured on the lent machines or this device's own."""

from __future__ import annotations

import time

import numpy as np
import torch

H200_MATMUL_TFLOPS = 790.0  # KINDS.md: bf16 8192^3 on random data, two machines, 2026-10-28 and 11-04
H200_COPY_GBPS = 4300.0  # KINDS.md: device-to-device copy, bytes read + written


def synchronize(device):
    """A function that waits for `device`'s queued work (nothing to wait for off CUDA). Its own:
    torch.cuda.synchronize() waits for the current device only, cuda:0 unless set, so the work of
    `--device cuda:1` was timed as it was queued."""
    dev = torch.device(device)
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def measure_ceilings(
    device,
    dtypes,
    repeats: int = 10,
    float8: bool = False,
    size: int | None = None,
    copy_mib: int | None = None,
) -> dict:
    """This device's matrix rate (one large product on random data, in the fastest of `dtypes`:
    the floor is a bound for any of them) and copy bandwidth (bytes read + written); with
    `float8`, also the rate of e4m3 products with row-wise scales (`reference.fp8_matmul`).

    `size`: the side of the square products, `copy_mib`: the copy's MiB (None: 8192 and 2 GiB on
    CUDA, 1024 and 256 MiB elsewhere, large enough to reach the rates; a bfloat16 product of 1024
    takes seconds on a CPU without native bf16)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = synchronize(device)
    n = size or (8192 if cuda else 1024)

    def median_seconds(fn):
        for _ in range(3):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    rates = {}
    for dtype in dict.fromkeys(dtypes):
        a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
        rates[str(dtype).removeprefix("torch.")] = 2 * n**3 / median_seconds(lambda a=a, b=b: a @ b) / 1e12
    copy_mib = copy_mib or ((2 << 10) if cuda else 256)
    src = torch.empty(copy_mib << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src))
    ceilings = {
        "matmul_tflop_per_s": max(rates.values()),
        "matmul_tflop_per_s_by_dtype": rates,
        "copy_gb_per_s": 2 * src.numel() / copy_s / 1e9,
        "source": f"measured: {n}^3 products, {src.numel() >> 20} MiB copy, medians of {repeats}",
    }
    if float8:
        from streamgen.kernels.reference import FP8_DTYPE, fp8_matmul

        a, b = (torch.randn(n, n, device=dev).to(FP8_DTYPE) for _ in range(2))
        sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
        out = torch.bfloat16 if cuda else torch.float32
        try:  # said, not raised: the other ceilings stand without it (the floor then has no FP8 rate)
            seconds = median_seconds(lambda: fp8_matmul(a, sa, b, sb, None, out))
            ceilings["matmul_tflop_per_s_float8"] = 2 * n**3 / seconds / 1e12
        except Exception as e:
            ceilings["float8_error"] = f"{type(e).__name__}: {e}"[:300]
    return ceilings
