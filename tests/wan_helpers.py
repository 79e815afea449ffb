"""Helpers the Wan adapter's tests share: a tiny diffusers Wan transformer of random, non-trivial weights."""

import torch
from diffusers import WanTransformer3DModel


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    ).eval()
    with torch.no_grad():  # make every weight non-trivial (norm weights, modulation tables, ...)
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m
