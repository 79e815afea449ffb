"""Several StreamSessions' next chunks in one batch: each stage of a chunk (the audio encoder,
the denoising steps, the decoder, the clean re-encode) runs once for the sessions that can share
it, each session getting the frames and cache it would get alone (up to float rounding). The
server's worker runs its sessions' chunks through here (server/scheduler.py).

    chunks = next_chunks(sessions)        # [(frames, pts), ...], one per session
    write_pending_chunks(sessions)        # their clean re-encodes, while the frames travel
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from streamgen.decode_beside_reencode import decoded_beside_reencode
from streamgen.model.audio import frame_windows
from streamgen.model.cache import StreamCache
from streamgen.sampling import cached_velocity, reencode_chunk, sample_few_step
from streamgen.stream import StreamSession, to_uint8


def group_indices(items: list, key) -> list[list[int]]:
    """Indices of `items`, grouped by key(item), each group in order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


def contained_step(on_error, failed: set, members: list[int], step, *args):
    """step(*args), a step that is sessions `members`' alone among a batch's: one session's own
    (its audio span, its noise) or a pass one group shares (a forward, a decode, a re-encode). With
    on_error its failure is theirs, as it would be one by one, not the batch's others': each member
    not failed yet is reported (on_error(i, exception)) and added to `failed`, and None is
    returned, so that the batch goes on without them. Without, it raises."""
    if on_error is None:
        return step(*args)
    try:
        return step(*args)
    except Exception as e:
        for i in members:
            if i not in failed:
                failed.add(i)
                on_error(i, e)
        return None


def prepare_chunks(
    group: list[StreamSession], on_error=None
) -> list[tuple[torch.Tensor | None, torch.Tensor] | None]:
    """Each session's next chunk's audio windows and starting noise (advancing its audio timeline
    and its RNG), for sessions of one DiT: the audio encoder runs once over the sessions whose
    encoder inputs are as long (all but those near a stream's start).

    on_error(i, exception): session i's own steps (its start check, audio span, windows, noise)
    fail it alone (`contained_step`): its entry is None. The shared audio encoder's failure raises."""
    lead = group[0]
    cfg, enc = lead.cfg, lead.dit.audio_encoder
    c = cfg.frames_per_chunk
    failed: set[int] = set()

    def span(s: StreamSession):
        s._require_started()
        return s._audio_span(s.chunk_index * c)

    def noise(s: StreamSession) -> torch.Tensor:
        shape = (1, cfg.in_channels, c, *s.latent_hw)
        return torch.randn(shape, generator=s.generator).to(s.device, s.dtype)

    spans = [contained_step(on_error, failed, [i], span, s) for i, s in enumerate(group)]
    audio: list = [None] * len(group)
    if enc is not None:
        ok = [i for i in range(len(group)) if i not in failed]
        for same in group_indices([spans[i] for i in ok], lambda span: len(span[0])):
            members = [ok[j] for j in same]
            pcm = torch.from_numpy(np.stack([spans[i][0] for i in members])).to(lead.device)
            with torch.no_grad(), lead.stage_threads("audio"):
                tokens = enc(pcm)
            for row, i in enumerate(members):
                mine, first, start = tokens[row : row + 1], spans[i][1], group[i].chunk_index * c
                windows = contained_step(on_error, failed, [i], frame_windows, mine, first, start, c, cfg)
                if windows is not None:
                    audio[i] = windows.to(lead.dtype)
    noises = [
        None if i in failed else contained_step(on_error, failed, [i], noise, s) for i, s in enumerate(group)
    ]
    return [None if i in failed else (audio[i], noises[i]) for i in range(len(group))]



