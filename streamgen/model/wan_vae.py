"""`WanVAE`: diffusers' `AutoencoderKLWan` behind the streaming interface of
`streamgen.model.vae.VideoAutoencoder` (real Wan2.1 weights load unchanged), with the switches
that run its decoder's convolutions and norms other ways (the same frames), and its saving as a
diffusers folder inside a model directory.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamgen import kernels
from streamgen.files import with_umask_mode
from streamgen.folders import write_folder_atomically, write_into_folder
from streamgen.model.upsample import FoldedTaps, upsample_conv3x3
from streamgen.model.vae import VideoAutoencoder


class WanVAE(VideoAutoencoder):
    """diffusers' AutoencoderKLWan behind the streaming interface.

    Latents are normalized with the checkpoint's per-channel mean/std (as the
    Wan pipelines do). The first latent frame decodes to 1 video frame, every
    later one to 4 (Wan's causal 1 + 4k layout).
    """

    latent_space = "wan2.1"

    def __init__(
        self,
        vae,
        frames_per_call: int | None | str = "auto",
        fused_norms=False,
        pad_in_conv=False,
        channels_last=False,
        compiled_decoder: str | None = None,
        single_frame_2d=True,
        upsample_phases=False,
    ):
        super().__init__()
        self.vae = vae
        self._single_frame_2d = bool(single_frame_2d)
        self._upsample_phases = bool(upsample_phases)
        # Latent frames per decoder call; None: a chunk's in one call; "auto": None on a GPU, 1 on a
        # CPU, the faster of the two on each as measured (bench gpu's `decoder`). diffusers decodes
        # one per call (bounded memory on long clips); a chunk in one call gives each convolution
        # 3 frames of work per launch and copies each conv's 2-frame causal cache once per chunk.
        # The caches make both exact. On an H200 at 832x480 a steady chunk decodes in 232 ms
        # instead of 256 (+4 GB), bench/results/h200-2026-11-30-followup.json; on this project's
        # CPU at 64x96, in 256 ms instead of 221.
        self.frames_per_call = frames_per_call
        self.fused_norms = fused_norms
        self._pad_in_conv = bool(pad_in_conv)
        self.channels_last = channels_last
        self.compiled_decoder = compiled_decoder
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        self.temporal_factor = 2 ** sum(cfg.temperal_downsample)
        self.spatial_factor = self.spatial_factor_of(cfg.dim_mult)
        self.register_buffer("latent_mean", torch.tensor(cfg.latents_mean).float())
        self.register_buffer("latent_std", torch.tensor(cfg.latents_std).float())

    @property
    def fused_norms(self) -> bool:
        """The decoder's RMSNorms through `kernels.rmsnorm_channels` (one Triton kernel on CUDA,
        the same arithmetic as diffusers' module elsewhere), each with the SiLU that follows it
        in the residual blocks and the head. Off by default until a GPU run times it (bench
        gpu's `decoder`): on the H200 the decoder spends most of its time in such memory-bound
        glue (docs/performance.md, "On one H200")."""
        return self._fused_norms

    @fused_norms.setter
    def fused_norms(self, enabled: bool) -> None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import (
            WanDecoder3d,
            WanResidualBlock,
            WanRMS_norm,
        )

        self._fused_norms = bool(enabled)
        decoder = self.vae.decoder
        norms = [m for m in decoder.modules() if isinstance(m, WanRMS_norm) and m.channel_first]
        _replace_forward(norms, _fused_rms_norm if enabled else None)
        # diffusers' residual blocks apply their SiLU right after norm1 and norm2, the decoder
        # after norm_out, and nowhere else: that SiLU moves into the norm's kernel
        for m in decoder.modules():
            if isinstance(m, (WanResidualBlock, WanDecoder3d)) and isinstance(m.nonlinearity, nn.SiLU):
                fed = [m.norm1, m.norm2] if isinstance(m, WanResidualBlock) else [m.norm_out]
                _replace_forward(fed, _fused_rms_norm_silu if enabled else None)
                _replace_forward([m.nonlinearity], _identity if enabled else None)

    @property
    def pad_in_conv(self) -> bool:
        """The decoder's causal 3D convolutions pad in height and width inside the convolution,
        where diffusers' pads a copy of every input first (`F.pad`). Off until a GPU run times it."""
        return self._pad_in_conv

    @pad_in_conv.setter
    def pad_in_conv(self, enabled: bool) -> None:
        self._set_conv_switch("pad_in_conv", enabled)

    @property
    def single_frame_2d(self) -> bool:
        """A causal convolution, encoder's or decoder's, whose input is one frame with zeros
        before it (nothing cached: a stream's first frame, the reference image) runs as a 2D
        convolution with its kernel's last temporal slice: the other slices meet only the zero
        padding. The same sums without the zero terms, a third of the multiply-adds of the
        3x3x3 convolutions: the reference encode and the first latent frame's decode. On by
        default; off is diffusers' arithmetic, exactly."""
        return self._single_frame_2d

    @single_frame_2d.setter
    def single_frame_2d(self, enabled: bool) -> None:
        self._set_conv_switch("single_frame_2d", enabled)

    @property
    def upsample_phases(self) -> bool:
        """The decoder's upsamplers (a nearest 2x upsample, in fp32, then a 3x3 convolution) as
        one 2x2 convolution of the low-resolution input per output phase (`upsample_conv3x3`):
        16 instead of 36 multiply-adds per input pixel and channel pair, and neither the fp32
        upsampled copy nor its cast back. At 832x480 they are 3.9 of a steady chunk's 45 decoder
        TFLOP (`bench floor`). The same values up to rounding: the folded taps are sums of the
        3x3 taps, rounded once to the weights' dtype. Off until a GPU run times it (bench gpu's
        `decoder`)."""
        return self._upsample_phases

    @upsample_phases.setter
    def upsample_phases(self, enabled: bool) -> None:
        self._set_conv_switch("upsample_phases", enabled)

    @property
    def channels_last(self) -> bool:
        """The decoder's convolutions run channels-last (NDHWC; its 2D ones NHWC): weights stored
        so once, inputs made so where diffusers' reshapes lost it. cuDNN's bf16 kernels compute in
        that layout and otherwise transpose every input and output (the H200 profile: 207
        NCHW-to-NHWC transposes, 18 ms a chunk). On this CPU at 64x96 it decodes a chunk in
        1800 ms against 1938 in bf16 and 3342 against 3473 in fp32 (`streamgen bench
        wan-decoder`). Off until a GPU run times it (bench gpu's `decoder`)."""
        return self._channels_last

    @channels_last.setter
    def channels_last(self, enabled: bool) -> None:
        self._check_not_banded()
        self._channels_last = bool(enabled)
        convs = [self.vae.post_quant_conv, *self.vae.decoder.modules()]
        for conv in convs:
            if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
                layout = _channels_last_format(conv.weight) if enabled else torch.contiguous_format
                conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
        self._patch_convs()

    def _set_conv_switch(self, name: str, enabled: bool) -> None:
        """A switch that changes the convolutions' forwards: stored, then the forwards re-patched."""
        self._check_not_banded()
        setattr(self, "_" + name, bool(enabled))
        self._patch_convs()

    def _check_not_banded(self) -> None:
        """A convolution switch re-patches the convolutions' forwards. Once the decoder is split
        into bands they are wrapped to take rows from the neighbouring bands, and re-patching would
        drop that: the bands would decode with zeros at the cuts, silently."""
        if getattr(self.vae.decoder, "band_parallel_group", None) is not None:
            raise RuntimeError(
                "this WanVAE's decoder is split into bands (streamgen.parallel.vae): set its "
                "convolution switches before making it band-parallel"
            )

    def _patch_convs(self) -> None:
        """The causal convolutions' and the upsamplers' forward: diffusers' own where no switch
        changes it."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample, WanUpsample

        def patch(modules, pad_inside: bool, channels_last: bool) -> None:
            convs = [m for m in modules if isinstance(m, WanCausalConv3d)]
            patched = pad_inside or channels_last or self._single_frame_2d
            forward = functools.partial(
                _causal_conv3d,
                pad_inside=pad_inside,
                channels_last=channels_last,
                single_frame_2d=self._single_frame_2d,
            )
            _replace_forward(convs, forward if patched else None)

        patch([self.vae.post_quant_conv, *self.vae.decoder.modules()], self._pad_in_conv, self._channels_last)
        patch([*self.vae.encoder.modules(), self.vae.quant_conv], False, False)
        for m in self.vae.decoder.modules():
            if not (isinstance(m, WanResample) and m.mode in ("upsample2d", "upsample3d")):
                continue
            if not self._upsample_phases:
                m.resample.__dict__.pop("forward", None)
                continue
            upsample, conv = m.resample  # diffusers' nn.Sequential(WanUpsample, Conv2d(3, padding=1))
            assert isinstance(upsample, WanUpsample) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            # (a partial of modules: a deep copy holds its own)
            m.resample.forward = functools.partial(
                _upsample_phases, conv, FoldedTaps(), channels_last=self._channels_last
            )

    @property
    def compiled_decoder(self) -> str | None:
        """The torch.compile backend the decoder runs under ("inductor": its norms, activations,
        pads and cache copies fused around the convolutions), or None. Dynamo captures diffusers'
        decoder whole, its causal caches included: three graphs per stream (the first latent
        frame, the rest of the first chunk, a steady chunk), then no recompiles. Off until a GPU
        run times it (bench gpu's `decoder_compiled`)."""
        return self._compiled_decoder

    @compiled_decoder.setter
    def compiled_decoder(self, backend: str | None) -> None:
        self._compiled_decoder = backend
        if backend is None:
            self.vae.decoder._compiled_call_impl = None
        else:
            self.vae.decoder.compile(backend=backend, dynamic=False)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> WanVAE:
        """diffusers' AutoencoderKLWan folder at `path`, or a ValueError naming it: a folder it cannot
        read was diffusers' traceback, and weights missing from the file were made up at random
        (after a page of their names) or failed on the meta device."""
        import logging

        from diffusers import AutoencoderKLWan

        from streamgen.model.files import read_json
        from streamgen.model.wan import folder_problem

        try:
            folder_problem(Path(path))
        except FileNotFoundError as e:  # (this loader's errors are ValueErrors naming the folder)
            raise ValueError(str(e)) from None
        if not (Path(path) / "config.json").is_file():  # (diffusers then looked for it on the Hub)
            raise ValueError(f"{path}: no config.json in it (not a diffusers AutoencoderKLWan folder)")
        # (a config.json that is no JSON object was diffusers' TypeError; one of another class, a
        # transformer's folder given for its pipeline's vae/, "194 [weights] missing")
        config = read_json(Path(path) / "config.json")
        kind = config.get("_class_name")
        if kind is not None and kind != "AutoencoderKLWan":
            raise ValueError(f"{path}: its config.json is of a {kind}, not a Wan VAE (AutoencoderKLWan): give "
                             "the pipeline's folder or its vae/")  # fmt: skip
        # (Wan2.2's VAE folds 2x2 pixels into channels around its encoder and decoder: decoded through
        # the decoder as here, its frames came out with 12 channels at half the size, without a word)
        if config.get("patch_size") not in (None, 1):
            raise ValueError(f"{path}: its config.json is of the Wan2.2 VAE (patch_size {config['patch_size']}), "
                             "which this loader does not read: give the Wan2.1 VAE")  # fmt: skip
        # (a string or a float was diffusers' TypeError from deep in its constructor, a traceback)
        for key, least in (("base_dim", 1), ("z_dim", 1), ("num_res_blocks", 0)):
            if key in config and not _is_integer(config[key], least):
                raise ValueError(f"{path}: its config.json's {key} is {json.dumps(config[key])}, not an integer "
                                 f"of at least {least}")  # fmt: skip
        dim_mult = config.get("dim_mult", [1])
        if not (isinstance(dim_mult, list) and dim_mult and all(_is_integer(m, 1) for m in dim_mult)):
            raise ValueError(f"{path}: its config.json's dim_mult is {json.dumps(dim_mult)}, not a list of "
                             "positive integers")  # fmt: skip
        # (diffusers logged "An error occurred while trying to fetch" above its error, which named the
        # .bin it looked for last: "no file named diffusion_pytorch_model.bin")
        weights = "diffusion_pytorch_model.safetensors"
        if not any((Path(path) / name).is_file() for name in _WEIGHT_NAMES):
            others = sorted(f.name for f in Path(path).glob("*.safetensors"))
            held = f" (it holds {', '.join(others)}: name the one to load {weights})" if others else ""
            raise ValueError(f"{path}: no {weights} in it{held}")
        quiet = logging.getLogger("diffusers.models.modeling_utils")  # (the names of what is missing)
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            vae, info = AutoencoderKLWan.from_pretrained(path, output_loading_info=True, **kwargs)
        # (a config.json's value of another type: diffusers' TypeError, IndexError, ... from its constructor)
        except (OSError, ValueError, RuntimeError, NotImplementedError, TypeError, IndexError, KeyError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ValueError(f"{path}: not a readable diffusers AutoencoderKLWan folder ({first})") from None
        finally:
            quiet.setLevel(level)
        wrong = [f"{len(info[key])} {what}, e.g. {info[key][0]}"
                 for key, what in (("missing_keys", "missing"), ("mismatched_keys", "of other shapes"),
                                   ("unexpected_keys", "with no place in it")) if info.get(key)]  # fmt: skip
        if wrong:
            raise ValueError(f"{path}: its weights do not match its config.json: {'; '.join(wrong)}")
        # (one a channel: other counts were a tensor size error at the first encode or decode)
        for key in ("latents_mean", "latents_std"):
            values = vae.config.get(key)
            if not isinstance(values, (list, tuple)) or len(values) != vae.config.z_dim:
                raise ValueError(f"{path}: its config.json's {key} is not {vae.config.z_dim} numbers (z_dim), "
                                 "one per latent channel")  # fmt: skip
            # (a string or a null was torch's "too many dimensions 'str'" or its RuntimeError's
            # traceback, naming nothing; a standard deviation of 0 made every latent inf or nan)
            bad = [v for v in values if not _is_finite_number(v) or (key == "latents_std" and v <= 0)]
            if bad:
                what = "positive numbers" if key == "latents_std" else "finite numbers"
                raise ValueError(f"{path}: its config.json's {key} holds {json.dumps(bad[0])}: they must be {what}")
        return cls(vae)

    # --- persistence: a diffusers folder inside a model directory --------------------------------
    DIRECTORY = "wan_vae"

    def save(self, directory) -> None:
        """diffusers' folder, whole or not at all (save_pretrained fsyncs nothing, writes in place);
        where it cannot be put in place whole (a mount point, a file system that exchanges no
        folders: `write_folder_atomically`), its files one by one, config.json last."""
        Path(directory).mkdir(parents=True, exist_ok=True)

        def save(folder: Path) -> None:
            self.vae.save_pretrained(folder)
            with_umask_mode(folder)  # (its weights are 0600: another user's server could not read them)

        write_folder_atomically(
            Path(directory) / self.DIRECTORY, save, in_place=lambda folder: write_into_folder(folder, save)
        )

    @staticmethod
    def spatial_factor_of(dim_mult) -> int:
        """The spatial factor of a Wan VAE whose config has this `dim_mult` (one halving between scales)."""
        return 2 ** (len(dim_mult) - 1)

    @classmethod
    def load(cls, directory) -> WanVAE:
        """The folder `save` wrote, in float32 (an export may have stored float16)."""
        return cls.from_pretrained(Path(directory) / cls.DIRECTORY, torch_dtype=torch.float32)

    first_latent_frames = 1  # Wan's 1 + 4k: the first latent frame holds one video frame

    def _stats(self, z):
        shape = (1, -1, 1, 1, 1)
        return self.latent_mean.view(shape).to(z), self.latent_std.view(shape).to(z)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(video).latent_dist.mode()
        mean, std = self._stats(z)
        return (z - mean) / std

    def encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode(image[:, :, None])

    def init_state(self, batch: int):
        self.vae.clear_cache()
        return {"feat_map": self.vae._feat_map, "first": True}

    def _frames_per_call(self, x: torch.Tensor) -> int | None:
        if self.frames_per_call == "auto":
            return None if x.is_cuda else 1
        return self.frames_per_call

    def decode_stream(self, latents: torch.Tensor, state):
        mean, std = self._stats(latents)
        x = self.vae.post_quant_conv(latents * std + mean)
        # a new state, the given one left as it was: the decoder rewrites its feature cache in
        # place, and a decode that failed part way (a CUDA OOM, a Ctrl-C) left the stream's
        # cache part a chunk on, which its retry decoded against (a list of tensors, not copied)
        state = {"feat_map": list(state["feat_map"]), "first": state["first"]}
        self.vae._feat_map = state["feat_map"]  # the cache is per stream, not per model
        outs, i = [], 0
        while i < x.shape[2]:
            # the stream's first latent frame decodes alone, to one video frame (Wan's 1 + 4k)
            n = 1 if state["first"] else (self._frames_per_call(x) or x.shape[2] - i)
            self.vae._conv_idx = [0]
            outs.append(
                self.vae.decoder(
                    x[:, :, i : i + n],
                    feat_cache=state["feat_map"],
                    feat_idx=self.vae._conv_idx,
                    first_chunk=state["first"],
                )
            )
            state["first"] = False
            i += n
        # diffusers clamps inside decode(); decoding through its decoder we clamp ourselves
        return torch.cat(outs, 2).clamp(-1, 1), state


def _is_integer(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# the weight files AutoencoderKLWan.from_pretrained reads (whole or sharded, safetensors or pickle)
_WEIGHT_NAMES = tuple(
    f"diffusion_pytorch_model.{kind}{index}" for kind in ("safetensors", "bin") for index in ("", ".index.json")
)


def _replace_forward(modules, forward) -> None:
    """Each module's forward replaced by forward(module, ...), or restored where forward is None.
    An instance attribute: nn.Module.__call__ finds it before the class's; the weights, and so the
    state dict, are the module's own."""
    for module in modules:
        if forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = functools.partial(forward, module)


def _channels_last_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if t.dim() == 5 else torch.channels_last


def _causal_conv3d(
    conv,
    x: torch.Tensor,
    cache_x: torch.Tensor | None = None,
    *,
    pad_inside: bool,
    channels_last: bool,
    single_frame_2d: bool = False,
) -> torch.Tensor:
    """diffusers' `WanCausalConv3d.forward` (earlier frames from `cache_x`, zeros before the first),
    where `pad_inside`, the height and width padding left to the convolution; where
    `channels_last`, on an NDHWC input; where `single_frame_2d`, one frame with only zeros before
    it as a 2D convolution (`WanVAE.single_frame_2d`). `conv._padding` is F.pad's order:
    (w, w, h, h, 2 * t, 0)."""
    pad_w, pad_h, pad_t = conv._padding[0], conv._padding[2], conv._padding[4]
    if channels_last:  # a no-op where the layer before kept the layout
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if cache_x is not None and pad_t > 0:
        cache_x = cache_x.to(x.device)
        if channels_last:
            cache_x = cache_x.contiguous(memory_format=torch.channels_last_3d)
        x = torch.cat([cache_x, x], dim=2)
        pad_t -= cache_x.shape[2]
    if single_frame_2d and x.shape[2] == 1 and pad_t == conv.dilation[0] * (conv.kernel_size[0] - 1):
        # the output's one frame sees the input's through the last temporal tap, zeros through
        # the others (its conv2d zero-pads height and width as F.pad would). Dense operands, in
        # the layout asked for: a strided one gave other roundings eager than compiled.
        layout = torch.channels_last if channels_last else torch.contiguous_format
        frame, weight = (t[:, :, -1].contiguous(memory_format=layout) for t in (x, conv.weight))
        out = F.conv2d(
            frame, weight, conv.bias, conv.stride[1:], (pad_h, pad_w), conv.dilation[1:], conv.groups
        )
        return out.unsqueeze(2)
    spatial = (pad_w, pad_w, pad_h, pad_h) if not pad_inside else (0, 0, 0, 0)
    if pad_t > 0 or not pad_inside:
        x = F.pad(x, (*spatial, pad_t, 0))
    if channels_last:  # F.pad of a channels-last tensor may not keep the layout
        x = x.contiguous(memory_format=torch.channels_last_3d)
    inside = (0, pad_h, pad_w) if pad_inside else 0
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, inside, conv.dilation, conv.groups)


def _upsample_phases(
    conv: nn.Conv2d, taps: FoldedTaps, x: torch.Tensor, *, channels_last: bool
) -> torch.Tensor:
    """diffusers' upsampler, `nn.Sequential(WanUpsample, conv)`, as `WanVAE.upsample_phases` runs
    it. Where the conv has a `row_halo` (a band of the frame, streamgen.parallel.vae: x with the
    neighbouring bands' edge rows), those rows stand in for its zero padding above and below."""
    row_halo = getattr(conv, "row_halo", None)
    if row_halo is not None:
        x = row_halo(x, 1)
    return upsample_conv3x3(x, taps(conv.weight), conv.bias, channels_last, pad_rows=row_halo is None)


def _fused_rms_norm(norm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    bias = norm.bias if isinstance(norm.bias, torch.Tensor) else None  # diffusers' default bias is 0.0
    return kernels.rmsnorm_channels(x, norm.gamma, bias, silu=silu)


def _fused_rms_norm_silu(norm, x: torch.Tensor) -> torch.Tensor:
    return _fused_rms_norm(norm, x, silu=True)


def _identity(_module, x: torch.Tensor) -> torch.Tensor:
    return x
