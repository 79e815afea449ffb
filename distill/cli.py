"""`streamgen distill STAGE --config YAML [--resume]`: run one training stage.

Stages, in pipeline order: autoencoder, latents, teacher, ode, self_forcing,
chunk; and tiny_decoder (a fast decoder distilled from an autoencoder's). `--config` takes a YAML path or a name from distill/configs
(`debug` -> configs/<stage>-debug.yaml, `tiny-avatar` -> configs/<stage>-tiny-avatar.yaml).
Under torchrun every rank runs this same command (data parallel).
"""

from __future__ import annotations

import argparse
import os
import sys

from streamgen.cli import named_folder, positive_int

STAGES = ("autoencoder", "latents", "teacher", "ode", "self_forcing", "chunk", "tiny_decoder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGES, help="the stage to run")
    parser.add_argument("--config", required=True, help="YAML file, or a config name (debug, tiny-avatar)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in run.out"
    )
    parser.add_argument("--out", type=named_folder, help="override run.out")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set data.root=data/mine",
    )
    parser.add_argument("--steps", type=positive_int, help="override run.steps")


def _say_where_to_go_on(args: argparse.Namespace, out: str, is_main: bool, first_checkpoint: int) -> None:
    """After a Ctrl-C: the checkpoint a --resume goes on from (all it said was "interrupted"), or
    that there is none yet, so the steps taken are lost (a tiny-avatar stage checkpoints every 250
    steps, minutes apart: a stop before the first said nothing of it)."""
    from streamgen.checkpoint import checkpoint_step, latest_checkpoint

    if not is_main:
        return
    latest = latest_checkpoint(out)
    if latest is None:
        print(f"{args.stage}: no checkpoint was saved yet in {out} (the first comes after step "
              f"{first_checkpoint}; --set run.checkpoint_every=N saves more often): the steps taken are not "
              "kept, and the same command starts the run again from step 0", file=sys.stderr)  # fmt: skip
        return
    again = "the same command" + ("" if args.resume else " with --resume")
    print(f"{args.stage}: the newest checkpoint is {latest} (step {checkpoint_step(latest)}); {again} goes on "
          "from it", file=sys.stderr)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from streamgen.cli import HEAVY_IMPORTS, import_with_ctrl_c_held

    import_with_ctrl_c_held(HEAVY_IMPORTS)  # (a Ctrl-C inside torch's import aborted the process)
    from distill.build import ModelSourceError
    from distill.config import ConfigError, find_config, load_config
    from distill.data import DataMissing
    from distill.trainer import Trainer, TrainingError
    from streamgen.checkpoint import CheckpointError
    from streamgen.cli import UserError, restore_handlers, stop_behind, terminate_as_exit
    from streamgen.data.shards import DataError

    if args.stage == "latents":  # (they were ignored without a word: it trains nothing, into no run.out)
        given = [flag for flag, value in (("--steps", args.steps), ("--resume", args.resume), ("--out", args.out))
                 if value not in (None, False)]  # fmt: skip
        if given:
            raise UserError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the training stages: latents "
                "encodes data.root into DATA/latents/NAME (data.latents), and run again keeps what it has encoded"
            )
    try:
        cfg = load_config(find_config(args.config, args.stage), args.stage, args.sets)
        if args.out is not None:  # (`--out=~/x`: no shell expands `~` after `=`)
            cfg.run.out = os.path.expanduser(args.out)
        if args.steps is not None:
            cfg.run.steps = args.steps
        if args.stage == "latents":
            from distill.distributed import launch_rank
            from distill.latents import build_latents

            # one encoding of the dataset: under torchrun the other ranks did the same work into
            # the same files (the folder's lock now refuses them); it needs no gradients to share
            if launch_rank() == 0:
                build_latents(cfg)
            return 0
        trainer = Trainer(cfg, resume=args.resume)
        # SIGTERM (`timeout`, `kill`, a job scheduler) ends a run of one process as a Ctrl-C does, saying
        # where a --resume goes on from (Python's default ended it without a word). Under torchrun
        # the ranks keep the default: the launcher ends them, and one inside a collective would
        # not see a handler's exit until the collective returned
        one_process = os.environ.get("WORLD_SIZE", "1") == "1"
        terminated_before = terminate_as_exit() if one_process else None
        try:
            last = trainer.run()
        except BaseException as e:
            # (a stop that came as the first plot imported matplotlib failed that import: an ImportError)
            stop = e if isinstance(e, (KeyboardInterrupt, SystemExit)) else stop_behind(e)
            if stop is None:
                raise
            first_checkpoint = min(cfg.run.checkpoint_every, cfg.run.steps)
            _say_where_to_go_on(args, cfg.run.out, trainer.is_main, first_checkpoint)
            if stop is e:
                raise
            raise stop from None
        finally:
            restore_handlers(terminated_before)
    # (DataError: a shard found corrupted during training, where the stages read clips as they go)
    except (ConfigError, DataMissing, DataError, CheckpointError, TrainingError, ModelSourceError) as e:
        raise UserError(str(e)) from None
    except RuntimeError as e:
        from distill.distributed import launch_rank
        from streamgen.parallel.torchrun import another_rank_failed, stopped_by_another_rank

        if os.environ.get("WORLD_SIZE", "1") == "1" or not another_rank_failed(e):
            raise
        # marked for the launcher (`python -m streamgen.parallel.torchrun`), as generate's is: torchrun's
        # SIGTERM may reach this rank as it ends (exit code 143, not 3), and it was then named as the failed one
        return stopped_by_another_rank("distill", launch_rank())
    if not trainer.is_main:  # (under torchrun every rank printed it, the lines run together)
        return 0
    steps = f"{cfg.run.steps} step{'s' * (cfg.run.steps != 1)}"
    if not last:  # (a resume of a run that had taken them all: no step ran, no loss to show)
        print(f"{args.stage}: {cfg.run.out} had finished its {steps} already: its model was exported again "
              "(--steps N for more)")  # fmt: skip
        return 0
    shown = "  ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("loss"))
    print(f"{args.stage}: finished {steps} in {cfg.run.out}  {shown}")
    return 0
