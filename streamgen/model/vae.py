"""Video autoencoders behind one streaming interface.

    encode(video [B, 3, T, H, W] in [-1, 1]) -> latents [B, C, F, h, w] (normalized)
    encode_reference(image [B, 3, H, W])     -> one latent frame [B, C, 1, h, w]
    init_state(batch)                        -> decoder state for a new stream
    decode_stream(latents, state)            -> (frames [B, 3, T, H, W] in [-1, 1], state)
    decode(latents)                          -> frames (the whole clip at once)

Both implementations are causal in time, so decoding chunk by chunk equals
decoding the whole clip:
- `TinyCausalVAE`: small and fast, trained here for `tiny-avatar`. Each latent
  frame holds `temporal_factor` video frames (stacked into channels) and sees
  the previous latent frame's features (a kernel-2 causal temporal mix).
- `WanVAE` (streamgen/model/wan_vae.py): diffusers'
  `AutoencoderKLWan` (real Wan2.1 weights load unchanged); its per-frame feature
  cache already makes chunked decoding exact, so the stream state is that cache.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamgen.cpu_threads import side_by_side
from streamgen.model.upsample import UpsampleConv2d


class VideoAutoencoder(nn.Module):
    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    # whose code its latents are in, where others make decoders for it ("wan2.1": TAEHV's); None:
    # its own, which only decoders trained on it read (`TinyDecoderVAE` checks)
    latent_space: str | None = None
    # whether `decode_stream` takes `frame_threads`: its frames decode apart after what joins them
    frames_decode_apart = False

    @property
    def first_latent_frames(self) -> int:
        """Video frames in a stream's first latent frame (Wan's causal layout: 1; else all)."""
        return self.temporal_factor

    @property
    def first_frame_index(self) -> int:
        """Where a stream's first decoded frame lies on its timeline, in video frames.

        Latent frame l spans video frames [l * t, (l + 1) * t) (t = temporal_factor): that is the
        span its audio is drawn from (`streamgen.model.audio.frame_windows`) and the time its
        frames play at. Under Wan's 1 + 4k layout the first latent frame decodes to one frame, the
        last of its span: frame t - 1, so a stream's video starts (t - 1) / fps after its audio.
        """
        return self.temporal_factor - self.first_latent_frames

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"frame size {height}x{width} must be a multiple of {f}")
        return height // f, width // f

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames, _ = self.decode_stream(latents, self.init_state(latents.shape[0]))
        return frames

    def decode_streams(self, latents: torch.Tensor, states: list) -> tuple[torch.Tensor, list]:
        """`decode_stream` of several streams, a row of `latents` and a state each: here one by
        one; an autoencoder whose states stack decodes them as one batch."""
        decoded = [self.decode_stream(latents[i : i + 1], state) for i, state in enumerate(states)]
        return torch.cat([frames for frames, _ in decoded]), [state for _, state in decoded]


class ResBlock2d(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def _renumber_legacy_decoder(vae, state_dict, prefix, *_):
    """Load-time key adapter for TinyCausalVAE checkpoints of the layout with nn.Upsample layers."""
    index = vae._legacy_dec_index
    if max(index) == len(vae.dec) - 1 or f"{prefix}dec.{max(index)}.weight" not in state_dict:
        return  # no upsampling stages, or already our layout
    head = prefix + "dec."
    old_keys = [k for k in state_dict if k.startswith(head)]
    renamed = {}
    for key in old_keys:
        i, rest = key[len(head) :].split(".", 1)
        renamed[f"{head}{index.get(int(i), i)}.{rest}"] = state_dict[key]
    for key in old_keys:
        del state_dict[key]
    state_dict.update(renamed)


class TinyCausalVAE(VideoAutoencoder):
    """Spatial /8, temporal /4 causal autoencoder with a kernel-2 temporal mix."""

    DEFAULT_WIDTHS = (32, 64, 96, 128)
    frames_decode_apart = True  # after the temporal mix, `dec` sees each latent frame alone

    @staticmethod
    def spatial_factor_of(widths=DEFAULT_WIDTHS) -> int:
        """The spatial factor of an autoencoder of these `widths` (one halving between scales)."""
        return 2 ** (len(widths) - 1)

    def __init__(
        self,
        latent_channels: int = 16,
        widths=DEFAULT_WIDTHS,
        temporal_factor: int = 4,
        res_blocks: int = 0,
        decoder_widths=None,
    ):
        """res_blocks: extra residual blocks at every scale of the encoder and the decoder.
        decoder_widths: the decoder's, from full resolution down (None: `widths`); a narrower
        decoder distilled from this one's (`streamgen distill tiny_decoder` with
        `architecture: causal_vae`) decodes the same latents with fewer products."""
        super().__init__()
        self.latent_channels = latent_channels
        self.temporal_factor = tf = temporal_factor
        self.spatial_factor = self.spatial_factor_of(widths)
        self.config = {"latent_channels": latent_channels, "widths": list(widths), "temporal_factor": tf}
        if res_blocks:
            self.config["res_blocks"] = res_blocks
        if decoder_widths is not None and list(decoder_widths) != list(widths):
            if len(decoder_widths) != len(widths):
                raise ValueError(
                    f"decoder_widths {list(decoder_widths)} must have as many scales as widths {list(widths)}"
                )
            self.config["decoder_widths"] = list(decoder_widths)
        w = list(widths)
        enc = [nn.Conv2d(3 * tf, w[0], 3, padding=1)]
        enc += [ResBlock2d(w[0]) for _ in range(res_blocks)]
        for a, b in zip(w[:-1], w[1:]):
            enc += [nn.SiLU(), nn.Conv2d(a, b, 4, stride=2, padding=1), ResBlock2d(b)]
            enc += [ResBlock2d(b) for _ in range(res_blocks)]
        self.enc = nn.Sequential(*enc)
        self.enc_mix = nn.Conv2d(2 * w[-1], w[-1], 1)  # [this frame, previous frame] -> this frame
        self.enc_out = nn.Conv2d(w[-1], latent_channels, 1)

        w = list(decoder_widths or widths)
        self.dec_in = nn.Conv2d(latent_channels, w[-1], 3, padding=1)
        self.dec_mix = nn.Conv2d(2 * w[-1], w[-1], 1)
        dec = [ResBlock2d(w[-1]) for _ in range(1 + res_blocks)]
        for a, b in zip(w[::-1][:-1], w[::-1][1:]):
            dec += [UpsampleConv2d(a, b), nn.SiLU()]
            dec += [ResBlock2d(b) for _ in range(res_blocks)]
        dec += [nn.Conv2d(w[0], 3 * tf, 3, padding=1)]
        self.dec = nn.Sequential(*dec)
        # Checkpoints written before UpsampleConv2d (the shipped autoencoder among them) have a
        # parameterless nn.Upsample in front of each upsampling conv: their `dec` index -> ours.
        self._legacy_dec_index, stages = {}, 0
        for i, layer in enumerate(dec):
            stages += isinstance(layer, UpsampleConv2d)
            self._legacy_dec_index[i + stages] = i
        self.register_load_state_dict_pre_hook(_renumber_legacy_decoder)
        # per-channel latent normalization, measured on data after training
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))
        # NHWC convolution weights make every activation NHWC too, where oneDNN's CPU convolutions
        # are fastest: the shipped decoder's chunks decode 1.3-1.9x faster than in NCHW (256x256:
        # 265 -> 165 ms), same values to 1e-6. Loading copies into these weights, keeping the layout.
        self.to(memory_format=torch.channels_last)

    def _norm(self, z):
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def _denorm(self, z):
        return z * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        tf = self.temporal_factor
        if t % tf:
            raise ValueError(f"clip length {t} must be a multiple of {tf} frames")
        groups = (
            video.reshape(b, c, t // tf, tf, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, t // tf, tf * c, h, w)
        )
        feats = self.enc(groups.flatten(0, 1)).unflatten(0, (b, t // tf))  # [B, F, Wd, h, w]
        prev = torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], dim=1)
        mixed = feats + self.enc_mix(torch.cat([feats, prev], 2).flatten(0, 1)).unflatten(0, (b, t // tf))
        z = self.enc_out(mixed.flatten(0, 1))
        return self._norm(z).unflatten(0, (b, t // tf)).transpose(1, 2)

    def encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        """A still image encodes as a latent frame of identical video frames."""
        return self.encode(image[:, :, None].expand(-1, -1, self.temporal_factor, -1, -1))

    def init_state(self, batch: int):
        return None  # the previous latent frame's decoder features; none before the first

    def decode_streams(
        self, latents: torch.Tensor, states: list, frame_threads: int = 1
    ) -> tuple[torch.Tensor, list]:
        """One batch, when every stream has decoded before or none has (a state is the previous
        latent frame's features, [1, 1, Wd, h, w])."""
        if all(state is None for state in states):
            frames, last = self.decode_stream(latents, None, frame_threads=frame_threads)
        elif any(state is None for state in states):
            decoded = [
                self.decode_stream(latents[i : i + 1], state, frame_threads=frame_threads)
                for i, state in enumerate(states)
            ]
            return torch.cat([frames for frames, _ in decoded]), [state for _, state in decoded]
        else:
            frames, last = self.decode_stream(latents, torch.cat(states), frame_threads=frame_threads)
        return frames, list(last.split(1))

    def decode_stream(self, latents: torch.Tensor, state, clamp: bool = True, frame_threads: int = 1):
        """clamp=False: the frames unclamped, so that training gives every pixel a gradient.
        frame_threads > 1: the latent frames (of every stream) decoded side by side on that many
        threads, each running its convolutions on one (`cpu_threads.side_by_side`), rather than
        each convolution over the threads the caller runs on; the same frames."""
        b, _, f, h, w = latents.shape
        z = self._denorm(latents.transpose(1, 2).flatten(0, 1))
        feats = self.dec_in(z.to(self.dec_in.weight.dtype)).unflatten(0, (b, f))  # [B, F, Wd, h, w]
        prev_first = state if state is not None else torch.zeros_like(feats[:, :1])
        prev = torch.cat([prev_first, feats[:, :-1]], dim=1)
        mixed = feats + self.dec_mix(torch.cat([feats, prev], 2).flatten(0, 1)).unflatten(0, (b, f))
        out = self._decode_frames(mixed.flatten(0, 1), frame_threads)  # [B*F, 3*tf, H, W]
        tf = self.temporal_factor
        hh, ww = out.shape[-2:]
        frames = out.reshape(b, f, tf, 3, hh, ww).permute(0, 3, 1, 2, 4, 5).reshape(b, 3, f * tf, hh, ww)
        return (frames.clamp(-1, 1) if clamp else frames).to(latents.dtype), feats[:, -1:]

    def _decode_frames(self, mixed: torch.Tensor, frame_threads: int) -> torch.Tensor:
        parts = min(frame_threads, len(mixed))
        if parts <= 1:
            return self.dec(mixed)
        return torch.cat(side_by_side(self.dec, list(mixed.tensor_split(parts))))

    DECODER = ("dec_in", "dec_mix", "dec")
    ENCODER = ("enc", "enc_mix", "enc_out")

    def with_dtypes(
        self, decoder: torch.dtype | None = None, encoder: torch.dtype | None = None
    ) -> TinyCausalVAE:
        """This autoencoder with its decoder's and encoder's weights in these dtypes (None: as
        they are); self when nothing changes. A copy that shares this one's unchanged modules.
        Latents go in and frames come out in the caller's dtype, as before (bfloat16 decoding is
        2-3x faster on CPUs with AMX, 1.2-1.35x with AVX512-BF16 alone, and moves the uint8 frames
        by at most 2 levels, `streamgen bench decoder`); an encoder in bfloat16 gives latents in
        bfloat16 (with AMX a reference image encodes 2.2-2.9x faster, `streamgen bench decoder`'s
        `reference_encode`)."""
        changed = {}
        for names, dtype in ((self.DECODER, decoder), (self.ENCODER, encoder)):
            if dtype is not None and next(getattr(self, names[0]).parameters()).dtype != dtype:
                changed.update(dict.fromkeys(names, dtype))
        if not changed:
            return self
        shared = {name: m for name, m in self.named_children() if name not in changed}
        other = copy.deepcopy(self, memo={id(m): m for m in shared.values()})
        for name, dtype in changed.items():
            getattr(other, name).to(dtype)
        return other

    # --- persistence -----------------------------------------------------------
    def save(self, directory) -> None:
        """vae_config.json (what says a directory holds this autoencoder) and vae.safetensors, which
        carries the config too: a re-export renames the weights over the old ones, then the config,
        and a reader between the two renames would otherwise pair one export's config with the
        other's weights."""
        from streamgen.model.files import save_safetensors, write_text_atomically

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = json.dumps(self.config, indent=2)
        write_text_atomically(d / "vae_config.json", config)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_safetensors(state, d / "vae.safetensors", metadata={"vae_config": config})

    @classmethod
    def load(cls, directory) -> TinyCausalVAE:
        """The config the weights carry (vae_config.json for weights saved before they did)."""
        from streamgen.model.files import (
            json_object,
            load_safetensors_and_metadata,
            non_finite_tensor,
            read_json,
        )

        d = Path(directory)
        state, metadata = load_safetensors_and_metadata(d / "vae.safetensors")
        if "vae_config" in metadata:
            where = f"{d / 'vae.safetensors'}: its vae_config is"
            config = json_object(metadata["vae_config"], where)
        else:
            where = f"{d / 'vae_config.json'}:"
            config = read_json(d / "vae_config.json")
        try:
            vae = cls(**config)
        except TypeError as e:  # (an argument it does not take, or lacks)
            raise ValueError(f"{where} does not fit {cls.__name__} ({e})") from None
        try:  # (checked by load_state_dict itself: its hook renumbers an older export's keys first)
            vae.load_state_dict(state)
        except RuntimeError as e:  # (its message was two lines and named no file)
            said = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
            raise ValueError(f"{d / 'vae.safetensors'}: its weights do not fit its config: {said[:500]}") from None
        if bad := non_finite_tensor(state):  # (it loaded without a word, and decoded black frames)
            raise ValueError(f"{d / 'vae.safetensors'}: its {bad} holds NaN or infinite values (from a training "
                             "run that diverged?): the autoencoder cannot decode with them")  # fmt: skip
        return vae
