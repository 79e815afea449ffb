"""`streamgen eval` (score a model on the avatar world) and `streamgen eval train-evaluators`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streamgen.cli import (
    FRAME_SIZE_RULE,
    add_dtype_option,
    frame_size,
    named_folder,
    positive_int,
    seed_number,
)
from streamgen.data import SPLITS
from streamgen.files import home_expanded

# what --model takes besides a model (streamgen.eval.report's GROUND_TRUTH and ROUNDTRIP): the
# README's and docs/eval.md's rows of the renderer and the autoencoder's ceiling
MODEL_FORMS = ("'ground-truth' for the renderer itself, 'roundtrip:MODEL' for the clips through MODEL's autoencoder "
               "(MODEL a model or an autoencoder directory)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", default="run", choices=["run", "train-evaluators"],
        help="run (default): evaluate --model; train-evaluators: train the SyncNet and identity encoder",
    )  # fmt: skip
    parser.add_argument("--model", help=f"model name or path; {MODEL_FORMS}")
    parser.add_argument(
        "--split", default="test", choices=SPLITS, help="the split to evaluate on (default: %(default)s)"
    )
    parser.add_argument("--out", type=named_folder, help="output folder")
    parser.add_argument("--clips", type=int, help="number of clips (eval default 8, training default 400)")
    parser.add_argument("--size", type=frame_size, default=64, help=f"frame size for generation, {FRAME_SIZE_RULE} (default: 64)")
    parser.add_argument(
        "--minutes", type=float, help="also run one long stream of this many minutes for drift"
    )
    parser.add_argument(
        "--evaluators", type=home_expanded, help="evaluator checkpoint folder (default: bundled)"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--steps", type=positive_int, help="denoising steps for the model (default: the model's)")
    add_dtype_option(parser, "--decode-dtype", "a student's decoder (auto: bf16 on AMX, AVX512-BF16)")
    add_dtype_option(
        parser,
        "--encode-dtype",
        "a student's encoder of the reference image (auto: bfloat16 on CPUs with AMX or AVX512-BF16)",
    )
    add_dtype_option(
        parser, "--dtype", "a student's DiT (auto: bfloat16 from 224x224 up on CPUs with AMX, else float32)"
    )
    parser.add_argument(
        "--cache-from",
        choices=["reencode", "last_step"],
        help="a student's KV cache: each chunk from a clean re-encode or from its last step (default: the model's)",
    )
    parser.add_argument("--json", action="store_true", help="print report.json's object as the last line")
    training = parser.add_argument_group("train-evaluators")
    training.add_argument(
        "--data", type=home_expanded, help="train on this dataset's train split (default: make clips)"
    )
    training.add_argument("--sync-steps", type=positive_int, help="default 4000")
    training.add_argument("--identity-steps", type=positive_int, help="default 1500")
    training.add_argument("--seed", type=seed_number, help="default 0")
    training.add_argument("--workers", type=positive_int, help="default 2")


MAX_MINUTES = 60.0
# each action's own options, with their value when not given: the other action took them and
# ignored them without a word (eval --seed 3 scored its fixed clips, train-evaluators --device
# cuda trained on the CPU, --split val on the train split)
EVAL_OPTIONS = [("--model", "model", None), ("--split", "split", "test"), ("--size", "size", 64),
                ("--minutes", "minutes", None), ("--evaluators", "evaluators", None),
                ("--device", "device", "cpu"), ("--steps", "steps", None), ("--decode-dtype", "decode_dtype", "auto"),
                ("--encode-dtype", "encode_dtype", "auto"), ("--dtype", "dtype", "auto"),
                ("--cache-from", "cache_from", None), ("--json", "json", False)]  # fmt: skip
TRAINING_OPTIONS = [("--data", "data", None), ("--sync-steps", "sync_steps", None),
                    ("--identity-steps", "identity_steps", None), ("--seed", "seed", None),
                    ("--workers", "workers", None)]  # fmt: skip

# a model's session's: the renderer's clips and an autoencoder's round trip run none (they were
# ignored: roundtrip --decode-dtype bfloat16 scored the float32 decoder)
SESSION_DESTS = ("device", "steps", "decode_dtype", "encode_dtype", "dtype", "cache_from")
SESSION_OPTIONS = [option for option in EVAL_OPTIONS if option[1] in SESSION_DESTS]


def _given(options, args: argparse.Namespace) -> str | None:
    """The flags of `options` given on the command line, said as "--a is" / "--a, --b are"."""
    given = [flag for flag, dest, unset in options if getattr(args, dest) != unset]
    return f"{', '.join(given)} {'is' if len(given) == 1 else 'are'}" if given else None


def run(args: argparse.Namespace) -> int:
    from streamgen.cli import (
        HEAVY_IMPORTS,
        UserError,
        check_device,
        check_session_options,
        import_with_ctrl_c_held,
        output_folder,
    )

    if args.out is None:
        raise UserError("--out is required")
    output_folder(args.out, make=False)  # a file in its way: now; the folder made once all is checked
    if args.clips is not None and args.clips < 1:
        raise UserError("--clips must be at least 1")
    if args.action == "train-evaluators":
        if _given(EVAL_OPTIONS, args):  # (before --minutes' own checks: its value was said wrong)
            raise UserError(
                f"{_given(EVAL_OPTIONS, args)} for eval, not train-evaluators (it trains on the CPU, on "
                "the train split's clips at 64x64)"
            )
        import_with_ctrl_c_held(HEAVY_IMPORTS)  # (a Ctrl-C inside torch's import aborted the process)
        return _train(args)
    if args.minutes is not None and not args.minutes * 60 * 25 >= 2:  # (nan too)
        raise UserError("--minutes must give a stream of at least two frames (0.08 s: 0.0014 minutes)")
    if args.minutes is not None and not args.minutes <= MAX_MINUTES:  # (inf failed after scoring every clip)
        raise UserError(f"--minutes is at most {MAX_MINUTES:g}: the drift stream is one stream that long")
    if _given(TRAINING_OPTIONS, args):  # (--data: the clips came from the world, made on the fly)
        raise UserError(
            f"{_given(TRAINING_OPTIONS, args)} for train-evaluators; eval makes its clips from the world "
            "(--split), with seeds of its own"
        )
    if not args.model:
        raise UserError(f"--model is required: a model name or path; {MODEL_FORMS}")
    # (after the checks that need no torch: they answered at once, not after its ~2 s import)
    import_with_ctrl_c_held(HEAVY_IMPORTS)  # (a Ctrl-C inside torch's import aborted the process)
    from .sessions import GROUND_TRUTH, ROUNDTRIP, stream_memory_problem

    if (args.model == GROUND_TRUTH or args.model.startswith(ROUNDTRIP)) and _given(SESSION_OPTIONS, args):
        raise UserError(
            f"{_given(SESSION_OPTIONS, args)} for a model's session, which {args.model} does not run"
        )
    # (not given for those: refused above; a teacher's --cache-from and dtypes were said once it had loaded)
    check_session_options(args.model, args.steps, args.cache_from, dtype=args.dtype, decode_dtype=args.decode_dtype,
                          encode_dtype=args.encode_dtype)  # fmt: skip
    check_device(args.device)
    if args.minutes is not None and (problem := stream_memory_problem(args.model, args.minutes, args.size)):
        raise UserError(problem)
    return _evaluate(args)  # (which makes --out once its model and evaluators are loaded)


def _train(args) -> int:
    import torch

    from streamgen.checkpoint import CheckpointError
    from streamgen.cli import UserError, output_folder, restore_handlers, terminate_as_exit
    from streamgen.data.shards import DataError

    from .train import TrainingResumeError, check_training_data, train_evaluators

    torch.set_num_threads(max(1, torch.get_num_threads()))
    # SIGTERM (`timeout`, `kill`, a job scheduler) ends it as Ctrl-C does (exit 143): Python's default
    # ended this process alone, its clip workers left to finish their clips and their temp folder left
    terminated_before = terminate_as_exit()
    try:
        check_training_data(args.data, args.clips or 400)
        output_folder(args.out)  # (once --data is checked: a refused run left it made, and empty)
        info = train_evaluators(
            args.out,
            args.clips or 400,
            args.sync_steps or 4000,
            args.identity_steps or 1500,
            args.seed or 0,
            args.workers or 2,
            args.data,
        )
    except (DataError, TrainingResumeError, CheckpointError) as e:
        raise UserError(str(e)) from None
    finally:
        restore_handlers(terminated_before)
    written = f"{args.out / 'syncnet.safetensors'} and {args.out / 'identity.safetensors'}"
    if info.get("already_trained"):  # (the same command run again: nothing to train)
        print(f"{written} are already trained with these settings: nothing to do (delete them to retrain)")
        return 0
    # (it printed the dict: "({'clips': 400, 'seed': 0, 'seconds': 612.3})")
    resumed = f", resumed from step {info['resumed_from']}" if "resumed_from" in info else ""
    print(f"wrote {written} ({info['clips']} clips, seed {info['seed']}, in {info['seconds']:g} s{resumed})")
    return 0


def _evaluate(args) -> int:
    from tqdm import tqdm

    from streamgen.cli import MACHINE_ERRNOS, UserError, is_stop, restore_handlers, terminate_as_exit

    from .evaluators import EvaluatorError
    from .partial import MeasuredFolderError
    from .report import OutFolderError, OutputInUse, evaluate
    from .sessions import ModelLoadError

    clips = args.clips or 8
    bars = []

    def progress(n: int) -> None:  # the bar from the first call on: an error in the set-up is one line
        if not bars:
            bars.append(tqdm(total=clips, desc=f"eval {args.model}", unit="clip"))
        bars[0].update(n)

    def stream_progress(n: int, of_frames: int) -> None:  # (the --minutes stream: up to an hour's frames)
        if len(bars) < 2:
            bars[0].close()  # (the clips' bar, done: the stream's shows below it)
            bars.append(tqdm(total=of_frames, desc="drift stream", unit="frame"))
        bars[1].update(n)

    # SIGTERM (`timeout`, `kill`, a job scheduler) ends it as Ctrl-C does (exit 143): Python's default
    # ended it where it was, the drift stream's scores since the last minute kept lost, and a report
    # being written left as some of its files with no report.json
    terminated_before = terminate_as_exit()
    try:
        report = evaluate(
            args.model, args.out, args.split, clips, args.size, args.minutes,
            args.evaluators, args.device, args.steps, progress=progress,
            decode_dtype=args.decode_dtype, cache_from=args.cache_from, dtype=args.dtype,
            encode_dtype=args.encode_dtype, stream_progress=stream_progress,
            note=lambda line: tqdm.write(line, file=sys.stderr),  # (on a line of its own, the bars kept)
        )  # fmt: skip
    except (EvaluatorError, ModelLoadError, OutputInUse, OutFolderError, MeasuredFolderError) as e:
        raise UserError(str(e)) from None
    except OSError as e:
        if not bars or e.errno not in MACHINE_ERRNOS:
            raise
        # (a full disk under OUT/partial was said of a temp file, ".clip-00002.npz.x1f3.tmp", without a
        # word of the clips scored before it)
        kept, said = _what_is_kept(args.out), f"cannot write into {args.out}: {e.strerror or e}"
        raise UserError(f"{said} ({kept})" if kept else said) from None
    except BaseException as e:
        if bars and is_stop(e):  # (the work had begun: OUT/partial is this evaluation's)
            for bar in bars:  # (before the line: closed after, a bar was drawn again under it)
                bar.close()
            _say_what_is_kept(args.out)
        raise
    finally:
        restore_handlers(terminated_before)
        for bar in bars:
            bar.close()
    keys = ["sync_c", "sync_d", "av_offset_frames", "csim", "fid", "fvd", "drift_slope", "black_frames"]
    summary = "  ".join(f"{k}={_summary_value(k, report[k])}" for k in keys)
    # (no bar: the work never began, report.json was already this evaluation's)
    print(f"{'wrote' if bars else 'already finished:'} {args.out / 'report.json'}: {summary}")
    if args.json:
        print(json.dumps({k: v for k, v in report.items()}))
    return 0


def _summary_value(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "none (no sync)" if value is None and key == "av_offset_frames" else str(value)


def _say_what_is_kept(out: Path) -> None:
    """What a stopped evaluation keeps for the same command to go on from ("interrupted" alone left
    its user to find out whether a run of an hour's clips was lost)."""
    kept = _what_is_kept(out)
    if kept:
        try:  # (after SIGHUP its terminal may be gone: the stop is the thing to end with)
            print(f"streamgen eval: stopped: {kept}", file=sys.stderr)
        except OSError:
            pass


def _what_is_kept(out: Path) -> str | None:
    """What OUT/partial keeps of an evaluation that did not finish, for the same command to go on from."""
    from streamgen.data.shards import clip_count

    from .partial import FOLDER

    folder = out / FOLDER
    clips = len(list(folder.glob("clip-*.npz")))
    stream = any(folder.glob("stream-*.npz"))
    kept = [clip_count(clips) + " scored"] * bool(clips) + ["the drift stream's scores so far"] * stream
    if not kept:
        return None
    return f"{' and '.join(kept)} kept in {folder}: run the same command again to go on from them"
