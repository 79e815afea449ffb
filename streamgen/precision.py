"""The dtype each part of a model runs in: the names options take, their checks, and the CPU's
defaults (bfloat16 where it is faster and as accurate: the decoder on CPUs with native bfloat16,
the DiT from a size up on CPUs with AMX tiles)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from streamgen.cli import SESSION_DTYPES
from streamgen.cpu_threads import chunk_forward_flop, cpu_has_amx, cpu_has_native_bfloat16
from streamgen.model.float8 import float8_layers
from streamgen.model.vae import TinyCausalVAE, VideoAutoencoder

if TYPE_CHECKING:
    from streamgen.model.model import DiT
    from streamgen.models import AvatarModel

DTYPES = ("float32", "bfloat16")  # a DiT's dtype as options name it (`--dtype`)

# A float32 DiT runs a session in bfloat16 (`default_dit_dtype`) from this much arithmetic a
# chunk's forward (streamgen.cpu_threads.chunk_forward_flop), on a CPU with AMX tiles. tiny-avatar's
# denoising and re-encode on the 2-core machine with AMX (bfloat16 on one thread against float32 on
# the threads it gains from): 0.98x at 0.74 GFLOP (160x160), 1.05x at 1.19 (192x192), 1.16x at
# 1.83 (224x224), 1.27x at 2.7 (256x256), 1.5x at 5.4 (320x320). On the 2-core AMD EPYC (AVX512-BF16,
# no AMX) the whole session gained little or lost with a bfloat16 DiT on its best threads:
# 1.03-1.04x at 224x224, 1.00-1.03x at 256x256, 0.90-0.98x at 320x320, 0.91-0.99x at 384x384
# (alternating rounds; docs/performance.md, "bf16 DiT").
DIT_BFLOAT16_FLOP = 1.5e9
DECODE_DTYPES = SESSION_DTYPES  # the command-line spelling of StreamSession's decode_dtype and encode_dtype


def decode_dtype_arg(name: str, what: str = "decode dtype") -> torch.dtype | str:
    if name not in DECODE_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(DECODE_DTYPES)}, got {name!r}")
    return name if name == "auto" else getattr(torch, name)


def check_float_dtype(dtype: torch.dtype, what: str = "dtype") -> torch.dtype:
    """`dtype` if a model can run in it (a floating-point dtype, float8 aside: FP8 is
    `float8_linears`' weights, not a model's dtype), else a ValueError naming `what`."""
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(
            f"{what} must be a floating-point dtype such as torch.float32 or torch.bfloat16, got {dtype}"
        )
    return dtype


def autoencoder_dtype(value, vae: VideoAutoencoder, device, what: str = "decode dtype") -> torch.dtype | None:
    """A session's decode_dtype or encode_dtype (`what`): a dtype, its name, None (as loaded) or
    "auto" (`default_decode_dtype`), as a dtype or None."""
    if isinstance(value, str):
        value = decode_dtype_arg(value, what)
    elif isinstance(value, torch.dtype):
        value = check_float_dtype(value, what)
    elif value is not None:
        raise ValueError(
            f"{what} must be a torch dtype, one of {', '.join(DECODE_DTYPES)}, or None, got {value!r}"
        )
    return default_decode_dtype(vae, device) if value == "auto" else value


def default_decode_dtype(vae: VideoAutoencoder, device) -> torch.dtype | None:
    """bfloat16 for TinyCausalVAE decoders on CPUs with native bfloat16 (AMX or AVX512-BF16):
    2-3x faster decoding from 128x128 up, frames within 2 uint8 levels of float32 (measured by
    `streamgen bench decoder`); None (the loaded dtype) everywhere else. The same for the
    encoder of a session's reference image (`StreamSession(encode_dtype="auto")`): 2.2-2.9x
    faster, the same scores (docs/performance.md, "On this 2-core CPU")."""
    if not isinstance(vae, TinyCausalVAE) or torch.device(device).type != "cpu":
        return None
    return torch.bfloat16 if cpu_has_native_bfloat16() else None


def dit_dtype_arg(value):
    """A DiT dtype as load_model and StreamSession take it: a `DTYPES` name becomes its torch
    dtype; a floating-point torch dtype, None and "auto" stay as they are. Anything else (an
    integer, complex or float8 dtype, a number) is a ValueError that says so (it was a TypeError
    from deep inside `nn.Module.to`, or a model that loaded and failed at its first chunk)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, torch.dtype):
        return check_float_dtype(value, "dtype")
    if not isinstance(value, str):
        raise ValueError(f"dtype must be a torch dtype, one of {', '.join(DTYPES)}, or 'auto', got {value!r}")
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    return getattr(torch, value)


def runs_as_loaded(dit: DiT) -> bool:
    """A sequence-parallel or FP8 DiT: its sessions cannot run a copy in another dtype."""
    return hasattr(dit, "sequence_parallel_groups") or float8_layers(dit) > 0


def default_dit_dtype(
    model: AvatarModel, device, latent_hw: tuple[int, int], amx: bool | None = None
) -> torch.dtype | None:
    """bfloat16 for a float32 DiT whose chunk forward at `latent_hw` reaches `DIT_BFLOAT16_FLOP`,
    on CPUs with AMX tiles (`amx`: whether this one has them, None: ask it); None (as loaded)
    everywhere else (AVX512-BF16 alone makes the DiT no faster), for FP8 and sequence-parallel
    DiTs, and when the model's dtype was asked for."""
    dit = model.dit
    if (
        model.dtype_asked
        or torch.device(device).type != "cpu"
        or next(dit.parameters()).dtype != torch.float32
        or runs_as_loaded(dit)
        or not (cpu_has_amx() if amx is None else amx)
    ):
        return None
    flop = chunk_forward_flop(dit, latent_hw, dit.cfg.frames_per_chunk)
    return torch.bfloat16 if flop >= DIT_BFLOAT16_FLOP else None
