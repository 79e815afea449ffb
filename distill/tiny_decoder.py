"""Stage `tiny_decoder`: distill an autoencoder's decoder into a faster one.

The teacher is a frozen autoencoder (`model.vae`: a TinyCausalVAE directory, a model directory,
or `wan:DIR` for the Wan2.1 VAE). Each step encodes crops of training video with it, decodes
them with the teacher, and trains the student decoder to give the teacher's frames from the same
latents: L1 + MSE against the teacher's frames, plus, weighted by `video_weight`, against the
video itself. A crop starts a stream (the decoder sees zeros before it), as the first chunk of a
stream does. The student (`tiny_decoder.architecture`) is either

- `taehv`: a `TinyDecoder` (streamgen/model/tiny_decoder.py), TAEHV's architecture;
  `tiny_decoder.init` may start from a published TAEHV checkpoint (fine-tuning `taew2_1.pth`);
- `causal_vae`: the teacher's own TinyCausalVAE decoder with narrower `widths` (`decoder_widths`):
  it starts from the teacher's weights, each narrowed layer from the teacher's leading channels,
  and the encoder stays the teacher's, so the DiT's latents are unchanged.

At export the directory gets, for `taehv`, `tiny_decoder.safetensors` (EMA weights;
`TinyDecoder.from_checkpoint` and `--tiny-decoder` load it); for `causal_vae`, the whole
autoencoder (`vae_config.json`, `vae.safetensors`) and, where the teacher came from a model
directory, `model/`: that model with this autoencoder, for `--model`. Both get `tiny_decoder.json`:
over `eval_clips` clips of `eval_split`,
the PSNR of the student's frames against the teacher's and against the video, the teacher's own
against the video, and both decoders' time per clip on this machine (the same run). Beside it,
`tiny_decoder.png`: frames of the video, the teacher and the student.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from distill.autoencoder import VideoSource, video_crops, video_to_input, warn_if_capped
from distill.config import ConfigError
from distill.distributed import broadcast_module, broadcast_text, mean_across
from distill.updater import Updater
from streamgen.model.files import write_atomically, write_text_atomically


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frames in [-1, 1]: the peak-to-peak range is 2."""
    return float(10 * torch.log10(4 / (a.float() - b.float()).square().mean().clamp(min=1e-10)))


