"""The --minutes drift stream of `streamgen eval`: one long take of one identity, made by the
model (or rendered, or through an autoencoder and back) and scored chunk by chunk as it is made,
its scores so far kept for a stopped run to go on from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# frames of the renderer's drift stream rendered (and scored) at a time
STREAM_SLICE = 250
# frames of the drift stream scored between the saves of its scores so far (a minute of video;
# the scores of an hour's stream are 3 MB at its end)
STREAM_KEEP_FRAMES = 1500


def score_stream(
    ev, split, minutes, size, session, roundtrip, lead, stream_progress, kept=None, keep=None, note=None,
    state_file=None,
) -> dict:  # fmt: skip
    """The --minutes stream's per-frame CSIM and colour and its detectors' counts, scored chunk by
    chunk as it is made: only an autoencoder's round trip holds it whole (it encodes it at once).
    Its scores so far go to `keep` every STREAM_KEEP_FRAMES frames and when it is stopped (a
    Ctrl-C); `kept`, such scores of a stopped run, are gone on from: the renderer's stream (and a
    round trip's) from the frame after them. A model's session state goes to `state_file` with
    each `keep` (not at a Ctrl-C, which may come mid-chunk); its stream goes on from there, making
    the frames from there to the scored ones again unscored (from its start without such a state)."""
    from streamgen.cli import is_stop
    from streamgen.data.render import Identity, render_frame
    from streamgen.data.world import make_stream

    from .metrics import StreamScores
    from .report import EVAL_SEED
    from .sessions import SessionChunks

    clip = make_stream(EVAL_SEED, _first_identity(split), minutes, size, size, render=roundtrip is not None)
    n_frames = len(clip.motion)
    shown = [0]  # frames the bar counts (taken back where the stream is scored afresh)

    def made(n: int) -> None:
        shown[0] += n
        stream_progress(n, n_frames)

    made = made if stream_progress else None
    scores = StreamScores(ev, clip.reference, lead)
    if kept is not None and not (scores.restore(kept) and scores.seen <= n_frames):
        scores = StreamScores(ev, clip.reference, lead)  # (not this stream's: scored afresh)
    start = scores.seen
    model_chunks = None
    if session is not None:
        model_chunks = SessionChunks(
            session, clip.reference, clip.audio, clip.caption, n_frames, EVAL_SEED, made
        )
        resumed_at = _resumed(model_chunks, state_file, start, note) if start and state_file else 0
        made and resumed_at and made(resumed_at)  # (the frames made before: the bar goes on from them)
        chunks = iter(model_chunks)
        chunks = _after(chunks, start - resumed_at, scores.last) if start > resumed_at else chunks
        again = (
            "" if resumed_at == start
            else f" (the model goes on from its state at frame {resumed_at}: frames {resumed_at}-{start - 1} are made again, unscored)"
            if resumed_at
            else " (the model makes it again up to there, unscored)"
        )  # fmt: skip
    else:
        identity = Identity.from_id(clip.meta["identity_id"])
        whole = roundtrip(clip.video) if roundtrip is not None else None
        again = ""

        def slices():
            made and start and made(start)  # (the frames scored before: the bar goes on from them)
            for k in range(start, n_frames, STREAM_SLICE):
                end = min(k + STREAM_SLICE, n_frames)
                if whole is not None:
                    chunk = whole[k:end]
                else:
                    chunk = np.stack(
                        [render_frame(identity, clip.motion.frame(t), size, size) for t in range(k, end)]
                    )
                made and made(len(chunk))
                yield chunk

        chunks = slices()
    if start and note:
        note(f"resuming: the drift stream's first {start} of {n_frames} frames are already scored{again}")
    kept_at = start
    try:
        for chunk in chunks:
            scores.add(chunk)
            if keep is not None and scores.seen - kept_at >= STREAM_KEEP_FRAMES:
                keep(scores.state())
                kept_at = scores.seen
                if model_chunks is not None and state_file is not None and model_chunks.keeps_state:
                    # (after the scores: a kill between the two costs frames made again, not wrong scores)
                    model_chunks.save(state_file)
    except StreamMadeOtherwise:
        note and note(
            "the drift stream made again differs from the one scored before: scoring it from its start"
        )
        made and made(-shown[0])  # (its bar went on past its end, to "46frame" of 30)
        return score_stream(
            ev, split, minutes, size, session, roundtrip, lead, stream_progress, None, keep, note, state_file
        )
    except BaseException as e:
        if not is_stop(e):  # (a Ctrl-C; a SIGTERM, `terminate_as_exit`; or an import such a stop failed)
            raise
        if keep is not None and scores.seen > kept_at and (state := scores.state()) is not None:
            keep(state)  # (what was scored up to the Ctrl-C: the same command goes on from there)
        raise
    return scores.result()


class StreamMadeOtherwise(Exception):
    """A model's drift stream made again is not the one whose first frames were scored (the frame
    before the resumed one differs)."""


def _resumed(chunks, state_file, scored: int, note) -> int:
    """The frame the model's stream goes on from: that of the state in `state_file` (at most the
    `scored` ones), else 0 (the stream made from its start, as without one)."""
    from streamgen.stream_state import SessionStateError

    if not Path(state_file).exists():
        return 0
    try:
        return chunks.resume(state_file, scored)
    except SessionStateError as e:
        note and note(f"the model's stream is made again from its start: {e}")
        return 0


def _after(chunks, start: int, last: np.ndarray):
    """The frames from `start` on of the chunks of a stream made again (a chunk's frames before it
    dropped), once its frame `start - 1` is found to be `last`, the one scored before:
    StreamMadeOtherwise where it is not."""
    got, checked = 0, False
    try:
        for chunk in chunks:
            end = got + len(chunk)
            if not checked and got < start <= end:
                if not np.array_equal(chunk[start - 1 - got], last[0]):
                    raise StreamMadeOtherwise
                checked = True
            if end > start:
                yield chunk[max(0, start - got) :]
            got = end
    finally:  # (now: the session is started again for the stream made afresh)
        chunks.close()


def _first_identity(split: str) -> int:
    from streamgen.data.world import identity_split

    return next(i for i in range(100, 200) if identity_split(i) == split)
