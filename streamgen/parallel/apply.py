"""Apply sequence parallelism to a DiT: Ulysses, Ring, or their 2D hybrid.

    mesh = sequence_parallel_mesh(ulysses_degree=2, ring_degree=2)   # after init_process_group
    apply_sequence_parallel(model, mesh, mode="hybrid")
    cache = model.new_cache(batch, latent_hw)                        # now sharded like the sequence

Every process runs the same forward on the same inputs and gets the same full
output; in between it holds only its shard of every frame's tokens. The model
knows nothing of this: the functions here fill the model's three seams
(`DiT.shard_tokens`, `DiT.gather_tokens`, `SelfAttention.attend`) and its
`new_cache`, on the instance.

Sharding. Token shards are taken *inside each frame* (`[B, F, S, D]` ->
`[B, F, S/P, D]`), so per-frame work (adaLN modulation, per-frame audio
cross-attention) and per-token work (text cross-attention, MLP) stay local
and unchanged, and every process's token sequence has the same frame layout,
which keeps block-causal masks and the cache's [sink | chunk | ring] layout
per process. RoPE angles are those of each process's own tokens. Requires
S = tokens per latent frame divisible by the world size (1560 for Wan at
832x480 divides by 2, 4, 8).

Process layout for the hybrid: a 2D mesh (ring, ulysses); global token shard
index = ring_rank * ulysses_degree + ulysses_rank, so a Ulysses group (the
inner, fastest-communicating dimension) covers one contiguous ring shard.

KV cache: under Ulysses each process keeps all tokens of its H/U heads, under
Ring its token shard of every frame of all heads, under the hybrid both.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from streamgen import kernels
from streamgen.kernels import Rope
from streamgen.model.cache import StreamCache
from streamgen.model.model import SelfAttention
from streamgen.parallel.ring import ring_attention
from streamgen.parallel.ulysses import check_heads, ulysses_attend

SP_MODES = ("ulysses", "ring", "hybrid")


@dataclasses.dataclass(frozen=True)
class SequenceParallelGroups:
    """The process groups of one model replica; None for a dimension of size 1."""

    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None

    @staticmethod
    def _size(group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    @staticmethod
    def _rank(group) -> int:
        return 0 if group is None else dist.get_rank(group)

    @property
    def ulysses_degree(self) -> int:
        return self._size(self.ulysses)

    @property
    def ring_degree(self) -> int:
        return self._size(self.ring)

    @property
    def degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def ring_rank(self) -> int:
        return self._rank(self.ring)

    @property
    def shard_index(self) -> int:
        """Which of the `degree` token shards of every frame this process holds."""
        return self._rank(self.ring) * self.ulysses_degree + self._rank(self.ulysses)


def sequence_parallel_mesh(ulysses_degree: int, ring_degree: int = 1, device_type: str | None = None):
    """A 2D DeviceMesh (ring, ulysses) over all processes of the default group."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if ulysses_degree * ring_degree != world:
        raise ValueError(
            f"ulysses_degree x ring_degree = {ulysses_degree} x {ring_degree} must equal world size {world}"
        )
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(device_type, (ring_degree, ulysses_degree), mesh_dim_names=("ring", "ulysses"))


def resolve_groups(mesh_or_group, mode: str) -> SequenceParallelGroups:
    """Process groups for `mode` from a ProcessGroup, a 1D DeviceMesh or a 2D (ring, ulysses) mesh."""
    if mode not in SP_MODES:
        raise ValueError(f"sequence parallel mode must be one of {SP_MODES}, got {mode!r}")
    if isinstance(mesh_or_group, dist.ProcessGroup) or mesh_or_group is None:
        if mesh_or_group is None and not dist.is_initialized():  # (no world: it ran unsharded, silently)
            raise RuntimeError(
                "sequence parallelism needs a process group: torch.distributed.init_process_group (or "
                "streamgen.parallel.launch.init_process_group under torchrun) first"
            )
        group = mesh_or_group or dist.group.WORLD
        if mode == "hybrid":
            raise ValueError(
                "mode 'hybrid' needs a 2D DeviceMesh (see sequence_parallel_mesh), not a process group"
            )
        return (
            SequenceParallelGroups(group, None) if mode == "ulysses" else SequenceParallelGroups(None, group)
        )
    mesh = mesh_or_group
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 1:
        if mode == "hybrid":
            raise ValueError("mode 'hybrid' needs a 2D DeviceMesh with dims ('ring', 'ulysses')")
        group = mesh.get_group()
        return (
            SequenceParallelGroups(group, None) if mode == "ulysses" else SequenceParallelGroups(None, group)
        )
    if set(names) != {"ring", "ulysses"}:
        raise ValueError(f"a 2D mesh needs dims named ('ring', 'ulysses'), got {names}")
    ring, uly = mesh.get_group("ring"), mesh.get_group("ulysses")
    if mode == "ulysses" and dist.get_world_size(ring) > 1 or mode == "ring" and dist.get_world_size(uly) > 1:
        raise ValueError(f"mode {mode!r} with a 2D mesh of ring x ulysses = {mesh.shape}; use mode 'hybrid'")
    # a dimension of size 1 is no dimension: plain attention instead of a ring of one
    return SequenceParallelGroups(
        uly if dist.get_world_size(uly) > 1 else None, ring if dist.get_world_size(ring) > 1 else None
    )