def _device_key(device: torch.device):
    """One key per device however it was named: "cpu" and "cpu:0" are one CPU, and "cuda" is the
    current CUDA device (str(device) kept sessions on one device from ever sharing a batch)."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and device.index is None:
        return ("cuda", torch.cuda.current_device())
    return (device.type, device.index)


def _batch_key(s: StreamSession):
    """Sessions with equal keys can share one forward pass per denoising step."""
    return (
        id(s.dit),
        id(s.vae),
        s.latent_hw,
        tuple(s.sigmas.tolist()),
        s.cache_from,
        s.dtype,
        _device_key(s.device),
        s.cache.filled,
        s.context.shape,
        s.decode_beside_reencode,  # (a group's decode goes to one stream, or to another)
    )


def _pending_key(s: StreamSession):
    """Sessions with equal keys can re-encode their pending chunks in one forward pass."""
    _, audio, context = s._pending
    return (id(s.dit), s.latent_hw, s.dtype, _device_key(s.device), s.cache.filled, context.shape, audio is None)


@contextmanager
def all_in_use(sessions: list[StreamSession]):
    """Each session for this thread alone (`StreamSession.in_use`), each listed once: one session
    twice in a batch made both its chunks from the same cache and drew their noise in turns."""
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session is listed more than once: a batch makes one chunk per session")
    with ExitStack() as held:
        for s in sessions:
            held.enter_context(s.in_use())
        yield


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


def write_pending_chunks(sessions: list[StreamSession], on_error=None) -> None:
    """`write_pending_chunk` of each session, in one forward for the sessions that can share it
    (`_pending_key`): their chunks are re-encoded together against a stacked copy of their caches,
    and each session takes its row into its own ring. The same keys and values as one by one, up
    to float rounding. At 64x64 on one thread, written one by one in a batch of 16, a re-encode
    cost 3.4 ms a session, where each of the batch's denoising forwards cost 1.0 ms a session.

    on_error(i, exception): a group's failed re-encode fails its members only (`contained_step`),
    each reported; the other groups' chunks are written. Without on_error it raises."""
    with all_in_use(sessions):
        pending = [i for i, s in enumerate(sessions) if s.chunk_pending]
        failed: set[int] = set()
        for same in group_indices([sessions[i] for i in pending], _pending_key):
            members = [pending[j] for j in same]
            contained_step(on_error, failed, members, _write_group, [sessions[i] for i in members])


def _write_group(group: list[StreamSession]) -> None:
    if len(group) == 1:
        group[0].write_pending_chunk()
        return
    lead = group[0]
    latents, audio, context = (_cat(list(parts)) for parts in zip(*(s._pending for s in group)))
    with torch.no_grad(), lead.stage_threads("reencode", len(group)):
        batch_cache = StreamCache.stack([s.cache for s in group])
        written = batch_cache.ring_token_index()
        reencode_chunk(lead.dit, batch_cache, latents, context, audio, advance=False)
        for row, s in enumerate(group):
            s.cache.take_chunk_from(batch_cache, row, written)
            s._pending = None


def next_chunks(sessions: list[StreamSession], on_error=None) -> list[tuple[np.ndarray, float] | None]:
    """The next chunk of several sessions, batched where they can be.

    Sessions of the same model, size, steps and cache fill level (every
    session that has streamed for more than a window is at the full level)
    run each denoising step as one forward pass over the batch, and their
    pending clean re-encodes (`write_pending_chunks`) and decodes
    (`VideoAutoencoder.decode_streams`) as one each; under cache_from
    "last_step" the batch's last step writes every session's chunk, copied into
    each session's own ring. Each session draws its noise from its own
    generator, so its frames are those it would have made alone (up to float
    rounding). Returns one (frames, pts) per session, in order.

    on_error(i, exception): what session i does on its own (its start check, its audio span,
    windows and noise, a chunk it makes alone) is its own failure when it raises, as it would
    be one by one: it is reported so, its entry is None, and the others' chunks are made
    without it. A pass a group of sessions shares (its pending chunks' re-encode, its audio
    encoder, forward or decode) is its members' failure: each is reported, and the other
    groups' chunks are kept (`contained_step`). Without on_error it raises.
    """
    with all_in_use(sessions):
        return _next_chunks(sessions, on_error)


def _next_chunks(sessions: list[StreamSession], on_error) -> list[tuple[np.ndarray, float] | None]:
    results: list = [None] * len(sessions)
    failed: set[int] = set()

    def mine(indices: list[int]):  # on_error for a step given sessions[indices]: its session j is indices[j]
        def report(j: int, e: Exception) -> None:
            failed.add(indices[j])
            on_error(indices[j], e)

        return None if on_error is None else report

    for i, s in enumerate(sessions):
        contained_step(on_error, failed, [i], s._require_started)
    live = [i for i in range(len(sessions)) if i not in failed]
    # the fill level the batch key reads counts the last chunk
    write_pending_chunks([sessions[i] for i in live], mine(live))
    live = [i for i in live if i not in failed]
    for same in group_indices([sessions[i] for i in live], _batch_key):
        members = [live[j] for j in same]
        if len(members) == 1:
            results[members[0]] = contained_step(on_error, failed, members, sessions[members[0]].next_chunk)
            continue
        group = [sessions[i] for i in members]
        chunks = contained_step(on_error, failed, members, _group_chunks, group, mine(members))
        for i, chunk in zip(members, chunks or []):
            results[i] = chunk
    return results


