"""What a running job shows: a progress bar with loss and rate, TensorBoard
scalars, `scalars.jsonl` (one line per logged step) and loss-curve PNGs.

Only rank 0 writes. On resume the log is cut back to the resumed step, so the
curves of a resumed run are the curves of one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from streamgen.files import write_atomically, write_text_atomically


class Monitor:
    def __init__(self, out, total_steps: int, start_step: int, enabled: bool, progress: bool, desc: str):
        self.out = Path(out)
        self.enabled = enabled
        self.log_path = self.out / "scalars.jsonl"
        self.tb = None
        self.bar = None
        self._last = (time.perf_counter(), start_step)
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # (from step 0 too: a fresh start where a run was killed before its first checkpoint
            # showed that run's steps beside its own, while scalars.jsonl was cut)
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_step)
        except Exception:  # TensorBoard missing or broken: the JSON log and PNGs still work
            self.tb = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        if not self.log_path.exists():
            return
        kept = [json.dumps(r) for r in _records(self.log_path) if r["step"] < start_step]
        # (not in place: a kill mid-write lost the whole log of the run being resumed)
        write_text_atomically(self.log_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        t0, s0 = self._last
        rate = (step + 1 - s0) / max(now - t0, 1e-9)
        self._last = (now, step + 1)
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}, "steps_per_s": rate}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in scalars.items() if k.startswith("loss")}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def plot(self) -> Path | None:
        """loss_curves.png: every logged loss against the step."""
        if not self.enabled or not self.log_path.exists():
            return None
        records = _records(self.log_path)
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted({k for r in records for k in r if k.startswith("loss")})
        fig, axes = plt.subplots(len(keys) or 1, 1, figsize=(7, 2.4 * max(len(keys), 1)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            pts = [(r["step"], r[key]) for r in records if key in r]
            # (a marker where the points are few: a line through one point draws nothing)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, marker="." if len(pts) < 20 else None)
            ax.set_ylabel(key)
            if all(p[1] > 0 for p in pts):
                ax.set_yscale("log")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = self.out / "loss_curves.png"
        try:
            write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
        finally:
            plt.close(fig)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _records(path: Path) -> list[dict]:
    """The lines of scalars.jsonl, without one a kill cut short (the last, written as it died)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
