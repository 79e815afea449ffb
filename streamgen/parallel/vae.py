"""Parallel VAE decode: each process decodes a horizontal band of the latent
frame plus a halo of neighbouring rows, crops the halo off its output and the
bands are gathered at the end.

Exactness. A convolutional decoder's output pixel depends on latents within a
finite radius (its receptive field); with a halo at least that radius, a
band's cropped output equals the same rows of the whole-frame decode exactly
(zero padding at the band's cut edges only reaches into the halo). The
decoder state of a stream (TinyCausalVAE: the previous latent frame's
features at the band's rows) is per band, and since the temporal mix is
per pixel it never carries halo errors sideways, so chunk-by-chunk decoding
stays exact too.

WanVAE is not supported: its decoder's mid block runs spatial self-attention
over the whole frame, so its receptive field is the frame and no halo short of
the frame makes tiles exact (diffusers' own tiling blends overlaps instead).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def decoder_receptive_radius(vae) -> float:
    """How far (in latent pixels) a decoded pixel can see, for TinyCausalVAE-style decoders.

    Walks the decoder's modules in forward order (dec_in, dec_mix, dec): a
    convolution reaches kernel//2 * dilation pixels at the current scale, an
    upsample multiplies the scale. Raises for layers whose reach is not local.
    """
    stages = [getattr(vae, name, None) for name in ("dec_in", "dec_mix", "dec")]
    if any(s is None for s in stages):
        raise TypeError(
            f"{type(vae).__name__}: tiled decoding needs a convolutional decoder (dec_in, dec_mix, dec) "
            "with a finite receptive field; WanVAE's mid-block attention sees the whole frame"
        )
    scale, radius = 1.0, 0.0
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, nn.Conv2d):
                radius += (m.kernel_size[0] // 2) * m.dilation[0] / scale
            elif isinstance(m, nn.Upsample):
                scale *= m.scale_factor if isinstance(m.scale_factor, (int, float)) else m.scale_factor[0]
            elif isinstance(m, (nn.Sequential, nn.SiLU, nn.Identity)) or type(m).__name__ == "ResBlock2d":
                continue
            else:
                raise TypeError(f"cannot bound the receptive field of {type(m).__name__}")
    return radius


class TiledParallelDecoder:
    """Decode latents across the processes of `group`, one band of latent rows each.

    Same streaming interface as the autoencoder (`init_state`, `decode_stream`,
    `decode`); every process passes the same full latents and gets the full
    frames back. The latent height must be divisible by the group size.
    halo: rows of latent context each side; default the decoder's receptive radius.
    """

    def __init__(self, vae, group=None, halo: int | None = None):
        self.vae = vae
        self.group = group or dist.group.WORLD
        self.halo = math.ceil(decoder_receptive_radius(vae)) if halo is None else halo

    def _band(self, height: int) -> tuple[int, int, int, int]:
        """(lo, hi) latent rows decoded with halo, and (start, stop) rows kept, for this process."""
        p, i = dist.get_world_size(self.group), dist.get_rank(self.group)
        if height % p:
            raise ValueError(
                f"latent height {height} must be divisible by the number of decode processes {p}"
            )
        rows = height // p
        start, stop = i * rows, (i + 1) * rows
        return max(0, start - self.halo), min(height, stop + self.halo), start, stop

    def init_state(self, batch: int):
        return self.vae.init_state(batch)

    def decode_stream(self, latents: torch.Tensor, state):
        """latents [B, C, F, h, w] (the same on every process) -> (frames [B, 3, T, H, W], this band's state)."""
        lo, hi, start, stop = self._band(latents.shape[-2])
        frames, state = self.vae.decode_stream(latents[..., lo:hi, :], state)
        sf = self.vae.spatial_factor
        band = frames[..., (start - lo) * sf : (stop - lo) * sf, :].contiguous()
        parts = [torch.empty_like(band) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, band, group=self.group)
        return torch.cat(parts, dim=-2), state

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames, _ = self.decode_stream(latents, self.init_state(latents.shape[0]))
        return frames
