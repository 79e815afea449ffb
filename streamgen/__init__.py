"""streamgen: real-time streaming video generation (causal few-step video diffusion)."""

import os

# OpenMP threads that spin while waiting make PyTorch's CPU ops collapse as soon
# as anything else wants a core (measured on a 2-core machine: a 128x128 chunk
# took 6.6 s instead of 0.23 s with a training job beside it). Sleeping waiters
# cost a wake-up at every parallel region instead, which made the small model's
# many small operators slower on two threads than on one: a stream runs each
# stage on one thread unless its work gains from more (streamgen/cpu_threads.py).
# It must be set before torch is imported; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
