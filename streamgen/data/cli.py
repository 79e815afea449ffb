"""`streamgen data make` and `streamgen data preview`."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

from streamgen.cli import FRAME_SIZE_RULE, frame_size, named_folder, positive_int, seed_number, usable_cpus
from streamgen.files import home_expanded

from . import SPLITS


def clip_seconds(text: str) -> float:
    """argparse type of a clip's length: long enough for one frame (1/25 s)."""
    from .motion import FPS

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    if round(value * FPS) < 1:
        raise argparse.ArgumentTypeError(f"{text} s is shorter than one frame (1/{FPS} s)")
    from .shards import too_long_for_an_array

    if too_long_for_an_array(value):  # (numpy's "Maximum allowed dimension exceeded": a traceback)
        raise argparse.ArgumentTypeError(f"{text} s is too long: no array could hold a clip's sound")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    make = sub.add_parser("make", help="generate a sharded dataset of talking-head clips")
    make.add_argument("--out", type=named_folder, required=True,
                      help="output folder: a new one, or one a make of the same settings left (an unfinished "
                      "make goes on from its shards, a finished one has nothing to do; another dataset is refused)")  # fmt: skip
    make.add_argument("--clips", type=positive_int, required=True, help="number of clips over all splits")
    make.add_argument("--seed", type=seed_number, default=0, help="the world's seed (default: %(default)s)")
    make.add_argument(
        "--size",
        type=frame_size,
        default=64,
        help=f"frame height and width in pixels, {FRAME_SIZE_RULE} (default: 64)",
    )
    make.add_argument(
        "--seconds", type=clip_seconds, default=4.0, help="clip length in seconds (default: %(default)g)"
    )
    make.add_argument(
        "--identities", type=positive_int, default=500, help="size of the identity pool (default: 500)"
    )
    make.add_argument("--shard-size", type=positive_int, default=32, help="clips per shard (default: 32)")
    make.add_argument(
        "--workers",
        type=positive_int,
        default=min(2, usable_cpus()),
        help="processes making shards (default: 2, or the CPUs usable if fewer)",
    )
    preview = sub.add_parser("preview", help="write a contact sheet PNG and an MP4 with sound")
    preview.add_argument("--data", type=home_expanded, help="a dataset folder; without it, clips are made on the fly")
    preview.add_argument("--split", choices=SPLITS, default="train", help="split to preview (default: train)")
    preview.add_argument(
        "--clips", type=positive_int, default=6, help="clips to show (default 6; fewer if --data has fewer)"
    )
    # (no defaults here: given with --data, whose clips are the dataset's, they were ignored without a word)
    preview.add_argument("--seed", type=seed_number, help="with no --data: the world's seed (default 0)")
    preview.add_argument("--size", type=frame_size, help=f"with no --data: frame size, {FRAME_SIZE_RULE} (default 128)")
    preview.add_argument(
        "--out",
        type=named_folder,
        default=Path("preview"),
        help="output folder (default: preview; an earlier preview in it is replaced)",
    )
    for action in (make, preview):  # (what main's error lines name, as argparse's do)
        action.set_defaults(_prog=action.prog)


def run(args: argparse.Namespace) -> int:
    from streamgen.cli import UserError, output_folder, restore_handlers, terminate_as_exit

    from .shards import DataError
    from .speech import SpeechError

    try:
        if args.data_command == "make":
            return _make(args)
        output_folder(args.out, make=False)  # a file in its way: before the clips are made
        given = [flag for flag, value in (("--seed", args.seed), ("--size", args.size)) if value is not None]
        if args.data is not None and given:
            raise UserError(
                f"{' and '.join(given)} make{'s' * (len(given) == 1)} clips on the fly: not with --data, whose clips are made "
                "(their size and seed are its manifest's)"
            )
        args.seed = 0 if args.seed is None else args.seed
        args.size = 128 if args.size is None else args.size
        # SIGTERM ends it as Ctrl-C does: Python's default left the folder it made and the video's
        # temp file in it
        terminated_before = terminate_as_exit()
        try:
            return _preview(args)
        finally:
            restore_handlers(terminated_before)
    except (DataError, SpeechError) as e:
        raise UserError(str(e)) from None


