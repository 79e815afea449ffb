"""FSDP2 for the trainable modules of large flavors (`run.fsdp: true` under torchrun).

The model knows nothing of this: `shard` applies `fully_shard` to the
transformer, so parameters, gradients and optimizer state live in 1/N shards
(DTensors) and the full weights exist only while the transformer runs (see
`shard` for the units). FSDP2 averages gradients with a reduce-scatter, which is the same
arithmetic as the replicated path's all-reduce; it also allows the many
forwards before one backward that the distillation stages make.

Checkpoints stay in the replicated format (full tensors, optimizer state keyed
by parameter index), so a sharded run and a replicated one read each other's
checkpoints, and the exact-resume guarantee holds for both. Gathering is a
collective: every rank calls these functions, and only rank 0 writes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

FULL = StateDictOptions(full_state_dict=True)


def can_shard(module: torch.nn.Module) -> bool:
    """Transformers (modules with `blocks`) shard; others (the small autoencoder) replicate.

    FSDP2 gathers parameters in forward hooks, so a module must be run through
    forward: the autoencoder is used through encode/decode methods instead.
    """
    return isinstance(getattr(module, "blocks", None), torch.nn.ModuleList)


def world_mesh(device: torch.device) -> DeviceMesh:
    """The 1-D mesh of every rank, which `shard` shards over: FSDP2's default, made here so that
    the run holds it and `release` can let go of its process group at the end."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def release(mesh: DeviceMesh) -> None:
    """Let go of the process group that `mesh` and torch's DTensor caches keep, before the group is
    destroyed: destroy_process_group drops only the registry's reference, and a group still held
    runs its gloo threads on (into the interpreter's shutdown, where one still freeing a
    collective's tensors aborts the process: "terminate called without an active exception").

    The mesh keeps its groups (`_pg_registry`, in recent torch), and every DTensorSpec keeps the
    mesh: the caches of sharding propagation, of redistribution plans and of collective costs,
    keyed and valued by specs, keep them after the sharded modules and optimizers are gone.
    Both links are cut: a cache kept per thread (sharding propagation's, filled by autograd's
    device threads on a GPU) cannot be cleared from this one, and the mesh's registry is only
    torch.compile's way to its groups (eager code resolves them by name)."""
    registry = getattr(mesh, "_pg_registry", None)
    if registry is not None:
        registry.clear()
    for clear in _dtensor_cache_clears():
        clear()


# torch's DTensor caches that hold specs, so meshes: (module, the path to its clear). Private
# names, absent or renamed in some torch versions: nothing to clear there then
DTENSOR_CACHES = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
    (
        "torch.distributed.tensor._sharding_prop",
        "ShardingPropagator._propagate_tensor_meta_cached.cache_clear",
    ),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def _dtensor_cache_clears() -> list:
    import importlib

    clears = []
    for module_name, path in DTENSOR_CACHES:
        try:
            found = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in path.split("."):
            found = getattr(found, name, None)
        if callable(found):
            clears.append(found)
    return clears


def shard(module: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Shard the transformer as one unit, and the audio encoder as another, over `mesh` (`world_mesh`).

    Parameters, gradients and optimizer state live in shards; the transformer's
    parameters are gathered for the length of its forward and backward. Units of
    one block each would gather less at a time, but the DiT fuses each block's
    closing residual with the next block's modulated norm, so block i's call
    reads block i+1's modulation: per-block units need that fusion moved first.
    The audio encoder is its own unit because the stages also call it directly,
    outside the transformer's forward.
    """
    if getattr(module, "audio_encoder", None) is not None:
        fully_shard(module.audio_encoder, mesh=mesh)
    fully_shard(module, mesh=mesh)
    # FSDP2 decides which unit is the root on the first forward, and refuses a child unit
    # that runs before the root has: settle it now, since the audio encoder runs first
    module._get_fsdp_state()._lazy_init()


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(t):
    """A DTensor gathered to its full value (collective); anything else as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like):
    """A full tensor cut into the same shards as `like` (a DTensor), or itself on `like`'s device
    and in its dtype (a checkpoint's tensors load on the CPU: an EMA left there failed the first
    update of a resumed GPU run)."""
    if not isinstance(like, DTensor):
        return full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in get_model_state_dict(module, options=FULL).items()}


def load_full_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(module, state, options=FULL)


def _param_names(module: torch.nn.Module) -> list[str]:
    # the optimizer was built from these parameters, in this order
    return [n for n, p in module.named_parameters() if p.requires_grad]


def full_optimizer_state(name: str, module, opt) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer state gathered, in checkpoint.optimizer_tensors' format (keys by index)."""
    sd = get_optimizer_state_dict(module, opt, options=FULL)
    index = {n: i for i, n in enumerate(_param_names(module))}
    tensors, scalars = {}, {}
    for fqn, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{index[fqn]}/{key}"] = full_tensor(value).detach().cpu().contiguous()
            else:
                scalars[f"{index[fqn]}/{key}"] = value
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_full_optimizer_state(name: str, module, opt, tensors: dict, meta: dict) -> None:
    names = _param_names(module)
    state: dict[str, dict] = {}
    prefix = f"optim/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, k = key[len(prefix) :].split("/", 1)
            state.setdefault(names[int(idx)], {})[k] = value
    for key, value in meta["scalars"].items():
        idx, k = key.split("/", 1)
        state.setdefault(names[int(idx)], {})[k] = value
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]]
    set_optimizer_state_dict(module, opt, {"state": state, "param_groups": groups}, options=FULL)
