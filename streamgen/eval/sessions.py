"""The models `streamgen eval` scores, and how their frames are made: a student's StreamSession or a
teacher's TeacherSession (`open_session`), their frames for one clip (`generate_with_stream_session`)
or chunk by chunk for a stream (`SessionChunks`), and an autoencoder's round trip of the clips
(`autoencoder_roundtrip`, `--model roundtrip:MODEL`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamgen.files import home_expanded

GROUND_TRUTH = "ground-truth"
# "roundtrip:MODEL": the clips through MODEL's autoencoder and back, the ceiling of any
# generator that decodes with it (MODEL: a model name or directory, or an autoencoder directory)
ROUNDTRIP = "roundtrip:"


def generate_with_stream_session(
    session, reference, audio, caption, n_frames, seed, progress=None
) -> np.ndarray:
    """Frames a StreamSession makes for one clip: push audio ahead of the video, pull chunks
    (`progress(frames)` after each).

    The clip's caption conditions models that take sentence embeddings; models
    without that width (the debug flavor) are scored uncaptioned.
    """
    chunks = SessionChunks(session, reference, audio, caption, n_frames, seed, progress)
    return np.concatenate(list(chunks))


class SessionChunks:
    """`generate_with_stream_session`'s frames chunk by chunk, `n_frames` in all, iterated once: for
    a stream scored as it is made (an hour's frames were held whole, 10x their bytes at the peak).
    Between two chunks `save(path)` keeps where it is (the session's state, the frames made, the
    audio pushed), and `resume(path)` before the first makes the stream go on from there."""

    def __init__(self, session, reference, audio, caption, n_frames, seed, progress=None):
        self.session, self.reference, self.audio, self.caption = session, reference, audio, caption
        self.n_frames, self.seed, self.progress = n_frames, seed, progress
        self.made = self.pushed = 0  # frames made (and given out), audio samples pushed
        self._resumed = False

    def save(self, path) -> None:
        from streamgen.stream_state import save_session_state

        extra = {"made": self.made, "pushed": self.pushed, "n_frames": self.n_frames, "seed": self.seed}
        save_session_state(self.session, path, extra)

    @property
    def keeps_state(self) -> bool:
        """Whether `save` can keep the session's state: a StreamSession's. A teacher's TeacherSession
        (offline windows) has none to save (save_session_state failed on it with a traceback, the
        first minute of its stream scored): its stream is made again from its start."""
        from streamgen.stream import StreamSession

        return isinstance(self.session, StreamSession)

    def resume(self, path, at_most: int) -> int:
        """Go on from the state `save` left in `path` (of this stream, at most `at_most` frames
        in): the frames made up to it. A SessionStateError where it is not such a state."""
        from streamgen.stream_state import SessionStateError, restore_session_state

        extra = restore_session_state(self.session, path)
        if extra.get("n_frames") != self.n_frames or extra.get("seed") != self.seed:
            raise SessionStateError(f"{path}: the state of another stream")
        if not 0 < extra.get("made", 0) <= at_most:
            raise SessionStateError(f"{path}: a state {extra.get('made')} frames in, not 1 to {at_most}")
        self.made, self.pushed, self._resumed = extra["made"], extra["pushed"], True
        return self.made

    def __iter__(self):
        from streamgen.media import from_time_zero
        from streamgen.model.text import TEXT_DIM

        session, audio = self.session, self.audio
        if not self._resumed:
            text = self.caption if self.caption and session.cfg.text_dim == TEXT_DIM else None
            session.start(self.reference, text=text, seed=self.seed)
        samples_per_frame = 640
        try:
            while self.made < self.n_frames:
                # keep the audio 2 s ahead of the video, as a live caller would
                want = min(len(audio), (self.made + 50) * samples_per_frame)
                if want > self.pushed:
                    session.push_audio(audio[self.pushed : want])
                    self.pushed = want
                chunk, pts = session.next_chunk()
                if len(chunk) == 0:
                    raise RuntimeError("the model returned an empty chunk")
                if self.made == 0:  # frame i of the result is the audio's frame i (scored for lip sync)
                    chunk = from_time_zero(chunk, pts)
                chunk = chunk[: self.n_frames - self.made]
                self.progress and self.progress(len(chunk))
                self.made += len(chunk)
                yield chunk
        finally:
            session.close()


class ModelLoadError(ValueError):
    """The model to evaluate cannot be loaded or cannot run at the requested size."""


def open_session(
    model: str,
    height: int,
    width: int,
    device: str,
    steps: int | None,
    decode_dtype="auto",
    cache_from=None,
    dtype="auto",
    encode_dtype="auto",
):
    """A student's StreamSession, or a teacher's TeacherSession (offline windows, its model.json's steps + CFG)."""
    from streamgen.teacher import open_session as open_any

    try:
        return open_any(model, height, width, steps, device, dtype, decode_dtype, cache_from, encode_dtype)
    except (FileNotFoundError, ValueError, KeyError) as e:
        export = _autoencoder_export(model)
        if export is not None:  # (was "a folder without model.json: not a streamgen model")
            what = "it is an autoencoder's export" if export == model else f"its model, {export}, is an autoencoder"
            raise ModelLoadError(
                f"cannot load model {model!r}: {what} (vae_config.json, no model.json); "
                f"eval scores an autoencoder with --model {ROUNDTRIP}{export}"
            ) from None
        raise ModelLoadError(f"cannot load model {model!r}: {e}") from None


def _autoencoder_export(model: str) -> str | None:
    """`model`, or its run's model folder, where it is a folder `autoencoder_roundtrip` takes (an
    autoencoder stage's export, or that stage's run folder) and no model; else None."""
    for folder in (Path(model), Path(model) / "model"):
        found = home_expanded(folder)  # (`--model=~/ae`: no shell expands `~` after `=`)
        if (found / "vae_config.json").is_file() and not (found / "model.json").exists():
            return model if folder == Path(model) else str(folder)
    return None


# the memory an autoencoder's round trip of the --minutes stream peaks at, in bytes of its frames
# (uint8 RGB), measured at 64x64 over 1 to 4 minute streams: 39x (its activations over the whole
# stream at once). The renderer's and a model's streams are scored chunk by chunk (`StreamScores`):
# they hold no more than a chunk of frames, whatever their length (6.2x and 8.6x, held whole).
ROUNDTRIP_BYTES_PER_FRAME_BYTE = 45


def stream_memory_problem(model: str, minutes: float, size: int) -> str | None:
    """Why this machine has not the memory a `minutes` stream at `size` takes, or None: the
    kernel kills the process once the stream is made (an autoencoder's round trip of an hour
    takes 40 GiB at 64x64)."""
    from streamgen.models import free_memory

    if not model.startswith(ROUNDTRIP):
        return None
    per_minute = 60 * 25 * size * size * 3 * ROUNDTRIP_BYTES_PER_FRAME_BYTE
    free = free_memory()
    if free is None or minutes * per_minute <= free:
        return None
    return (
        f"a {minutes:g}-minute stream at {size}x{size} takes about {minutes * per_minute / 2**30:.1f} GiB "
        f"to score; this machine has {free / 2**30:.1f} GiB free: --minutes {free / per_minute:.1f} at most"
    )


def session_dtypes(session) -> dict:
    """The dtypes a session's DiT and reference encoder ran in (None for the rows without a model)."""
    if session is None:
        return {"dtype": None, "encode_dtype": None}
    return {
        "dtype": str(next(session.dit.parameters()).dtype).removeprefix("torch."),
        "encode_dtype": str(next(session.vae.parameters()).dtype).removeprefix("torch."),
    }


def autoencoder_roundtrip(name: str):
    """A function: uint8 video [T, H, W, 3] -> the same video encoded and decoded by `name`'s autoencoder."""
    import torch

    from streamgen.model.vae import TinyCausalVAE
    from streamgen.models import load_model

    path = home_expanded(name)  # (`roundtrip:~/ae` was taken for a model's name, "not a streamgen model")
    try:
        vae = TinyCausalVAE.load(path) if (path / "vae_config.json").exists() else load_model(name).vae
    except (FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"cannot load the autoencoder of {name!r}: {e}") from None
    if not isinstance(vae, TinyCausalVAE):  # WanVAE's 1 + 4k frame layout would need its own padding
        raise ModelLoadError(
            f"roundtrip scores TinyCausalVAE autoencoders; {name!r} has a {type(vae).__name__}"
        )
    vae.eval()

    @torch.no_grad()
    def roundtrip(video: np.ndarray) -> np.ndarray:
        tf = vae.temporal_factor
        padded = np.concatenate([video, np.repeat(video[-1:], -len(video) % tf, axis=0)])
        x = torch.from_numpy(padded).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        y = vae.decode(vae.encode(x))[0, :, : len(video)]
        return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    roundtrip.vae = vae  # (its weights: part of what the evaluation is of)
    return roundtrip