class Stage:
    def __init__(self, cfg, world):
        from distill.build import load_vae
        from streamgen.model.config import get_config
        from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig, TinyDecoderVAE

        self.cfg, self.world, self.opts = cfg, world, cfg.options
        mcfg = get_config(cfg.model.flavor, **cfg.model.overrides)
        # (a taehv decoder is made for the teacher's latents whatever model.flavor says: the real Wan
        # VAE's 16 channels under the debug config's 4 were refused)
        self.teacher = load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed,
                                match_model=cfg.options.architecture != "taehv")  # fmt: skip
        self.teacher.to(world.device)
        # (a frame size it cannot encode trained into a shape mismatch's traceback at the first step)
        self.teacher.latent_hw(cfg.model.height, cfg.model.width)
        torch.manual_seed(cfg.run.seed)
        if self.opts.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"tiny_decoder.architecture must be one of {ARCHITECTURES}, not {self.opts.architecture!r}"
            )
        if self.opts.architecture == "causal_vae":
            self.decoder = self.student = (
                narrower_decoder(self.teacher, self.opts.widths).to(world.device).train()
            )
        elif self.opts.init:
            try:
                decoder = TinyDecoder.from_checkpoint(self.opts.init)
            except (FileNotFoundError, ValueError) as e:  # (a missing one was a traceback)
                raise ConfigError(f"tiny_decoder.init: {e}") from None
            decoder.made_for = None  # fine-tuned here to the teacher's own latents
        else:
            space_stages = len(self.opts.widths) - 1
            # one x2 stage per width after the first, the last two also x2 in time (1 or 2 widths
            # were "1 stages need 1 time_upscale and space_upscale flags")
            wanted = max(int(self.teacher.spatial_factor).bit_length() - 1, 2)
            if self.teacher.spatial_factor < 4:  # (it said "takes 3 widths", then "spatial factor 4 != 2")
                raise ConfigError(
                    f"a taehv decoder upsamples x4 at least (its last two stages double time too), more "
                    f"than this autoencoder's x{self.teacher.spatial_factor}: set tiny_decoder.architecture "
                    "causal_vae"
                )
            if space_stages != wanted:
                raise ConfigError(
                    f"tiny_decoder.widths {self.opts.widths}: a taehv decoder upsamples x2 per width "
                    f"after the first, so this autoencoder's x{self.teacher.spatial_factor} takes "
                    f"{wanted + 1} widths"
                )
            decoder = TinyDecoder(
                TinyDecoderConfig(
                    latent_channels=self.teacher.latent_channels,
                    widths=tuple(self.opts.widths),
                    blocks_per_stage=self.opts.blocks_per_stage,
                    time_upscale=(False,) * (space_stages - 2) + (True, True),
                    space_upscale=(True,) * space_stages,
                )
            )
        if self.opts.architecture == "taehv":
            self.decoder = decoder.to(world.device).train()
            # the student as the stream decodes: it also checks the decoder fits the teacher's latents
            self.student = TinyDecoderVAE(self.teacher, self.decoder)
        broadcast_module(self.decoder, world)
        tf = self.teacher.temporal_factor
        if cfg.data.video_frames % tf:
            raise ConfigError(f"data.video_frames must be a multiple of {tf}")
        # a crop of n latent frames: the first holds first_latent_frames video frames (Wan: 1)
        self.crop = self.teacher.first_latent_frames + tf * (cfg.data.video_frames // tf - 1)
        self.source = VideoSource(cfg)
        if self.source.frames is not None:  # the most video_frames, a multiple of tf, whose crop fits
            most = tf * ((self.source.frames - self.teacher.first_latent_frames) // tf + 1)
            self.source.check_crops_fit(self.crop, cfg.data.video_frames, most)
        # (read at the end, for the report: a split with no clips was found after the training)
        eval_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split=self.opts.eval_split))
        self.eval_source = VideoSource(eval_cfg, "tiny_decoder.eval_split")
        warn_if_capped(self.opts.eval_clips, "tiny_decoder.eval_clips", self.eval_source, world, "the report scores")
        self.updaters = {"decoder": Updater("decoder", self.decoder, cfg.optim, world)}
        # the last export's score of the trained decoder, until the next step: with run.export the
        # trainer exports twice (OUT/model, then run.export), and each scored eval_split again
        self._scored: tuple[dict, tuple] | None = None

    def model_configs(self) -> dict:
        return {"decoder": _decoder_config(self.decoder)}

    def input_identity(self) -> dict[str, str]:
        """The frozen teacher autoencoder's weights digest: every step distills toward its frames,
        and a resume against one retrained at the same path went on without a word."""
        import hashlib

        h = hashlib.sha1()
        for key, tensor in sorted(self.teacher.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return {"model.vae": broadcast_text(h.hexdigest()[:16], self.world)}

    def train_step(self, step: int) -> dict:
        self._scored = None  # (the decoder changes: its score is made again at the next export)
        if self.cfg.data.batch_size % self.world.size:
            raise ConfigError(f"data.batch_size is not divisible by {self.world.size} ranks")
        video = video_crops(self.source, self.cfg, self.world, step, self.crop, 1)
        with torch.no_grad():
            latents = self.teacher.encode(video)
            target = self.teacher.decode(latents)
        frames, _ = self.student.decode_stream(latents, self.student.init_state(len(latents)), clamp=False)
        o = self.opts

        def distance(err):
            return o.l1_weight * err.abs().mean() + o.mse_weight * err.square().mean()

        loss = distance(frames - target)
        if o.video_weight:
            loss = loss + o.video_weight * distance(frames - video)
        out = self.updaters["decoder"].update(loss)
        # of the whole global batch, as one process's (rank 0's slice alone was logged)
        mse = mean_across((frames.detach().clamp(-1, 1) - target).square().mean(), self.world)
        out["psnr_vs_teacher"] = float(10 * torch.log10(4 / mse.clamp(min=1e-10)))
        return out

    @torch.no_grad()
    def export(self, directory, name=None, compact=False):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        averaged = self.updaters["decoder"].averaged_module().eval()
        # scored before anything is written: written first, a run killed while scoring (half a minute
        # and more) left the new decoder beside the previous export's report and picture
        if self._scored is None:
            if self.opts.architecture == "causal_vae":
                saved, self.student = self.student, averaged
            else:
                saved, self.student.decoder = self.student.decoder, averaged
            try:
                self._scored = self.evaluate()
            finally:
                if self.opts.architecture == "causal_vae":
                    self.student = saved
                else:
                    self.student.decoder = saved
        report, sample = self._scored
        if self.opts.architecture == "causal_vae":
            averaged.save(d)
            self._export_model(averaged, d / "model", name)
        else:
            averaged.save(d / "tiny_decoder.safetensors")
        write_text_atomically(d / "tiny_decoder.json", json.dumps(report, indent=2))
        _plot_sample(sample, d / "tiny_decoder.png")

    @torch.no_grad()
    def evaluate(self) -> tuple[dict, tuple]:
        """Whole clips of `eval_split`, from their first frame (the frames a stream would show)."""
        source = self.eval_source
        tf, first = self.teacher.temporal_factor, self.teacher.first_latent_frames
        sums = {"student_vs_teacher": 0.0, "student_vs_video": 0.0, "teacher_vs_video": 0.0}
        seconds = {"teacher": 0.0, "student": 0.0}
        clips = min(self.opts.eval_clips, source.num)
        sample = None
        # (after the training's bar, at 100%: tiny-avatar's 6 clips of 100 frames sat half a minute
        # and more with nothing said)
        shown = self.cfg.run.progress
        desc = f"tiny_decoder: scoring on {self.opts.eval_split}"
        for i in tqdm(range(clips), desc=desc, unit="clip", disable=not shown, dynamic_ncols=True):
            raw = source.clip(i)
            usable = first + tf * ((len(raw) - first) // tf)
            video = video_to_input(raw[None, :usable]).to(self.world.device)
            latents = self.teacher.encode(video)
            started = time.perf_counter()
            teacher = self.teacher.decode(latents)
            seconds["teacher"] += time.perf_counter() - started
            started = time.perf_counter()
            student = self.student.decode(latents)
            seconds["student"] += time.perf_counter() - started
            sums["student_vs_teacher"] += psnr(student, teacher)
            sums["student_vs_video"] += psnr(student, video)
            sums["teacher_vs_video"] += psnr(teacher, video)
            if sample is None:
                sample = (video[0], teacher[0], student[0])
        return {
            "eval_split": self.opts.eval_split,
            "clips": clips,
            "frames_per_clip": int(video.shape[2]) if clips else 0,
            **{f"psnr_db_{k}": round(v / max(clips, 1), 2) for k, v in sums.items()},
            "decode_ms_per_clip": {k: round(v / max(clips, 1) * 1000, 1) for k, v in seconds.items()},
            "architecture": self.opts.architecture,
            "decoder": _decoder_config(self.decoder),
            "parameters": {
                "student": _decoder_parameters(self.student),
                "teacher": _decoder_parameters(self.teacher),
            },
        }, sample

    def _export_model(self, vae, directory: Path, name: str | None = None) -> None:
        """The teacher's model directory (`model.vae`, else `model.init`), with `vae` as its
        autoencoder, named `name` (run.export_name; else the teacher's, "-narrow-decoder"): put in place whole (`write_model_dir`; it was written file by file, and a
        reader meanwhile found the new decoder beside the previous export's DiT)."""
        from streamgen.folders import read_folder
        from streamgen.model_export import write_model_dir
        from streamgen.models import resolve_model_dir

        source = self.cfg.model.vae or self.cfg.model.init
        model_dir = resolve_model_dir(source) if source and not source.startswith("wan:") else None
        if model_dir is None or not (model_dir / "dit.safetensors").exists():
            return

        opened = []  # (the DiT weights open: of the export model.json is of, a re-export meanwhile or not)

        def read(d: Path) -> tuple[dict, object]:
            opened.append(open(d / "dit.safetensors", "rb"))
            return json.loads((d / "model.json").read_text()), opened[-1]

        def write_dit(tmp: Path) -> None:
            dit.seek(0)
            with open(tmp, "wb") as f:
                shutil.copyfileobj(dit, f)

        try:
            meta, dit = read_folder(model_dir, read)
            meta.update(name=name or f"{meta.get('name', model_dir.name)}-narrow-decoder", decoder_from=str(model_dir))
            write_model_dir(directory, write_dit, vae, meta)
        finally:
            for f in opened:
                f.close()


ARCHITECTURES = ("taehv", "causal_vae")


def narrower_decoder(teacher, widths) -> torch.nn.Module:
    """A copy of the TinyCausalVAE `teacher` whose decoder has `widths` (full resolution first).
    Its encoder and latent statistics are the teacher's, frozen; each decoder weight is the
    teacher's, or the teacher's leading channels where this one is narrower (a pruned start,
    nearer the teacher's frames than a random one). Only the decoder trains."""
    from streamgen.model.vae import TinyCausalVAE

    if not isinstance(teacher, TinyCausalVAE):
        raise ConfigError(
            f"tiny_decoder.architecture causal_vae needs a TinyCausalVAE teacher, not {type(teacher).__name__}"
        )
    theirs_widths = list(teacher.config.get("decoder_widths", teacher.config["widths"]))
    if len(widths) != len(theirs_widths):
        raise ConfigError(
            f"tiny_decoder.widths {list(widths)}: a causal_vae decoder takes one width per scale of "
            f"the teacher's decoder, {theirs_widths} ({len(theirs_widths)} widths)"
        )
    # A wider layer has no teacher channels to start from: it started random, and the decoder it
    # made was slower than the teacher's, trained without a word. (The same widths: the teacher's
    # own decoder, fine-tuned, as with video_weight.)
    wider = [f"{w} > {t}" for w, t in zip(widths, theirs_widths) if w > t]
    if wider:
        raise ConfigError(
            f"tiny_decoder.widths {list(widths)} is wider than the teacher's decoder {theirs_widths} "
            f"({', '.join(wider)}): a causal_vae decoder is the teacher's narrowed, each width at most its own"
        )
    student = TinyCausalVAE(**{**teacher.config, "decoder_widths": list(widths)})
    theirs = teacher.state_dict()
    state = {}
    for key, own in student.state_dict().items():
        if key in theirs and all(a <= b for a, b in zip(own.shape, theirs[key].shape)):
            own = _leading_channels(key, theirs[key], own.shape)
        state[key] = own
    student.load_state_dict(state)
    student.requires_grad_(False)
    for name in student.DECODER:
        getattr(student, name).requires_grad_(True)
    return student


def _leading_channels(key: str, weight: torch.Tensor, shape) -> torch.Tensor:
    """The teacher's `weight` cut to `shape`: its leading channels on every axis. The mixing
    convolution reads [this frame's features, the previous frame's] side by side, so its inputs
    are cut half by half: each half's leading channels, not the first half's alone."""
    if key == "dec_mix.weight":
        out_ch, in_half, whole_half = shape[0], shape[1] // 2, weight.shape[1] // 2
        halves = (weight[:out_ch, :in_half], weight[:out_ch, whole_half : whole_half + in_half])
        return torch.cat(halves, 1)
    return weight[tuple(slice(0, n) for n in shape)]


def _decoder_config(decoder) -> dict:
    return (
        dataclasses.asdict(decoder.cfg)
        if dataclasses.is_dataclass(getattr(decoder, "cfg", None))
        else dict(decoder.config)
    )


def _decoder_parameters(vae) -> int:
    """The decoder's parameters: a TinyDecoderVAE's tiny decoder, or an autoencoder's decoder modules."""
    decoder = getattr(vae, "decoder", None)
    if decoder is not None:
        return sum(p.numel() for p in decoder.parameters())
    names = getattr(vae, "DECODER", None)
    modules = [getattr(vae, n) for n in names] if names else [vae]
    return sum(p.numel() for m in modules for p in m.parameters())


def _plot_sample(sample, path: Path, frames: int = 6) -> None:
    if sample is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ("video", "teacher", "student")
    count = sample[0].shape[1]
    picks = sorted({round(i * (count - 1) / max(frames - 1, 1)) for i in range(frames)})
    fig, axes = plt.subplots(3, len(picks), figsize=(1.6 * len(picks), 5.0), squeeze=False)
    for r, clip in enumerate(sample):
        for c, t in enumerate(picks):
            image = ((clip[:, t].permute(1, 2, 0).float().cpu() + 1) / 2).clamp(0, 1).numpy()
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(rows[r])
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
