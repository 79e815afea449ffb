"""A started StreamSession's state between two chunks, saved to a file and put back into a session
of the same model and settings, which then makes the very frames the first would have made next.

    save_session_state(session, "stream.pt", extra={"frames": 1500})
    ...                                             # another process, after a stop
    session = StreamSession("tiny-avatar", ...)     # the same model, size, steps, dtypes
    extra = restore_session_state(session, "stream.pt")
    frames, pts = session.next_chunk()              # as the first session's next chunk

A long job that a stop must not throw away uses it: `streamgen eval --minutes 60` makes an hour of a
model's stream, which was made again from its first frame after a Ctrl-C. The state is what a chunk
reads: the KV cache (sink and ring, with its fill level), the RNG, the text context, the reference
latent, the decoder's state and the audio timeline. What the cache derives from them (the text's
and the audio's cross-attention keys, FP8 copies of the keys and values) is computed again.

This module reads and writes StreamSession's own fields: it is the one other place that knows them.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_map

from streamgen.files import write_atomically

# bumped when what is saved changes: a file of another version is refused, not misread
STATE_VERSION = 1


class SessionStateError(ValueError):
    """The file is not a saved state of a session like this one (or not readable)."""


def save_session_state(session, path, extra: dict | None = None) -> None:
    """Write the started `session`'s state to `path` (atomically), with `extra`, plain values the
    caller wants back at the restore (how far its own loop had got). The last chunk's clean keys
    are written into the cache first, as its next chunk would have done: the same frames follow."""
    with session.in_use(wait=True):
        session._require_started()
        if hasattr(session.dit, "sequence_parallel_groups") or session.device.type == "meta":
            raise SessionStateError("a sequence-parallel or meta-device session's state is not saved")
        session.write_pending_chunk()
        cache = session.cache
        with session._audio_lock:
            audio = {  # (from the first sample a chunk still reads)
                "pcm": torch.from_numpy(session._pcm[session._kept_from - session._pcm_origin :].copy()),
                "origin": session._kept_from,
                "write_pos": session._write_pos,
                "consumed": session._consumed,
            }
        state = {
            "version": STATE_VERSION,
            "seed": session.seed,
            "chunk_index": session.chunk_index,
            "generator": session.generator.get_state(),
            "context": session.context,
            "reference_latent": session.reference_latent,
            "frames_written": cache.frames_written,
            "sink_ready": cache.sink_ready,
            # the sink's keys and values, the ring's values and unrotated keys (`_parts`): the
            # chunk's region is written afresh by the next chunk, and the ring's rotated keys follow
            # from the unrotated (Wan2.1-1.3B at 832x480 in bf16: 6.3 GB of the cache's 10.2). Copies
            # on the host: torch.save of a view writes all of the tensor it views
            "layers": [tuple(part.to("cpu", copy=True) for part in _parts(layer)) for layer in cache.layers],
            "decoder_state": session.decoder_state,
            "audio": audio,
            "extra": dict(extra or {}),
        }
        # (torch.save keeps each tensor's strides: a decoder memory in channels_last comes back so,
        # and the convolutions that read it give the same values)
        write_atomically(Path(path), lambda tmp: torch.save(state, tmp))


def restore_session_state(session, path) -> dict:
    """Put the state saved in `path` into `session` (started or not; a stream it was making is
    replaced) and return the `extra` saved with it. A file that is not such a state, or one of a
    session of another model, size or dtype, is a SessionStateError, and the session is as it was."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise SessionStateError(f"{path}: not a saved stream state ({e})") from None
    with session.in_use(wait=True):
        cache = _checked(session, state, path)
        _put(session, state, cache)
    return state["extra"]


def _checked(session, state, path):
    """The cache to restore into (the session's own, or a new one), once `state` is found to fit."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise SessionStateError(f"{path}: not a stream state of this version ({STATE_VERSION})")
    if hasattr(session.dit, "sequence_parallel_groups") or session.device.type == "meta":
        raise SessionStateError("a sequence-parallel or meta-device session cannot take a saved state")
    cache = session.cache
    if cache is None:
        cache = session.dit.new_cache(1, session.latent_hw, session.dtype, session.device)
    if len(state["layers"]) != len(cache.layers):
        raise SessionStateError(
            f"{path}: a state of {len(state['layers'])} layers, this model has {len(cache.layers)}"
        )
    for saved, layer in zip(state["layers"], cache.layers):
        own_parts = _parts(layer)
        if not isinstance(saved, tuple | list) or len(saved) != len(own_parts):
            raise SessionStateError(f"{path}: not a stream state of this version ({STATE_VERSION})")
        for tensor, own in zip(saved, own_parts):
            if tensor.shape != own.shape or tensor.dtype != own.dtype:
                raise SessionStateError(
                    f"{path}: a state of a session of another size or dtype (its cache "
                    f"{list(tensor.shape)} {tensor.dtype}, this one's {list(own.shape)} {own.dtype})"
                )
    if state["context"].shape[-1] != session.cfg.text_dim or state["reference_latent"].dtype != session.dtype:
        raise SessionStateError(f"{path}: a state of a session of another model or dtype")
    return cache


def _parts(layer) -> tuple:
    """The parts of a layer's cache a state holds (views: a copy into them fills the cache)."""
    sink, chunk_end = layer.sink_end, layer.chunk_end
    return layer.k[:, :sink], layer.v[:, :sink], layer.v[:, chunk_end:], layer.k_ring_raw


def _put(session, state, cache) -> None:
    device = session.device
    session.started = False
    cache.reset()  # (the text's and audio's cross-attention keys: computed again from the context)
    for saved, layer in zip(state["layers"], cache.layers):
        for tensor, own in zip(saved, _parts(layer)):
            own.copy_(tensor)  # (a copy bumps the tensors' versions: their FP8 copies are made again)
    cache.frames_written, cache.sink_ready = state["frames_written"], state["sink_ready"]
    cache.rotate_ring()
    session.cache = cache
    session.seed = state["seed"]
    session.generator = torch.Generator()
    session.generator.set_state(state["generator"])
    session.context = state["context"].to(device)
    session.reference_latent = state["reference_latent"].to(device)
    session.vae_dtype = next(session.model.vae.parameters()).dtype
    session._pending = None
    session.decoder_state = tree_map(
        lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, state["decoder_state"]
    )
    session.chunk_index = state["chunk_index"]
    audio = state["audio"]
    with session._audio_lock:
        session._pcm = np.asarray(audio["pcm"].numpy(), np.float32)
        session._pcm_origin = session._kept_from = session._keep_after_chunk = audio["origin"]
        session._write_pos = audio["write_pos"]
        session._consumed = audio["consumed"]
    session.started = True
