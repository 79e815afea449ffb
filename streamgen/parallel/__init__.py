"""Scaling past one GPU: sequence parallelism (Ulysses, Ring, hybrid) for the DiT
and spatially tiled parallel VAE decoding. See docs/parallel.md."""

from streamgen.parallel.apply import (  # noqa: F401
    SP_MODES,
    ShardedStreamCache,
    apply_sequence_parallel,
    sequence_parallel_mesh,
)
