"""A tiny streaming decoder for a video model's latents: TAEHV's decoder architecture.

On the H200 the Wan2.1 VAE's decoder takes 232 ms of a 750 ms steady chunk (docs/performance.md,
"On one H200"): 40.6 TFLOP of 3D convolutions over 12 frames of 832x480. TAEHV (madebyollin/taehv, "Tiny
AutoEncoder for Hunyuan Video", with `taew2_1` weights for Wan2.1's latents; the decoder of
Self-Forcing's real-time demo) decodes the same latents with ~1.3 TFLOP of 2D convolutions,
at a cost in fidelity its authors document. This module is our implementation of its decoder,
written for streaming by chunks, and the adapter that loads its published checkpoints:

- every frame is decoded by 2D convolutions; a `MemoryBlock` also sees its own input one frame
  earlier (zeros before a stream's first frame), which is all the decoder knows of time, so a
  chunk's frames run as one batch and a stream's state is one frame per block;
- `TimeUpsample` turns each frame into `factor` frames with a 1x1 convolution (its output
  channels, in groups, are the new frames in order);
- a stage ends with a nearest 2x upsample, the time upsample and a 3x3 convolution. The 1x1
  convolution commutes with the nearest upsample, so it runs before it, at a quarter of the
  pixels, and the upsample and the 3x3 convolution run as one `UpsampleConv2d` (16 instead of
  36 multiply-adds per pixel). The published weights load unchanged: the same arithmetic.

Latents go in as the diffusion model makes them (Wan's normalized ones: TAEHV applies no mean
or scale of its own); frames come out in [0, 1]. A stream's first latent frame decodes to
`time_factor` frames, of which Wan's causal layout (1 + 4k) keeps the last: `TinyDecoderVAE`
drops the others.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamgen.model.upsample import UpsampleConv2d
from streamgen.model.vae import VideoAutoencoder


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 16  # Wan2.1's (taew2_1)
    widths: tuple[int, ...] = (256, 128, 64, 64)  # each stage's, then the last projection's
    blocks_per_stage: int = 3
    time_upscale: tuple[bool, ...] = (False, True, True)  # per stage: x2 frames
    space_upscale: tuple[bool, ...] = (True, True, True)  # per stage: x2 height and width
    patch_size: int = 1  # the output's pixel-shuffle factor (taew2_2: 2)
    image_channels: int = 3

    def __post_init__(self):
        stages = len(self.widths) - 1
        if len(self.time_upscale) != stages or len(self.space_upscale) != stages:
            raise ValueError(f"{stages} stages need {stages} time_upscale and space_upscale flags")

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.time_upscale)

    @property
    def space_factor(self) -> int:
        return 2 ** sum(self.space_upscale) * self.patch_size


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class MemoryBlock(nn.Module):
    """A residual block of three 3x3 convolutions whose first also reads the block's input one
    frame earlier."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv3x3(2 * c, c), nn.ReLU(), _conv3x3(c, c), nn.ReLU(), _conv3x3(c, c))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TimeUpsample(nn.Module):
    """[N*T, C, H, W] -> [N*T*factor, C, H, W]: each frame's `factor` successors, from one 1x1
    convolution whose output channels hold them in order."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(channels, channels * factor, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class DecoderStage(nn.Module):
    def __init__(self, channels: int, out_channels: int, blocks: int, time_up: bool, space_up: bool):
        super().__init__()
        self.blocks = nn.ModuleList(MemoryBlock(channels) for _ in range(blocks))
        self.time_up = TimeUpsample(channels, 2 if time_up else 1)
        # the nearest 2x upsample and the 3x3 convolution after it, as one low-resolution convolution
        self.proj = (
            UpsampleConv2d(channels, out_channels, bias=False)
            if space_up
            else _conv3x3(channels, out_channels, bias=False)
        )

    def forward(self, x: torch.Tensor, batch: int, memory: list, new_memory: list) -> torch.Tensor:
        for block in self.blocks:
            t = x.shape[0] // batch  # frames per stream; x holds each stream's in turn
            last = x[t - 1 :: t]
            past = memory.pop(0) if memory else torch.zeros_like(last)
            # each frame's predecessor: the one the previous chunk ended on, then this chunk's own
            past = torch.cat([p for n in range(batch) for p in (past[n : n + 1], x[n * t : (n + 1) * t - 1])])
            new_memory.append(last.clone(memory_format=torch.channels_last))  # not a view of all of x
            x = block(x, past)
        return self.proj(self.time_up(x))


class TinyDecoder(nn.Module):
    """TAEHV's decoder: latents [N, T, C, h, w] -> frames [N, T * time_factor, 3, H, W] in [0, 1]."""

    def __init__(self, cfg: TinyDecoderConfig = TinyDecoderConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.inp = _conv3x3(cfg.latent_channels, w[0])
        self.stages = nn.ModuleList(
            DecoderStage(w[i], w[i + 1], cfg.blocks_per_stage, cfg.time_upscale[i], cfg.space_upscale[i])
            for i in range(len(w) - 1)
        )
        self.out = _conv3x3(w[-1], cfg.image_channels * cfg.patch_size**2)
        # the latent space it was made for ("wan2.1": TAEHV's published weights), or None: trained
        # here, on the autoencoder it is exported with (a fine-tune sets None)
        self.made_for: str | None = None
        # NHWC weights make every activation NHWC, the layout cuDNN's bf16 and oneDNN's kernels
        # compute in; loading copies into them and keeps it
        self.to(memory_format=torch.channels_last)

    def forward(
        self, latents: torch.Tensor, memory: list | None = None, clamp: bool = True
    ) -> tuple[torch.Tensor, list]:
        """Decode a chunk of latent frames after `memory` (the state a previous chunk returned;
        None: a stream's start). Returns the frames and the state for the next chunk: the last
        frame each memory block saw. Chunk by chunk equals the whole clip at once. Training
        takes the frames unclamped (`clamp=False`), so that every pixel has a gradient."""
        n, t = latents.shape[:2]
        memory, new_memory = list(memory or []), []
        z = latents.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        x = F.relu(self.inp(torch.tanh(z / 3) * 3))  # latents softly clamped to [-3, 3]
        for stage in self.stages:
            x = stage(x, n, memory, new_memory)
        x = self.out(F.relu(x))
        if self.cfg.patch_size > 1:
            x = F.pixel_shuffle(x, self.cfg.patch_size)
        return (x.clamp(0, 1) if clamp else x).unflatten(0, (n, -1)), new_memory

    @classmethod
    def from_checkpoint(cls, path, **overrides) -> TinyDecoder:
        """TAEHV's published weights (`taew2_1.pth`, or its .safetensors), or ours (`save`). The
        config is read off the tensors' shapes; `overrides` may turn stages' upsampling off
        (TAEHV's cheaper previews: time_upscale=(False, False, False) keeps 1 frame a latent)."""
        from streamgen.files import home_expanded

        path = home_expanded(path)  # (`--tiny-decoder=~/x` reaches it unexpanded: "no checkpoint at ~/x")
        try:
            exists, is_file = path.exists(), path.is_file()
        except OSError as e:  # (a name the file system cannot hold, ENAMETOOLONG: a traceback)
            raise ValueError(f"cannot read a tiny decoder checkpoint at {path}: {e.strerror or e}") from None
        if not exists:
            raise FileNotFoundError(f"no tiny decoder checkpoint at {path}")
        if not is_file:
            raise ValueError(f"{path} is not a file (a tiny decoder checkpoint: .pth or .safetensors)")
        try:
            return cls._from_file(path, overrides)
        except Exception as e:  # unpickling, safetensors' header, foreign keys or shapes
            # (the first sentence: torch's unpickling error runs to a page of advice on weights_only)
            first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
            why = first if isinstance(e, ValueError) else f"{type(e).__name__}: {first}"  # (ours say it)
            raise ValueError(f"{path} is not a tiny decoder checkpoint: {why}") from e

    @classmethod
    def _from_file(cls, path: Path, overrides: dict) -> TinyDecoder:
        saved = None  # the config `save` wrote beside the weights
        if path.suffix == ".safetensors":
            from streamgen.model.files import load_safetensors_and_metadata

            # (one open: a re-export renamed over it meanwhile gave one's weights the other's config)
            state, metadata = load_safetensors_and_metadata(path)
            saved = metadata.get("tiny_decoder_config")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        taehv = any(k.startswith("decoder.") for k in state)
        if taehv:
            state = from_taehv(state)
        if saved is not None:
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(saved).items()}
            cfg = TinyDecoderConfig(**{**fields, **overrides})
        else:
            cfg = config_from_state_dict(state, **overrides)
        decoder = cls(cfg)
        decoder.load_state_dict(_keep_last_frames(state, decoder.state_dict()))
        decoder.made_for = "wan2.1" if taehv else None  # (TAEHV's taew2_1: Wan2.1's VAE's latents)
        return decoder

    def save(self, path) -> None:
        """The weights as safetensors, the config in its metadata: the shapes do not say which
        stages upsample in space."""
        from streamgen.model.files import save_safetensors

        config = json.dumps(dataclasses.asdict(self.cfg))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_safetensors(state, path, metadata={"tiny_decoder_config": config})


