"""The plot of `streamgen bench gpu`'s JSON (bench/gpu.py): frames/s of each variant against the
targets and the floor, chunk times, the kernel micro-benchmarks, and where a chunk's time goes."""

from __future__ import annotations

import numpy as np

SELF_FORCING_H100_FPS = 17  # the published figure this benchmark's target doubles


def plot(result: dict, path) -> None:
    """Frames/s of each variant against the targets and each variant's chunk times; below, the
    kernel micro-benchmarks: GB/s of the memory-bound kernels, TFLOP/s of attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = {k: v for k, v in result["variants"].items() if "fps" in v}
    kernel_cases = (result.get("kernels") or {}).get("kernels") or {}
    stages = (result.get("stages") or {}).get("stages") or {}
    rows = 1 + bool(kernel_cases) + bool(stages)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
    (fps_ax, chunks_ax) = axes[0]
    names = list(timed)
    y = np.arange(len(names))
    fps_ax.barh(y - 0.2, [timed[n]["fps_steady"] for n in names], height=0.4, label="steady (ring full)")
    clip = [timed[n].get("fps_clip") or 0.0 for n in names]
    fps_ax.barh(y + 0.2, clip, height=0.4, label=f"fresh {result.get('clip_frames', 81)}-frame clip")
    fps_ax.set_yticks(y, names)
    fps_ax.invert_yaxis()
    fps_ax.axvline(result.get("target_fps", 34), color="tab:green", ls="--", label="target")
    fps_ax.axvline(SELF_FORCING_H100_FPS, color="grey", ls=":", label="Self-Forcing, H100")
    if result.get("fps_ceiling"):
        fps_ax.axvline(result["fps_ceiling"], color="tab:red", ls="-", label="floor, steady (measured rates)")
    if result.get("clip_fps_ceiling"):
        fps_ax.axvline(result["clip_fps_ceiling"], color="tab:red", ls="--", label="floor, clip")
    fps_ax.set_xlabel("frames/s")
    fps_ax.set_title(
        f"{result['flavor']} {result['width']}x{result['height']}, {result['steps']} steps, {result['device']}"
    )
    fps_ax.legend(fontsize=8)
    for name in names:
        chunks_ax.plot(timed[name]["chunk_ms"], "o-", ms=3, label=name)
    chunks_ax.set_xlabel("chunk after the restart's first")
    chunks_ax.set_ylabel("ms per chunk")
    chunks_ax.legend(fontsize=7)
    if kernel_cases:
        _plot_kernels(axes[1], kernel_cases, (result["kernels"].get("copy") or {}).get("gb_per_s"))
    if stages:
        _plot_stages(axes[-1], stages, result.get("ceilings") or {})
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_kernels(axes, cases: dict, copy_gb_per_s) -> None:
    bandwidth_ax, attention_ax = axes
    variants = ("eager", "compile", "triton")
    for ax, attention, unit in ((bandwidth_ax, False, "GB/s"), (attention_ax, True, "TFLOP/s")):
        names = [n for n in cases if n.startswith("attention") == attention]
        for i, variant in enumerate(variants):
            values = []
            for n in names:
                timing = cases[n].get(variant) or {}
                value = timing.get("gflop_per_s" if attention else "gb_per_s", 0.0)
                values.append(value / 1000 if attention else value)
            ax.barh([y + i * 0.27 for y in range(len(names))], values, height=0.27, label=variant)
        ax.set_yticks([y + 0.27 for y in range(len(names))], names, fontsize=8)
        ax.set_xlabel(unit)
        ax.legend(fontsize=8)
    if copy_gb_per_s:
        bandwidth_ax.axvline(copy_gb_per_s, color="grey", ls="--")
    bandwidth_ax.set_title("memory-bound kernels (dashed: this device's copy rate)")
    attention_ax.set_title("attention")


def _plot_stages(axes, stages: dict, ceilings: dict) -> None:
    """Each stage of a steady chunk: measured time against its floor, and the matrix rate it achieved."""
    time_ax, rate_ax = axes
    names = list(stages)
    y = np.arange(len(names))
    time_ax.barh(y - 0.2, [stages[n]["ms_p50"] for n in names], height=0.4, label="measured (p50)")
    time_ax.barh(y + 0.2, [stages[n].get("floor_ms", 0.0) for n in names], height=0.4, label="floor")
    time_ax.set_yticks(y, names)
    for i, name in enumerate(names):  # from the profiled chunk: was the GPU kept busy?
        if stages[name].get("kernels") is not None:
            label = f" {stages[name]['kernels']} kernels, GPU busy {stages[name]['gpu_busy_share']:.0%}"
            time_ax.text(stages[name]["ms_p50"], i - 0.2, label, va="center", fontsize=7)
    time_ax.invert_yaxis()
    time_ax.set_xlabel("ms per steady chunk")
    time_ax.set_title("where a chunk's time goes (sdpa + fused kernels)")
    time_ax.legend(fontsize=8)
    counted = [n for n in names if "tflop_per_s" in stages[n]]
    rate_ax.barh(counted, [stages[n]["tflop_per_s"] for n in counted], color="tab:green")
    if ceilings.get("matmul_tflop_per_s"):
        rate_ax.axvline(ceilings["matmul_tflop_per_s"], color="grey", ls="--")
    rate_ax.invert_yaxis()
    rate_ax.set_xlabel("TFLOP/s achieved (dashed: this device's matrix rate)")