def _make(args) -> int:
    from tqdm import tqdm

    from streamgen.cli import is_stop, output_folder, restore_handlers, terminate_as_exit, usable_cpus

    from .shards import MadeAlready, clip_count, make_dataset, partly_made, planned_shards

    output_folder(args.out, make=False)  # (it makes the folder itself, and removes it on failure)
    resumed = []  # (an unfinished make's clips still there as it wrote them, which this one goes on from)
    # (make_dataset starts no more workers than shards to make)
    planned = sum(planned_shards(args.clips, args.shard_size).values())
    workers = min(args.workers, planned)
    start = time.perf_counter()
    # SIGTERM (`timeout`, `kill`, a job scheduler) ends it as Ctrl-C does (exit 143): Python's default
    # ended this process alone, its pool's workers left to finish their shards unrecorded and print
    # a traceback each over the shell's prompt
    terminated_before = terminate_as_exit()
    bars = []  # (opened as make_dataset begins the work, its checks passed: a refused make showed one)

    def begun(clips_kept: int, shards_kept: int) -> None:
        nonlocal workers  # (of the shards left: a make with one to go said "with 2 workers" and used 1)
        resumed.append(clips_kept)
        workers = max(1, min(workers, planned - shards_kept))
        cpus = usable_cpus()
        if workers > cpus:  # (each one more only waits for a core, and holds its clip's memory meanwhile)
            print(f"data make: warning: {workers} workers on {cpus} CPUs: at most {cpus} run at once, "
                  f"no faster than --workers {cpus}", file=sys.stderr)  # fmt: skip
        bars.append(tqdm(total=args.clips, unit="clip", desc="data make"))

    def close_bars() -> None:
        while bars:
            bars.pop().close()

    try:
        manifest = make_dataset(
            args.out, args.clips, args.seed, args.size, args.size, args.seconds,
            args.shard_size, args.identities, args.workers, progress=lambda n: bars[0].update(n),
            resumed=begun,
        )  # fmt: skip
    except MadeAlready:  # (it said to delete the finished dataset, as of another make's)
        print(f"{args.out} already holds this dataset ({clip_count(args.clips)}), made with these settings: "
              "nothing to do (delete it to make it again)")  # fmt: skip
        return 0
    except MemoryError:  # (numpy's, for a clip's frames: a traceback)
        from .motion import FPS
        from .shards import DataError

        frames = round(args.seconds * FPS)
        need = frames * args.size * args.size * 3 * workers / 2**30
        kept = partly_made(args.out)
        again = f" ({clip_count(kept)} made so far kept in {args.out})" if kept else ""
        raise DataError(
            f"not enough memory to make clips of {plain_number(args.seconds)} s at {args.size}x{args.size} "
            f"({plain_number(need, 3)} GiB of frames, a clip per worker): choose a shorter --seconds, a smaller "
            f"--size or fewer --workers{again}"
        ) from None
    except BaseException as e:
        if not is_stop(e):  # (a Ctrl-C, a SIGTERM, or an import such a stop failed: an ImportError)
            raise
        close_bars()  # (before what is said: closed after, the bar was drawn again under it)
        kept = partly_made(args.out)
        if kept:
            print(f"data make: {clip_count(kept)} made so far kept in {args.out}: "
                  "run the same command again to go on from them", file=sys.stderr)  # fmt: skip
        raise
    finally:
        close_bars()
        restore_handlers(terminated_before)
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{s} {v['clips']}" for s, v in manifest["splits"].items())
    before = sum(resumed)
    kept = f", {before} of them made before" if before else ""
    print(f"wrote {clip_count(args.clips)} ({counts}) to {args.out} in {elapsed:.1f} s{kept}")
    if not manifest["splits"]["train"]["clips"]:  # (distill refuses it only when a stage starts on it)
        print("data make: warning: its train split holds no clips (clip i is test where i % 10 == 0, val "
              "where i % 10 == 1): distill trains on train; make 3 clips or more", file=sys.stderr)  # fmt: skip
    if args.clips > before:
        per_minute = clips_of_4s_per_minute(args.clips - before, args.seconds, elapsed)
        size = f"{args.size}x{args.size}"
        print(f"speed: {said_speed(per_minute)} clips of 4 s per minute at {size} with {workers} "
              f"worker{'s' if workers > 1 else ''}")  # fmt: skip
    return 0


def said_speed(per_minute: float) -> str:
    """`per_minute` as `data make` says it: whole from 10 on, below that two significant digits (short
    clips: not '0'), as a plain decimal at any speed (the general format's '1e-05' under 0.0001)."""
    from decimal import Decimal

    if per_minute >= 10:
        return f"{per_minute:.0f}"
    return f"{Decimal(f'{per_minute:.2g}'):f}"


