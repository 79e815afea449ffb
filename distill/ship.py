"""Copy a trained model directory into streamgen/assets/models/NAME (DiT weights as float16).

    python -m distill.ship runs/tiny-avatar/self_forcing/model tiny-avatar

Kept apart from training on purpose: a shipped name (above all `tiny-avatar`,
the default of every command) changes what every command runs, so it is
written only when someone decides the trained model is worth shipping.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ship(source: str, name: str, assets: Path | None = None) -> Path:
    from distill.build import export_model, load_dit
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.models import MODELS_DIR, resolve_model_dir

    src = resolve_model_dir(source)
    if src is None:
        raise FileNotFoundError(f"{source} is not a model directory")
    meta = json.loads((src / "model.json").read_text())
    extra = {
        k: v for k, v in meta.items() if k not in ("name", "config", "height", "width", "shift", "steps")
    }
    dst = (assets or MODELS_DIR) / name
    export_model(
        load_dit(str(src)), TinyCausalVAE.load(src), dst, name, meta["height"], meta["width"],
        meta["shift"], meta["steps"], {**extra, "trained_from": str(source)}, compact=True,
    )  # fmt: skip
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="trained model directory (a stage's OUT/model)")
    p.add_argument("name", help="model name, e.g. tiny-avatar")
    args = p.parse_args(argv)
    dst = ship(args.source, args.name)
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"shipped {args.source} as {args.name}: {dst} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
