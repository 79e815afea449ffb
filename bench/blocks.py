"""A transformer's count from one block and two (`bench floor` on the meta device, bench/floor.py;
bench/variant_floor.py): its blocks are identical, so every count is affine in their number."""

from __future__ import annotations

import dataclasses

import torch


def with_layers(model, layers: int):
    """`model` with a freshly built DiT of `layers` blocks, the rest of its configuration and its
    autoencoder the same (on the device and in the dtype of `model`'s DiT)."""
    from streamgen.model.model import DiT
    from streamgen.models import AvatarModel

    param = next(model.dit.parameters())
    with torch.device(param.device):
        dit = DiT(dataclasses.replace(model.cfg, num_layers=layers)).to(param.dtype).eval()
    return AvatarModel(
        model.name,
        dit,
        model.vae,
        model.height,
        model.width,
        shift=model.shift,
        steps=model.steps,
        meta=model.meta,
    )


def layer_extrapolated(work_with_layers, layers: int):
    """The work of a DiT of `layers` identical blocks from `work_with_layers(1)` and
    `work_with_layers(2)` (each a nested dict of counts, as `floor.chunk_work`'s): every count is affine
    in the number of blocks (each adds the same products, weights and cached keys and values;
    what runs once per forward, or only in the last block, the start and the autoencoder, do not
    change with it), so count(L) = count(1) + (L - 1) * (count(2) - count(1)). What is not a
    number (names) must be the same in both. The autoencoder's work is the same in both counts:
    the second need not run it again (`floor.KeptDecodes`)."""
    one, two = work_with_layers(1), work_with_layers(2)

    def combine(a, b):
        if isinstance(a, dict):
            if a.keys() != b.keys():
                raise ValueError(f"the counts differ in their parts: {sorted(a)} and {sorted(b)}")
            return {k: combine(a[k], b[k]) for k in a}
        if isinstance(a, list):
            if len(a) != len(b):
                raise ValueError("the counts differ in their number of chunks")
            return [combine(x, y) for x, y in zip(a, b)]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return a + (layers - 1) * (b - a)
        if a != b:
            raise ValueError(f"the counts differ: {a!r} and {b!r}")
        return a

    return combine(one, two)