def plain_number(value: float, significant: int | None = None) -> str:
    """`value` as a person writes it, never in the general format's exponent form ('1e+07' for
    --seconds 1e7, '1.79e+04' GiB): exact (as Python reads it back), or to `significant`
    significant digits, the whole digits all kept ('17881' GiB, '179', '0.512')."""
    from decimal import Decimal

    if significant is None:
        return f"{Decimal(repr(float(value))).normalize():f}"
    if abs(value) >= 10 ** (significant - 1):
        return f"{value:.0f}"
    return f"{Decimal(f'{value:.{significant}g}'):f}"


def clips_of_4s_per_minute(clips: int, seconds: float, elapsed: float) -> float:
    """The speed `data make` reports, in clips of 4 s (the default length): a clip of 8 s counts
    as two."""
    return clips * (seconds / 4.0) / elapsed * 60


SHEET_ROWS = 48  # the contact sheet's most rows (clips), about 6 200 pixels tall at 128
PREVIEW_MARK = "streamgen data preview"  # in the files a preview writes: an earlier one's are replaced


def _preview(args) -> int:
    import itertools
    import math

    import numpy as np

    from streamgen.cli import output_folder

    from . import media
    from .shards import clip_count

    video, sheet = args.out / "preview.mp4", args.out / "contact_sheet.png"
    _refuse_files_no_preview_wrote(args.out, video, sheet)
    clips = _clips_to_preview(args)
    first = next(clips, None)
    if first is None:
        raise_empty(args)
    factor = max(1, 128 // first[0].shape[1])
    clips = itertools.chain([first], clips)
    del first
    made_out = not args.out.exists()
    output_folder(args.out)  # (once a clip is read: a --data that is not there made it, empty)
    rows = []  # (of each clip on the contact sheet, its row: not its frames)
    # every clip in the video; on the sheet, evenly spaced ones, no more than SHEET_ROWS (a row a
    # clip made 10 000 clips a sheet 1.3 million pixels tall, and their rows 4 GB held meanwhile)
    # (of a split with fewer, as many as it has: spaced as if --clips were there, 1000 of a split of
    # 60 showed 3 of them)
    previewed = args.clips
    if args.data is not None:
        from .manifest import load_manifest

        previewed = min(previewed, load_manifest(args.data)["splits"][args.split]["clips"])
    every = max(1, math.ceil(previewed / SHEET_ROWS))  # (1: a split whose count was edited to 0)
    counted = 0

    def shown():
        nonlocal counted
        for i, (video, audio, reference) in enumerate(clips):
            frames = media.upscale(np.concatenate([reference[None], video]), factor)
            if i % every == 0:
                rows.append(media.contact_row(frames))
            counted = i + 1
            yield frames[1:], audio

    if video.exists() or sheet.exists():  # (not without a word, as eval's report replaced is said)
        print(f"data preview: replacing the earlier preview in {args.out}", file=sys.stderr)
    try:
        media.write_mp4(video, shown(), comment=PREVIEW_MARK)
        try:
            media.save_png(sheet, media.stack_rows(rows), software=PREVIEW_MARK)
        except BaseException:  # the two or neither (the video was left behind, as if the preview were done)
            video.unlink(missing_ok=True)
            raise
    except BaseException:
        if made_out:  # (a shard found corrupted after the first clips: no folder made for nothing)
            with contextlib.suppress(OSError):
                args.out.rmdir()
        raise
    on_sheet = "" if every == 1 else f"; the sheet shows {len(rows)} of them, one in {every}"
    print(f"wrote {sheet} and {video} ({clip_count(counted)}{on_sheet})")
    return 0


def _refuse_files_no_preview_wrote(out, *outputs) -> None:
    """A UserError where `out` holds one of `outputs` that no preview wrote (a preview.mp4 of the user's
    own in `--out .` was replaced without a word), as eval refuses a report.md no evaluation wrote."""
    from streamgen.cli import UserError

    from .media import written_by

    others = [p.name for p in outputs if p.exists() and written_by(p) != PREVIEW_MARK]
    if others:
        raise UserError(f"--out {out} holds {', '.join(others)}, which no preview wrote there: data preview "
                        "would replace them; give another --out, or move them")  # fmt: skip


def _clips_to_preview(args):
    """(video, audio, reference) of each clip to preview, read (or made) one at a time."""
    if args.data is not None:
        from .shards import iter_clips

        for c in iter_clips(args.data, args.split, args.clips):
            yield c["video"], c["audio"], c["reference"]
    else:
        from .world import make_clip

        for i in range(args.clips):
            c = make_clip(args.seed, i, args.split, args.size, args.size)
            yield c.video, c.audio, c.reference


def raise_empty(args):
    from streamgen.cli import UserError

    raise UserError(f"no clips in split {args.split!r} of {args.data}")
