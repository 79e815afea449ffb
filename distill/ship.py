"""Copy a trained model directory into streamgen/assets/models/NAME (DiT weights as float16).

    python -m distill.ship runs/tiny-avatar/self_forcing/model tiny-avatar

Kept apart from training on purpose: a shipped name (above all `tiny-avatar`,
the default of every command) changes what every command runs, so it is
written only when someone decides the trained model is worth shipping.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamgen.files import home_expanded


def ship(source: str, name: str, assets: Path | None = None) -> Path:
    """The model directory `source` as NAME, its autoencoder as it loads (the Wan VAE, or a tiny
    decoder beside it, too: shipping TinyCausalVAE alone dropped the one and failed on the other).
    The source read in one load, all of one export (its model.json, DiT weights and autoencoder
    were read each on its own: a re-export meanwhile shipped one's model.json with the other's
    weights)."""
    import torch

    from distill.build import export_model, run_past_export
    from distill.config import model_name_problem
    from streamgen.models import MODEL_META_DEFAULTS, MODELS_DIR, load_model_dir, resolve_model_dir

    # ('', '../evaluators', 'a/b', an absolute path: written beside or outside the shipped models)
    problem = model_name_problem(name)
    if problem:
        raise ValueError(problem)
    src = resolve_model_dir(source)
    if src is None:
        try:
            hint = _run_hint(source)
        except OSError:  # (a name too long for the file system: was "cannot write the model")
            hint = ""
        raise FileNotFoundError(f"{source} is not a model directory (no model.json){hint}")
    model = load_model_dir(src, dtype=torch.float32)
    meta = model.meta
    then = "shipping the model of step {step} (to ship the newest, finish the run with --resume and ship again)"
    if behind := run_past_export(src, meta, then):
        print(f"warning: {behind}", file=sys.stderr)
    run = {key: meta.get(key, default) for key, default in MODEL_META_DEFAULTS.items()}
    extra = {k: v for k, v in meta.items() if k not in ("name", "config", *run)}
    dst = (assets or MODELS_DIR) / name
    export_model(
        model.dit, model.vae, dst, name, run["height"], run["width"], run["shift"],
        run["steps"], {**extra, "trained_from": str(source)}, compact=True,
    )  # fmt: skip
    return dst


def _run_hint(source: str) -> str:
    """What a training run's folder at `source` says of its model: a run's folder given for its
    `model/`, or a run that has exported none yet (killed, or still training: its export is
    written when it finishes). "" where it is no run's."""
    from streamgen.checkpoint import checkpoint_header, latest_checkpoint
    from streamgen.model_names import is_diffusers_wan

    given = home_expanded(source)
    if (given / "model" / "model.json").exists():
        return f"; the model of the run in {given} is {given / 'model'}"
    if is_diffusers_wan(given):  # (what ships is a model distilled from it)
        return (f"; it is a diffusers Wan2.1 checkpoint: distill a model from it first (a distill config's "
                f"model.init: wan:{source}, docs/distill.md) and ship that")  # fmt: skip
    run = given.parent if given.name == "model" else given
    newest = latest_checkpoint(run)
    if newest is None:
        return ""
    try:
        stage = checkpoint_header(newest).get("stage", "STAGE")
    except Exception:  # (a damaged checkpoint: the resume sets it aside)
        stage = "STAGE"
    if (run / "model").is_dir():  # (the autoencoder's or a tiny decoder's export: no DiT)
        return (
            f"; {run / 'model'} is the {stage} stage's export, not a model to ship: ship the model "
            "of a teacher, ode, self_forcing or chunk run"
        )
    return (
        f"; {run} holds a {stage} run that has exported no model yet (newest checkpoint {newest.name}): "
        f"a run exports its model when it finishes, so finish it with `streamgen distill {stage} "
        f"--config ... --out {run} --resume`"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.ship", description=__doc__.splitlines()[0])
    p.add_argument("source", help="trained model directory (a stage's OUT/model)")
    p.add_argument("name", help="model name, e.g. tiny-avatar")
    args = p.parse_args(argv)
    try:
        dst = ship(args.source, args.name)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    except OSError as e:  # (a full disk, an install it may not write into: a traceback)
        where = f" ({e.filename})" if e.filename else ""
        p.exit(2, f"{p.prog}: error: cannot write the model {args.name}: {e.strerror or e}{where}\n")
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())  # (a Wan model's wan_vae/ too)
    print(f"shipped {args.source} as {args.name}: {dst} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