def _all_gather_tokens(y: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the processes' token shards of every frame: [B, F, s, D] -> [B, F, s*P, D]."""
    if group is None:
        return y
    y = y.contiguous()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, y, group=group)
    return torch.cat(parts, dim=2)


class ShardedStreamCache(StreamCache):
    """A StreamCache holding this process's heads and its token shard of every frame.

    Built as a plain StreamCache for H/U heads and S/R tokens per frame (so the
    [sink | chunk | ring] slots, fill level and ring index are those of the
    local shard); only the ring's RoPE angles must be the shard's own tokens of
    the full frame grid, hence `ring_rope` is overridden.
    """

    def __init__(
        self, cfg, batch, grid_hw, groups: SequenceParallelGroups, dtype=torch.float32, device="cpu"
    ):
        s = grid_hw[0] * grid_hw[1]
        r, u = groups.ring_degree, groups.ulysses_degree
        check_heads(cfg.num_heads, u)
        check_tokens(s, groups.degree)
        local_cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // u, dim=cfg.dim // u)
        super().__init__(local_cfg, batch, (1, s // r), dtype, device)
        shard = groups.ring_rank
        self.full_grid_hw = tuple(grid_hw)
        self.token_slice = slice(shard * (s // r), (shard + 1) * (s // r))

    def ring_rope(self):
        # this shard's tokens of the full grid's table (the forward's): the local grid's (1, S/R),
        # which the inherited `ring_rope` would take, gives every process's ring keys the angles of
        # a frame's first S/R tokens. Overridden here, not in `advance`, so that every caller of
        # `rotate_ring` gets these
        slots, s = self.ring_frame_positions(), self.full_grid_hw[0] * self.full_grid_hw[1]
        table = self.rope_table(self.full_grid_hw)
        return table.map(lambda t: t.unflatten(0, (-1, s))[slots][:, self.token_slice].flatten(0, 1))


def check_tokens(tokens_per_frame: int, degree: int) -> None:
    """A ValueError unless every one of `degree` processes can hold an equal shard of each frame's tokens."""
    if tokens_per_frame % degree:
        raise ValueError(
            f"sequence parallelism over {degree} processes needs the tokens per latent frame "
            f"({tokens_per_frame}) to be divisible by {degree}; change the resolution or the degree"
        )


def _local_attend(attn, attention_fn, *attend_args):
    """Replacement for `SelfAttention.attend` without Ulysses: the local cache shard, `attention_fn`."""
    return SelfAttention.attend(attn, *attend_args, attention=attention_fn)


def apply_sequence_parallel(model, mesh_or_group=None, mode: str = "ulysses"):
    """Make `model` (a DiT) run sequence-parallel over `mesh_or_group`; returns the model.

    mode "ulysses" / "ring": a ProcessGroup (default: the world) or a 1D mesh.
    mode "hybrid": a 2D DeviceMesh with dims ("ring", "ulysses"), see
    `sequence_parallel_mesh`. Cross-attention (text, per-frame audio) stays
    local. Call `model.new_cache` after this so the cache is sharded too.
    """
    groups = resolve_groups(mesh_or_group, mode)
    cfg = model.cfg
    check_heads(cfg.num_heads, groups.ulysses_degree)
    degree, index = groups.degree, groups.shard_index

    def shard_tokens(xs, angles):
        f, s = xs.shape[1], xs.shape[2]
        check_tokens(s, degree)
        part = slice(index * (s // degree), (index + 1) * (s // degree))
        own_tokens = lambda t: t.unflatten(0, (f, s))[:, part].flatten(0, 1)  # noqa: E731
        return xs[:, :, part].contiguous(), angles.map(own_tokens) if isinstance(
            angles, Rope
        ) else own_tokens(angles)

    def gather_tokens(y):
        # the shard index is ring-major, so gather inside each Ulysses group first
        return _all_gather_tokens(_all_gather_tokens(y, groups.ulysses), groups.ring)

    def new_cache(batch, latent_hw, dtype=None, device=None):
        p = next(model.parameters())
        return ShardedStreamCache(
            cfg, batch, model.grid(latent_hw), groups, dtype or p.dtype, device or p.device
        )

    # the attention over the whole sequence of this process's heads: a ring over the
    # ring dimension, or plain attention when there is none
    inner = (
        functools.partial(ring_attention, group=groups.ring) if groups.ring is not None else kernels.attention
    )
    for blk in model.blocks:
        attn = blk.self_attn
        if groups.ulysses is not None:
            attn.attend = functools.partial(ulysses_attend, attn, groups.ulysses, inner)
        else:
            attn.attend = functools.partial(_local_attend, attn, inner)
    model.shard_tokens = shard_tokens
    model.gather_tokens = gather_tokens
    model.new_cache = new_cache
    model.sequence_parallel_groups = groups
    return model
