"""Parallel VAE decode: each process decodes a horizontal band of the latent
frame and the bands are gathered at the end. Two ways to make bands exact:

`TiledParallelDecoder` (convolutional decoders, TinyCausalVAE): each band is
decoded with a halo of neighbouring latent rows and the halo is cropped off
its output. A decoded pixel depends on latents within a finite radius (the
receptive field); with a halo at least that radius, a band's cropped output
equals the same rows of the whole-frame decode exactly (zero padding at the
band's cut edges only reaches into the halo). The decoder state of a stream
(the previous latent frame's features at the band's rows) is per band, and
since the temporal mix is per pixel it never carries halo errors sideways.

`WanBandParallelDecoder` (diffusers' AutoencoderKLWan): its mid block runs
self-attention over the whole frame, so no halo short of the frame would do.
Instead every spatial layer of the decoder works on the band itself: a 3x3
convolution first takes one row from each neighbouring band (zeros at the
frame's top and bottom, as its own padding would), the attention block
gathers the whole (lowest-resolution) frame and keeps its band's rows, and
everything else (RMS norms over channels, nearest upsampling, 1x1 and
temporal convolutions) is local to a pixel. The feature caches of the causal
convolutions hold the band's rows, and their halos are exchanged too, so
chunk-by-chunk decoding stays exact.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from streamgen.model.upsample import UpsampleConv2d
from streamgen.model.vae import ResBlock2d, VideoAutoencoder


def decoder_receptive_radius(vae) -> float:
    """How far (in latent pixels) a decoded pixel can see, for TinyCausalVAE-style decoders and
    TAEHV's (`TinyDecoderVAE`).

    Walks the decoder's modules in forward order (dec_in, dec_mix, dec; or the tiny decoder's):
    a convolution reaches kernel//2 * dilation pixels at the current scale, an upsample
    multiplies the scale. A memory block's past is the same pixels one frame earlier, which see
    as far. Raises for layers whose reach is not local.
    """
    from streamgen.model.tiny_decoder import (
        DecoderStage,
        MemoryBlock,
        TimeUpsample,
        TinyDecoder,
        TinyDecoderVAE,
    )

    containers = (
        nn.Sequential,
        nn.ModuleList,
        ResBlock2d,
        DecoderStage,
        MemoryBlock,
        TimeUpsample,
        TinyDecoder,
    )
    if isinstance(vae, TinyDecoderVAE):
        stages = [vae.decoder]
    else:
        stages = [getattr(vae, name, None) for name in ("dec_in", "dec_mix", "dec")]
    if any(s is None for s in stages):
        raise TypeError(
            f"{type(vae).__name__}: tiled decoding needs a convolutional decoder (dec_in, dec_mix, dec) "
            "with a finite receptive field (WanVAE: use WanBandParallelDecoder or parallel_decoder)"
        )
    scale, radius = 1.0, 0.0
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, UpsampleConv2d):  # a 2x upsample, then its 3x3 conv at the new scale
                scale *= 2
            if isinstance(m, nn.Conv2d):
                radius += (m.kernel_size[0] // 2) * m.dilation[0] / scale
            elif isinstance(m, nn.Upsample):
                scale *= m.scale_factor if isinstance(m.scale_factor, (int, float)) else m.scale_factor[0]
            elif isinstance(m, containers):
                continue  # their convolutions are counted one by one
            elif isinstance(m, (nn.SiLU, nn.ReLU, nn.Identity)):
                continue
            else:
                raise TypeError(f"cannot bound the receptive field of {type(m).__name__}")
    return radius


class _ParallelDecoder:
    """Common to the parallel decoders: they stand in for the autoencoder they wrap
    (encoding, sizes, parameters come from it) and decode whole clips as one stream."""

    vae: nn.Module
    group: dist.ProcessGroup
    # its decode_stream takes no `frame_threads` (a band's frames decode together), whatever the
    # wrapped autoencoder's does: not read from it through __getattr__
    frames_decode_apart = False

    def __getattr__(self, name):
        if name == "vae":  # not set yet: no recursion
            raise AttributeError(name)
        if name.startswith("decode"):  # the wrapped one's decodes the whole frame (or wrongly, once
            # its convolutions are split into bands): each decode the wrapper has is its own
            raise AttributeError(f"{type(self).__name__} has no {name}")
        return getattr(self.vae, name)

    def band_rows(self, height: int) -> tuple[int, int]:
        """(start, stop): the latent rows this process decodes (and keeps)."""
        p, i = dist.get_world_size(self.group), dist.get_rank(self.group)
        if height % p:
            raise ValueError(
                f"latent height {height} must be divisible by the number of decode processes {p}"
            )
        rows = height // p
        return i * rows, (i + 1) * rows

    def init_state(self, batch: int):
        return self.vae.init_state(batch)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames, _ = self.decode_stream(latents, self.init_state(latents.shape[0]))
        return frames

    # several streams (batched sessions): one by one, each through this decode_stream
    decode_streams = VideoAutoencoder.decode_streams


class TiledParallelDecoder(_ParallelDecoder):
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

    def decode_stream(self, latents: torch.Tensor, state):
        """latents [B, C, F, h, w] (the same on every process) -> (frames [B, 3, T, H, W], this band's state)."""
        height = latents.shape[-2]
        start, stop = self.band_rows(height)
        lo, hi = max(0, start - self.halo), min(height, stop + self.halo)
        frames, state = self.vae.decode_stream(latents[..., lo:hi, :], state)
        sf = self.vae.spatial_factor
        band = frames[..., (start - lo) * sf : (stop - lo) * sf, :].contiguous()
        return gather_rows(band, self.group), state


# --- AutoencoderKLWan: bands with per-layer halo exchange -----------------------


def exchange_halo(x: torch.Tensor, rows: int, group) -> torch.Tensor:
    """This band [..., h, W] -> [..., rows + h + rows, W]: the neighbouring bands' edge rows
    above and below (zeros at the frame's top and bottom)."""
    p, i = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[-2] < rows:
        raise ValueError(f"a band of {x.shape[-2]} rows cannot lend a halo of {rows}")
    edges = torch.cat([x[..., :rows, :], x[..., -rows:, :]], dim=-2).contiguous()
    parts = [torch.empty_like(edges) for _ in range(p)]
    dist.all_gather(parts, edges, group=group)
    zeros = torch.zeros_like(x[..., :rows, :])
    top = parts[i - 1][..., rows:, :] if i > 0 else zeros
    bottom = parts[i + 1][..., :rows, :] if i + 1 < p else zeros
    return torch.cat([top, x, bottom], dim=-2)


def gather_rows(band: torch.Tensor, group) -> torch.Tensor:
    """Equal bands [..., h, W] from every process -> the whole frame [..., p * h, W]."""
    parts = [torch.empty_like(band) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, band.contiguous(), group=group)
    return torch.cat(parts, dim=-2)


def _band_causal_conv3d(conv, group) -> None:
    """WanCausalConv3d: rows come from the neighbours instead of zero padding."""
    pw, _, ph, _, pt, _ = conv._padding
    conv._padding = (pw, pw, 0, 0, pt, 0)
    forward = conv.forward

    def band_forward(x, cache_x=None):
        x = exchange_halo(x, ph, group)
        if cache_x is not None:  # the previous frames' rows of the same layer input
            cache_x = exchange_halo(cache_x, ph, group)
        return forward(x, cache_x)

    conv.forward = band_forward


def _band_conv2d(conv: nn.Conv2d, group) -> None:
    """The 3x3 convolution after each upsampling; and where `WanVAE.upsample_phases` runs it at
    the low resolution instead (not through its forward), the rows it takes from the
    neighbours there (`row_halo`)."""
    ph, pw = conv.padding
    conv.padding = (0, pw)
    forward = conv.forward
    conv.forward = lambda x: forward(exchange_halo(x, ph, group))
    conv.row_halo = lambda x, rows: exchange_halo(x, rows, group)


def _band_attention(block, group) -> None:
    """Whole-frame attention: gather the frame, keep this band's rows of the output."""
    forward = block.forward

    def band_forward(x):
        h, i = x.shape[-2], dist.get_rank(group)
        return forward(gather_rows(x, group))[..., i * h : (i + 1) * h, :]

    block.forward = band_forward


def _make_wan_decoder_band_parallel(decoder: nn.Module, group) -> None:
    """Patch every spatial layer of the decoder; refuse layers not known to be band-safe.

    The containers (decoder, mid/up blocks, residual blocks, resamplers)
    only reshape, add and call their children; the leaves decide.
    """
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    decoder.band_parallel_group = group  # WanVAE's convolution switches refuse to re-patch it
    pointwise = (wan.WanRMS_norm, wan.WanUpsample, nn.SiLU, nn.Dropout, nn.Identity)
    whole_frame = [m for m in decoder.modules() if isinstance(m, wan.WanAttentionBlock)]
    inside_attention = {id(c) for m in whole_frame for c in m.modules() if c is not m}
    for name, m in decoder.named_modules():
        if id(m) in inside_attention or list(m.children()) and not isinstance(m, wan.WanAttentionBlock):
            continue
        if isinstance(m, wan.WanAttentionBlock):
            _band_attention(m, group)
        elif isinstance(m, wan.WanCausalConv3d | nn.Conv2d):
            k = m.kernel_size[-2]
            pad = m._padding[2] if isinstance(m, wan.WanCausalConv3d) else m.padding[0]
            if k == 1:
                continue
            if k != 2 * pad + 1 or m.stride[-2] != 1:
                raise TypeError(f"{name}: only same-size spatial convolutions split into bands")
            (_band_causal_conv3d if isinstance(m, wan.WanCausalConv3d) else _band_conv2d)(m, group)
        elif not isinstance(m, pointwise):
            raise TypeError(f"{name}: {type(m).__name__} is not known to be local to a pixel")


class WanBandParallelDecoder(_ParallelDecoder):
    """Decode WanVAE latents across the processes of `group`, one band of latent rows each.

    Same streaming interface as the autoencoder; every process passes the same
    full latents and gets the full frames back. Changes this process's decoder
    in place: from then on it only decodes bands, as part of the group. The
    latent height must be divisible by the group size.
    """

    def __init__(self, vae, group=None):
        self.vae = vae
        self.group = group or dist.group.WORLD
        _make_wan_decoder_band_parallel(vae.vae.decoder, self.group)

    def decode_stream(self, latents: torch.Tensor, state):
        start, stop = self.band_rows(latents.shape[-2])
        band, state = self.vae.decode_stream(latents[..., start:stop, :], state)
        return gather_rows(band, self.group), state


def parallel_decoder(vae, latent_height: int, group=None):
    """The parallel decoder for this autoencoder (banded for WanVAE, tiled with a halo otherwise),
    or `vae` itself, decoding whole frames on every process: when `latent_height` does not divide
    into the group's bands, and for TAEHV's tiny decoder (`TinyDecoderVAE`), whose receptive
    radius (`decoder_receptive_radius`: 17.75 latent rows with TAEHV's layout) would give each
    band a halo of most of the frame (at 480p, 60 latent rows: 2 bands would each decode 48)."""
    from streamgen.model.tiny_decoder import TinyDecoderVAE
    from streamgen.model.wan_vae import WanVAE

    group = group or dist.group.WORLD
    if isinstance(vae, TinyDecoderVAE) or latent_height % dist.get_world_size(group):
        return vae
    return WanBandParallelDecoder(vae, group) if isinstance(vae, WanVAE) else TiledParallelDecoder(vae, group)
