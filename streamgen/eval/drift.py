"""The --minutes drift stream of `streamgen eval`: one long take of one identity, made by the
model (or rendered, or through an autoencoder and back) and scored chunk by chunk as it is made,
its scores so far kept for a stopped run to go on from."""

from __future__ import annotations

import numpy as np

# frames of the renderer's drift stream rendered (and scored) at a time
STREAM_SLICE = 250
# frames of the drift stream scored between the saves of its scores so far (a minute of video;
# the scores of an hour's stream are 3 MB at its end)
STREAM_KEEP_FRAMES = 1500


def score_stream(
    ev, split, minutes, size, session, roundtrip, lead, stream_progress, kept=None, keep=None, note=None
) -> dict:
    """The --minutes stream's per-frame CSIM and colour and its detectors' counts, scored chunk by
    chunk as it is made: only an autoencoder's round trip holds it whole (it encodes it at once).
    Its scores so far go to `keep` every STREAM_KEEP_FRAMES frames and when it is stopped (a
    Ctrl-C); `kept`, such scores of a stopped run, are gone on from: the renderer's stream (and a
    round trip's) from the frame after them; a model's is made again from its start (its session's
    state, a KV cache, is not kept), its frames up to there not scored again."""
    from streamgen.data.render import Identity, render_frame
    from streamgen.data.world import make_stream

    from .metrics import StreamScores
    from .report import EVAL_SEED, stream_session_chunks

    clip = make_stream(EVAL_SEED, _first_identity(split), minutes, size, size, render=roundtrip is not None)
    n_frames = len(clip.motion)
    made = (lambda n: stream_progress(n, n_frames)) if stream_progress else None
    scores = StreamScores(ev, clip.reference, lead)
    if kept is not None and not (scores.restore(kept) and scores.seen <= n_frames):
        scores = StreamScores(ev, clip.reference, lead)  # (not this stream's: scored afresh)
    start = scores.seen
    if start and note:
        again = " (the model makes it again up to there, unscored)" if session is not None else ""
        note(f"resuming: the drift stream's first {start} of {n_frames} frames are already scored{again}")
    if session is not None:
        chunks = stream_session_chunks(
            session, clip.reference, clip.audio, clip.caption, n_frames, EVAL_SEED, made
        )
        chunks = _after(chunks, start, scores.last) if start else chunks
    else:
        identity = Identity.from_id(clip.meta["identity_id"])
        whole = roundtrip(clip.video) if roundtrip is not None else None

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
    kept_at = start
    try:
        for chunk in chunks:
            scores.add(chunk)
            if keep is not None and scores.seen - kept_at >= STREAM_KEEP_FRAMES:
                keep(scores.state())
                kept_at = scores.seen
    except StreamMadeOtherwise:
        note and note(
            "the drift stream made again differs from the one scored before: scoring it from its start"
        )
        return score_stream(ev, split, minutes, size, session, roundtrip, lead, stream_progress, None, keep)
    except KeyboardInterrupt:
        if keep is not None and scores.seen > kept_at and (state := scores.state()) is not None:
            keep(state)  # (what was scored up to the Ctrl-C: the same command goes on from there)
        raise
    return scores.result()


class StreamMadeOtherwise(Exception):
    """A model's drift stream made again is not the one whose first frames were scored (the frame
    before the resumed one differs)."""


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
