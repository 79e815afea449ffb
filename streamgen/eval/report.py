"""`streamgen eval`: generate the test clips with a model and score them.

The clips to generate are the world's clips of the chosen split (identities and
sentences never trained on): clip i is `make_clip(EVAL_SEED, i, split)`. A model
sees each clip's reference image, caption and audio through `StreamSession`
(`generate_with_stream_session`); `--model ground-truth` uses the renderer's own
frames (the upper reference). The real set for FID/FVD is a second draw of the same
split (seed EVAL_SEED + 1): for ground truth, FID/FVD therefore measure the
estimator's noise floor, not 0.

Outputs in --out: report.json (written last: its presence means the run finished),
report.md, drift.png, samples.png, sync.png.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .outputs import write_outputs
from .sessions import (
    GROUND_TRUTH,
    ROUNDTRIP,
    autoencoder_roundtrip,
    generate_with_stream_session,
    open_session,
    session_dtypes,
)

# (where it was before sessions.py was split off from this module: tests/test_eval_cli.py's import)
from .sessions import stream_memory_problem as stream_memory_problem

EVAL_SEED = 20240
# the version of what eval measures: bump it with any change that changes a number in report.json
# for the same model and evaluators (a metric, a detector, the clips made, what a clip keeps in
# partial/), so that a report.json, or an unfinished run's clips, measured by the code before the
# change are measured again rather than taken for this code's. tests/test_eval_versions.py pins it
# to a digest of the code its numbers depend on (the metrics, this module, partial.py, the code that
# makes the clips): a change there fails the suite until it is looked at (bumped, or not, and pinned
# again)
EVAL_VERSION = 3
# what a run writes into --out, report.json last
OUTPUTS = ("drift.png", "sync.png", "samples.png", "report.md", "report.json")


def median_offset(offsets: list[int | None]) -> int | None:
    """The clips' median audio-video offset, and one some clip had: of an even count, the lower
    middle (the mean of the two middles, truncated, was an offset no clip had: -3 and 4 gave 0).
    Of the clips that have one (None: no sync, `metrics.has_peak`); None where none has."""
    found = [o for o in offsets if o is not None]
    return int(statistics.median_low(found)) if found else None


class OutputInUse(RuntimeError):
    """Another evaluation is writing into the --out folder."""


class OutFolderError(RuntimeError):
    """The --out folder cannot be made."""


def one_eval_at_a_time(out: Path):
    """The folder `out` for this evaluation alone: a second one into it at once removed the first's
    outputs as it began, and the two wrote theirs over each other's (one's report.json beside the
    other's plots, both said "wrote")."""
    from streamgen.folder_lock import no_other_writer

    busy = f"another evaluation is writing into {out}: wait for it to end, or give another --out"
    return no_other_writer(out, lambda: OutputInUse(busy))


