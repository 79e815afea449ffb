"""TeacherSession: a bidirectional teacher behind StreamSession's interface.

    session = TeacherSession("tiny-avatar-teacher")
    session.start(reference_rgb_uint8, text="smiling", seed=0)
    session.push_audio(pcm_16k)
    frames, pts = session.next_chunk()          # one window of video frames

A teacher denoises whole windows of latent frames at once (Euler steps with
classifier-free guidance), so it cannot stream with a KV cache; this samples
one window per `next_chunk()`, each conditioned on the previous window's last
`motion` latent frames as clean motion frames (the teacher was trained with
such prefixes). It needs the audio of the whole window before it starts. It is
offline generation for `streamgen generate` and `streamgen eval`, not for the
server: a window of 50 steps with CFG is about 100 network evaluations per
latent frame.
"""

from __future__ import annotations

import math
import operator
import random

import numpy as np
import torch

from streamgen.conditioning import Conditions, guided_velocity
from streamgen.model.audio import SAMPLES_PER_FRAME, VIDEO_FPS, frame_windows, needed_video_frames
from streamgen.model.float8 import float8_layers
from streamgen.model.text import text_context
from streamgen.models import TEACHER_STEPS, AvatarModel, load_model
from streamgen.precision import dit_dtype_arg
from streamgen.sampling import euler_sigmas, sample_euler
from streamgen.session_limits import SEED_END
from streamgen.stream import encode_reference
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


