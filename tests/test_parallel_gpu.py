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

from streamgen.kernels.attention_backends import attention_with_lse
from streamgen.parallel.ring import merge_partials

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


@pytest.mark.gpu_last
@pytest.mark.parametrize("backend", ["triton", "fp8_qk", "fp8"])
def test_kernel_log_sum_exp_merges_like_full_attention(backend):
    """Ring attention's blocks on our kernel, at Wan shapes in bf16: four key blocks (their own
    frames, masked block-causally) merged by log-sum-exp equal one call over all keys, to bf16's
    precision for `triton` and `fp8_qk`, and to FP8's for `fp8` (P rounded per block)."""
    from streamgen.kernels import attention_backends, triton_attention

    if backend != "triton" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89")
    torch.manual_seed(0)
    s = 390  # 1560 tokens a frame / 4
    # peaked scores (a few keys dominate), so the outputs are not the near-zero mean of v
    q = 3 * torch.randn(1, 3 * s, 12, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 24 * s, 12, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_block = torch.full((3,), 7)
    k_block = torch.arange(24) % 9  # frames 8 of each 9 are in the query's future: masked
    blocks = list(zip(k.chunk(4, dim=1), v.chunk(4, dim=1), k_block.chunk(4)))
    merged = lse = None
    if backend == "triton":
        whole = attention_backends.attention(q, k, v, (q_block, k_block), s, "triton").float()
        for kb, vb, ids in blocks:
            part = attention_backends.attention_with_lse(q, kb, vb, (q_block, ids), s, "triton")
            merged, lse = merge_partials(merged, lse, *part)
        tol = 1e-2
    else:
        pv = backend == "fp8"
        whole = attention_backends.attention(q, k, v, (q_block, k_block), s, backend).float()
        q8, q_scale, k8, k_scale, v_q, v_scale = triton_attention.quantize_fp8_attention(q, k, v, pv)
        for i, ids in enumerate(k_block.chunk(4)):
            keys = slice(i * 6 * s, (i + 1) * 6 * s)
            vb = v_q[..., keys] if pv else v_q[:, keys]
            part = triton_attention.fp8_attention_quantized(
                q8, q_scale, k8[:, keys], k_scale[:, keys], vb, v_scale, (q_block, ids), s, q.dtype,
                return_lse=True,
            )  # fmt: skip
            merged, lse = merge_partials(merged, lse, *part)
        tol = 5e-2 if pv else 1e-2
    assert whole.abs().mean() > 0.1
    error = ((merged - whole).norm() / whole.norm()).item()
    assert error <= tol, error


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
