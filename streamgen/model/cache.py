"""The KV cache of the streaming student: a permanent sink plus a ring window.

Per layer, keys and values live in one preallocated buffer laid out as

    [ sink | chunk | ring ]      tokens = (sink_frames + frames_per_chunk + window_frames) * S

- sink:  the reference latent, encoded once at t = 0; never evicted.
- chunk: the chunk being generated; rewritten by every denoising step.
- ring:  the last `window_frames` clean frames (each written once by the clean
         re-encode of its chunk); the oldest frames are overwritten in place, after
         the re-encode's attention has read them (it sees the ring its chunk's
         denoising steps saw).

Attention is permutation-invariant once keys carry their rotary position, so
the three regions can sit in any physical order; this one keeps the valid keys
a contiguous prefix while the ring fills (it fills from slot 0 upward).

Endless streams: ring keys are stored *un-rotated* (`k_ring_raw`). Positions
are assigned by age inside the window, so the newest chunk always sits at
`sink + filled`, the positions ever used are bounded by
`sink_frames + window_frames + frames_per_chunk`, and hour 10 looks exactly
like minute 1. After each ring write the rotated copy of the ring is rebuilt
once (per layer, per chunk), so the denoising steps pay nothing extra.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn

from streamgen.kernels import Rope, apply_rope, reference, rope_angles


class KVCache(nn.Module):
    """One layer's preallocated keys and values."""

    def __init__(self, batch, sink_tokens, chunk_tokens, ring_tokens, heads, head_dim, dtype, device):
        super().__init__()
        total = sink_tokens + chunk_tokens + ring_tokens
        shape = (batch, total, heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        raw = (batch, ring_tokens, heads, head_dim)
        self.register_buffer("k_ring_raw", torch.zeros(raw, dtype=dtype, device=device), persistent=False)
        self.sink_end = sink_tokens
        self.chunk_end = sink_tokens + chunk_tokens
        # cross-attention keys/values of the (constant) text context, computed once per stream
        self.context_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        # and those of the audio windows the last forward was given: (windows, (keys, values))
        self.audio_kv: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        # keys and values in e4m3 for the FP8 attention backends (`fp8_keys`, `fp8_values`), made
        # on their first read; each remembers the version of k or v its sink's and ring's are of
        for name in ("k8", "k8_scale", "v8", "v_rows", "v8_applied"):
            self.register_buffer(name, None, persistent=False)
        self.v_fixed_scale = None
        self._k8_version = self._v8_version = -1
        self._v8_end = 0
        self._v8_fresh: list[torch.Tensor] = []  # ring slots written since the last FP8 read

    def write_sink(self, k_rot: torch.Tensor, v: torch.Tensor):
        """Store the reference frame's keys (rotated at their fixed positions 0..sink-1)."""
        n = k_rot.shape[1]
        if n != self.sink_end:
            raise ValueError(f"sink holds {self.sink_end} tokens, got {n}")
        self.k[:, :n] = k_rot
        self.v[:, :n] = v
        return self.k[:, :n], self.v[:, :n]

    def update(self, k_rot: torch.Tensor, v: torch.Tensor, ring_tokens_filled: int):
        """Place the current chunk's keys/values and return all keys it attends to."""
        n = k_rot.shape[1]
        if n != self.chunk_end - self.sink_end:
            raise ValueError(f"chunk region holds {self.chunk_end - self.sink_end} tokens, got {n}")
        end = self.chunk_end + ring_tokens_filled
        if k_rot.requires_grad or v.requires_grad:
            # training (Self-Forcing): the step that carries gradient must not write into the
            # buffer, which later steps overwrite; attend to a fresh concatenation instead
            def joined(buf, new):
                return torch.cat([buf[:, : self.sink_end], new, buf[:, self.chunk_end : end]], dim=1)

            return joined(self.k, k_rot), joined(self.v, v)
        k_before, v_before = self.k._version, self.v._version
        self.k[:, self.sink_end : self.chunk_end] = k_rot
        self.v[:, self.sink_end : self.chunk_end] = v
        # only the chunk's changed: the sink's and ring's e4m3 keys and values stay
        if self._k8_version == k_before:
            self._k8_version = self.k._version
        if self._v8_version == v_before:
            self._v8_version = self.v._version
        return self.k[:, :end], self.v[:, :end]

    def fp8_keys(self, ops, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys [:end] in e4m3 with their scales per token and head, as `ops.quantize_fp8_heads`
        makes them (`kernels.attention`'s FP8 backends; ops: the module that runs them). The
        sink's and the ring's are quantized again only after they changed (once per chunk, when
        the ring moves on), not at every call; the chunk's at every call. Any write into `k` but
        `update`'s of the chunk (the sink, the ring's rotation, a restored start, `stack`) bumps
        its version, so they are never stale. At 832x480 this spares each layer of each FP8 forward
        a pass over 34,320 of a steady chunk's 39,000 keys (~160 MB read and written): ~18 GB of
        a steady chunk's 149 layer-forwards that attend, net of the one pass per layer and chunk
        (~4 ms at the H200's 4.2 TB/s)."""
        if self.k8 is None:
            self.k8 = torch.empty(self.k.shape, dtype=torch.float8_e4m3fn, device=self.k.device)
            self.k8_scale = torch.empty(self.k.shape[:-1], dtype=torch.float32, device=self.k.device)
        parts = [slice(self.sink_end, self.chunk_end)]
        if self._k8_version != self.k._version:
            parts += [slice(0, self.sink_end), slice(self.chunk_end, None)]
            self._k8_version = self.k._version
        for part in parts:
            ops.quantize_fp8_heads(self.k[:, part], out=(self.k8[:, part], self.k8_scale[:, part]))
        return self.k8[:, :end], self.k8_scale[:, :end]

    def fp8_values(self, ops, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The values [:end] in e4m3, transposed [B, H, D, end], with their scales [B, H, D], as
        `ops.quantize_fp8_values` makes them: one scale per head and channel over every value,
        the chunk's included, so that a chunk can move the scale of the sink's and ring's values.

        Where a channel's scale stays, its e4m3 values stay. A call quantizes the chunk's values,
        those a ring write brought (`write_ring`), and the moved channels' values again, from a
        transposed copy of the sink's and ring's (`v_rows`: each channel's row contiguous);
        everything only after some other write (the sink, a restored start, `stack`). The same
        values as quantizing them all at every call. At 832x480 a steady chunk's 149
        layer-forwards that attend each read its 39,000 values twice and wrote them once
        (~300 MB a call, ~45 GB a chunk); now a call reads them once per layer and chunk for
        their scales, and writes the chunk's and the moved channels'."""
        if self.v8 is None:
            b, total, h, d = self.v.shape
            self.v8 = torch.empty(b, h, d, total, dtype=torch.float8_e4m3fn, device=self.v.device)
            self.v_rows = torch.zeros(b, h, d, total, dtype=self.v.dtype, device=self.v.device)
            self.v8_applied = torch.empty(b, h, d, dtype=torch.float32, device=self.v.device)
        chunk = slice(self.sink_end, self.chunk_end)
        fixed = [slice(0, self.sink_end)] + ([slice(self.chunk_end, end)] if end > self.chunk_end else [])
        if self._v8_version != self.v._version or end != self._v8_end and not self._v8_fresh:
            for part in fixed:  # written by something else: every value again
                self.v_rows[..., part] = self.v[:, part].permute(0, 2, 3, 1)
            self.v8_applied = torch.full_like(self.v8_applied, float("nan"))  # (no scale equals NaN)
            self._v8_fresh.clear()
            self.v_fixed_scale = None
            self._v8_version = self.v._version
        fresh, self._v8_fresh = self._v8_fresh, []
        for index in fresh:
            self.v_rows.index_copy_(3, index, self.v.index_select(1, index).permute(0, 2, 3, 1))
        if fresh or self.v_fixed_scale is None or end != self._v8_end:
            # the max of the parts' scales is the scale of their max (both steps are monotone)
            scales = [reference.fp8_value_scales(self.v[:, part]) for part in fixed]
            self.v_fixed_scale, self._v8_end = functools.reduce(torch.maximum, scales), end
        scale = torch.maximum(self.v_fixed_scale, reference.fp8_value_scales(self.v[:, chunk]))
        # the moved channels of the sink's and ring's values, then every channel of new ring slots
        for part in fixed:
            rows = self.v_rows[..., part].permute(0, 3, 1, 2)
            ops.quantize_fp8_values(rows, scale, out=self.v8[..., part], applied=self.v8_applied)
        for index in fresh:
            v8, _ = ops.quantize_fp8_values(self.v.index_select(1, index), scale)
            self.v8.view(torch.uint8).index_copy_(3, index, v8.view(torch.uint8))
        ops.quantize_fp8_values(self.v[:, chunk], scale, out=self.v8[..., chunk])
        self.v8_applied = scale  # (a new tensor at every call: kept, not copied)
        return self.v8[..., :end], scale

    def write_ring(self, k_raw: torch.Tensor, v: torch.Tensor, token_index: torch.Tensor):
        """Clean re-encode: keep the finished chunk (un-rotated keys) in its ring slots (once the
        layer's attention is done: the slots may hold the oldest chunk, which it attends to)."""
        v_before = self.v._version
        self.k_ring_raw.index_copy_(1, token_index, k_raw)
        self.v.index_copy_(1, token_index + self.chunk_end, v)
        if self._v8_version == v_before:  # the e4m3 values stay, but for these slots' (`fp8_values`)
            self._v8_fresh.append(token_index + self.chunk_end)
            self._v8_version = self.v._version

    def rotate_ring(self, ring_angles: torch.Tensor):
        """Rebuild the rotated ring keys for the positions the slots have now."""
        self.k[:, self.chunk_end :] = apply_rope(self.k_ring_raw, ring_angles)


class StreamCache(nn.Module):
    """All layers' KV caches plus the bookkeeping they share (fill level, ring head).

    Usage per chunk (see `streamgen.sampling.generate_chunk`): the denoising
    steps call the model with `cache` (read-only for the ring), then one clean
    re-encode call with `write=True` stores the chunk, then `advance()`.
    """

    def __init__(self, cfg, batch: int, grid_hw: tuple[int, int], dtype=torch.float32, device="cpu"):
        super().__init__()
        self.cfg = cfg
        self.grid_hw = tuple(grid_hw)
        self.tokens_per_frame = grid_hw[0] * grid_hw[1]
        s = self.tokens_per_frame
        self.sink_frames, self.chunk_frames, self.window_frames = (
            cfg.sink_frames,
            cfg.frames_per_chunk,
            cfg.window_frames,
        )
        if self.chunk_frames > self.window_frames:
            raise ValueError(
                f"frames_per_chunk ({self.chunk_frames}) must not exceed window_frames ({self.window_frames})"
            )
        self.layers = nn.ModuleList(
            KVCache(
                batch,
                self.sink_frames * s,
                self.chunk_frames * s,
                self.window_frames * s,
                cfg.num_heads,
                cfg.head_dim,
                dtype,
                device,
            )
            for _ in range(cfg.num_layers)
        )
        self.device = torch.device(device)
        self._rope: dict[tuple[int, int], Rope] = {}  # `rope_table`'s, each made on its first call
        self.reset()

    def reset(self):
        self.frames_written = 0  # ring frames ever written (grows; only used modulo the window)
        self.sink_ready = False
        for layer in self.layers:
            layer.context_kv = layer.audio_kv = None

    # --- positions ----------------------------------------------------------
    @property
    def filled(self) -> int:
        return min(self.frames_written, self.window_frames)

    def chunk_frame_positions(self) -> torch.Tensor:
        """Rotary frame positions of the chunk being generated."""
        start = self.sink_frames + self.filled
        return torch.arange(start, start + self.chunk_frames, device=self.device)

    def sink_frame_positions(self) -> torch.Tensor:
        return torch.arange(self.sink_frames, device=self.device)

    def ring_frame_positions(self) -> torch.Tensor:
        """Position of each physical ring slot: sink + its age rank (oldest first)."""
        slots = torch.arange(self.window_frames, device=self.device)
        if self.frames_written >= self.window_frames:
            oldest = self.frames_written % self.window_frames
            slots = (slots - oldest) % self.window_frames
        return self.sink_frames + slots

    def rope_table(self, grid_hw: tuple[int, int]) -> Rope:
        """The rotations of every frame position a stream uses (0 up to sink + window + chunk) over a
        frame grid, frame-major, made once for the cache: a forward's are a slice of them
        (`frames_rope`), the ring's a selection. Made at every forward (a dozen small operators),
        they were 1.1-1.7% of tiny-avatar's denoising forward at 128x128 on one CPU thread (~0.4 of
        22.5 ms); the same values. (The grid is the forward's: a sequence-parallel cache holds a
        shard of each frame's tokens.)"""
        grid_hw = tuple(grid_hw)
        if grid_hw not in self._rope:
            frames = self.sink_frames + self.window_frames + self.chunk_frames
            positions = torch.arange(frames, device=self.device)
            angles = rope_angles(positions, grid_hw, self.cfg.head_dim, self.cfg.rope_theta)
            self._rope[grid_hw] = Rope.of(angles)
        return self._rope[grid_hw]

    def frames_rope(self, start: int, frames: int, grid_hw: tuple[int, int]) -> Rope:
        """The rotations of `frames` frames from rotary position `start` (a view of `rope_table`)."""
        s = grid_hw[0] * grid_hw[1]
        return self.rope_table(grid_hw).map(lambda table: table[start * s : (start + frames) * s])

    def sink_rope(self, grid_hw: tuple[int, int]) -> Rope:
        """`frames_rope` of `sink_frame_positions`."""
        return self.frames_rope(0, self.sink_frames, grid_hw)

    def chunk_rope(self, grid_hw: tuple[int, int]) -> Rope:
        """`frames_rope` of `chunk_frame_positions`."""
        return self.frames_rope(self.sink_frames + self.filled, self.chunk_frames, grid_hw)

    def positions_in_use(self) -> dict[str, list[int]]:
        """For tests and debugging: every rotary frame position the next chunk will see."""
        ring = self.ring_frame_positions()[: self.filled]
        return {
            "sink": self.sink_frame_positions().tolist(),
            "ring": sorted(ring.tolist()),
            "chunk": self.chunk_frame_positions().tolist(),
        }

    # --- writes ---------------------------------------------------------------
    def ring_tokens_filled(self) -> int:
        return self.filled * self.tokens_per_frame

    def ring_token_index(self) -> torch.Tensor:
        """Token slots in the ring that the current chunk's frames will occupy."""
        frames = (
            self.frames_written + torch.arange(self.chunk_frames, device=self.device)
        ) % self.window_frames
        s = self.tokens_per_frame
        return (frames[:, None] * s + torch.arange(s, device=self.device)[None, :]).reshape(-1)

    def advance(self):
        """After the clean re-encode wrote the chunk: move the ring on and re-rotate it."""
        self.frames_written += self.chunk_frames
        self.rotate_ring()

    def rotate_ring(self):
        """Every layer's ring keys rotated for the positions its slots have now (from `k_ring_raw`)."""
        angles = self.ring_rope()  # (once for every layer)
        for layer in self.layers:
            layer.rotate_ring(angles)

    def ring_rope(self) -> Rope:
        """The rotations of the ring's tokens, slot by slot: a selection of `rope_table`'s (made once
        for the cache, not once per layer or chunk)."""
        slots, s = self.ring_frame_positions(), self.tokens_per_frame
        return self.rope_table(self.grid_hw).map(lambda t: t.unflatten(0, (-1, s))[slots].flatten(0, 1))

    @contextmanager
    def ring_write_undone_on_failure(self):
        """A block that writes the current chunk into the ring and moves it on (a clean re-encode,
        a last step that writes): where it raises, the ring is put back as it was (`ring_write_undo`)."""
        undo = self.ring_write_undo()
        try:
            yield
        except BaseException:
            undo()
            raise

    def ring_write_undo(self):
        """A function that puts the ring back as it is now, after the current chunk's write and
        move. A layer writes its slots once its attention is done, so a failure at a later layer
        left the earlier layers' slots overwritten, and a retry's attention read the new chunk there
        in place of the oldest. Only the slots the write takes that attention reads are kept (a
        chunk's of the ring, once it is full), not the whole cache."""
        frames_written = self.frames_written
        slots = [(frames_written + i) % self.window_frames for i in range(self.chunk_frames)]
        read = [slot for slot in slots if slot < self.filled]
        index = kept = None
        if read:
            s = self.tokens_per_frame
            index = (torch.tensor(read)[:, None] * s + torch.arange(s)[None, :]).reshape(-1).to(self.device)
            kept = [
                (layer.k_ring_raw.index_select(1, index), layer.v.index_select(1, index + layer.chunk_end))
                for layer in self.layers
            ]

        def undo():
            for layer, (k_raw, v) in zip(self.layers, kept or []):
                layer.k_ring_raw.index_copy_(1, index, k_raw)
                layer.v.index_copy_(1, index + layer.chunk_end, v)  # (a new version: e4m3 made again)
            self.frames_written = frames_written
            self.rotate_ring()

        return undo

    def take_chunk_from(self, batch: StreamCache, row: int, batch_slots: torch.Tensor) -> None:
        """Keep the chunk that a stacked batch's forward wrote into its ring slots `batch_slots`
        (row `row` of it) in this stream's own slots, then move the ring on."""
        slots = self.ring_token_index()
        for mine, theirs in zip(self.layers, batch.layers):
            v = theirs.v[row : row + 1, batch_slots + theirs.chunk_end]
            mine.write_ring(theirs.k_ring_raw[row : row + 1, batch_slots], v, slots)
        self.advance()

    @classmethod
    def stack(cls, caches: list[StreamCache]) -> StreamCache:
        """A batch of several streams' caches, for reading: one row per stream (a copy).

        The streams must be at the same fill level, so that their chunks sit at
        the same rotary positions; their ring keys are already rotated, each
        with its own slot positions, so the rows may differ in ring layout.
        Writes (the clean re-encode) go to each stream's own cache.
        """
        first = caches[0]
        if any(c.filled != first.filled or c.grid_hw != first.grid_hw for c in caches):
            raise ValueError("only caches at the same fill level and grid can be stacked")
        k0 = first.layers[0].k
        out = cls(first.cfg, len(caches), first.grid_hw, k0.dtype, k0.device)
        for i, layer in enumerate(out.layers):
            layer.k.copy_(torch.cat([c.layers[i].k for c in caches]))
            layer.v.copy_(torch.cat([c.layers[i].v for c in caches]))
        out.frames_written = first.filled  # positions depend on the fill level only
        out.sink_ready = all(c.sink_ready for c in caches)
        return out

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
