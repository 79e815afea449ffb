"""Stage `autoencoder`: train the TinyCausalVAE of `tiny-avatar` on avatar-world video.

Crops of `data.video_frames` frames (a multiple of the temporal factor, so the
causal temporal mix between latent frames is trained too) are encoded and
decoded; loss = L1 + MSE of the reconstruction (optionally weighted up inside
the mouth box, `mouth_weight`) plus a small penalty on the latents' magnitude.
At export the per-channel latent mean and std are measured over `stats_clips` clips and stored in the VAE's normalisation buffers, so the
diffusion stages see roughly unit-variance latents.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from distill.config import ConfigError
from distill.distributed import broadcast_module, mean_across
from distill.rng import generator
from distill.updater import Updater


def video_to_input(video_uint8: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 -> [B, 3, T, H, W] in [-1, 1]."""
    return video_uint8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def video_crops(source, cfg, world, step: int, frames: int, stride: int) -> torch.Tensor:
    """This rank's share of step `step`'s batch: a clip drawn per sample, cut to `frames` frames
    from a start on a multiple of `stride`, as [B, 3, T, H, W] in [-1, 1]."""
    per_rank = cfg.data.batch_size // world.size
    crops = []
    for i in range(world.rank * per_rank, (world.rank + 1) * per_rank):
        g = generator(cfg.run.seed, step, i, "clip")
        video = source.clip(int(torch.randint(source.num, (), generator=g)))
        if len(video) < frames:
            raise ConfigError(f"clips of {len(video)} frames are shorter than a crop of {frames}")
        start = stride * int(torch.randint((len(video) - frames) // stride + 1, (), generator=g))
        crops.append(video[start : start + frames])
    return video_to_input(torch.stack(crops)).to(world.device)


def warn_if_capped(count: int, key: str, source: VideoSource, world, use: str) -> None:
    """A warning where `key` asks for more clips than `source` holds: all it holds are used
    (`use` those N), which was said nowhere (a report of 8 clips, 64 asked for)."""
    if count > source.num and world.is_main:
        print(f"warning: {key} is {count}, more than the {source.num} clips of {source.where}: {use} "
              f"those {source.num}", file=sys.stderr)  # fmt: skip


def _check_frame_size(manifest: dict, cfg) -> None:
    """ConfigError unless the dataset's frames are model.height x model.width: the pixel stages
    trained on the clips' own frames, of another size, without a word, and laid the mouth box
    (autoencoder.mouth_weight) out for the config's (a 64x64 box on 32x32 frames weighed the chin
    corner up). A manifest that does not say its size is not checked."""
    size = (manifest.get("height"), manifest.get("width"))
    if not all(isinstance(n, int) for n in size) or size == (cfg.model.height, cfg.model.width):
        return
    h, w = size
    raise ConfigError(
        f"model.height x model.width ({cfg.model.height}x{cfg.model.width}) are not the size of the frames of "
        f"{cfg.data.root} ({h}x{w}): set them to it (--set model.height={h} --set model.width={w})"
    )


class VideoSource:
    """Uniform access to training video: the avatar world's clips, or synthetic moving blobs."""

    def __init__(self, cfg, split_key: str = "data.split"):
        """split_key: the setting that chose `cfg.data.split`, named where the split holds no clips."""
        d = cfg.data
        self.synthetic = d.source == "synthetic"
        if self.synthetic:
            self.num = d.synthetic_clips
            self.size = cfg.model.height
            self.frames = d.synthetic_clip_latents * 4
            self.where = "the synthetic data (data.synthetic_clips)"
        else:
            from pathlib import Path

            from distill.data import DataMissing
            from streamgen.data.dataset import AvatarWorldDataset
            from streamgen.data.shards import DataError

            if not Path(d.root).is_dir():
                raise DataMissing(
                    f"data directory {d.root} does not exist (make it with `streamgen data make`)"
                )
            try:
                self.ds = AvatarWorldDataset(d.root, d.split)
            except DataError as e:
                raise DataMissing(str(e)) from None
            self.num = len(self.ds)
            frames = self.ds.manifest.get("frames")  # (every clip's; a manifest from before it: None)
            self.frames = frames if isinstance(frames, int) else None
            self.where = f"the {d.split} split of {d.root} ({split_key})"
            _check_frame_size(self.ds.manifest, cfg)
            if not self.num:  # (a traceback from torch.randint at the first step, or a report of 0 clips)
                raise DataMissing(
                    f"the {d.split} split of {d.root} holds no clips ({split_key}): choose another split, "
                    "or make the dataset with more clips (streamgen data make --clips N)"
                )

    def check_crops_fit(self, crop: int, video_frames: int, most: int) -> None:
        """ConfigError naming data.video_frames where its crops, of `crop` frames, are longer than
        the clips: found at the first step, after the stage was built (a tiny decoder's teacher
        loaded), it named no setting ("clips of 16 frames are shorter than a crop of 40"; a Wan
        teacher's crop of 37 frames for a video_frames of 40). `most`: the most that fits."""
        if self.frames is not None and crop > self.frames:
            raise ConfigError(
                f"data.video_frames {video_frames}: crops that long do not fit the clips ({self.where}: "
                f"{self.frames} frames); set it to at most {most}"
            )

    def clip(self, index: int) -> torch.Tensor:
        """uint8 [T, H, W, 3]."""
        if not self.synthetic:
            return torch.from_numpy(self.ds[index]["video"])
        g = generator(index, "synthetic-video")
        t = torch.arange(self.frames).float()[:, None, None]
        yy, xx = torch.meshgrid(
            torch.arange(self.size).float(), torch.arange(self.size).float(), indexing="ij"
        )
        cx = self.size * (0.3 + 0.4 * torch.rand((), generator=g)) + 2 * torch.sin(t / 5)
        cy = self.size * (0.3 + 0.4 * torch.rand((), generator=g))
        colour = torch.rand(3, generator=g) * 255
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < (self.size / 4) ** 2).float()
        return (blob[..., None] * colour + (1 - blob[..., None]) * 40).to(torch.uint8)


class Stage:
    def __init__(self, cfg, world):
        from streamgen.model.config import get_config
        from streamgen.model.vae import TinyCausalVAE

        self.cfg, self.world, self.opts = cfg, world, cfg.options
        mcfg = get_config(cfg.model.flavor, **cfg.model.overrides)
        if cfg.data.video_frames % mcfg.temporal_compression:
            raise ConfigError(f"data.video_frames must be a multiple of {mcfg.temporal_compression}")
        torch.manual_seed(cfg.run.seed)
        self.vae = TinyCausalVAE(
            mcfg.in_channels, tuple(cfg.model.vae_widths), mcfg.temporal_compression, cfg.model.vae_res_blocks
        )
        # (a frame size it cannot encode trained into a shape mismatch's traceback at the first step)
        self.vae.latent_hw(cfg.model.height, cfg.model.width)
        self.vae.to(world.device).train()
        broadcast_module(self.vae, world)
        self.source = VideoSource(cfg)
        if self.source.frames is not None:  # (crops start on latent frames: a whole number of them)
            most = self.source.frames - self.source.frames % mcfg.temporal_compression
            self.source.check_crops_fit(cfg.data.video_frames, cfg.data.video_frames, most)
        warn_if_capped(self.opts.stats_clips, "autoencoder.stats_clips", self.source, world,
                       "the latent statistics are measured over")  # fmt: skip
        self.updaters = {"vae": Updater("vae", self.vae, cfg.optim, world)}
        from streamgen.eval.evaluators import MOUTH_BOX

        r0, r1, c0, c1 = MOUTH_BOX  # fractions of the frame: the renderer's mouth is always there
        h, w = cfg.model.height, cfg.model.width
        self.mouth_rows, self.mouth_cols = (
            slice(round(r0 * h), round(r1 * h)),
            slice(round(c0 * w), round(c1 * w)),
        )

    def model_configs(self) -> dict:
        return {"vae": dict(self.vae.config)}

    def train_step(self, step: int) -> dict:
        if self.cfg.data.batch_size % self.world.size:
            raise ConfigError(f"data.batch_size is not divisible by {self.world.size} ranks")
        # crops start on latent-frame boundaries, as the stream's chunks do
        x = video_crops(
            self.source, self.cfg, self.world, step, self.cfg.data.video_frames, self.vae.temporal_factor
        )
        o = self.opts
        z = self.vae.encode(x)
        recon, _ = self.vae.decode_stream(z, None)
        err = recon - x
        loss = o.l1_weight * err.abs().mean() + o.mse_weight * err.square().mean()
        if o.mouth_weight:
            mouth = err[..., self.mouth_rows, self.mouth_cols]
            loss = loss + o.mouth_weight * (
                o.l1_weight * mouth.abs().mean() + o.mse_weight * mouth.square().mean()
            )
        loss = loss + o.latent_penalty * z.square().mean()
        out = self.updaters["vae"].update(loss)
        # of the whole global batch, as one process's (rank 0's slice alone was logged)
        mse = mean_across(err.detach().square().mean(), self.world)
        out["psnr"] = float(10 * torch.log10(4 / mse.clamp(min=1e-10)))
        return out

    @torch.no_grad()
    def export(self, directory, name=None, compact=False):
        vae = self.updaters["vae"].averaged_module()
        vae.latent_mean.zero_()
        vae.latent_std.fill_(1)
        zs = []
        # (after the training's bar, at 100%: tiny-avatar's 64 clips took half a minute, nothing said)
        clips = range(min(self.opts.stats_clips, self.source.num))
        shown, desc = self.cfg.run.progress, "autoencoder: latent statistics"
        for i in tqdm(clips, desc=desc, unit="clip", disable=not shown, dynamic_ncols=True):
            video = self.source.clip(i)
            usable = len(video) - len(video) % vae.temporal_factor
            zs.append(vae.encode(video_to_input(video[None, :usable]).to(vae.latent_mean.device)))
        z = torch.cat([t.transpose(1, 2).flatten(0, 1) for t in zs])  # [N, C, h, w]
        vae.latent_mean.copy_(z.mean(dim=(0, 2, 3)))
        vae.latent_std.copy_(z.std(dim=(0, 2, 3)).clamp(min=1e-4))
        vae.cpu().save(directory)
