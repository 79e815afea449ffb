"""Scaling past one GPU: sequence parallelism (Ulysses, Ring, hybrid) for the DiT
and spatially tiled parallel VAE decoding. See docs/parallel.md.

The names below load on first use, so that `python -m streamgen.parallel.torchrun`
(what `--sp N` runs) starts without importing torch before it can handle Ctrl-C.
"""

from __future__ import annotations

_FROM_APPLY = ("SP_MODES", "ShardedStreamCache", "apply_sequence_parallel", "sequence_parallel_mesh")
__all__ = list(_FROM_APPLY)


def __getattr__(name: str):
    if name in _FROM_APPLY:
        from streamgen.parallel import apply

        return getattr(apply, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
