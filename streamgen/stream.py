"""StreamSession: the one object the server talks to.

    session = StreamSession("tiny-avatar")
    session.start(reference_rgb_uint8, text="smiling", seed=0)
    session.push_audio(pcm_16k)                 # any time, up to max_audio_ahead_s ahead
    frames, pts = session.next_chunk()          # uint8 [T, H, W, 3], seconds
    session.close()

The reference may be a file's path, a PIL image or a uint8 array. A session makes one chunk at a
time: a second thread's call while one runs is refused (push_audio, close and the
decode_beside_reencode switch wait for it instead); give each thread its own session, or batch
them (streamgen/stream_batch.py).

It owns the KV cache (sink + ring), the audio timeline and the decoder state;
none of them grows with the length of the stream. Audio is placed on the
stream's own timeline: sample n belongs to video time n / 16000 s. A chunk that
needs audio which has not arrived treats it as silence (the avatar idles), and
audio arriving after its time has passed starts at the current position
instead, so lateness never accumulates into latency.
"""

from __future__ import annotations

import logging
import numbers
import random
import threading
from contextlib import contextmanager

import numpy as np
import torch

from streamgen.cpu_threads import (
    allowed_threads,
    check_cpu_threads,
    check_decode_threads,
    session_stage_threads,
)
from streamgen.decode_beside_reencode import decoded_beside_reencode, switched_decode_stream
from streamgen.model.audio import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    VIDEO_FPS,
    needed_video_frames,
)
from streamgen.model.text import text_context
from streamgen.models import AvatarModel, load_model
from streamgen.precision import autoencoder_dtype, default_dit_dtype, dit_dtype_arg
from streamgen.sampling import (
    check_cache_from,
    encode_sink,
    generate_chunk,
    reencode_chunk,
    student_sigmas,
)
from streamgen.session_limits import SEED_END
from streamgen.start_memo import StartState
from streamgen.stream_inputs import (
    check_caption,
    check_model_device,
    check_predicted_channels,
    check_seed,
    positive_size,
    prepare_reference,
    session_device,
    session_frame_size,
    to_pcm_float,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_reference(vae, ref: np.ndarray, device) -> torch.Tensor:
    """A prepared reference image (uint8 [H, W, 3]) -> its latent frame [1, C, 1, h, w]."""
    dtype = next(vae.parameters()).dtype
    img = torch.from_numpy(ref).to(device).permute(2, 0, 1)[None].to(dtype) / 127.5 - 1
    return vae.encode_reference(img)


# what next_chunk does, in order; "reencode" writes the previous chunk's clean K/V (StreamSession.next_chunk)
CHUNK_STAGES = ("reencode", "audio", "denoise", "decode", "to_host")
# what start does besides bookkeeping: the reference image resized, its latent, the sink's K/V
# (a known avatar's start skips "reference_encode" and its "sink" copies the kept one)
START_STAGES = ("prepare", "reference_encode", "sink")


def _run_stage(_stage: str, fn):
    return fn()


class StreamSession:
    def __init__(
        self,
        model: str | AvatarModel = "tiny-avatar",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        device="cpu",
        dtype: torch.dtype | str | None = "auto",
        max_audio_ahead_s: float = 600.0,
        decode_dtype: torch.dtype | str | None = "auto",
        cache_from: str | None = None,
        cpu_threads: str = "auto",
        encode_dtype: torch.dtype | str | None = "auto",
        decode_threads: str = "auto",
    ):
        """dtype: the DiT's weights and cache, a dtype or its name (None: the model's own, as
        loaded; "auto": `default_dit_dtype`, bfloat16 for the larger sizes on CPUs with AMX, unless
        the model was loaded in a dtype asked for; a dtype other than the model's runs a copy of
        its DiT, `AvatarModel.dit_in`). decode_dtype: the autoencoder's decoder, a dtype or its name ("auto":
        `default_decode_dtype`, bfloat16 on CPUs with AMX or AVX512-BF16; None: as loaded); encode_dtype: its encoder,
        which encodes the reference image at the start, likewise. cache_from: where
        each chunk's keys/values in the ring come from (`streamgen.sampling.CACHE_FROM`; None:
        the model's own, "reencode" unless it was trained otherwise; at 1 step "last_step" asked
        for is a ValueError, and a model's own re-encodes: `_cache_from`). cpu_threads: on a CPU,
        "auto" runs each stage on one thread unless its work gains from all of them
        (streamgen/cpu_threads.py), "all" every stage on all. decode_threads: on a CPU, "split"
        runs each of the decoder's convolutions over the decode's threads, "frames" decodes the
        chunk's frames side by side on all threads, one each (an autoencoder that cannot: split),
        "auto" frames where the decode has at least as many latent frames as threads, else split
        (`cpu_threads.DECODE_THREADS`)."""
        dtype = dit_dtype_arg(dtype)
        device = session_device(device)
        self.model = (
            model if isinstance(model, AvatarModel) else load_model(model, device=device, dtype=dtype)
        )
        check_model_device(self.model, device)
        if self.model.meta.get("kind") == "teacher":
            raise ValueError(teacher_cannot_stream(self.model.name))
        decode_dtype = autoencoder_dtype(decode_dtype, self.model.vae, device, "decode dtype")
        encode_dtype = autoencoder_dtype(encode_dtype, self.model.vae, device, "encode dtype")
        self.cfg = self.model.cfg
        check_predicted_channels(self.model)
        self.vae = self.model.session_vae(decode_dtype, encode_dtype)
        # (None: the model's; 0 was taken as None)
        self.height, self.width = session_frame_size(height, width, self.model, self.vae)
        self.latent_hw = self.vae.latent_hw(self.height, self.width)
        if dtype == "auto":
            dtype = default_dit_dtype(self.model, device, self.latent_hw)
        self.dit = self.model.dit_in(dtype)
        self.dtype = next(self.dit.parameters()).dtype  # the patch embedding's: never FP8
        self.steps = self.model.steps if steps is None else positive_size(steps, "steps")
        self.cache_from = _cache_from(cache_from, self.model, self.steps)
        self.sigmas = student_sigmas(self.steps, self.model.shift)
        self.device = device
        self.cpu_threads = check_cpu_threads(cpu_threads)
        self.decode_threads = check_decode_threads(decode_threads)
        # (0 refused every push; NaN and infinity failed in int())
        number = isinstance(max_audio_ahead_s, numbers.Real) and not isinstance(max_audio_ahead_s, bool)
        if not number or not 0 < max_audio_ahead_s < float("inf"):
            raise ValueError(
                f"max_audio_ahead_s must be a finite number of seconds > 0, got {max_audio_ahead_s!r}"
            )
        self.max_audio_ahead = int(max_audio_ahead_s * SAMPLE_RATE)
        self.cache = None
        self._pending = None  # the last chunk's (latents, audio, context), re-encoded by the next
        self._decode_stream = None  # a CUDA stream while decode_beside_reencode
        self.started = False
        # held while a call changes the stream (`in_use`); the audio timeline has a lock of its own,
        # so that another thread may push audio while a chunk is made
        self._busy = threading.RLock()
        self._audio_lock = threading.Lock()

    @contextmanager
    def in_use(self, wait: bool = False):
        """The session for this thread alone: another thread's call while one runs is refused
        (RuntimeError) rather than interleaved (two threads' chunks drew from one generator and
        cache, and made other frames than one after the other), or with `wait`, waited for."""
        if not self._busy.acquire(blocking=wait):
            raise RuntimeError(
                "this StreamSession is in use by another thread: a session makes one chunk at a time "
                "(give each thread its own session)"
            )
        try:
            yield self
        finally:
            self._busy.release()

    @property
    def decode_beside_reencode(self) -> bool:
        """On CUDA: each chunk decodes on a second CUDA stream while its clean re-encode runs on
        the first, so that the GPU may run the decoder's memory-bound kernels beside the
        re-encode's matrix products (the H200 profile: 232 ms of decoding at 159 TFLOP/s, 107 ms
        of re-encode). next_chunk returns once the frames are on the host; the re-encode may
        still be running, ahead of the next chunk's work on the first stream; a batch of such
        sessions (`stream_batch.next_chunks`) decodes on its first one's second stream beside the
        batch's re-encode. Off by default until a GPU run times it (bench gpu's `decode beside re-encode`)."""
        return self._decode_stream is not None

    @decode_beside_reencode.setter
    def decode_beside_reencode(self, enabled: bool) -> None:
        if enabled and self.device.type != "cuda":
            raise ValueError("decode_beside_reencode needs a CUDA device (two CUDA streams)")
        # after a chunk another thread is making (as close): it decodes on the stream it began with
        with self.in_use(wait=True):
            self._decode_stream = switched_decode_stream(self, enabled)

    # --- timing ---------------------------------------------------------------
    @property
    def frames_per_chunk(self) -> int:
        """Video frames produced by one next_chunk() (the first chunk of a stream under Wan's
        1 + 4k layout: `vae.first_frame_index` fewer)."""
        return self.cfg.frames_per_chunk * self.vae.temporal_factor

    def chunk_pts(self, index: int) -> float:
        """Stream time of chunk `index`'s first frame: chunk k spans video frames
        [k, k + 1) * frames_per_chunk of the audio's timeline, of which the first chunk of a
        1 + 4k stream starts `vae.first_frame_index` frames in."""
        first = index * self.frames_per_chunk + (self.vae.first_frame_index if index == 0 else 0)
        return first / VIDEO_FPS

    @property
    def chunks_to_full_ring(self) -> int:
        """Chunks a fresh stream makes up to the first that attends to a full ring, that one
        included: by then every attention length of a stream has run once (a warm-up that stops
        short leaves a GPU's per-shape work, cuDNN's plans or an autotuner's timings, to the first
        stream that reaches the longer lengths)."""
        return -(-self.cfg.window_frames // self.cfg.frames_per_chunk) + 1

    @property
    def chunk_seconds(self) -> float:
        return self.frames_per_chunk / VIDEO_FPS

    @property
    def audio_lookahead_seconds(self) -> float:
        return self.cfg.audio_lookahead_frames / VIDEO_FPS

    @property
    def video_time(self) -> float:
        """Presentation time of the next chunk's first frame."""
        return self.chunk_pts(self.chunk_index) if self.started else 0.0

    # --- CPU threads ----------------------------------------------------------------
    def stage_threads(self, stage: str, batch: int = 1):
        """A context that runs `stage` (of `CHUNK_STAGES` or `START_STAGES`) for `batch` streams on
        the threads its work gains from (`cpu_threads.session_stage_threads`)."""
        return session_stage_threads(self, stage, batch)

    def decodes_frames_apart(self, batch: int = 1) -> bool:
        """Whether the decode of `batch` streams' chunks runs its frames side by side
        (decode_threads="frames", or "auto" with no fewer latent frames than threads; where it can)."""
        if self.device.type != "cpu" or not self.vae.frames_decode_apart:
            return False
        if self.decode_threads == "auto":
            return batch * self.cfg.frames_per_chunk >= allowed_threads()
        return self.decode_threads == "frames"

    def decode_options(self, batch: int = 1) -> dict:
        """The keywords of the decoder's call for `batch` streams (on the decode stage's threads)."""
        return {"frame_threads": torch.get_num_threads()} if self.decodes_frames_apart(batch) else {}

    def _threaded(self, run):
        """`run(stage, fn)` with each stage on its threads (`stage_threads`)."""

        def threaded(stage, fn):
            with self.stage_threads(stage):
                return run(stage, fn)

        return threaded

    # --- lifecycle --------------------------------------------------------------
    def start(
        self,
        reference,
        text: str | None = None,
        seed: int | None = None,
        context: torch.Tensor | None = None,
        observe=None,
    ) -> None:
        """context: the text tokens [1, L, text_dim] themselves instead of `text` (e.g. Wan's T5
        embeddings, made elsewhere). observe(stage, fn) -> fn(), if given, runs each of
        `START_STAGES` (as next_chunk's `observe`)."""
        with self.in_use():
            self._start(reference, text, seed, context, observe)

    def _start(self, reference, text, seed, context, observe) -> None:
        run = self._threaded(observe or _run_stage)
        # everything a caller can get wrong first: a refused start leaves a running stream as it was
        seed = random.randrange(SEED_END) if seed is None else check_seed(seed)
        if context is None:
            check_caption(text)
            context = text_context(text, self.cfg.text_dim)
        elif text is not None:
            raise ValueError("give a text or a context, not both")
        if context.ndim != 3 or context.shape[0] != 1 or context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"context must be [1, tokens, {self.cfg.text_dim}], got {list(context.shape)}")
        if context.device.type != "meta" and not torch.isfinite(context).all():
            raise ValueError("context holds NaN or infinite values")  # (every frame came out black)
        ref = run("prepare", lambda: prepare_reference(reference, self.height, self.width))
        # from here the old stream is gone: a failure below leaves none started, not a broken one
        self.started = False
        self.seed = seed
        self.generator = torch.Generator().manual_seed(self.seed)
        self.context = context.to(self.device, self.dtype)
        # the loaded autoencoder's: latents go into the decoder and frames come out in it
        self.vae_dtype = next(self.model.vae.parameters()).dtype
        self._pending = None
        if self.cache is None:
            self.cache = self.dit.new_cache(1, self.latent_hw, self.dtype, self.device)
        else:
            self.cache.reset()
        self._start_sink(ref, run)
        self.decoder_state = self.vae.init_state(1)
        self.chunk_index = 0
        with self._audio_lock:
            self._pcm = np.zeros(0, np.float32)
            self._pcm_origin = 0  # absolute sample index of _pcm[0]
            self._write_pos = 0  # where the next pushed sample goes
            self._consumed = 0  # samples up to here have been used (or taken as silence)
            self._kept_from = 0  # samples before it are no longer read (`_drop_used_audio`)
            self._keep_after_chunk = 0  # and those before this, once the chunk being made is made
        self.started = True

    def _start_sink(self, ref: np.ndarray, run=_run_stage) -> None:
        """The reference latent and the cache's sink: as a start of the same reference and text
        made them (streamgen/start_memo.py), or computed and kept."""
        memo = self.model.start_memo
        # every sequence-parallel rank must run the sink's forward together, and the meta device
        # (bench/floor.py counts on it) has no values to tell starts apart
        if memo.capacity <= 0 or hasattr(self.dit, "sequence_parallel_groups") or self.device.type == "meta":
            return self._compute_sink(ref, run)
        key = memo.key(ref, self.context, self.dit, self.vae)
        state = memo.lookup(key, self.dit, self.vae)
        if state is None:
            self._compute_sink(ref, run)
            memo.store(key, self.dit, self.vae, StartState.capture(self.reference_latent, self.cache))
        else:
            self.reference_latent = state.reference_latent
            run("sink", lambda: state.restore(self.cache))

    def _compute_sink(self, ref: np.ndarray, run=_run_stage) -> None:
        encoded = run("reference_encode", lambda: encode_reference(self.vae, ref, self.device))
        self.reference_latent = encoded.to(self.dtype)
        run("sink", lambda: encode_sink(self.dit, self.cache, self.reference_latent, self.context))

    def set_text(self, text: str | None) -> None:
        """Change the caption mid-stream (the identity sink stays as encoded)."""
        check_caption(text)
        with self.in_use():
            self._require_started()
            self.write_pending_chunk()  # with the caption it was made with, before its keys are dropped
            self.context = text_context(text, self.cfg.text_dim).to(self.device, self.dtype)
            for layer in self.cache.layers:
                layer.context_kv = None  # the cross-attention keys were computed from the old caption

    def close(self) -> None:
        """End the stream (after a chunk another thread is making) and free its cache."""
        with self.in_use(wait=True):
            self.cache = None
            self._pending = None
            self.decoder_state = None
            with self._audio_lock:
                self._pcm = np.zeros(0, np.float32)
            self.started = False

    # --- audio --------------------------------------------------------------------
    def push_audio(self, pcm) -> None:
        """Append mono 16 kHz PCM (int16 or float in [-1, 1]) to the stream's audio timeline: at most
        `max_audio_ahead_s` ahead of the video (a BufferError past it: feed a long file as the
        chunks use it, as `generate` does). Another thread may push while a chunk is made."""
        self._require_started()
        a = to_pcm_float(pcm)
        if a.size == 0:
            return
        with self._audio_lock:
            self._push(a)

    def _push(self, a: np.ndarray) -> None:
        start = max(self._write_pos, self._consumed)  # late audio starts now, never in the past
        if start + a.size - self._consumed > self.max_audio_ahead:
            raise BufferError(
                f"audio buffer full: more than {self.max_audio_ahead / SAMPLE_RATE:.0f} s ahead of the video"
            )
        end_rel = start + a.size - self._pcm_origin
        if end_rel > self._pcm.size:
            # grown by doubling: zeros past the pushed audio read as the silence it would be anyway
            # (growing it to fit copied all of the audio buffered at every push: 120 s pushed ahead
            # in 20 ms frames took 22 s, and held the audio lock, which the next chunk waits for);
            # the samples no chunk reads any more are left behind
            live = self._pcm[self._kept_from - self._pcm_origin :]
            self._pcm_origin = self._kept_from
            end_rel = start + a.size - self._pcm_origin
            grown = np.zeros(max(end_rel, 2 * live.size), np.float32)
            grown[: live.size] = live
            self._pcm = grown
        self._pcm[start - self._pcm_origin : end_rel] = a
        self._write_pos = start + a.size

    @property
    def audio_buffered_seconds(self) -> float:
        """Audio received but not yet used by a chunk."""
        return max(0, self._write_pos - self._consumed) / SAMPLE_RATE if self.started else 0.0

    def _audio_samples(self, start: int, end: int) -> np.ndarray:
        """Absolute samples [start, end); anything not received is silence."""
        out = np.zeros(end - start, np.float32)
        lo, hi = max(start, self._kept_from), min(end, self._pcm_origin + self._pcm.size)
        if hi > lo:
            out[lo - start : hi - start] = self._pcm[lo - self._pcm_origin : hi - self._pcm_origin]
        return out

    def _audio_span(self, latent_start: int) -> tuple[np.ndarray, int] | None:
        """The samples the audio encoder reads for the chunk from `latent_start`, and the video
        frame of their first token (None without an audio encoder); advances the timeline."""
        cfg, enc = self.cfg, self.dit.audio_encoder
        if enc is None:  # the audio is the chunk's all the same: else it piled up, to a BufferError
            with self._audio_lock:
                self._drop_used_audio(needed_video_frames(latent_start + cfg.frames_per_chunk, cfg))
            return None
        with self._audio_lock:
            return self._take_audio_span(latent_start, cfg, enc)

    def _drop_used_audio(self, end_frame: int, keep_from: int | None = None) -> None:
        """The timeline used up to video frame `end_frame`; its samples before `keep_from` (else
        `end_frame`) let go once the chunk is made (`_next_pts`: a failed chunk's retry reads them).
        Those let go stay in the buffer until they are over half of it (or a push grows it): the
        rest of it was copied at every chunk (up to `max_audio_ahead_s` of audio, 38 MB at 600 s,
        under the audio lock that pushes wait for); a sample is copied O(1) times now."""
        self._consumed = max(self._consumed, end_frame * SAMPLES_PER_FRAME)
        keep = (end_frame if keep_from is None else keep_from) * SAMPLES_PER_FRAME
        self._keep_after_chunk = max(self._kept_from, keep)
        gone = self._kept_from - self._pcm_origin
        if gone > self._pcm.size // 2:
            self._pcm = self._pcm[gone:].copy()
            self._pcm_origin = self._kept_from

    def _take_audio_span(self, latent_start: int, cfg, enc) -> tuple[np.ndarray, int]:
        first_needed = latent_start * cfg.temporal_compression - cfg.audio_context_frames
        end_frame = needed_video_frames(latent_start + cfg.frames_per_chunk, cfg)
        # recompute the causal encoder over its receptive field: equal to encoding the whole stream
        first = max(0, first_needed - enc.receptive_field_frames)
        pcm = self._audio_samples(first * SAMPLES_PER_FRAME, end_frame * SAMPLES_PER_FRAME)
        # keep only what the next chunk's receptive field can still reach
        keep_from = max(
            0, (first_needed + cfg.frames_per_chunk * cfg.temporal_compression - enc.receptive_field_frames)
        )
        self._drop_used_audio(end_frame, keep_from)
        return pcm, first

    def _prepare_chunk(self):
        """This chunk's audio windows and starting noise (advances the audio timeline and the RNG)."""
        from streamgen.stream_batch import prepare_chunks  # (here: stream_batch imports this module)

        return prepare_chunks([self])[0]

    # --- generation ---------------------------------------------------------------
    def next_chunk(self, observe=None) -> tuple[np.ndarray, float]:
        """Generate the next chunk: (frames uint8 [T, H, W, 3], pts of its first frame in seconds).

        observe(stage, fn) -> fn(), if given, runs each stage of the chunk (one of
        `CHUNK_STAGES`) so that a benchmark can time or count it (bench/floor.py); one that
        does not run "to_host" (a model on the meta device has no values) gets None frames.
        A call that raises (the model's error, a CUDA OOM, a Ctrl-C) leaves the session as it was
        (`_undone_on_failure`; the last chunk's re-encode, written first, stays written): a retry
        makes the chunk a first success would have made.
        """
        with self.in_use():
            return self._next_chunk(observe)

    def _next_chunk(self, observe) -> tuple[np.ndarray, float]:
        run = self._threaded(observe or _run_stage)
        self._require_started()
        # A chunk returns its frames before its clean re-encode writes its K/V into the cache
        # (15% of a chunk, on the H200 and on this CPU): only the next chunk's denoising reads
        # them. A caller writes them while the frames travel (`write_pending_chunk`, as the
        # server's worker does), or the next chunk does it here, first. The frames are the same;
        # a stream's first frames come that much sooner either way.
        run("reencode", self.write_pending_chunk)
        beside = self._decode_stream is not None and observe is None  # (a timed stage runs alone)
        with self._undone_on_failure(cache_written=beside or self.cache_from == "last_step"):
            audio, noise = run("audio", self._prepare_chunk)

            def denoise():  # the steps read the cache (under "last_step" the last one writes it too)
                return generate_chunk(
                    self.dit, self.cache, noise, self.context, audio, self.sigmas, self.generator,
                    reencode=False, cache_from=self.cache_from,
                )  # fmt: skip

            with torch.no_grad():
                latents = run("denoise", denoise)
            if self.cache_from == "reencode":
                self._pending = (latents, audio, self.context)
            if beside:  # (the decoder's state lives on the second stream only)
                frames = decoded_beside_reencode(
                    self._decode_stream, self.device, latents, self.decoder_state,
                    lambda: self._decode(latents), self.write_pending_chunk,
                )  # fmt: skip
                return frames.numpy(), self._next_pts()
            return self._finish_chunk(latents, run)

    @contextmanager
    def _undone_on_failure(self, cache_written: bool):
        """A chunk's block, after its pending re-encode: where it raises, what it changed is put back
        (`chunk_undo`). It had moved the audio timeline and the generator, and the retry made another
        chunk, later in the audio. The re-encode stays: it reads only what the last chunk left, so
        written at the failed call or at the retry it writes the same keys and values (the retry's
        frames are a first success's: tests/test_stream_atomic.py). Undone, it would keep the slots it
        overwrote through the chunk (0.86 GB in bf16 for wan2.1-1.3b at 832x480) for the same frames."""
        undo = self.chunk_undo(cache_written)
        try:
            yield
        except BaseException:
            undo()
            raise

    def chunk_undo(self, cache_written: bool):
        """A function that puts back what the next chunk changes (here and in a batch). cache_written:
        it writes itself into the ring (`StreamCache.ring_write_undo`); else it only reads the cache."""
        generator, chunk_index = self.generator.get_state(), self.chunk_index
        pending, decoder_state = self._pending, self.decoder_state
        ring_undo = self.cache.ring_write_undo() if cache_written else None
        with self._audio_lock:
            consumed = self._consumed

        def undo():
            if ring_undo is not None:
                ring_undo()
            self.generator.set_state(generator)
            self.chunk_index, self._pending, self.decoder_state = chunk_index, pending, decoder_state
            with self._audio_lock:
                # (audio pushed meanwhile stays where it went: after what the chunk took, as after
                # a success; the samples the chunk would have let go were kept until it was made)
                self._consumed = consumed
                self._keep_after_chunk = self._kept_from

        return undo

    @property
    def chunk_pending(self) -> bool:
        """True while the last chunk's clean K/V are not yet in the cache (the next chunk writes them)."""
        return self._pending is not None

    @torch.no_grad()
    def write_pending_chunk(self) -> None:
        """Write the last chunk into the cache (its clean re-encode) if that is still to do."""
        with self.in_use():
            if self._pending is not None:
                latents, audio, context = self._pending
                # (a failed re-encode leaves the chunk pending and the ring as it was)
                with self.stage_threads("reencode"), self.cache.ring_write_undone_on_failure():
                    reencode_chunk(self.dit, self.cache, latents, context, audio)
                self._pending = None

    @torch.no_grad()
    def _finish_chunk(self, latents: torch.Tensor, run=None) -> tuple[np.ndarray, float]:
        """Decode the chunk's clean latents (the cache already holds them) to uint8 frames."""
        run = run or self._threaded(_run_stage)
        out = run("decode", lambda: self._decode(latents))
        frames = run("to_host", lambda: out.cpu().numpy())
        return frames, self._next_pts()

    def _next_pts(self) -> float:
        """The pts of the chunk just made (its first frame's), the chunk counted and the audio only
        it read let go: the last of a chunk's work, done once nothing of it can fail."""
        pts = self.chunk_pts(self.chunk_index)
        self.chunk_index += 1
        with self._audio_lock:
            self._kept_from = max(self._kept_from, self._keep_after_chunk)
        return pts

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents, state = latents.to(self.vae_dtype), self.decoder_state
        frames, self.decoder_state = self.vae.decode_stream(latents, state, **self.decode_options())
        return to_uint8(frames)[0]

    def _require_started(self):
        if not self.started:
            raise RuntimeError("call start(reference) first")


def teacher_cannot_stream(name: str) -> str:
    """What a session (or `serve`, before it loads one) says of a teacher, `name`, asked to stream."""
    return f"{name} is a bidirectional teacher: it generates whole clips and cannot stream; use a distilled student"


def _cache_from(asked: str | None, model: AvatarModel, steps: int) -> str:
    """Where a session's chunk keys/values come from: as asked, else the model's own. With one
    step, the last step's input is pure noise, so its keys/values say nothing of the chunk: asking
    for that is an error, and a model trained that way re-encodes instead."""
    cache_from = check_cache_from(asked or model.meta.get("cache_from", "reencode"))
    if cache_from == "last_step" and steps == 1:
        if asked:
            raise ValueError(
                "cache_from 'last_step' needs 2 or more steps: a 1-step chunk's last step sees only noise"
            )
        log.warning("%s: one step re-encodes each chunk (its last step sees only noise)", model.name)
        return "reencode"
    return cache_from


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames [B, 3, T, H, W] in [-1, 1] as uint8 [B, T, H, W, 3]."""
    return ((frames.permute(0, 2, 3, 4, 1).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