class TeacherSession:
    def __init__(
        self,
        model: str | AvatarModel = "tiny-avatar-teacher",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        window: int = 6,
        motion: int = 2,
        device="cpu",
    ):
        device = session_device(device)
        window, motion = positive_size(window, "window"), operator.index(motion)
        self.model = model if isinstance(model, AvatarModel) else load_model(model, device=device)
        check_model_device(self.model, device)
        check_predicted_channels(self.model)  # (as StreamSession: a tensor size error at the first window)
        self.dit, self.vae, self.cfg = self.model.dit, self.model.vae, self.model.cfg
        # as StreamSession's (0 was the model's size, a float failed at the first window, a size
        # the DiT's patches do not tile failed in it)
        self.height, self.width = session_frame_size(height, width, self.model, self.vae)
        self.latent_hw = self.vae.latent_hw(self.height, self.width)
        if window <= motion:
            raise ValueError(f"window ({window}) must be longer than the motion frames ({motion})")
        if motion < 0:
            raise ValueError(f"motion must be >= 0 latent frames, got {motion}")
        if steps is None:  # (50 was taken whatever the model.json said, --help's "the model's" or not)
            steps = self.model.meta.get("steps", TEACHER_STEPS)
        self.steps, self.window, self.motion = steps, window, motion
        # (checked here, not at the first window: 0 steps sampled nothing and returned the noise)
        self.sigmas = euler_sigmas(steps, self.model.shift)
        self.cfg_scale = cfg_scale if cfg_scale is not None else self.model.meta.get("cfg_scale", 3.0)
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale}")
        self.device = device
        self.started = False

    @property
    def frames_per_chunk(self) -> int:
        """Video frames produced by one next_chunk() (the first window under Wan's 1 + 4k layout:
        `vae.first_frame_index` fewer)."""
        return self.window * self.vae.temporal_factor

    @property
    def chunk_seconds(self) -> float:
        return self.frames_per_chunk / VIDEO_FPS

    def start(self, reference, text=None, seed=None):
        # as StreamSession: no seed draws one (it was 0, so every unseeded teacher stream was alike)
        seed = random.randrange(SEED_END) if seed is None else check_seed(seed)
        check_caption(text)
        ref = prepare_reference(reference, self.height, self.width)
        # as StreamSession: a caption for a model without sentence-embedding width is an error, and
        # one refused leaves a running stream as it was (it went on with the new reference)
        context = text_context(text, self.cfg.text_dim).to(self.device)
        self.reference = encode_reference(self.vae, ref, self.device)
        self.context = context
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.pcm = np.zeros(0, np.float32)
        self.pcm_origin = 0  # the stream's sample index of pcm[0] (what no window can reach is let go)
        self.position, self.previous, self.state = 0, None, self.vae.init_state(1)
        self.started = True

    def _require_started(self):
        """As StreamSession's (before a start, an AttributeError; after a close, the stream went
        on from where it was, without its motion frames)."""
        if not self.started:
            raise RuntimeError("call start(reference) first")

    def push_audio(self, pcm):
        """As StreamSession's: after the audio pushed before, and audio that comes late starts at
        the video not yet made (it went to time 0, under windows already made, and was not heard)."""
        self._require_started()
        made = self.position * self.vae.temporal_factor * SAMPLES_PER_FRAME - self.pcm_origin
        if len(self.pcm) < made:
            self.pcm = np.concatenate([self.pcm, np.zeros(made - len(self.pcm), np.float32)])
        self.pcm = np.concatenate([self.pcm, to_pcm_float(pcm)])

    def _first_audio_frame(self, first_latent: int) -> int:
        """The first video frame of audio the window whose frames (motion ones included) start at
        latent frame `first_latent` reads: its first token's context, less the audio encoder's
        receptive field (0 without an audio encoder: none is read)."""
        enc = self.dit.audio_encoder
        if enc is None:
            return max(0, first_latent * self.cfg.temporal_compression)
        needed = first_latent * self.cfg.temporal_compression - self.cfg.audio_context_frames
        return max(0, needed - enc.receptive_field_frames)

    def _samples(self, start: int, end: int) -> np.ndarray:
        """The stream's samples [start, end); any not pushed yet are silence."""
        out = np.zeros(end - start, np.float32)
        lo, hi = max(start, self.pcm_origin), min(end, self.pcm_origin + len(self.pcm))
        if hi > lo:
            out[lo - start : hi - start] = self.pcm[lo - self.pcm_origin : hi - self.pcm_origin]
        return out

    def _drop_audio_before(self, sample: int) -> None:
        drop = sample - self.pcm_origin
        if drop > 0:
            self.pcm = self.pcm[drop:].copy()
            self.pcm_origin += drop

    def close(self):
        self.previous, self.started = None, False

    @torch.no_grad()
    def next_chunk(self):
        self._require_started()
        cfg, w = self.cfg, self.window
        m = 0 if self.previous is None else self.motion
        first = self.position - m
        end_frame = needed_video_frames(self.position + w, cfg)
        enc = self.dit.audio_encoder
        audio = None  # a DiT without the audio branch (StreamSession's too)
        if enc is not None:
            # the samples this window's tokens depend on, as StreamSession takes a chunk's: encoding
            # from the stream's first sample gave the same tokens, in time and memory that grew
            # with the stream (tiny-avatar's encoder on one thread: 2.3 s and 0.6 GB a window at minute 10)
            from_frame = self._first_audio_frame(first)
            pcm = self._samples(from_frame * SAMPLES_PER_FRAME, end_frame * SAMPLES_PER_FRAME)
            tokens = enc(torch.from_numpy(pcm)[None].to(self.device))
            audio = frame_windows(tokens, from_frame, first, m + w, cfg)
        cond = Conditions.full(self.reference, audio, self.context)
        prefix = None if m == 0 else self.previous[:, :, -m:]

        def velocity(x, sigma):
            t = (sigma * 1000)[:, None].expand(1, w)
            if prefix is not None:
                x = torch.cat([prefix, x], 2)
                t = torch.cat([torch.zeros(1, m, device=t.device), t], 1)
            return guided_velocity(self.dit, x, t, cond, self.cfg_scale)[:, :, m:]

        shape = (1, cfg.in_channels, w, *self.latent_hw)
        noise = torch.randn(shape, generator=self.generator).to(self.device)
        latents = sample_euler(velocity, noise, self.sigmas)
        frames, self.state = self.vae.decode_stream(latents, self.state)
        # as StreamSession.chunk_pts: a 1 + 4k stream's first window starts frames into its span
        lead = self.vae.first_frame_index if self.position == 0 else 0
        pts = (self.position * self.vae.temporal_factor + lead) / VIDEO_FPS
        self.previous, self.position = latents, self.position + w
        self._drop_audio_before(self._first_audio_frame(self.position - self.motion) * SAMPLES_PER_FRAME)
        out = ((frames[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return out.cpu().numpy(), pts


def open_session(
    model,
    height=None,
    width=None,
    steps=None,
    device="cpu",
    dtype="auto",
    decode_dtype="auto",
    cache_from=None,
    encode_dtype="auto",
):
    """StreamSession for a student, TeacherSession for a model whose model.json says kind: teacher
    (which decodes as loaded: its 100 evaluations per window dwarf the decode; it has no cache,
    so no cache_from). dtype: the student's DiT, as StreamSession takes it (None: as loaded)."""
    from streamgen.stream import StreamSession

    dtype = dit_dtype_arg(dtype)
    loaded = load_model(model, device=device, dtype=dtype) if isinstance(model, str) else model
    if loaded.meta.get("kind") == "teacher":
        loaded_in = next(loaded.dit.parameters()).dtype  # ($STREAMGEN_DTYPE applies to "auto" too)
        if dtype not in ("auto", None, torch.float32) or loaded_in != torch.float32:
            raise ValueError(f"a teacher runs in float32 only (asked: {dtype}, loaded in {loaded_in})")
        if float8_layers(loaded.dit):  # (its patch embedding, the dtype above, is never FP8: it ran so)
            raise ValueError("a teacher runs in float32 only: its block linears are in FP8 (--fp8, "
                             "$STREAMGEN_FP8), which apply to students")  # fmt: skip
        for name, asked in (("decode", decode_dtype), ("encode", encode_dtype)):
            # (a bfloat16 asked was ignored without a word: the teacher decoded in float32)
            if dit_dtype_arg(asked) not in ("auto", None, torch.float32):
                raise ValueError(f"a teacher {name}s as loaded, in float32 only (asked: {asked}): "
                                 f"--{name}-dtype applies to students")  # fmt: skip
        if cache_from is not None:
            raise ValueError(
                "a teacher samples whole windows without a KV cache: cache_from applies to students"
            )
        return TeacherSession(loaded, height, width, steps=steps, device=device)
    return StreamSession(
        loaded, height=height, width=width, steps=steps, device=device, dtype=dtype,
        decode_dtype=decode_dtype, cache_from=cache_from, encode_dtype=encode_dtype,
    )  # fmt: skip
