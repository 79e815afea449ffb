"""Model configurations ("flavors"), chosen by name.

The transformer fields mirror diffusers' `WanTransformer3DModel` config so that
Wan2.1 checkpoints map onto them one to one; the avatar fields (audio, sink,
window) are ours and default to values that leave a loaded Wan model's output
unchanged (the audio branch's output projection starts at zero).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from streamgen.kernels import check_attention_backend


@dataclass
class ModelConfig:
    # --- Wan2.1 transformer -------------------------------------------------
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    # --- avatar conditioning ------------------------------------------------
    audio: bool = True  # per-frame audio cross-attention
    audio_dim: int = 256  # audio encoder width (one token per video frame)
    audio_mels: int = 80
    audio_context_frames: int = 2  # video frames of audio before a latent frame's own window
    audio_lookahead_frames: int = 2  # video frames after it (adds this much latency)
    temporal_compression: int = 4  # video frames per latent frame (the VAE's)

    # --- streaming ----------------------------------------------------------
    frames_per_chunk: int = 3  # latent frames generated per step of the stream
    sink_frames: int = 1  # permanent identity anchor (the reference latent)
    window_frames: int = 21  # ring of past latent frames in the KV cache

    attn_backend: str = "sdpa"  # sdpa | flex | triton | flash | cudnn | fp8_qk | fp8 (kernels.attention)
    name: str = field(default="custom", compare=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_window(self) -> int:
        """Audio tokens each latent frame attends to."""
        return self.audio_context_frames + self.temporal_compression + self.audio_lookahead_frames

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        counts = ("in_channels", "out_channels", "dim", "ffn_dim", "num_heads", "num_layers", "text_dim",
                  "freq_dim", "audio_dim", "audio_mels", "temporal_compression", "frames_per_chunk",
                  "sink_frames", "window_frames")  # fmt: skip
        small = [name for name in counts if getattr(self, name) < 1]
        if small:  # (num_layers 0 was an IndexError from inside the forward; sink_frames 0 or less
            # a tensor size mismatch or a torch.arange error at a stream's first chunk)
            raise ValueError(f"{small[0]} must be at least 1, not {getattr(self, small[0])}")
        offsets = ("audio_context_frames", "audio_lookahead_frames")
        negative = [name for name in offsets if getattr(self, name) < 0]
        if negative:  # (a negative context was a torch.arange traceback as the audio windows were cut)
            raise ValueError(f"{negative[0]} must be at least 0, not {getattr(self, negative[0])}")
        for name in ("eps", "rope_theta"):
            # (eps <= 0 divides by 0, or takes the root of a negative, in the norm of a row of
            # small variance; a rope_theta <= 0 makes NaN rotary angles: both loaded without a word)
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number, not {getattr(self, name)}")
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 positive sizes (t, h, w), not {self.patch_size}")
        if self.frames_per_chunk > self.window_frames:
            # (said only once a stream started, as its KV cache was made: after a model had loaded)
            raise ValueError(
                f"frames_per_chunk ({self.frames_per_chunk}) must not exceed window_frames ({self.window_frames}): "
                "a chunk's frames go into the cache's ring of past frames"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.patch_size[0] != 1:
            raise ValueError("temporal patch size must be 1 (one latent frame per token frame)")
        check_attention_backend(self.attn_backend)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        if problems := type_problems(d):  # (a model.json's "128" was a TypeError from __post_init__)
            raise ValueError(f"model config {problems[0]}")
        return cls(**d)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def type_problems(values: dict) -> list[str]:
    """The `values` (ModelConfig fields) not of their field's type, each "NAME: expected TYPE, got
    VALUE": a string for a number came out of the config's own checks as "'<' not supported
    between instances of 'str' and 'int'", a float count failed in torch.zeros."""
    hints = typing.get_type_hints(ModelConfig)
    problems = []
    for name, value in values.items():
        t = hints.get(name)
        if t is None:
            continue  # (an unknown field: from_dict names it)
        base = typing.get_origin(t) or t
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
            tuple: lambda v: isinstance(v, list | tuple) and all(type(x) is int for x in v),
            str: lambda v: isinstance(v, str),
        }.get(base, lambda v: True)(value)
        if not ok:
            problems.append(f"{name}: expected {getattr(base, '__name__', base)}, got {value!r}")
    return problems


FLAVORS: dict[str, ModelConfig] = {
    # The CPU default, trained in this project on the avatar world.
    "tiny-avatar": ModelConfig(
        name="tiny-avatar",
        dim=192,
        ffn_dim=768,
        num_heads=3,
        num_layers=6,
        text_dim=384,  # MiniLM sentence embeddings
        freq_dim=128,
        audio_dim=128,
        frames_per_chunk=2,
        window_frames=12,
    ),
    "wan2.1-1.3b": ModelConfig(
        name="wan2.1-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, audio_dim=512
    ),
    "wan2.1-14b": ModelConfig(
        name="wan2.1-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, audio_dim=768
    ),
    # For tests: runs every code path in milliseconds.
    "debug": ModelConfig(
        name="debug",
        in_channels=4,
        out_channels=4,
        dim=48,
        ffn_dim=96,
        num_heads=2,
        num_layers=2,
        text_dim=16,
        freq_dim=32,
        audio_dim=16,
        audio_mels=16,
        frames_per_chunk=2,
        window_frames=6,
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in FLAVORS:
        raise KeyError(f"unknown model flavor {name!r}; known: {', '.join(FLAVORS)}")
    if problems := type_problems(overrides):
        raise ValueError(f"model config {problems[0]}")
    return dataclasses.replace(FLAVORS[name], **overrides)
