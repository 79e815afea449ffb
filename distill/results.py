"""The results table (docs/results.md): every model of the pipeline scored by `streamgen eval`.

    python -m distill.results --runs runs/tiny-avatar --out runs/tiny-avatar/results --doc docs/results.md

Rows: the renderer's ground truth, the clips through the autoencoder and back
(what any student that decodes with it can reach), the teacher (50 Euler steps + CFG), the
ODE-init student, the Self-Forcing student at 4/2/1 steps and the
chunk-distilled student, all on the held-out test split (identities and
sentences never trained on). Students stream through `StreamSession`; the
bidirectional teacher cannot, so `streamgen eval` runs it through
`streamgen.teacher.TeacherSession` (windows of latent frames, each continuing
the previous window's last frames as clean motion frames).

NFE per frame counts the network evaluations a latent frame goes through:
teacher steps x 2 (CFG), student steps + 1 (the clean re-encode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from streamgen.cli import folder_problem, frame_size, positive_int, thread_count
from streamgen.eval.cli import MAX_MINUTES
from streamgen.files import write_text_atomically

LATENT_FPS = 25 / 4


def frames_per_second(session, seconds: float = 4.0) -> float:
    """Generation speed on this machine: frames of one test clip per wall second."""
    from streamgen.data.world import make_clip
    from streamgen.eval.report import EVAL_SEED
    from streamgen.eval.sessions import generate_with_stream_session

    clip = make_clip(EVAL_SEED, 0, "test", session.height, session.width)
    n = int(seconds * 25)
    start = time.perf_counter()
    generate_with_stream_session(session, clip.reference, clip.audio, clip.caption, n, EVAL_SEED)
    return n / (time.perf_counter() - start)


def this_machine() -> str:
    """The CPU the frames/s were measured on, as the table names it: its model and core count."""
    name = platform.processor() or platform.machine()
    try:  # (on Linux platform.processor() is the architecture, the model is in /proc/cpuinfo)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name or 'an unknown CPU'}, {cores} core(s)"


def table_machine(rows: list[dict]) -> str:
    """Where the note says the frames/s were measured: the rows' machine, each named where they
    were made on several; rows kept before the machine was say so."""
    machines = sorted({f"on {row['machine']}" if row.get("machine") else "machine not recorded" for row in rows})
    return "; ".join(machines) or "machine not recorded"


def rows_for(runs: Path) -> list[dict]:
    return [
        {"row": "ground truth (renderer)", "model": "ground-truth", "nfe": None},
        {
            "row": "autoencoder round trip (the students' ceiling)",
            "model": "roundtrip:" + str(runs / "autoencoder" / "model"),
            "nfe": None,
        },
        {"row": "teacher, 50 steps + CFG", "model": str(runs / "teacher" / "model"), "steps": 50, "nfe": 100},
        {"row": "ODE-init student, 4 steps", "model": str(runs / "ode" / "model"), "steps": 4, "nfe": 5},
        {
            "row": "Self-Forcing student, 4 steps",
            "model": str(runs / "self_forcing" / "model"),
            "steps": 4,
            "nfe": 5,
        },
        {
            "row": "Self-Forcing student, 2 steps",
            "model": str(runs / "self_forcing" / "model"),
            "steps": 2,
            "nfe": 3,
        },
        {
            "row": "Self-Forcing student, 1 step",
            "model": str(runs / "self_forcing" / "model"),
            "steps": 1,
            "nfe": 2,
        },
        {  # the same weights, each chunk's keys/values kept from its last step: no re-encode
            "row": "Self-Forcing student, 4 steps, cache from last step",
            "model": str(runs / "self_forcing" / "model"),
            "steps": 4,
            "nfe": 4,
            "cache_from": "last_step",
        },
        {  # those weights fine-tuned to keep their last step (self_forcing-tiny-avatar-last-step.yaml)
            "row": "Self-Forcing student fine-tuned to keep its last step, 4 steps",
            "model": str(runs / "self_forcing_last_step" / "model"),
            "steps": 4,
            "nfe": 4,
        },
        {
            "row": "chunk-distilled student, 4 steps",
            "model": str(runs / "chunk" / "model"),
            "steps": 4,
            "nfe": 5,
        },
    ]


def evaluate_rows(
    runs: Path, out: Path, clips: int, minutes: float | None, size: int, skip=frozenset(), on_row=None
) -> list[dict]:
    """Evaluate every row of the table but those named in `skip`; `on_row(rows so far)` after each."""
    from streamgen.eval.report import evaluate
    from streamgen.eval.sessions import ROUNDTRIP, ModelLoadError, open_session

    problem = model_problem(runs, skip)
    if problem:
        raise ModelLoadError(problem)
    results = []
    for spec in rows_for(runs):
        name = spec["row"]
        if name in skip:
            continue
        generated = spec["model"] != "ground-truth" and not spec["model"].startswith(ROUNDTRIP)
        slug = name.split(",")[0].split(" (")[0].replace(" ", "-")
        folder = out / "-".join([slug, str(spec.get("steps", 0)), *filter(None, [spec.get("cache_from")])])
        is_teacher = spec.get("nfe") == 100
        started = time.perf_counter()
        report = evaluate(
            spec["model"], folder, "test", clips, size,
            minutes if generated and not is_teacher else None,
            None, "cpu", spec.get("steps"), cache_from=spec.get("cache_from"),
        )  # fmt: skip
        fps = None
        if generated:
            session = open_session(
                spec["model"], size, size, "cpu", spec.get("steps"), cache_from=spec.get("cache_from")
            )
            fps = frames_per_second(session)
        row = {**spec, **{k: report.get(k) for k in REPORT_KEYS}, "fps": fps}
        row.update(minutes=minutes, threads=torch.get_num_threads())  # (the table's, for a later run)
        row["eval_seconds"] = round(time.perf_counter() - started, 1)
        results.append(row)
        if on_row is not None:
            on_row(results)
        print(
            json.dumps({k: row[k] for k in ("row", "sync_c", "csim", "fvd", "drift_slope", "fps")}),
            flush=True,
        )
    return results


# the repository this module is of: where the defaults of --runs and --doc are (as the Makefile's
# `make results` names them from its root)
REPOSITORY = Path(__file__).resolve().parents[1]
REPORT_KEYS = ("sync_c", "sync_d", "av_offset_frames", "csim", "fid", "fvd", "drift_slope", "drift_source",
               "black_frames", "frozen_frames", "clips", "seconds", "size")  # fmt: skip
# what a row was made with, beside its model: rows made otherwise are not one table
SETTINGS = ("clips", "minutes", "size", "threads")


def settings_problem(stored: list[dict], runs: Path, asked: dict) -> str | None:
    """Why rows of results.json cannot share a table with rows made now from `runs` with the
    settings `asked`, or None (rows written before a setting was kept are not held to it)."""
    models = {spec["row"]: spec["model"] for spec in rows_for(runs)}
    for row in stored:
        for key in SETTINGS:
            if key in row and row[key] != asked[key]:
                return f"its row {row['row']!r} was made with --{key} {row[key]}, this run's is {asked[key]}"
        if models.get(row["row"], row["model"]) != row["model"]:
            return f"its row {row['row']!r} scored {row['model']}, this run's --runs has {models[row['row']]}"
    return None


def model_problem(runs: Path, skip) -> str | None:
    """The first model of a row to evaluate that is not there, or None: said before the first row,
    not where its row comes (a traceback, after the rows before it; the teacher's takes minutes)."""
    from distill.build import stage_that_makes
    from streamgen.eval.sessions import GROUND_TRUTH, ROUNDTRIP
    from streamgen.models import require_model

    for spec in rows_for(runs):
        model = spec["model"]
        if spec["row"] in skip or model == GROUND_TRUTH:
            continue
        folder = Path(model.removeprefix(ROUNDTRIP))
        if model.startswith(ROUNDTRIP) and (folder / "vae_config.json").exists():
            continue  # (an autoencoder's own folder)
        if not folder.exists():  # (a relative one was "unknown model ...: not one of tiny-avatar, ...")
            return f"row {spec['row']!r}: no model directory {folder}: there is no such folder; {stage_that_makes(folder)}"
        try:
            require_model(model.removeprefix(ROUNDTRIP))
        except FileNotFoundError as e:
            return f"row {spec['row']!r}: {e}"
    return None


def table_settings(rows: list[dict], asked: dict) -> dict:
    """The settings the table's note names: its rows' own where they kept them (--render-only
    named the command line's defaults: 24 clips and 5-minute streams for rows made otherwise)."""
    kept = {key: {row[key] for row in rows if key in row} for key in SETTINGS}
    return {key: kept[key].pop() if len(kept[key]) == 1 else asked[key] for key in SETTINGS}


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _slope(v) -> str:
    # slopes of a flat stream are 1e-5 or less: a fixed number of decimals would print them as 0
    return "—" if v is None else f"{v:+.1e}"


def markdown(rows: list[dict], clips: int, minutes: float | None, threads: int, size: int = 64) -> str:
    # (it said "this CPU" and "a shared 2-core CPU", whatever machine had made the rows)
    head = (
        "| model | Sync-C ↑ | Sync-D ↓ | A/V offset (frames) | CSIM ↑ | FID ↓ | FVD ↓ | drift slope (CSIM/min) "
        "| black / frozen frames | NFE per frame | NFE per s of video | frames/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        nfe = r.get("nfe")
        lines.append(
            f"| {r['row']} | {_fmt(r['sync_c'])} | {_fmt(r['sync_d'])} | {_fmt(r['av_offset_frames'])} "
            f"| {_fmt(r['csim'])} | {_fmt(r['fid'], 2)} | {_fmt(r['fvd'], 2)} "
            f"| {_slope(r['drift_slope'])} ({r.get('drift_source') or '—'}) "
            f"| {r['black_frames']} / {r['frozen_frames']} | {_fmt(nfe)} "
            f"| {_fmt(None if nfe is None else nfe * LATENT_FPS, 1)} | {_fmt(r.get('fps'), 1)} |"
        )
    note = (
        f"\n{clips} test clips per row (4 s each, {size}x{size}); drift "
        + (f"from a {minutes}-minute stream for the students " if minutes else "")
        + f"(the teacher and ground truth{'' if minutes else ', and with no stream the students'}: mean CSIM "
        f"curve over the clips); frames/s: one 4 s clip, "
        f"{threads} torch thread(s), {table_machine(rows)}.\n"
    )
    return head + "\n".join(lines) + "\n" + note


def main(argv=None) -> int:
    from streamgen.eval.sessions import ModelLoadError

    # (named as it is run: it said "usage: results.py", a file no one types)
    p = argparse.ArgumentParser(prog="python -m distill.results", description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="folder of the stages' runs (autoencoder/, teacher/, ode/, ...) (default: the repository's "
        "runs/tiny-avatar)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        # (it was runs/results in the current folder, whatever --runs said: `make results RUNS=/x`
        # wrote there, and --render-only read another run's table)
        help="folder for results.json and each row's evaluation (default: RUNS/results)",
    )
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="the file whose table is rewritten (default: the repository's docs/results.md)",
    )
    p.add_argument("--clips", type=positive_int, default=24, help="test clips per row (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=5.0, help="minutes of the students' drift stream (0: none; default 5)")
    p.add_argument("--size", type=frame_size, default=64, help="frame size generated (default: %(default)s)")
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads (default: %(default)s)")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the table from OUT/results.json, evaluating nothing",
    )
    p.add_argument(
        "--missing-only",
        action="store_true",
        help="evaluate only the rows OUT/results.json does not have yet",
    )
    args = p.parse_args(argv)
    # (the defaults were relative to the current folder: run from anywhere but the repository's
    # root, --render-only found no results.json and no docs/ to write in)
    args.runs = REPOSITORY / "runs" / "tiny-avatar" if args.runs is None else args.runs
    args.doc = REPOSITORY / "docs" / "results.md" if args.doc is None else args.doc
    args.out = args.runs / "results" if args.out is None else args.out
    # (nan too) as eval's: a traceback at the first student's stream, after the teacher's row
    if not (args.minutes == 0 or args.minutes * 60 * 25 >= 2) or not args.minutes <= MAX_MINUTES:
        p.error(
            f"--minutes must be 0 (no drift stream) or give a stream of two frames at least, at most {MAX_MINUTES}"
        )
    # (a traceback at the first row for --out, once every row was made for --doc)
    problem = folder_problem(args.out) and f"--out {folder_problem(args.out)}"
    if args.doc.is_dir() or not args.doc.parent.is_dir() or not os.access(args.doc.parent, os.W_OK):
        problem = f"--doc {args.doc}: not a file in a folder this can write in"
    if problem:
        p.error(problem)
    torch.set_num_threads(args.threads)
    asked = {"clips": args.clips, "minutes": args.minutes, "size": args.size, "threads": args.threads}
    stored = args.out / "results.json"
    if args.render_only:
        if not stored.exists():
            p.error(f"{stored} does not exist yet: run without --render-only first")
        rows = json.loads(stored.read_text())
    else:
        kept = json.loads(stored.read_text()) if args.missing_only and stored.exists() else []
        problem = settings_problem(kept, args.runs, asked)
        if problem:  # (they were kept, and the table mixed rows of both runs under one note)
            p.error(f"--missing-only: {stored} is another run's: {problem}; run without --missing-only")
        order = [spec["row"] for spec in rows_for(args.runs)]

        machine = this_machine()

        def store(new: list[dict]) -> list[dict]:
            for row in new:  # (the frames/s are this machine's: the table names it)
                row.setdefault("machine", machine)
            # after every row: a run that fails on a late row (hours in) keeps the rows it made,
            # and --missing-only goes on from them
            rows = sorted(
                kept + new, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order)
            )
            args.out.mkdir(parents=True, exist_ok=True)
            # whole or not at all: written in place, a kill mid-write lost every row made before
            write_text_atomically(stored, json.dumps(rows, indent=2))
            return rows

        try:
            new = evaluate_rows(
                args.runs, args.out, args.clips, args.minutes, args.size, {r["row"] for r in kept}, store
            )
        except ModelLoadError as e:  # (the rows made before it are kept: --missing-only goes on)
            p.error(str(e))
        except KeyboardInterrupt:  # (a traceback, which did not say that the rows made were kept)
            print(f"interrupted: the rows made so far are in {stored}; --missing-only goes on from them",
                  file=sys.stderr)  # fmt: skip
            return 130
        rows = store(new)
    note = table_settings(rows, asked)
    table = markdown(rows, note["clips"], note["minutes"], note["threads"], note["size"])
    doc = args.doc.read_text() if args.doc.exists() else ""
    start, end = "<!-- results:begin -->", "<!-- results:end -->"
    if start in doc and end in doc:
        doc = doc[: doc.index(start) + len(start)] + "\n" + table + doc[doc.index(end) :]
    elif doc.strip():  # (another document, or one without the markers: its text was replaced whole)
        doc = f"{doc.rstrip()}\n\n{start}\n{table}{end}\n"
    else:
        doc = f"# Results\n\n{start}\n{table}{end}\n"
    write_text_atomically(args.doc, doc)  # (a kill mid-write cut off the rest of the document)
    print(f"wrote {args.doc}" + ("" if args.render_only else f" and {args.out / 'results.json'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