def evaluate(
    model: str,
    out: Path,
    split: str = "test",
    n_clips: int = 8,
    size: int = 64,
    minutes: float | None = None,
    evaluators_dir: Path | None = None,
    device: str = "cpu",
    steps: int | None = None,
    progress=None,
    decode_dtype="auto",
    cache_from=None,
    dtype="auto",
    encode_dtype="auto",
    stream_progress=None,
    note=None,
) -> dict:
    """Score `model` on `n_clips` clips of `split` (and a `minutes` stream) into `out`:
    `progress(clips)` as clips are done, `stream_progress(frames, of_frames)` as the stream is made,
    `note(line)` where it resumes (the clips measured by an earlier run of the same settings, kept in
    OUT/partial: `partial.Measured`) or finds the run finished (report.json of the same settings and
    clips: returned, nothing measured)."""
    from streamgen.data.world import make_clip

    from .drift import score_stream
    from .evaluators import Evaluators
    from .metrics import (
        black_frames,
        clip_features,
        csim,
        flicker_frames,
        frechet_distance,
        frozen_frames,
        slope_per_minute,
        sync_scores,
    )
    from .partial import Measured

    start_time = time.perf_counter()
    ev = Evaluators(evaluators_dir)  # fails first, with a clear message, if a checkpoint is missing
    roundtrip = autoencoder_roundtrip(model.removeprefix(ROUNDTRIP)) if model.startswith(ROUNDTRIP) else None
    plain = model == GROUND_TRUTH or roundtrip is not None
    session = None
    if not plain:
        session = open_session(
            model, size, size, device, steps, decode_dtype, cache_from, dtype, encode_dtype
        )
    settings = eval_settings(model, split, size, minutes, ev, session, roundtrip, device, steps)
    # set up (a model or evaluator that is not there stopped it, the earlier run's results left
    # alone, and no --out made for it): from here a run that fails (a crash on the way, a Ctrl-C)
    # must not leave an earlier run's report in --out, whose presence says the run finished, nor
    # its report.md and plots, which name that run's model beside no report.json
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (a traceback: a folder under /proc, one the user may not write into)
        raise OutFolderError(f"--out: cannot make {out}: {e.strerror}") from None
    with one_eval_at_a_time(Path(out)):  # (another eval's outputs are not removed, nor mixed with ours)
        finished, earlier = _finished_report(Path(out), settings, n_clips)
        if finished is not None:  # (the same command run again: nothing to measure)
            note and note(f"{Path(out) / 'report.json'} is already this evaluation's: nothing measured again "
                          "(delete it to evaluate again)")  # fmt: skip
            return finished
        others = _not_an_evaluations(Path(out))
        if others:  # (removed as this one began, a report.md of the user's in the folder given)
            raise OutFolderError(
                f"--out {out} holds {', '.join(others)}, which no evaluation wrote there (no report.json nor "
                "partial/ of one): eval would replace them; give another --out, or move them"
            )
        if earlier is not None and note:  # (not without a word: it is measured again, and replaced)
            note(f"replacing {Path(out) / 'report.json'}, an evaluation of other settings ({earlier})")
        for name in OUTPUTS:
            (Path(out) / name).unlink(missing_ok=True)
        # (the clips' results are not a function of --minutes: a stream asked for, or not, or
        # another length, on the second run goes on from the clips of the first; the stream's are
        # kept by its length)
        measured = Measured(Path(out), {k: v for k, v in settings.items() if k != "minutes"})
        kept = measured.open(note)
        if kept and note:
            note(f"resuming: the clips already scored in {measured.folder} are not scored again")
        if progress is not None:
            progress(0)  # the work begins (the command's progress bar shows from here)

        # frames the stream holds from time 0 before its first (`from_time_zero`: Wan's 1 + 4k layout
        # starts the video 3 frames in): copies made here, not frozen frames of the model's
        lead = session.vae.first_frame_index if session is not None else 0

        def produce(clip, seed, progress=None):
            if session is None:
                frames = roundtrip(clip.video) if roundtrip is not None else clip.video
                progress and progress(len(frames))
                return frames
            return generate_with_stream_session(
                session, clip.reference, clip.audio, clip.caption, len(clip.video), seed, progress
            )

        def score_clip(i: int) -> dict:
            clip = make_clip(EVAL_SEED, i, split, size, size)
            frames = produce(clip, EVAL_SEED + i)
            real = make_clip(EVAL_SEED + 1, i, split, size, size)
            v, a = ev.sync_embeddings(frames, clip.audio)
            sync = sync_scores(v, a)
            emb, feats = ev.identity_embeddings(frames)
            ref_emb, _ = ev.identity_embeddings(clip.reference[None])
            sims = csim(emb, ref_emb)
            _, rfeats = ev.identity_embeddings(real.video)
            rv, _ = ev.sync_embeddings(real.video, real.audio)
            sync_curve = sync.pop("curve")
            per_clip = {"index": i, "caption": clip.caption, "csim": float(sims.mean()), **sync}
            # the frames samples.png shows of its first clips: contact_sheet's picks, not the whole
            # clips (kept in partial/ with each clip's results, they were 12 MB a clip at 512x512)
            picks = np.linspace(0, len(frames) - 1, SAMPLE_FRAMES).round().astype(int)
            shown = {"sample_real": clip.video[picks], "sample_generated": frames[picks]}
            return {
                "per_clip": np.array(json.dumps(per_clip)),
                "gen_feats": feats[::4].numpy(),
                "real_feats": rfeats[::4].numpy(),
                "gen_clip_feats": clip_features(feats.numpy(), v.numpy()),
                "real_clip_feats": clip_features(rfeats.numpy(), rv.numpy()),
                "counts": np.array(
                    [
                        black_frames(frames).sum(),
                        frozen_frames(frames[lead:]).sum(),
                        flicker_frames(frames).sum(),
                    ]
                ),
                "csim_curve": sims,
                "sync_curve": np.array(sync_curve),
                **(shown if i < SAMPLE_CLIPS else {}),
            }

        per_clip, gen_feats, real_feats, gen_clip_feats, real_clip_feats = [], [], [], [], []
        csim_curves, samples, sync_curves = [], [], []
        black = frozen = flicker = 0
        kept_seconds = 0.0  # earlier runs' on what is taken from partial/ (0 where older code kept it)
        for i in range(n_clips):
            scored = measured.load(f"clip-{i:05d}", CLIP_ARRAYS + (SAMPLE_ARRAYS if i < SAMPLE_CLIPS else ()))
            if scored is None:
                began = time.perf_counter()
                scored = score_clip(i)
                scored["wall_seconds"] = np.array(time.perf_counter() - began)
                measured.save(f"clip-{i:05d}", scored)
            else:
                kept_seconds += float(scored.get("wall_seconds", 0))
            per_clip.append(json.loads(str(scored["per_clip"])))
            gen_feats.append(scored["gen_feats"])
            real_feats.append(scored["real_feats"])
            gen_clip_feats.append(scored["gen_clip_feats"])
            real_clip_feats.append(scored["real_clip_feats"])
            black, frozen, flicker = (int(n) for n in np.array([black, frozen, flicker]) + scored["counts"])
            csim_curves.append(scored["csim_curve"])
            sync_curves.append(scored["sync_curve"].tolist())
            if i < SAMPLE_CLIPS:
                samples.append((scored["sample_real"], scored["sample_generated"]))
            progress and progress(1)
        stream = None
        if minutes:
            scored = measured.load(f"stream-{minutes!r}", STREAM_ARRAYS)
            if scored is None:
                name = f"stream-{minutes!r}-so-far"
                so_far, began = measured.load(name), time.perf_counter()
                earlier = float((so_far or {}).get("wall_seconds", 0))  # (a stopped run's, on its frames)
                spent = lambda: np.array(earlier + time.perf_counter() - began)  # noqa: E731
                keep = lambda state: measured.save(name, {**state, "wall_seconds": spent()})  # noqa: E731
                scored = score_stream(ev, split, minutes, size, session, roundtrip, lead, stream_progress,
                                       so_far, keep, note, measured.folder / f"{name}.pt")  # fmt: skip
                measured.save(f"stream-{minutes!r}", {**scored, "wall_seconds": spent()})
                kept_seconds += earlier
            else:
                kept_seconds += float(scored.get("wall_seconds", 0))
            stream = {"csim": scored["csim"], "colour": scored["colour"]}
            black, frozen, flicker = (int(n) for n in np.array([black, frozen, flicker]) + scored["counts"])
        n_frames = sum(len(c) for c in csim_curves) + (len(stream["csim"]) if stream else 0)
        mean_curve = np.mean(np.stack(csim_curves), axis=0)
        drift_series = stream["csim"] if stream else mean_curve
        gen_feats, real_feats = np.concatenate(gen_feats), np.concatenate(real_feats)
        report = {
            "model": model,
            "split": split,
            "clips": n_clips,
            "seconds": round(n_frames / 25, 2),
            "size": size,
            "cache_from": getattr(session, "cache_from", None),  # a student's; None for the others
            **session_dtypes(session),
            "sync_c": float(np.mean([c["sync_c"] for c in per_clip])),
            "sync_d": float(np.mean([c["sync_d"] for c in per_clip])),
            "av_offset_frames": median_offset([c["av_offset_frames"] for c in per_clip]),
            "csim": float(np.mean([c["csim"] for c in per_clip])),
            "fid": frechet_distance(gen_feats, real_feats),
            "fvd": frechet_distance(np.stack(gen_clip_feats), np.stack(real_clip_feats))
            if n_clips >= 2
            else None,
            "drift_slope": slope_per_minute(drift_series),
            "drift_source": f"{minutes} min stream" if stream else "mean over clips",
            "colour_drift_slope": slope_per_minute(stream["colour"][:, :3].mean(1)) if stream else None,
            "black_frames": black,
            "frozen_frames": frozen,
            "flicker_frames": flicker,
            "per_clip": per_clip,
            # (this run's alone was said: `--clips 24` after `--clips 8` gave the 16 new clips' time)
            "wall_seconds": round(time.perf_counter() - start_time + kept_seconds, 1),
            "settings": settings,
        }
        write_outputs(Path(out), report, mean_curve, stream, samples, sync_curves)
        # (after: a kill between the two leaves the results to write again; the clips stay for a
        # later run of more: it measured them all again)
        measured.keep_finished()
        return report


