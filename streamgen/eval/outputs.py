"""What `streamgen eval` writes into --out from a report: drift.png, sync.png, samples.png, report.md,
and report.json last (its presence says the run finished)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from streamgen.files import write_text_atomically


def write_outputs(out: Path, report: dict, mean_curve, stream, samples, sync_curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from streamgen.data.media import contact_sheet, save_png, upscale

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # an old report must not vouch for this run
    written = []
    try:
        fig, axes = plt.subplots(1, 2 if stream else 1, figsize=(10 if stream else 5, 3.2), squeeze=False)
        series = stream["csim"] if stream else mean_curve
        t = np.arange(len(series)) / 25
        axes[0, 0].plot(t, series, lw=0.8)
        axes[0, 0].set(
            xlabel="seconds",
            ylabel="CSIM",
            title=f"identity vs time (slope {report['drift_slope']:+.3f}/min)",
        )
        if stream:
            for k, name in enumerate("RGB"):
                axes[0, 1].plot(t, stream["colour"][:, k], color=name.lower(), lw=0.8, label=name)
            axes[0, 1].set(xlabel="seconds", ylabel="mean level", title="colour vs time")
            axes[0, 1].legend()
        fig.tight_layout()
        fig.savefig(out / "drift.png", dpi=90)
        plt.close(fig)
        written.append(out / "drift.png")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for curve in sync_curves[:8]:
            ax.plot(range(-15, 16), curve, lw=0.8)
        ax.set(xlabel="audio offset (frames)", ylabel="mean A/V distance", title="sync curves")
        fig.tight_layout()
        fig.savefig(out / "sync.png", dpi=90)
        plt.close(fig)
        written.append(out / "sync.png")
        rows = []
        for real, generated in samples:
            rows += [real, generated]
        factor = max(1, 96 // samples[0][0].shape[1])
        save_png(out / "samples.png", contact_sheet([upscale(r, factor) for r in rows]))
        written.append(out / "samples.png")
        (out / "report.md").write_text(markdown(report))
        written.append(out / "report.md")
        write_text_atomically(out / "report.json", json.dumps(report, indent=1))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise


def markdown(r: dict) -> str:
    def fmt(v, key: str) -> str:  # (four decimals of every float said seconds as "11.0000", a slope of 2e-5 "0.0000")
        if not isinstance(v, float):
            return ("no sync" if key == "av_offset_frames" else "n/a") if v is None else str(v)
        return f"{v:.1f}" if key.endswith("seconds") else f"{v:.4g}"

    keys = ["sync_c", "sync_d", "av_offset_frames", "csim", "fid", "fvd", "drift_slope", "colour_drift_slope",
            "black_frames", "frozen_frames", "flicker_frames", "clips", "seconds", "wall_seconds"]  # fmt: skip
    lines = [f"# Evaluation of `{r['model']}` on the {r['split']} split", "",
             f"{r['clips']} clip{'s' * (r['clips'] != 1)} at {r['size']}x{r['size']}, drift from {r['drift_source']}.", "",
             "| metric | value |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {fmt(r[k], k)} |" for k in keys]
    lines += ["", "Sync-C higher is better, Sync-D lower; offset > 0 means the audio is late.",
              "", "![drift](drift.png)", "", "![sync](sync.png)", "",
              "Samples (odd rows ground truth, even rows the model):", "", "![samples](samples.png)", ""]  # fmt: skip
    return "\n".join(lines)
