"""Tiled parallel VAE decode on gloo CPU processes equals the single-process decode."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamgen.model.vae import TinyCausalVAE
from streamgen.parallel.vae import decoder_receptive_radius

TOL = 1e-5
WIDTHS = (8, 16, 16, 24)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_vae():
    torch.manual_seed(0)
    return TinyCausalVAE(latent_channels=4, widths=WIDTHS).eval()


@torch.no_grad()
def decode_all(decoder, latents, chunk: int):
    """Whole clip at once, and the same clip chunk by chunk through the stream state."""
    whole = decoder.decode(latents)
    state, parts = decoder.init_state(latents.shape[0]), []
    for i in range(0, latents.shape[2], chunk):
        frames, state = decoder.decode_stream(latents[:, :, i : i + chunk], state)
        parts.append(frames)
    return whole, torch.cat(parts, dim=2)


def _worker(rank, world, port, case_path, result_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from streamgen.parallel.vae import TiledParallelDecoder

        case = torch.load(case_path)
        vae = make_vae()
        vae.load_state_dict(case["state"])
        result = {}
        exact = TiledParallelDecoder(vae)
        whole, streamed = decode_all(exact, case["latents"], case["chunk"])
        result["whole"] = (whole - case["whole"]).abs().max().item()
        result["streamed"] = (streamed - case["whole"]).abs().max().item()
        result["halo"] = exact.halo
        # one row less than the receptive field is visibly wrong: the halo is what makes tiles exact
        short, _ = decode_all(TiledParallelDecoder(vae, halo=exact.halo - 1), case["latents"], case["chunk"])
        result["short_halo"] = (short - case["whole"]).abs().max().item()
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_tiled(tmp_path, world):
    vae = make_vae()
    latents = torch.randn(2, 4, 3, 8, 6)  # 8 latent rows: 4 or 2 per process
    with torch.no_grad():
        whole, streamed = decode_all(vae, latents, chunk=2)
    assert (whole - streamed).abs().max() <= TOL  # the decoder is causal single-process too
    case_path = str(tmp_path / "case.pt")
    torch.save({"state": vae.state_dict(), "latents": latents, "whole": whole, "chunk": 2}, case_path)
    mp.spawn(_worker, args=(world, free_port(), case_path, str(tmp_path)), nprocs=world)
    results = []
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


def test_receptive_radius_of_tiny_vae():
    # dec_in 1 + resblock 2 at latent scale, then 1/2 + 1/4 + 1/8 + 1/8 after the upsamples
    assert decoder_receptive_radius(make_vae()) == 4.0


@pytest.mark.timeout(120)
def test_two_process_tiled_decode_equals_single_process(tmp_path):
    for r in run_tiled(tmp_path, 2):
        assert r["halo"] == 4
        assert r["whole"] <= TOL and r["streamed"] <= TOL, r
        assert r["short_halo"] > 1e-4, r


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_four_process_tiled_decode_equals_single_process(tmp_path):
    for r in run_tiled(tmp_path, 4):
        assert r["whole"] <= TOL and r["streamed"] <= TOL, r
        assert r["short_halo"] > 1e-4, r