SAMPLE_CLIPS = 4  # clips shown in samples.png
SAMPLE_FRAMES = 8  # frames of each sample clip in samples.png (contact_sheet's columns)
# the arrays of a clip's measurements in OUT/partial (and, for the first SAMPLE_CLIPS, its samples)
CLIP_ARRAYS = ("per_clip", "gen_feats", "real_feats", "gen_clip_feats", "real_clip_feats", "counts",
               "csim_curve", "sync_curve")  # fmt: skip
SAMPLE_ARRAYS = ("sample_real", "sample_generated")
STREAM_ARRAYS = ("csim", "colour", "counts")  # the --minutes stream's


def eval_settings(model, split, size, minutes, ev, session, roundtrip, device, steps) -> dict:
    """What an evaluation's results are a function of, the clip count aside (clip i is the same
    clip whatever the count): the weights by digest, so a model or evaluators trained again at the
    same path are another evaluation; the model's model.json by digest (its default steps, shift,
    cfg_scale: a model.json edited beside the same weights scored otherwise); the speech engine the
    clips are spoken by (another espeak-ng makes other clips, eval's code the same); and
    `EVAL_VERSION`, the code's."""
    from streamgen.data.speech import engine_version

    from .partial import files_digest, json_digest, weights_digest

    weights = (session.dit, session.vae) if session is not None else (getattr(roundtrip, "vae", None),)
    return {
        "eval_version": EVAL_VERSION,
        "model": model, "split": split, "size": size, "minutes": minutes,
        "device": device if session is not None else None, "steps": steps,
        "cache_from": getattr(session, "cache_from", None), **session_dtypes(session),
        "model_weights": weights_digest(*weights),
        "model_meta": json_digest(session.model.meta) if session is not None else None,
        "evaluators": files_digest([ev.folder / "syncnet.safetensors", ev.folder / "identity.safetensors"]),
        "speech": engine_version(),
    }  # fmt: skip


def _finished_report(out: Path, settings: dict, n_clips: int) -> tuple[dict | None, str | None]:
    """report.json in `out` where it is of this evaluation, finished (else None), and where it is
    of another, what differs (its changed settings, said in a few words; else None)."""
    from .partial import changed_settings

    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(report, dict):
        return None, None
    if report.get("settings") != settings or report.get("clips") != n_clips:
        if not isinstance(report.get("settings"), dict):
            return None, "none recorded"
        changed = changed_settings(report["settings"], settings)
        if report.get("clips") != n_clips:
            changed.append("clips")
        return None, ", ".join(changed)
    if not all((out / name).exists() for name in OUTPUTS):
        return None, None
    return report, None


def _not_an_evaluations(out: Path) -> list[str]:
    """The names of OUTPUTS in `out` where no evaluation is known to have written them: neither a
    report.json of one (its settings) nor the measurements of one (partial/settings.json) are there."""
    from .partial import FOLDER

    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        report = None
    if (isinstance(report, dict) and "settings" in report) or (out / FOLDER / "settings.json").is_file():
        return []
    return [name for name in OUTPUTS if (out / name).exists()]
