"""The streaming video diffusion model: DiT, KV cache, audio encoder, autoencoders."""

from streamgen.model.cache import KVCache, StreamCache
from streamgen.model.config import FLAVORS, ModelConfig, get_config
from streamgen.model.model import DiT

__all__ = ["DiT", "FLAVORS", "KVCache", "ModelConfig", "StreamCache", "get_config"]
