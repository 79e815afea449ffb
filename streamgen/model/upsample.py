"""A nearest 2x upsample then a 3x3 convolution, computed at the low resolution.

Both autoencoders' decoders upsample this way (the tiny one in `UpsampleConv2d`, the Wan
decoder's upsamplers under `WanVAE.upsample_phases`): one 2x2 convolution of the small input
per output phase, 16 instead of 36 multiply-adds per low-resolution pixel and channel pair,
and no upsampled copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UpsampleConv2d(nn.Conv2d):
    """A nearest 2x upsample followed by this 3x3 convolution (padding 1), computed at the low
    resolution (`upsample_conv3x3`): on the 2-core CPU these layers run ~1.5x faster and the
    shipped decoder 1.07-1.18x from 128x128 up (`streamgen bench decoder`), same values to ~1e-6
    (float sums reassociated). Parameters are those of the plain Conv2d, so checkpoints load.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)
        self._taps = FoldedTaps()

    def phase_weights(self) -> torch.Tensor:
        return self._taps(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv3x3(x, self.phase_weights(), self.bias, channels_last=True)


def fold_upsample_taps(w: torch.Tensor) -> torch.Tensor:
    """3x3 taps [O, C, 3, 3] -> [4*O, C, 2, 2], the four output phases (a, b) of a nearest 2x
    upsample then the 3x3 convolution. Phase 0 of an axis reads low-res taps (i-1, i) with kernel
    taps (w0, w1+w2); phase 1 reads (i, i+1) with (w0+w1, w2). The sums are taken in fp32 and
    rounded once to w's dtype (in bf16, the rounding of the products' fp32 sums they replace)."""

    def fold(t, dim):  # the 3 taps along `dim` -> the two phases' 2 taps each
        t0, t1, t2 = t.unbind(dim)
        return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)

    wide = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
    return torch.cat([col for row in fold(wide, 2) for col in fold(row, 3)], 0).to(w.dtype)


class FoldedTaps:
    """One 3x3 weight's phase taps (`fold_upsample_taps`), folded once while it is unchanged.

    Without autograd (streaming) they are kept: refolding cost ~1 ms of a 64x64 chunk's decode.
    An in-place change of the weight (optimizer step, load_state_dict) bumps its version, new
    data (`.to`) has another address: either folds again. The kept weight holds its storage, so
    no new tensor can reuse that address. With autograd on they are folded every call, so
    gradients reach the 3x3 taps."""

    def __init__(self):
        self._kept: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (weight, its version, taps)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or w.is_inference():
            # (a compiled graph folds them itself; inference tensors have no version)
            return fold_upsample_taps(w)
        kept = self._kept
        if kept is None or kept[1] != w._version or not _same_tensor(kept[0], w):
            self._kept = kept = (w.detach(), w._version, fold_upsample_taps(w))
        return kept[2]


def upsample_conv3x3(
    x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, channels_last: bool, pad_rows: bool = True
) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) with padding 1, from the phase taps `fold_upsample_taps`
    gives: one 2x2 convolution of x with 4x the output channels computes the four output phases,
    then one strided view interleaves them. 16 instead of 36 multiply-adds per low-resolution
    pixel and channel pair, and no upsampled copy of x. x [N, C, h, w] -> [N, O, 2h, 2w], NHWC in
    memory where `channels_last`, else contiguous: the interleaving copy writes either layout.
    Without `pad_rows`, x brings its own row above and below (a band of a frame: h + 2 rows in)."""
    o = taps.shape[0] // 4
    bias = None if bias is None else bias.repeat(4)
    # output (p, q) of the 2x2 convolution over x padded by 1 reads x rows p-1, p and cols q-1, q
    # (the convolution pads: no padded copy of x)
    y = F.conv2d(x, taps, bias, padding=(1 if pad_rows else 0, 1))  # [N, 4*O, h+1, w+1]
    n, h, w = y.shape[0], y.shape[2] - 1, y.shape[3] - 1
    # out[n, o, 2i+a, 2j+b] = y[n, (a, b, o), i+a, j+b]: a strided view of y's storage, shaped
    # (n, h, a, w, b, o) in NHWC or (n, o, h, a, w, b) in NCHW, then one copy of it
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
        sw = 4 * o
        sh = (w + 1) * sw
        phases = y.as_strided((n, h, 2, w, 2, o), (y.stride(0), sh, sh + 2 * o, sw, sw + o, 1))
        return phases.reshape(n, 2 * h, 2 * w, o).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
    y = y.contiguous()
    so = (h + 1) * (w + 1)
    phases = y.as_strided((n, o, h, 2, w, 2), (y.stride(0), so, w + 1, 2 * o * so + w + 1, 1, o * so + 1))
    return phases.reshape(n, o, 2 * h, 2 * w)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
