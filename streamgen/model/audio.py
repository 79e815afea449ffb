"""Speech features for the avatar: 16 kHz mono PCM -> log-mel -> causal encoder.

The encoder emits one token per video frame (25 fps: 640 samples, 4 mel hops).
Everything is causal: token n depends only on audio before the end of video
frame n, so encoding a stream piece by piece (with enough left context, see
`AudioEncoder.receptive_field_frames`) equals encoding it whole. Each latent
frame then attends to a short window of tokens around its own time span
(`frame_windows`), with a configurable look-ahead that costs that much latency.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
VIDEO_FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640
HOP = 160  # 10 ms
N_FFT = 400  # 25 ms
MELS_PER_FRAME = SAMPLES_PER_FRAME // HOP  # 4


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """HTK-style triangular mel filters [n_mels, n_fft // 2 + 1]."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(40.0), hz_to_mel(sr / 2 - 200.0), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    return torch.from_numpy(fb.astype(np.float32))


def log_mel(pcm: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Causal log-mel: pcm [B, N] (N a multiple of HOP) -> [B, n_mels, N // HOP].

    Frame i covers samples [(i+1)*HOP - N_FFT, (i+1)*HOP): it ends where its hop
    ends, so no frame looks into the future.
    """
    if pcm.shape[-1] % HOP:
        raise ValueError(f"audio length {pcm.shape[-1]} is not a multiple of {HOP} samples")
    x = F.pad(pcm.float(), (N_FFT - HOP, 0))
    frames = x.unfold(-1, N_FFT, HOP)  # [B, T, N_FFT]
    window = torch.hann_window(N_FFT, periodic=True, device=pcm.device)
    spec = torch.fft.rfft(frames * window, dim=-1).abs().pow(2)
    mel = spec @ mel_filterbank(n_mels).to(pcm.device).T  # [B, T, n_mels]
    # log compression with a fixed floor and scale so silence is ~-1 and speech ~[0, 1]
    return ((torch.log10(mel.clamp(min=1e-6)) + 2.0) / 4.0).transpose(1, 2)


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only; with stride s, output j ends at input (j+1)*s - 1."""

    def __init__(self, cin, cout, kernel_size, stride=1):
        super().__init__(cin, cout, kernel_size, stride=stride)
        self.left = kernel_size - stride

    def forward(self, x):
        return super().forward(F.pad(x, (self.left, 0)))


class AudioEncoder(nn.Module):
    """log-mel at 100 Hz -> tokens at 25 Hz (one per video frame), causal."""

    def __init__(self, cfg):
        super().__init__()
        d, m = cfg.audio_dim, cfg.audio_mels
        self.n_mels = m
        self.net = nn.Sequential(
            CausalConv1d(m, d, 3),
            nn.GELU(),
            CausalConv1d(d, d, 4, stride=2),
            nn.GELU(),
            CausalConv1d(d, d, 4, stride=2),
            nn.GELU(),
            CausalConv1d(d, d, 3),
            nn.GELU(),
            CausalConv1d(d, d, 3),
        )
        self.norm = nn.LayerNorm(d)

    @property
    def receptive_field_frames(self) -> int:
        """Video frames of past audio a token can depend on (rounded up, plus the STFT window)."""
        rf, jump = 1, 1  # in mel hops
        for layer in self.net:
            if isinstance(layer, CausalConv1d):
                rf += (layer.kernel_size[0] - 1) * jump
                jump *= layer.stride[0]
        return math.ceil((rf + math.ceil(N_FFT / HOP)) / MELS_PER_FRAME) + 1

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [B, N] with N a multiple of 640 -> tokens [B, N // 640, audio_dim]."""
        if pcm.shape[-1] % SAMPLES_PER_FRAME:
            raise ValueError(f"audio length {pcm.shape[-1]} is not a multiple of {SAMPLES_PER_FRAME}")
        feats = log_mel(pcm, self.n_mels).to(self.norm.weight.dtype)
        return self.norm(self.net(feats).transpose(1, 2))


def frame_windows(tokens: torch.Tensor, first_token_frame: int, latent_start: int, num_latent: int, cfg):
    """Audio windows for latent frames [latent_start, latent_start + num_latent).

    tokens: [B, T, Da], token i belongs to video frame first_token_frame + i.
    Latent frame l spans video frames [l*tc, (l+1)*tc) and sees tokens of
    [l*tc - context, (l+1)*tc + lookahead). Frames outside `tokens` read zeros. (Under Wan's
    1 + 4k layout latent frame 0 decodes to the last frame of its span alone: the stream's video
    starts at frame tc - 1, `VideoAutoencoder.first_frame_index`.)
    Returns [B, num_latent, cfg.audio_window, Da].
    """
    tc = cfg.temporal_compression
    b, n, da = tokens.shape
    lat = torch.arange(latent_start, latent_start + num_latent, device=tokens.device)
    offs = torch.arange(cfg.audio_window, device=tokens.device) - cfg.audio_context_frames
    idx = lat[:, None] * tc + offs[None, :] - first_token_frame  # [L, W] indices into tokens
    valid = (idx >= 0) & (idx < n)
    padded = torch.cat([tokens, tokens.new_zeros(b, 1, da)], dim=1)
    gathered = padded[:, torch.where(valid, idx, n)]  # [B, L, W, Da]
    return gathered


def needed_video_frames(latent_end: int, cfg) -> int:
    """Video frames of audio that must have arrived before latent frames < latent_end can be made."""
    return latent_end * cfg.temporal_compression + cfg.audio_lookahead_frames
