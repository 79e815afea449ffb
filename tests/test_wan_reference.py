"""Wan weights against Wan2.1's published formulas, not against diffusers or our model.

test_wan_adapter.py compares our DiT with the installed diffusers' WanTransformer3DModel at a
head width of 16; this file computes Wan2.1's forward here, from the formulas of Wan's own model
(Wan-Video/Wan2.1, wan/modules/model.py: sinusoidal_embedding_1d, rope_params / rope_apply,
WanAttentionBlock, Head, unpatchify), straight from the diffusers-layout state dict: at Wan's head
width of 128, whose RoPE splits each head into 44 / 42 / 42 dims for frames / height / width, and
at 24 (three heads of 8 / 8 / 8), a timestep between integers and a latent grid that is not square.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from streamgen.model.model import DiT
from streamgen.model.wan import config_from_diffusers, from_diffusers


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _layer_norm(x, eps, weight=None, bias=None):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _rms_norm(x, weight, eps):  # over the whole width (diffusers' "rms_norm_across_heads")
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_table(positions: int, dim: int, theta: float = 10000.0):
    """Wan's rope_params: exp(i * p * theta^(-2k/dim)) for p < positions, k < dim/2, in float64."""
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles)


def _rope(x, grid):
    """Wan's rope_apply on x [B, L, heads, d] of tokens frame-major: the pairs (x[2k], x[2k+1]) are
    complex numbers; of the d/2 of them the first d/2 - 2 (d/2 // 3) turn with the frame, the next
    d/2 // 3 with the row, the last d/2 // 3 with the column."""
    f, h, w = grid
    d = x.shape[-1]
    c = d // 2
    t_table, h_table, w_table = (_rope_table(32, 2 * n) for n in (c - 2 * (c // 3), c // 3, c // 3))
    freqs = torch.cat(
        [
            t_table[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            h_table[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            w_table[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, c)
    pairs = torch.view_as_complex(x.double().unflatten(-1, (c, 2)))
    return torch.view_as_real(pairs * freqs).flatten(-2).float()


def _attention(q, k, v):  # [B, L, heads, d], softmax(q k^T / sqrt(d)) v
    return F.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v))).transpose(1, 2)


def wan_forward(sd, cfg, x, t, context):
    """Wan2.1's velocity for latents x [B, C, F, H, W], timesteps t [B], text context [B, L, text_dim]."""
    heads, head_dim, eps = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["eps"]
    dim, patch = heads * head_dim, cfg["patch_size"]
    y = F.conv3d(x, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=patch)
    b, _, f, h, w = y.shape
    tokens = y.flatten(2).transpose(1, 2)
    # the timestep's sinusoid, cos half first, frequencies 10000^(-k/half)
    half = cfg["freq_dim"] // 2
    args = torch.outer(t.double(), 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half))
    sinusoid = torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()
    time = "condition_embedder.time_embedder"
    e = _linear(sd, f"{time}.linear_2", F.silu(_linear(sd, f"{time}.linear_1", sinusoid)))
    e0 = _linear(sd, "condition_embedder.time_proj", F.silu(e)).unflatten(1, (6, dim))
    text = "condition_embedder.text_embedder"
    ctx = F.gelu(_linear(sd, f"{text}.linear_1", context), approximate="tanh")
    ctx = _linear(sd, f"{text}.linear_2", ctx)

    def heads_of(a):
        return a.unflatten(-1, (heads, head_dim))

    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        # the modulation: shift, scale, gate of the self-attention, then of the MLP
        modulation = (sd[p + "scale_shift_table"] + e0).chunk(6, dim=1)
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = modulation
        hn = _layer_norm(tokens, eps) * (1 + scale) + shift
        q = _rms_norm(_linear(sd, p + "attn1.to_q", hn), sd[p + "attn1.norm_q.weight"], eps)
        k = _rms_norm(_linear(sd, p + "attn1.to_k", hn), sd[p + "attn1.norm_k.weight"], eps)
        out = _attention(_rope(heads_of(q), (f, h, w)), _rope(heads_of(k), (f, h, w)),
                         heads_of(_linear(sd, p + "attn1.to_v", hn)))  # fmt: skip
        tokens = tokens + _linear(sd, p + "attn1.to_out.0", out.flatten(2)) * gate
        # cross_attn_norm: a LayerNorm with its weight and bias
        hc = _layer_norm(tokens, eps, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        q = _rms_norm(_linear(sd, p + "attn2.to_q", hc), sd[p + "attn2.norm_q.weight"], eps)
        k = _rms_norm(_linear(sd, p + "attn2.to_k", ctx), sd[p + "attn2.norm_k.weight"], eps)
        out = _attention(heads_of(q), heads_of(k), heads_of(_linear(sd, p + "attn2.to_v", ctx)))
        tokens = tokens + _linear(sd, p + "attn2.to_out.0", out.flatten(2))
        hm = _layer_norm(tokens, eps) * (1 + mlp_scale) + mlp_shift
        up = F.gelu(_linear(sd, p + "ffn.net.0.proj", hm), approximate="tanh")
        tokens = tokens + _linear(sd, p + "ffn.net.2", up) * mlp_gate
    # the head: shift and scale from the time embedding itself (before time_proj's SiLU)
    shift, scale = (sd["scale_shift_table"] + e[:, None]).chunk(2, dim=1)
    out = _linear(sd, "proj_out", _layer_norm(tokens, eps) * (1 + scale) + shift)
    channels = cfg["out_channels"]
    out = torch.einsum("bfhwpqrc->bcfphqwr", out.view(b, f, h, w, *patch, channels))
    return out.reshape(b, channels, f * patch[0], h * patch[1], w * patch[2])


@pytest.mark.parametrize("heads, head_dim", [(2, 128), (3, 24)])
@torch.no_grad()
def test_wan_weights_give_wans_published_forward(heads, head_dim):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2,
    ).eval()  # fmt: skip
    for p in wan.parameters():  # every weight non-trivial (norm weights, modulation tables, ...)
        p.normal_(0, 0.2)
    sd = wan.state_dict()
    ours = DiT(config_from_diffusers(dict(wan.config))).eval()
    ours.load_state_dict(from_diffusers(sd), strict=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 12, generator=g)  # 3 frames of a 4 x 6 token grid
    t = torch.tensor([300.0, 937.5])
    context = torch.randn(2, 5, 24, generator=g)
    expected = wan_forward(sd, dict(wan.config), x, t, context)
    got = ours(x, t, context)
    # (float32 against float64 rotations: ~5e-6 of the largest value apart)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
