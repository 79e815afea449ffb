"""The decode beside the re-encode (`StreamSession.decode_beside_reencode`): on CUDA, a chunk's
decode runs on a second CUDA stream while its clean re-encode runs on the first, for one session
(`StreamSession.next_chunk`) or a batch's group of them (`stream_batch.next_chunks`). Checked on
the CPU with fake streams (tests/test_stream_beside.py), on a GPU by tests/test_gpu_check.py."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves


def switched_decode_stream(session, enabled: bool):
    """The second CUDA stream `session` decodes on once the switch is set to `enabled` (None: off),
    the session held by the caller."""
    if not enabled and session._decode_stream is not None:
        # the decoder's state, made on the second stream, is read on the first from now on:
        # its memory not reused by the second's work (one of torch's pool) before that is done
        _record_on(torch.cuda.current_stream(session.device), getattr(session, "decoder_state", None))
    return torch.cuda.Stream(session.device) if enabled else None


def _record_on(stream, tensors) -> None:
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            t.record_stream(stream)


@torch.no_grad()
def decoded_beside_reencode(side, device, latents: torch.Tensor, decoder_states, decode, write) -> torch.Tensor:
    """decode() (the frames, on the device) on the second stream `side` once the first stream's work
    so far is done (the denoised `latents`), and meanwhile write() (the pending clean re-encodes)
    queued on the first: the GPU runs both. Returns the frames on the host once the decode alone is
    done; a failure in either is the caller's to undo (its ring's slots among the rest)."""
    side.wait_stream(torch.cuda.current_stream(device))
    # read there: their memory is not reused on the first stream before that is done (a decoder's
    # state comes from the first stream where the switch went on mid-stream)
    _record_on(side, [latents, decoder_states])
    with torch.cuda.stream(side):
        out = decode()
    write()
    with torch.cuda.stream(side):
        return out.cpu()  # waits for the decode only
