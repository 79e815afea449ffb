"""streamgen: real-time streaming video generation (causal few-step video diffusion)."""

import os

# OpenMP threads that spin while waiting make PyTorch's CPU ops collapse as soon
# as anything else wants a core (measured on a 2-core machine: a 128x128 chunk
# took 6.6 s instead of 0.23 s with a training job beside it). Sleeping waiters
# cost nothing measurable when the machine is idle. It must be set before torch
# is imported; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
