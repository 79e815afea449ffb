"""The Wan2.1-architecture diffusion transformer, with avatar conditioning.

patch embed (Conv3d 1x2x2) -> N x [adaLN(shift, scale, gate from the timestep)
-> self-attention (RMS qk-norm, 3D RoPE) -> text cross-attention -> per-frame
audio cross-attention -> GELU-tanh MLP] -> adaLN head -> unpatchify.

Tokens are kept frame-major, `[B, F, S, D]` (S = tokens per latent frame), so
every frame can carry its own timestep: a chunk being denoised and the clean
frames before it can share one forward pass (block-causal training), and the
streaming path sees one chunk at a time against the KV cache.

One forward, three attention modes:
  "bidirectional"  every frame sees every frame (the teacher)
  "block_causal"   full attention inside a chunk, causal across chunks; the
                   first `sink_frames` frames (the reference) form block 0
  "cached"         the frames are one chunk; keys/values come from the
                   StreamCache (sink + ring) plus the chunk itself

All hot-path math goes through `kernels`, which picks Triton on CUDA and the
PyTorch references elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from streamgen import kernels
from streamgen.model.audio import AudioEncoder
from streamgen.model.cache import StreamCache
from streamgen.model.config import ModelConfig

MODES = ("bidirectional", "block_causal", "cached")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps in [0, 1000], cos first (diffusers' flip_sin_to_cos); an
    odd `dim` ends with a zero, as diffusers pads it (without, an odd freq_dim was a shape error
    in the time embedding's first linear, where Wan's own model runs)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    parts = [torch.cos(args), torch.sin(args)]
    if dim % 2:
        parts.append(args.new_zeros(*args.shape[:-1], 1))
    return torch.cat(parts, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = nn.RMSNorm(d, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(d, eps=cfg.eps)
        self.backend = cfg.attn_backend

    def forward(
        self,
        x,
        angles,
        mask,
        tokens_per_frame,
        cache=None,
        cache_op=None,
        ring_filled=0,
        ring_index=None,
        write_only=False,
    ):
        """x [B, L, D]; angles [L, Dh/2] for x's tokens; mask = per-frame block ids or None.

        write_only (with a cache_op): store x's keys/values and return None, attending to nothing;
        the last layer of a cache write, whose output nothing reads."""
        if write_only and (cache is None or cache_op not in ("write_sink", "write_ring")):
            raise ValueError("write_only stores keys/values: it needs a cache and a cache write")
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        if cache_op == "write_ring":
            # the ring keeps keys un-rotated (positions are assigned at read time)
            k_raw = kernels.rmsnorm_rope(self.k(x), self.norm_k.weight, self.num_heads, None, self.eps)
            k = kernels.apply_rope(k_raw, angles)
        else:
            k_raw = None
            k = kernels.rmsnorm_rope(self.k(x), self.norm_k.weight, self.num_heads, angles, self.eps)
        # a write-only call has no queries; k stands in where the attend seam moves q's shape around
        q = (
            k
            if write_only
            else kernels.rmsnorm_rope(self.q(x), self.norm_q.weight, self.num_heads, angles, self.eps)
        )
        cache_args = (cache, cache_op, ring_filled, ring_index, write_only)
        out = self.attend(q, k, v, k_raw, mask, tokens_per_frame, *cache_args)
        return None if write_only else self.o(out.flatten(2))

    def attend(
        self,
        q,
        k,
        v,
        k_raw,
        mask,
        tokens_per_frame,
        cache,
        cache_op,
        ring_filled,
        ring_index,
        write_only=False,
        attention=kernels.attention,
    ):
        """Cache read/write, then attention; q/k/v/k_raw [B, L, H, Dh] -> [B, L, H, Dh].
        write_only: the write and no attention (returns q as it came, for the seam's shapes).

        A seam for sequence parallelism: `streamgen.parallel` replaces `attend`
        on the instance with a wrapper that reshards q/k/v and calls this
        method with its own shapes and `attention` function.
        """
        chunk_v = v
        kv_cache = None
        if cache is not None and cache_op == "write_sink":
            k, v = cache.write_sink(k, v)
        elif cache is not None and not write_only:
            k, v = cache.update(k, v, ring_filled)
            # a cache that attention reads as it is (one process, Ulysses' heads; not a ring's
            # shards) keeps its keys and values in e4m3 for the FP8 backends
            kv_cache = cache if attention is kernels.attention else None
        if write_only:
            out = q
        elif kv_cache is not None:
            out = attention(q, k, v, mask, tokens_per_frame, self.backend, kv_cache=kv_cache)
        else:
            out = attention(q, k, v, mask, tokens_per_frame, self.backend)
        if cache is not None and cache_op == "write_ring":
            # after attending: once the ring is full, this chunk's slots still hold the oldest
            # chunk, which the chunk attends to here as its denoising steps did
            cache.write_ring(k_raw, chunk_v, ring_index)
        return out


class CrossAttention(nn.Module):
    """Attention from video tokens to a context (text tokens, or audio windows)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, eps: float, backend: str = "sdpa"):
        super().__init__()
        self.num_heads, self.eps, self.backend = num_heads, eps, backend
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def context_kv(self, context):
        k = kernels.rmsnorm_rope(self.k(context), self.norm_k.weight, self.num_heads, None, self.eps)
        return k, self.v(context).unflatten(-1, (self.num_heads, -1))

    def forward(self, x, context=None, kv=None):
        k, v = kv if kv is not None else self.context_kv(context)
        if k.shape[1] == 1 and not torch.is_grad_enabled():
            # one context token (no caption, or one sentence embedding): every query puts all
            # its weight on it, so the output is that token's value; no query or attention needed.
            # (Training keeps the full path, so every parameter gets its (zero) gradient and the
            # optimizer state is the same whatever the captions of a batch.)
            return self.o(v.flatten(2)).expand(x.shape[0], x.shape[1], -1)
        q = kernels.rmsnorm_rope(self.q(x), self.norm_q.weight, self.num_heads, None, self.eps)
        out = kernels.attention(q, k, v, backend=self.backend)
        return self.o(out.flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(kernels.gelu_tanh(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        # 6-way adaLN: shift/scale/gate for self-attention, then for the MLP. (Divided in place: on
        # the meta device, where models.weights_problem builds a DiT, an out-of-place division runs
        # torch's Python references, which import torch._dynamo: 2 s of every model's load.)
        self.modulation = nn.Parameter(torch.randn(1, 6, d).div_(d**0.5))
        self.self_attn = SelfAttention(cfg)
        self.cross_norm = nn.LayerNorm(d, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.cross_attn = CrossAttention(d, d, cfg.num_heads, cfg.eps, cfg.attn_backend)
        self.audio_attn = None
        if cfg.audio:
            self.audio_norm, self.audio_attn = self.new_audio_branch(cfg)
        self.ffn = FeedForward(d, cfg.ffn_dim)

    @staticmethod
    def new_audio_branch(cfg: ModelConfig) -> tuple[nn.LayerNorm, CrossAttention]:
        """(norm, cross-attention) to the audio tokens, the output zero: a loaded Wan checkpoint
        (which has no audio branch) behaves exactly as before fine-tuning."""
        norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        attn = CrossAttention(cfg.dim, cfg.audio_dim, cfg.num_heads, cfg.eps, cfg.attn_backend)
        nn.init.zeros_(attn.o.weight)
        nn.init.zeros_(attn.o.bias)
        return norm, attn

    def attention_shift_scale(self, e):
        """(shift, scale) [B, F, D] of the norm before self-attention, from the timestep projection."""
        return (self.modulation[:, :2] + e[:, :, :2].float()).unbind(2)

    def kept_kv(self, ctx, audio, cache):
        """The cross-attentions' keys/values, (text, audio), kept on the layer's cache between
        forwards: the caption's for the whole stream, the audio windows' for the forwards given
        the same windows (a chunk's denoising steps and its clean re-encode: one of five computes
        them; the windows are never written in place). None where nothing is kept.

        Only where no gradient is recorded: keys/values made without gradient and read by a step
        that trains would cut the gradient to the cross-attention's key/value weights and the
        text embedding (Self-Forcing's exit step comes after its sink write and earlier steps,
        all without gradient), and ones made with gradient would tie later forwards to this
        one's graph. Called outside the block's forward, so a compiled block sees only tensors."""
        if cache is None or torch.is_grad_enabled():
            return None, None
        if cache.context_kv is None:
            cache.context_kv = self.cross_attn.context_kv(ctx)
        if self.audio_attn is None or audio is None:
            return cache.context_kv, None
        if cache.audio_kv is None or cache.audio_kv[0] is not audio:
            cache.audio_kv = (audio, self.audio_attn.context_kv(audio.flatten(0, 1)))
        return cache.context_kv, cache.audio_kv[1]

    def forward(self, x, h, e, next_mod, ctx, audio, audio_mask, attn_kwargs, cache=None, kv=(None, None)):
        """x: residual stream [B, F, S, D]; h: x already normed+modulated for this block.

        e: timestep projection [B, F, 6, D]. next_mod: (shift, scale) of whatever
        norm comes after this block (the next block's, or the head's), so the
        last residual add is fused with it. kv: `kept_kv`'s (text, audio) keys/values, or None
        for those to compute here (from ctx, the text embedding: None where kv holds the text's).
        Returns (x, h_next).
        """
        b, f, s, d = x.shape
        _, _, gate, c_shift, c_scale, c_gate = (self.modulation + e.float()).unbind(2)

        y = self.self_attn(h.reshape(b, f * s, d), cache=cache, **attn_kwargs).view(b, f, s, d)
        x = kernels.gated_residual(x, y, gate)

        hn = (
            x
            if self.cross_norm is None
            else kernels.layernorm_affine(x, self.cross_norm.weight, self.cross_norm.bias, self.eps)
        )
        text_kv, audio_kv = kv
        x = x + self.cross_attn(hn.reshape(b, f * s, d), ctx, text_kv).view(b, f, s, d)

        if self.audio_attn is not None and audio is not None:
            # each latent frame attends only to the audio tokens of its own time window
            ha = kernels.layernorm_affine(x, self.audio_norm.weight, self.audio_norm.bias, self.eps)
            ya = self.audio_attn(ha.reshape(b * f, s, d), audio.flatten(0, 1), audio_kv).view(b, f, s, d)
            # (no mask: every frame's audio kept, as a mask of ones would, without its product)
            x = x + (ya if audio_mask is None else ya * audio_mask[:, :, None, None].to(ya.dtype))

        h = kernels.layernorm_modulate(x, c_shift, c_scale, self.eps)
        return kernels.gated_residual_layernorm_modulate(x, self.ffn(h), c_gate, *next_mod, self.eps)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim).div_(cfg.dim**0.5))
        self.proj = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))

    def shift_scale(self, temb):
        """The head's adaLN is driven by the timestep embedding itself (as in Wan)."""
        return (self.modulation + temb.float()[:, :, None]).unbind(2)


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embed = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_embed = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.audio_encoder = AudioEncoder(cfg) if cfg.audio else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    # --- helpers ----------------------------------------------------------------
    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        _, ph, pw = self.cfg.patch_size
        return latent_hw[0] // ph, latent_hw[1] // pw

    def new_cache(self, batch: int, latent_hw: tuple[int, int], dtype=None, device=None) -> StreamCache:
        p = next(self.parameters())
        return StreamCache(self.cfg, batch, self.grid(latent_hw), dtype or p.dtype, device or p.device)

    def block_ids(self, num_frames: int, device) -> torch.Tensor:
        """Per-frame chunk ids for block-causal attention: the sink is block 0."""
        f = torch.arange(num_frames, device=device)
        sink, c = self.cfg.sink_frames, self.cfg.frames_per_chunk
        return torch.where(f < sink, 0, 1 + (f - sink).clamp(min=0) // c)

    def unpatchify(self, y: torch.Tensor, grid_hw) -> torch.Tensor:
        b, f = y.shape[:2]
        hp, wp = grid_hw
        pt, ph, pw = self.cfg.patch_size
        y = y.reshape(b, f, hp, wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        # the forward's output is no view: FSDP2 warns of a sharded module that returns one ("returned
        # a view tensor"; an in-place op on it would skip the backward's all-gather), which the
        # flattens of the permuted copy were. One copy either way: the reshape's, or where the
        # grid lets it view its input (one patch a frame), the clone's.
        out = y.reshape(b, y.shape[1], f * pt, hp * ph, wp * pw)
        return out if out._base is None else out.clone()

    @staticmethod
    def text_kept(cache: StreamCache | None) -> bool:
        """Whether every layer keeps the caption's cross-attention keys/values (`Block.kept_kv`), so
        that nothing reads the text embedding: a stream's forwards after its first chunk's first."""
        if cache is None or torch.is_grad_enabled():
            return False
        return all(layer.context_kv is not None for layer in cache.layers)

    # Seams for sequence parallelism: identities here. `streamgen.parallel`
    # replaces them on the instance to shard the tokens of every frame after the
    # patch embedding ([B, F, S, D] -> [B, F, S_local, D], with their RoPE
    # angles [F*S, Dh/2] -> [F*S_local, Dh/2]) and to gather them before unpatchify.
    def shard_tokens(self, xs: torch.Tensor, angles: torch.Tensor):
        return xs, angles

    def gather_tokens(self, y: torch.Tensor) -> torch.Tensor:
        return y

    # --- forward ----------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        audio: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        mode: str = "bidirectional",
        cache: StreamCache | None = None,
        cache_write: str | None = None,
        frame_pos: torch.Tensor | None = None,
        with_velocity: bool = False,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: latents [B, C, F, h, w]; t: timesteps in [0, 1000], per frame [B, F] (or [B]);
        context: text tokens [B, Lt, text_dim]; audio: per-frame windows of audio
        features [B, F, audio_window, audio_dim] (see `audio.frame_windows`);
        audio_mask: [B, F] (or [B]) 1 where audio conditions the frame, 0 to drop it (None: all 1).
        mode "cached": x is one chunk (or the sink when cache_write="sink"),
        cache_write in (None, "sink", "ring"). frame_pos overrides the rotary
        frame positions (default 0..F-1 outside the cache).
        Returns velocity [B, C_out, F, h, w]; None after a cache write, which keeps only keys and
        values, unless with_velocity (a denoising step that also writes its chunk into the ring).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (mode == "cached") != (cache is not None):
            raise ValueError("a cache is used exactly in mode 'cached'")
        cfg = self.cfg
        b, _, f, lh, lw = x.shape
        grid = self.grid((lh, lw))
        s = grid[0] * grid[1]

        h0 = self.patch_embed(x)  # [B, D, F, hp, wp]
        xs = h0.flatten(3).permute(0, 2, 3, 1).contiguous()  # [B, F, S, D]

        if t.ndim == 1:
            t = t[:, None].expand(b, f)
        temb = self.time_embed(timestep_embedding(t, cfg.freq_dim).to(xs.dtype))  # [B, F, D]
        e = self.time_proj(temb).unflatten(-1, (6, -1))  # [B, F, 6, D]
        ctx = None if self.text_kept(cache) else self.text_embed(context)
        if audio_mask is not None and audio_mask.ndim == 1:
            audio_mask = audio_mask[:, None].expand(b, f)

        # rotary positions and attention pattern
        attn_kwargs = {"tokens_per_frame": s, "mask": None}
        if mode == "cached":  # (the cache's rotations, made once for it)
            if cache_write == "sink":
                attn_kwargs["angles"] = cache.sink_rope(grid)
                attn_kwargs["cache_op"] = "write_sink"
            else:
                attn_kwargs["angles"] = cache.chunk_rope(grid)
                attn_kwargs["ring_filled"] = cache.ring_tokens_filled()
                if cache_write == "ring":
                    attn_kwargs["cache_op"] = "write_ring"
                    attn_kwargs["ring_index"] = cache.ring_token_index()
        else:
            if frame_pos is None:
                frame_pos = torch.arange(f, device=x.device)
            if mode == "block_causal":
                ids = self.block_ids(f, x.device)
                attn_kwargs["mask"] = (ids, ids)
            attn_kwargs["angles"] = kernels.Rope.of(
                kernels.rope_angles(frame_pos, grid, cfg.head_dim, cfg.rope_theta)
            )
        # sequence parallelism keeps only this process's tokens of every frame from here on
        xs, attn_kwargs["angles"] = self.shard_tokens(xs, attn_kwargs["angles"])
        attn_kwargs["tokens_per_frame"] = xs.shape[2]

        h = kernels.layernorm_modulate(xs, *self.blocks[0].attention_shift_scale(e), cfg.eps)
        for i, blk in enumerate(self.blocks):
            last = i + 1 == len(self.blocks)
            layer_cache = cache.layers[i] if cache is not None else None
            if last and cache_write is not None and not with_velocity:
                # a cache write keeps only keys/values: the last layer's attention, cross-attention,
                # MLP and the head would compute a velocity nobody reads (1/num_layers of the work)
                blk.self_attn(h.flatten(1, 2), cache=layer_cache, write_only=True, **attn_kwargs)
                return None
            nxt = self.head.shift_scale(temb) if last else self.blocks[i + 1].attention_shift_scale(e)
            kv = blk.kept_kv(ctx, audio, layer_cache)
            xs, h = blk(xs, h, e, nxt, ctx, audio, audio_mask, attn_kwargs, layer_cache, kv)

        # after a ring write the caller calls cache.advance() (once, for all layers)
        return self.unpatchify(self.gather_tokens(self.head.proj(h)), grid)
