"""streamgen: real-time streaming video generation (causal few-step video diffusion)."""

__version__ = "0.1.0"