def config_from_state_dict(state: dict[str, torch.Tensor], **overrides) -> TinyDecoderConfig:
    """The TinyDecoderConfig whose parameters have these shapes (ours, as `from_taehv` names them)."""
    needed = ("inp.weight", "out.weight", "stages.0.blocks.0.")
    if not all(any(k.startswith(n) for k in state) for n in needed):  # (a DiT's or a VAE's weights:
        # "max() arg is an empty sequence")
        raise ValueError(f"none of a tiny decoder's weights ({', '.join(needed)}...) in it")
    stages = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("stages."))
    blocks = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("stages.0.blocks."))
    widths = [state["inp.weight"].shape[0]] + [
        state[f"stages.{i}.proj.weight"].shape[0] for i in range(stages)
    ]
    image_channels = overrides.get("image_channels", 3)
    cfg = dict(
        latent_channels=state["inp.weight"].shape[1],
        widths=tuple(widths),
        blocks_per_stage=blocks,
        time_upscale=tuple(
            state[f"stages.{i}.time_up.conv.weight"].shape[0] == 2 * widths[i] for i in range(stages)
        ),
        space_upscale=(True,) * stages,  # nothing in the weights says; TAEHV's checkpoints all upsample
        patch_size=int(round((state["out.weight"].shape[0] / image_channels) ** 0.5)),
    )
    return TinyDecoderConfig(**{**cfg, **overrides})


