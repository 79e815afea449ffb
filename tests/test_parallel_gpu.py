"""Sequence-parallel pieces on a CUDA device (one GPU: NCCL with a world of one).

Multi-process NCCL needs one GPU per process; with one GPU these check the
CUDA-only code paths (the fused flash kernel's log-sum-exp that Ring merges,
NCCL collectives on the same code as the gloo tests). Skipped without CUDA.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from streamgen.parallel.ring import attention_with_lse, merge_partials

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_log_sum_exp_merges_like_full_attention(dtype):
    # Wan2.1-1.3B streaming shapes: a chunk of 3 frames x 1560 tokens / 4 against 25 frames of keys / 4
    torch.manual_seed(0)
    q = torch.randn(1, 1170, 12, 128, device="cuda", dtype=dtype)
    k = torch.randn(1, 9750, 12, 128, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = attention_with_lse(q.float(), k.float(), v.float())  # explicit fp32 path
    assert torch.allclose(lse, ref_lse, atol=2e-2), (lse - ref_lse).abs().max()
    assert torch.allclose(out, ref_out, atol=3e-2), (out - ref_out).abs().max()
    # four key blocks merged by their log-sum-exp equal attention over all keys
    merged = merged_lse = None
    for kb, vb in zip(k.chunk(4, dim=1), v.chunk(4, dim=1)):
        merged, merged_lse = merge_partials(merged, merged_lse, *attention_with_lse(q, kb, vb))
    full = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    assert torch.allclose(merged, full.float(), atol=3e-2), (merged - full.float()).abs().max()


@pytest.fixture(scope="module")
def nccl_world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@torch.no_grad()
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_sequence_parallel_on_nccl_equals_plain_model(nccl_world_of_one, mode):
    from streamgen.model import DiT, get_config
    from streamgen.parallel import apply_sequence_parallel
    from streamgen.sampling import encode_sink, generate_chunk, student_sigmas

    cfg = get_config("debug", num_heads=4, dim=64)
    torch.manual_seed(0)
    plain = DiT(cfg).cuda().eval()
    sp = DiT(cfg).cuda().eval()
    sp.load_state_dict(plain.state_dict())
    apply_sequence_parallel(sp, nccl_world_of_one, mode=mode)
    hw = (4, 8)
    ctx = torch.randn(1, 3, cfg.text_dim, device="cuda")
    ref = torch.randn(1, cfg.in_channels, 1, *hw, device="cuda")
    outs = []
    for model in (plain, sp):
        cache = model.new_cache(1, hw)
        encode_sink(model, cache, ref, ctx)
        chunks = []
        for k in range(4):
            noise = torch.randn(
                1, cfg.in_channels, cfg.frames_per_chunk, *hw, generator=torch.Generator().manual_seed(k)
            )
            gen = torch.Generator().manual_seed(100 + k)
            chunks.append(generate_chunk(model, cache, noise.cuda(), ctx, None, student_sigmas(2), gen))
        outs.append(torch.cat(chunks, dim=2))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-4
