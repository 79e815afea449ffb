"""The sections of the training stages' YAML configs, as dataclasses (config.py loads them).

A config file is the sections below; every stage reads `run`, `data`, `model`
and `optim`, plus the section named after itself (`teacher:`, `ode:`, ...).
Unknown keys are errors that name the key, its section and the closest valid
spelling, so a typo never silently trains with a default.

    stage: teacher
    run:   {out: runs/teacher, steps: 2000, seed: 0, checkpoint_every: 500}
    data:  {source: world, root: data/world, latents: tiny-vae, batch_size: 8, latent_frames: 6}
    model: {flavor: tiny-avatar, overrides: {num_layers: 4}}
    optim: {lr: 2.0e-4, warmup: 100, grad_clip: 1.0, ema: 0.999}
    teacher: {p_drop_audio: 0.1}
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

STAGES = ("autoencoder", "latents", "teacher", "ode", "self_forcing", "chunk", "tiny_decoder")
BANK_STAGES = ("teacher", "ode", "self_forcing", "chunk")  # they read a latent bank (distill/data.py)
PIXEL_STAGES = ("autoencoder", "tiny_decoder")  # they read video, in crops of data.video_frames


class ConfigError(ValueError):
    """The YAML file is unreadable, or holds an unknown key or a bad value."""


class ValueTypeError(ConfigError):
    """A value of the wrong type; `key` is its SECTION.KEY (a --set's is named, not the file)."""

    def __init__(self, message: str, key: str, wants_text: bool = False):
        super().__init__(message)
        self.key, self.wants_text = key, wants_text  # (wants_text: a str would have done)


@dataclass
class RunConfig:
    out: str = "runs/run"  # checkpoints, TensorBoard events, loss curves
    steps: int = 100  # optimizer steps of the main model in total
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    threads: int = 0  # torch.set_num_threads; 0 leaves the default
    device: str = "auto"  # auto | cpu | cuda
    export: str | None = None  # model directory written at the end (EMA weights)
    # the name in run.export's model.json (default: the folder's); of a model: not an autoencoder or a taehv decoder
    export_name: str | None = None
    progress: bool = True
    fsdp: bool = False  # under torchrun: shard the trainable modules with FSDP2 (large flavors)


@dataclass
class DataConfig:
    source: str = "world"  # world (a `streamgen data make` folder) | synthetic (random tensors, tests)
    root: str = "data/world"
    latents: str = "tiny-vae"  # latent cache name (see the `latents` stage)
    split: str = "train"
    batch_size: int = 8  # global: divided over the data-parallel ranks
    latent_frames: int = 6  # generated latent frames per sample (after the reference frame)
    video_frames: int = 8  # autoencoder stage: video frames per training crop
    synthetic_clips: int = 8
    synthetic_clip_latents: int = 10  # latent frames per synthetic clip
    # resume over a dataset (data.root) or latent bank (data.latents) made again since the checkpoint,
    # or against a teacher with other weights (self_forcing, chunk, tiny_decoder): refused unless this is given
    # (`--set data.accept_remade=true`), as the paths are by every command
    accept_remade: bool = False


@dataclass
class ModelConfigSection:
    flavor: str = "tiny-avatar"
    overrides: dict = field(default_factory=dict)  # ModelConfig fields to change
    init: str | None = None  # a model directory (its DiT), or wan:DIR (a diffusers Wan2.1 transformer)
    vae: str | None = None  # trained autoencoder directory; None: a random TinyCausalVAE
    vae_widths: list = field(default_factory=lambda: [32, 64, 96, 128])
    vae_res_blocks: int = 0  # extra residual blocks per scale of the TinyCausalVAE
    height: int = 64
    width: int = 64


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup: int = 0  # linear warm-up steps
    decay_steps: int = 0  # > 0: cosine decay from lr to min_lr over this many updates after warm-up
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 disables
    ema: float = 0.0  # EMA decay of the weights; 0 disables


@dataclass
class AutoencoderOptions:
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    latent_penalty: float = 1e-4  # keeps latents small and well-conditioned for diffusion
    stats_clips: int = 64  # clips used to measure latent_mean / latent_std at the end
    # extra weight of the reconstruction error inside the mouth box (the evaluators' MOUTH_BOX):
    # the mouth is ~15% of the frame but carries all of the lip sync
    mouth_weight: float = 0.0


@dataclass
class LatentsOptions:
    splits: list = field(default_factory=lambda: ["train", "val", "test"])
    captions: bool = True  # embed captions with MiniLM (needs text_dim 384); else zero context


@dataclass
class TeacherOptions:
    shift: float = 5.0  # timestep shift at sampling (exported into model.json)
    train_shift: float = 1.0  # shift of the training noise levels (small latents need low-noise training)
    logit_normal: bool = True  # sample training sigmas from a logit-normal before the shift
    p_drop_audio: float = 0.1
    p_drop_reference: float = 0.1
    p_drop_text: float = 0.1
    p_drop_all: float = 0.1  # the unconditional branch of CFG
    p_motion_prefix: float = 0.3  # train with clean leading frames (motion frames of the chunk stage)
    max_motion_frames: int = 2
    sample_steps: int = 50  # exported into model.json
    cfg_scale: float = 3.0


@dataclass
class OdeOptions:
    teacher: str = "runs/teacher/model"  # the teacher's model directory
    trajectories: int = 64  # teacher trajectories sampled once
    teacher_steps: int = 48  # Euler steps per trajectory
    cfg_scale: float = 3.0
    student_steps: int = 4
    shift: float = 5.0
    trajectory_batch: int = 8


@dataclass
class DmdOptions:
    """Shared by Self-Forcing and chunk distillation."""

    teacher: str = "runs/teacher/model"
    critic_init: str | None = None  # default: the teacher's weights
    cfg_scale: float = 3.0
    student_steps: int = 4
    shift: float = 5.0
    score_t_min: float = 0.02
    score_t_max: float = 0.98
    critic_updates: int = 5  # critic updates per generator update
    critic_optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SelfForcingOptions(DmdOptions):
    # Roll out up to this many latent frames (0: data.latent_frames) and score only the last
    # data.latent_frames of them: the teacher saw crops of that length, while drift happens over
    # longer streams, so the chunks in front run as plain inference (no gradient) and put the
    # scored window where the student's cache is already full of its own output. The length is
    # drawn per step, a whole number of chunks from data.latent_frames up to this.
    rollout_frames: int = 0
    # where the rollouts' (and the exported student's) ring keys/values come from:
    # `streamgen.sampling.CACHE_FROM`; "last_step" drops the clean re-encode at inference
    cache_from: str = "reencode"


@dataclass
class ChunkOptions(DmdOptions):
    motion_frames: int = 2  # clean frames of the previous chunk the student conditions on
    p_self_correct: float = 0.5  # contexts from the student's own rollout (else from the data)
    max_chunks_back: int = 3  # the own rollout runs up to this many chunks before the trained one


@dataclass
class TinyDecoderOptions:
    """A fast decoder distilled from `model.vae`'s (distill/tiny_decoder.py)."""

    # "taehv": TAEHV's decoder architecture; "causal_vae": the teacher's own (a TinyCausalVAE)
    # with narrower `widths` (from full resolution down), started from the teacher's weights
    architecture: str = "taehv"
    widths: list = field(default_factory=lambda: [256, 128, 64, 64])  # TAEHV's (taew2_1)
    blocks_per_stage: int = 3  # taehv only: a causal_vae decoder has the teacher's res_blocks
    init: str | None = None  # taehv only: a TAEHV checkpoint (taew2_1.pth) or ours to start from
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    video_weight: float = 0.0  # the same distance to the training video, beside the teacher's frames
    eval_split: str = "val"
    eval_clips: int = 8


STAGE_OPTIONS = {
    "autoencoder": AutoencoderOptions,
    "latents": LatentsOptions,
    "teacher": TeacherOptions,
    "ode": OdeOptions,
    "self_forcing": SelfForcingOptions,
    "chunk": ChunkOptions,
    "tiny_decoder": TinyDecoderOptions,
}


@dataclass
class TrainConfig:
    stage: str
    run: RunConfig
    data: DataConfig
    model: ModelConfigSection
    optim: OptimConfig
    options: typing.Any  # the stage's own section
    source: str = ""  # the YAML text, stored in checkpoints
    set_keys: tuple = ()  # the SECTION.KEY names given with --set: changed on purpose

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d[self.stage] = d.pop("options")
        d.pop("source")
        d.pop("set_keys")
        return d