def _keep_last_frames(state: dict, ours: dict) -> dict:
    """A time upsample turned off keeps the last of the frames the checkpoint's makes (TAEHV's
    previews do the same): the frame nearest the next latent frame's."""
    state = dict(state)
    for key, value in ours.items():
        if key.endswith("time_up.conv.weight") and key in state and state[key].shape[0] > value.shape[0]:
            state[key] = state[key][-value.shape[0] :]
    return state


_TAEHV_KEY = re.compile(r"^decoder\.(\d+)\.(.+)$")


def from_taehv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict adapter: TAEHV's checkpoint (one nn.Sequential `decoder`, and an `encoder` we do
    not use) -> TinyDecoder's names.

    TAEHV's decoder, by index: 0 a soft clamp, 1 the input convolution, 2 a ReLU; then per stage
    its memory blocks, an nn.Upsample, the time upsample and the 3x3 projection; then a ReLU and
    the output convolution. Only the convolutions have parameters, which fixes the stage length.
    """
    decoder = {}
    for key, value in state.items():
        m = _TAEHV_KEY.match(key)
        if m is not None:
            decoder.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif not key.startswith("encoder."):
            raise ValueError(f"not a TAEHV checkpoint key: {key!r}")
    if 1 not in decoder:
        raise ValueError("a TAEHV checkpoint without a decoder")
    # memory blocks hold conv.0/2/4; a stage's block run ends at the first index without them
    blocks = 0
    while "conv.0.weight" in decoder.get(3 + blocks, {}):
        blocks += 1
    length = blocks + 3  # the blocks, the upsample, the time upsample, the projection
    last = max(decoder)
    stages = (last - 1 - 3) // length  # after the stages: a ReLU, then the output convolution
    if blocks == 0 or 3 + stages * length + 1 != last:
        raise ValueError(f"a TAEHV decoder of an unknown layout (its last parameterized layer: {last})")
    out = {f"inp.{k}": v for k, v in decoder[1].items()} | {f"out.{k}": v for k, v in decoder[last].items()}
    for s in range(stages):
        base = 3 + s * length
        for j in range(blocks):
            out |= {f"stages.{s}.blocks.{j}.{k}": v for k, v in decoder[base + j].items()}
        out[f"stages.{s}.time_up.conv.weight"] = decoder[base + blocks + 1]["conv.weight"]
        out[f"stages.{s}.proj.weight"] = decoder[base + blocks + 2]["weight"]
    return out


TINY_DECODER_FILE = "tiny_decoder.safetensors"  # in a model directory, beside its autoencoder's files


class TinyDecoderVAE(VideoAutoencoder):
    """`vae` (its encoder, its latent layout) whose decoding runs through a `TinyDecoder`."""

    def __init__(self, vae: VideoAutoencoder, decoder: TinyDecoder):
        super().__init__()
        cfg = decoder.cfg
        mismatch = [
            f"{name} {theirs} != {ours}"
            for name, theirs, ours in (
                ("latent channels", cfg.latent_channels, vae.latent_channels),
                ("spatial factor", cfg.space_factor, vae.spatial_factor),
                ("temporal factor", cfg.time_factor, vae.temporal_factor),
            )
            if theirs != ours
        ]
        if mismatch:
            raise ValueError(
                f"this tiny decoder does not fit the autoencoder's latents: {'; '.join(mismatch)}"
            )
        if decoder.made_for is not None and decoder.made_for != vae.latent_space:
            # (tiny-avatar's latents have Wan's shape, and TAEHV's decoder made noise of them)
            raise ValueError(
                f"this tiny decoder was made for the {decoder.made_for} VAE's latents; this autoencoder's "
                f"are its own ({type(vae).__name__}): distill one for it (distill tiny_decoder, docs/distill.md)"
            )
        self.vae, self.decoder = vae, decoder
        self.latent_space = vae.latent_space
        self.latent_channels = vae.latent_channels
        self.spatial_factor, self.temporal_factor = vae.spatial_factor, vae.temporal_factor
        # a stream's first latent frame makes time_factor frames; Wan's layout keeps its last one
        self.trim_first = cfg.time_factor - vae.first_latent_frames

    @property
    def first_latent_frames(self) -> int:
        return self.vae.first_latent_frames

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video)

    def encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode_reference(image)

    def init_state(self, batch: int):
        return {"memory": None, "first": True}

    def save(self, directory) -> None:
        """The wrapped autoencoder's files, and `tiny_decoder.safetensors` beside them (a model
        directory decodes through it when loaded: `streamgen.models.load_autoencoder`)."""
        self.vae.save(directory)
        self.decoder.save(Path(directory) / TINY_DECODER_FILE)

    def decode_stream(self, latents: torch.Tensor, state, clamp: bool = True):
        """`clamp=False` (training, distill/tiny_decoder.py): frames not clamped to [-1, 1], so that
        every pixel has a gradient."""
        dtype = self.decoder.inp.weight.dtype
        frames, memory = self.decoder(latents.transpose(1, 2).to(dtype), state["memory"], clamp=clamp)
        if state["first"]:
            frames = frames[:, self.trim_first :]
        state = {"memory": memory, "first": False}
        return (frames * 2 - 1).transpose(1, 2).to(latents.dtype), state  # [N, 3, T, H, W] in [-1, 1]
