"""What starting a stream computes from its reference and its text, kept for the next start.

`StreamSession.start` encodes the reference image with the autoencoder's
encoder, then runs the DiT over that latent once to fill the cache's permanent
sink (and, on the way, the text's cross-attention keys and values). All of it
depends only on the reference, the text context, the dtype, the device and the
weights. A server starts many streams of the same few avatars (its built-ins),
so each model keeps its last few starts (`AvatarModel.start_memo`), and a start
that finds its own copies the sink into its fresh cache instead of computing
it: the same tensors, so the same frames (tests/test_stream.py), without the
encoder and the sink's forward on the way to the first frame.

The key holds a digest of the prepared reference's pixels and of the context's
values, the dtype and device, and the weights' identity and version (every
in-place change of a parameter or buffer, as an optimizer step or `load_state_dict`
makes, bumps it; a write through `.data` does not), so a model being trained
never gets an old sink. A
sequence-parallel DiT is not memoised: every rank must run the sink's forward
together.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class StartState:
    """A started stream's reference latent, and per layer its sink's keys/values and its text's
    cross-attention keys/values (None where no forward computed them)."""

    reference_latent: torch.Tensor
    sink: list[tuple[torch.Tensor, torch.Tensor]]
    context_kv: list[tuple[torch.Tensor, torch.Tensor] | None]

    @classmethod
    def capture(cls, reference_latent, cache) -> StartState:
        sink = [
            (layer.k[:, : layer.sink_end].clone(), layer.v[:, : layer.sink_end].clone())
            for layer in cache.layers
        ]
        # the context's keys/values are only ever read: the next stream may share them
        return cls(reference_latent, sink, [layer.context_kv for layer in cache.layers])

    def restore(self, cache) -> None:
        """Into a reset cache: what `encode_sink` would have written."""
        for layer, (k, v), kv in zip(cache.layers, self.sink, self.context_kv):
            layer.k[:, : layer.sink_end].copy_(k)
            layer.v[:, : layer.sink_end].copy_(v)
            layer.context_kv = kv
        cache.sink_ready = True


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8).tobytes()).hexdigest()


def weights_version(module: nn.Module) -> int:
    """Grows with every in-place change of the module's parameters and buffers (an autoencoder's
    latent statistics are buffers). Writes through `.data` go around the version counter: code
    that changes weights that way clears the memo (`StartMemo.clear`)."""
    return sum(t._version for t in [*module.parameters(), *module.buffers()])


class StartMemo:
    """The last `capacity` starts of one model, least recently used out first."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[weakref.ref, weakref.ref, StartState]] = OrderedDict()
        self._lock = threading.Lock()  # streams of one model may start on several threads (server lanes)

    def key(self, reference: np.ndarray, context: torch.Tensor, dit: nn.Module, vae: nn.Module) -> tuple:
        """reference: the prepared image (uint8 [H, W, 3]); context: the text tokens as the DiT
        reads them (its dtype and device)."""
        values = context.detach().float().cpu().numpy()
        return (
            _digest(reference),
            reference.shape,
            _digest(values),
            values.shape,
            str(context.dtype),
            str(context.device),
            id(dit),
            weights_version(dit),
            id(vae),
            weights_version(vae),
        )

    def lookup(self, key: tuple, dit: nn.Module, vae: nn.Module) -> StartState | None:
        with self._lock:
            entry = self._entries.get(key)
            # the ids in the key could belong to modules since freed: the entry keeps weak
            # references to its own, and only they match
            if entry is None or entry[0]() is not dit or entry[1]() is not vae:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[2]

    def store(self, key: tuple, dit: nn.Module, vae: nn.Module, state: StartState) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = (weakref.ref(dit), weakref.ref(vae), state)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