def _group_chunks(group: list[StreamSession], on_error) -> list[tuple[np.ndarray, float] | None]:
    """The next chunk of sessions of one batch key, each stage once for them all; a session whose
    own step fails (on_error, as in `prepare_chunks`) gets None and the others go on. A session
    that fails, alone or with its group, is put back as it was (`StreamSession.chunk_undo`), as
    one that fails on its own: its audio timeline and generator had moved on, and a retry made
    another chunk."""
    # (beside its decode, a chunk's own re-encode writes the ring: `_decoded_beside_reencode`)
    undo = [s.chunk_undo(cache_written=s.cache_from == "last_step" or s.decode_beside_reencode) for s in group]
    undone: set[int] = set()

    def failed(j: int, e: Exception) -> None:
        undone.add(j)
        undo[j]()
        on_error(j, e)

    try:
        return _made_group_chunks(group, None if on_error is None else failed)
    except BaseException:
        for j in set(range(len(group))) - undone:
            undo[j]()
        raise


def _made_group_chunks(group: list[StreamSession], on_error) -> list[tuple[np.ndarray, float] | None]:
    results: list = [None] * len(group)
    prepared = prepare_chunks(group, on_error)
    rows = [j for j, p in enumerate(prepared) if p is not None]
    if not rows:  # each failed on its own
        return results
    prepared = [prepared[j] for j in rows]
    group = [group[j] for j in rows]
    lead = group[0]
    audio = _cat([a for a, _ in prepared])
    noise = torch.cat([n for _, n in prepared])
    context = torch.cat([s.context for s in group])
    with torch.no_grad(), lead.stage_threads("denoise", len(group)):
        batch_cache = StreamCache.stack([s.cache for s in group])
        velocity = cached_velocity(lead.dit, batch_cache, context, audio)
        last_step = lead.cache_from == "last_step"
        last = None
        if last_step:  # it writes into the stacked copy, at these slots; each session keeps its row
            written = batch_cache.ring_token_index()
            last = cached_velocity(lead.dit, batch_cache, context, audio, write=True)
        x0 = sample_few_step(velocity, noise, lead.sigmas, [s.generator for s in group], last)
        for row, s in enumerate(group):
            if last_step:
                s.cache.take_chunk_from(batch_cache, row, written)
            else:
                s._pending = (
                    x0[row : row + 1],
                    None if audio is None else audio[row : row + 1],
                    s.context,
                )
    for j, chunk in zip(rows, _finish_chunks(group, x0)):
        results[j] = chunk
    return results


@torch.no_grad()
def _finish_chunks(group: list[StreamSession], latents: torch.Tensor) -> list[tuple[np.ndarray, float]]:
    """`_finish_chunk` of sessions that share an autoencoder, one row of `latents` each, decoded
    as one batch (beside their clean re-encodes where they decode so: `_decoded_beside_reencode`)."""
    if group[0].decode_beside_reencode:
        out = _decoded_beside_reencode(group, latents)
    else:
        out = _decoded(group, latents).cpu()
    return [(out[row].numpy(), s._next_pts()) for row, s in enumerate(group)]


def _decoded(group: list[StreamSession], latents: torch.Tensor) -> torch.Tensor:
    """The group's frames, uint8 [B, T, H, W, 3] on its device; each session's decoder state moved on."""
    lead = group[0]
    with lead.stage_threads("decode", len(group)):
        states = [s.decoder_state for s in group]
        frames, states = lead.vae.decode_streams(latents.to(lead.vae_dtype), states, **lead.decode_options(len(group)))
        out = to_uint8(frames)
    for s, state in zip(group, states):
        s.decoder_state = state
    return out


def _decoded_beside_reencode(group: list[StreamSession], latents: torch.Tensor) -> torch.Tensor:
    """A group's chunk decoded beside its re-encode (streamgen/decode_beside_reencode.py): its decode
    on the lead's second CUDA stream and, meanwhile, its pending clean re-encodes (one forward,
    `_write_group`) on the first; the frames on the host once the decode is done. A failure in
    either is undone by the caller (`_group_chunks`: the ring's slots among the rest)."""
    # (each session's decoder state may come from its own second stream, or the first)
    states = [s.decoder_state for s in group]
    pending = [s for s in group if s.chunk_pending]  # (none under "last_step": its last step wrote them)

    def write_pending():
        if pending:
            _write_group(pending)

    lead = group[0]
    return decoded_beside_reencode(
        lead._decode_stream, lead.device, latents, states, lambda: _decoded(group, latents), write_pending
    )
