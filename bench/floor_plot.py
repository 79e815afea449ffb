"""The plot of `streamgen bench floor`'s JSON (bench/floor.py): each result's steady chunk's floor,
stage by stage, against the time a chunk may take at the target frame rate."""

from __future__ import annotations

from streamgen.stream import CHUNK_STAGES


def plot(results: list[dict], path) -> None:
    """One bar per result: its steady chunk's floor stacked by stage, against the time a chunk
    may take at the target frame rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.6 * len(results)), layout="constrained")
    labels = [
        f"{r['model']} {r['width']}x{r['height']}, {r['steps']} steps, window {r['window_frames']}"
        + (", cache from last step" if r.get("cache_from") == "last_step" else "")
        + (", FP8 linears" if r.get("fp8_linears") else "")
        + (f", {r['attention']} attention" if r.get("attention", "sdpa") != "sdpa" else "")
        for r in results
    ]
    counted = [stage for stage in CHUNK_STAGES if stage != "to_host"]  # the copy is timed, not counted
    steady = [r["floor"]["steady_chunk"]["stages"] for r in results]
    left = [0.0] * len(results)
    for stage, color in zip(counted, ("tab:purple", "tab:blue", "tab:cyan", "tab:orange")):
        widths = [stages.get(stage, {}).get("floor_ms", 0.0) for stages in steady]
        ax.barh(labels, widths, left=left, color=color, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    for y, r in enumerate(results):
        budget_ms = r["work"]["steady_chunk"]["frames"] / r["target_fps"] * 1000
        ax.plot([budget_ms] * 2, [y - 0.4, y + 0.4], color="tab:red")
        ax.text(
            r["floor"]["steady_chunk"]["floor_ms"],
            y,
            f" {r['fps_ceiling']:.0f} FPS at best"
            + (
                f" ({r['clip_fps_ceiling']:.0f} over a fresh {r['floor']['clip']['frames']}-frame clip)"
                if r.get("clip_fps_ceiling")
                else ""
            ),
            va="center",
            fontsize=8,
        )
    ax.plot([], [], color="tab:red", label="a chunk's time at the target fps")
    rates = {(r["ceilings"]["matmul_tflop_per_s"], r["ceilings"]["copy_gb_per_s"]) for r in results}
    ax.set_xlabel(
        "floor of one steady chunk, ms (" + "; ".join(f"{m:g} TFLOP/s, {c:g} GB/s" for m, c in rates) + ")"
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 1.2 * max(ax.get_xlim()[1], *(r["floor"]["steady_chunk"]["floor_ms"] for r in results)))
    fig.legend(fontsize=8, loc="outside lower center", ncol=6)
    fig.savefig(path, dpi=90)
    plt.close(fig)
