"""The kernel dispatch and the attention backends on CPU.

The Triton kernels themselves are checked under the interpreter in
test_kernels_triton.py and at real shapes on a GPU in test_kernels_gpu.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from streamgen import kernels
from streamgen.kernels import attention_backends, reference


def test_layernorm_modulate_semantics():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 16) * 2 + 1
    shift, scale = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, :, None]) + shift[:, :, None]
    torch.testing.assert_close(kernels.layernorm_modulate(x, shift, scale), expected, atol=1e-5, rtol=1e-5)


def test_gated_residual_layernorm_modulate_is_the_composition():
    torch.manual_seed(1)
    x, y = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16), torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    gate, shift, scale = (torch.randn(1, 2, 8) for _ in range(3))
    h, n = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    assert h.dtype == n.dtype == torch.bfloat16
    assert torch.equal(h, kernels.gated_residual(x, y, gate))
    assert torch.equal(n, kernels.layernorm_modulate(h, shift, scale))


def test_rmsnorm_rope_positions_equals_angle_table():
    torch.manual_seed(2)
    heads, head_dim, grid = 2, 24, (2, 3)
    frame_pos = torch.tensor([4, 1, 9])
    x = torch.randn(2, 3 * 6, heads * head_dim)
    w = torch.randn(heads * head_dim)
    angles = kernels.rope_angles(frame_pos, grid, head_dim)
    expected = kernels.rmsnorm_rope(x, w, heads, angles)
    assert expected.shape == (2, 18, heads, head_dim)
    torch.testing.assert_close(kernels.rmsnorm_rope_positions(x, w, heads, frame_pos, grid), expected)
    contiguous = kernels.rmsnorm_rope(x, w, heads, kernels.rope_angles(torch.arange(5, 8), grid, head_dim))
    torch.testing.assert_close(kernels.rmsnorm_rope_positions(x, w, heads, 5, grid), contiguous)


def test_rope_scores_depend_only_on_relative_frame_position():
    """Why keys can be stored un-rotated and rotated at read time relative to the window."""
    torch.manual_seed(3)
    heads, head_dim, grid = 1, 24, (1, 1)
    q, k = torch.randn(1, 1, head_dim), torch.randn(1, 1, head_dim)
    ones = torch.ones(head_dim)

    def score(q_frame, k_frame):
        rq = kernels.rmsnorm_rope_positions(q, ones, heads, q_frame, grid)
        rk = kernels.rmsnorm_rope_positions(k, ones, heads, k_frame, grid)
        return (rq * rk).sum()

    torch.testing.assert_close(score(7, 3), score(1007, 1003), atol=1e-3, rtol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)


# --- attention backends


def _qkv(lq, lk, heads=2, head_dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, heads, head_dim, generator=g).to(dtype) for n in (lq, lk, lk))


def _frame_mask(q_block, k_block, s):
    allowed = k_block[None, :] <= q_block[:, None]
    return allowed.repeat_interleave(s, 0).repeat_interleave(s, 1)[None, None]


# the backends that compute attention in the inputs' precision (the FP8 ones: below)
EXACT_BACKENDS = [b for b in kernels.ATTENTION_BACKENDS if not b.startswith("fp8")]


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_attention_backends_agree_full(backend):
    q, k, v = _qkv(10, 23)  # a chunk of queries against a longer K/V
    expected = reference.attention_reference_math(q, k, v)
    torch.testing.assert_close(kernels.attention(q, k, v, backend=backend), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_attention_backends_agree_block_causal(backend):
    s = 5
    blocks = torch.tensor([0, 0, 1, 1, 2, 2])  # 3 chunks of 2 frames
    q, k, v = _qkv(6 * s, 6 * s, seed=1)
    expected = reference.attention_reference_math(q, k, v, _frame_mask(blocks, blocks, s))
    out = kernels.attention(q, k, v, (blocks, blocks), s, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [*EXACT_BACKENDS, "fp8_qk"])
def test_cached_chunk_equals_rows_of_block_causal(backend):
    """The streaming call (one chunk of queries against the K/V it may see) gives
    the same rows as block-causal attention over the whole sequence."""
    s = 4
    blocks = torch.tensor([0, 1, 1, 2, 2])  # sink frame, then chunks of 2 frames
    q, k, v = _qkv(5 * s, 5 * s, seed=2)
    full = kernels.attention(q, k, v, (blocks, blocks), s, backend=backend)
    last_chunk = slice(3 * s, 5 * s)
    streamed = kernels.attention(q[:, last_chunk], k, v, backend=backend)
    torch.testing.assert_close(streamed, full[:, last_chunk], atol=1e-5, rtol=1e-5)
    middle = slice(1 * s, 3 * s)
    streamed = kernels.attention(q[:, middle], k[:, : 3 * s], v[:, : 3 * s], backend=backend)
    torch.testing.assert_close(streamed, full[:, middle], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["fp8_qk", "fp8"])
@pytest.mark.parametrize("masked", [False, True])
def test_fp8_attention_is_within_e4m3_precision(backend, masked):
    """On a CPU the FP8 backends emulate the kernel's numerics: near the exact attention, not
    equal to it; PV in e4m3 too costs more."""
    s = 5
    blocks = torch.tensor([0, 0, 1, 1, 2, 2])
    q, k, v = _qkv(6 * s, 6 * s, head_dim=64, seed=4)
    mask = _frame_mask(blocks, blocks, s) if masked else None
    exact = reference.attention_reference_math(q, k, v, mask)
    out = kernels.attention(q, k, v, (blocks, blocks) if masked else None, s, backend=backend)
    error = float((out - exact).norm() / exact.norm())
    assert out.dtype == q.dtype and 1e-3 < error < 0.06
    qk_only = kernels.attention(q, k, v, (blocks, blocks) if masked else None, s, backend="fp8_qk")
    if backend == "fp8":
        assert error > float((qk_only - exact).norm() / exact.norm())


def test_fp8_attention_differentiates_through_sdpa():
    q, k, v = (t.requires_grad_() for t in _qkv(6, 9))
    out = kernels.attention(q, k, v, backend="fp8")
    torch.testing.assert_close(out, reference.attention(q, k, v))  # inference only: training is exact
    out.sum().backward()
    assert q.grad is not None and v.grad is not None


def test_flex_bf16_and_out_of_order_ring_blocks():
    s = 3
    q_block, k_block = torch.tensor([6, 6]), torch.tensor([0, 5, 3, 7, 4, 6, 6])
    q, k, v = _qkv(2 * s, 7 * s, dtype=torch.bfloat16, seed=3)
    expected = reference.attention(q, k, v, (q_block, k_block), s)
    out = kernels.attention(q, k, v, (q_block, k_block), s, backend="flex")
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_flex_takes_inputs_that_require_grad(masked):
    """Eager flex (CPUs) refuses inputs that require grad, under no_grad too: there it is handed
    them detached (nothing records), and calls that record take SDPA, whose gradients these are."""
    s, blocks = 3, torch.tensor([0, 1, 1])
    mask = (blocks, blocks) if masked else None
    q, k, v = (t.requires_grad_() for t in _qkv(3 * s, 3 * s, seed=8))
    expected = reference.attention_reference_math(q, k, v, _frame_mask(blocks, blocks, s) if masked else None)
    with torch.no_grad():
        out = kernels.attention(q, k, v, mask, s, backend="flex")
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    out = kernels.attention(q, k, v, mask, s, backend="flex")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_flex_under_torch_compile_raises_no_dynamo_warning():
    """`serve --compile --attention flex` traces flex_attention: dynamo warned at its cached
    lookup of torch's flex module that "silent incorrectness" was a risk."""

    def uses_flex(x):
        return x + (attention_backends._flex_module() is not None)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.compile(uses_flex, backend="eager", fullgraph=True)(torch.zeros(2))
    assert out.tolist() == [1.0, 1.0]


def test_flex_block_mask_is_cached_by_block_ids():
    a = attention_backends.flex_block_mask(torch.tensor([0, 1]), torch.tensor([0, 1]), 4, "cpu")
    b = attention_backends.flex_block_mask(torch.tensor([0, 1]), torch.tensor([0, 1]), 4, "cpu")
    c = attention_backends.flex_block_mask(torch.tensor([1, 1]), torch.tensor([0, 1]), 4, "cpu")
    assert a is b and c is not a


def test_attention_backend_switch_validates_and_reports():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.attention(q, k, v, backend="xformers")
    assert attention_backends.available_backends("cpu")[:2] == ["sdpa", "flex"]
    assert set(attention_backends._BY_NAME) == set(kernels.ATTENTION_BACKENDS)  # each listed one runs
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_backends.attention(q, k, v, backend="xformers")


def test_cudnn_backend_puts_cudnn_first_in_sdpa_for_the_call_only(monkeypatch):
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    before = _cur_sdpa_kernel_backends(with_priority=True)
    seen = []
    sdpa = reference.attention

    def spy(*args):
        seen.append(_cur_sdpa_kernel_backends(with_priority=True))
        return sdpa(*args)

    monkeypatch.setattr(reference, "attention", spy)
    q, k, v = _qkv(4, 9)
    kernels.attention(q, k, v, backend="cudnn")
    assert seen[0][0] == SDPBackend.CUDNN_ATTENTION and SDPBackend.MATH in seen[0]  # falls back, never fails
    assert _cur_sdpa_kernel_backends(with_priority=True) == before
    assert "cudnn" not in attention_backends.available_backends("cpu")


def test_cudnn_backend_on_a_torch_without_sdpa_priorities_is_sdpa_with_a_warning(monkeypatch):
    """sdpa_kernel's set_priority came in torch 2.6, and pyproject allows 2.4: there the switch
    that promises to fall back raised a TypeError."""
    import contextlib

    import torch.nn.attention

    allowed = []

    @contextlib.contextmanager
    def sdpa_kernel_of_torch_2_5(backends):
        allowed.append(backends)
        yield

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", sdpa_kernel_of_torch_2_5)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    q, k, v = _qkv(4, 9)
    with pytest.warns(UserWarning, match="torch 2.5.1 cannot put cuDNN first.*SDPA's own order serves"):
        out = kernels.attention(q, k, v, backend="cudnn")
    torch.testing.assert_close(out, reference.attention(q, k, v))
    assert len(allowed) == 1 and len(allowed[0]) == 4  # every kernel SDPA has


def test_needs_autograd_decides_between_kernel_and_reference():
    x = torch.randn(2, requires_grad=True)
    assert kernels.needs_autograd(torch.randn(2), x, None)
    assert not kernels.needs_autograd(torch.randn(2), None)
    with torch.no_grad():
        assert not kernels.needs_autograd(x)


def test_flash_backend_takes_what_flash_attn_can_serve_and_routes_the_rest(monkeypatch):
    calls = []

    def fake_flash_attn(q, k, v):
        calls.append(q.dtype)
        return reference.attention(q, k, v), None  # older FA3 returned (out, lse)

    monkeypatch.setattr(attention_backends, "_flash_func", lambda device: fake_flash_attn)
    routed = []
    monkeypatch.setattr(attention_backends, "triton_attention", lambda *a: routed.append("triton") or a[0])
    q = torch.randn(1, 6, 2, 16)
    k = torch.randn(1, 9, 2, 16)
    bf16 = [t.bfloat16() for t in (q, k, k)]
    out = attention_backends.flash_attention(*bf16)
    assert calls == [torch.bfloat16] and out.shape == q.shape and not routed  # the tuple was unpacked
    # fp32: flash-attn has none, and our kernel's exact fp32 path spills on Hopper: SDPA
    torch.testing.assert_close(attention_backends.flash_attention(q, k, k), reference.attention(q, k, k))
    assert calls == [torch.bfloat16] and not routed
    # a frame-block mask: our kernel
    blocks = (torch.tensor([1, 1, 1, 2, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    attention_backends.flash_attention(*bf16, block_mask_frames=blocks, tokens_per_frame=1)
    assert routed == ["triton"] and calls == [torch.bfloat16]


def test_flash_without_flash_attn_on_a_gpu_says_that_our_kernel_serves(monkeypatch):
    monkeypatch.setattr(kernels, "_TRITON_ON_CPU", True)  # as if on a GPU with the kernel
    monkeypatch.setattr(attention_backends, "_flash_func", lambda device: None)  # not installed
    monkeypatch.setattr(attention_backends, "triton_attention", lambda *a: a[0])
    attention_backends._warn_no_flash_attn.cache_clear()
    q = torch.randn(1, 6, 2, 16, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="flash-attn is not installed.*Triton kernel serves"):
        attention_backends.flash_attention(q, q, q)
    with warnings.catch_warnings():  # once a process
        warnings.simplefilter("error")
        attention_backends.flash_attention(q, q, q)


def test_flash_attn_is_not_called_on_a_gpu_older_than_ampere(monkeypatch):
    """flash-attn installs on a T4 or V100, then raises at its first call: such a GPU is served
    as one without it, and the warning says why."""
    import sys
    from types import SimpleNamespace

    installed = SimpleNamespace(flash_attn_func=lambda q, k, v: q)
    monkeypatch.setitem(sys.modules, "flash_attn", installed)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # FA3 not installed
    attention_backends._flash_func_for.cache_clear()
    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    try:
        assert attention_backends._flash_func("cuda:0") is installed.flash_attn_func  # an A100
        capability[0] = (7, 5)  # a T4
        assert attention_backends._flash_func("cuda:0") is None
        assert "sm_80" in attention_backends._no_flash_reason("cuda:0")
        capability[0] = (9, 0)
        assert "not installed" in attention_backends._no_flash_reason("cpu")
    finally:
        attention_backends._flash_func_for.cache_clear()  # (not the stand-in for later tests)


def test_triton_that_cannot_be_imported_on_a_gpu_says_so_once(monkeypatch):
    """On a GPU without a working Triton every kernel, `--attention triton`'s too, runs its
    reference: that fallback names its reason instead of passing unsaid."""
    import sys

    monkeypatch.setattr(kernels, "_triton", None)  # not tried yet
    monkeypatch.delattr(kernels, "triton_attention", raising=False)  # (else `from` takes the attribute)
    monkeypatch.setitem(sys.modules, "streamgen.kernels.triton_attention", None)  # an ImportError
    q, k, v = _qkv(4, 6)
    with warnings.catch_warnings():  # a CPU run never asks for Triton (FP8's emulation neither)
        warnings.simplefilter("error")
        for backend in kernels.ATTENTION_BACKENDS:
            kernels.attention(q, k, v, backend=backend)
    monkeypatch.setattr(kernels, "_TRITON_ON_CPU", True)  # as if on a GPU
    with pytest.warns(UserWarning, match=r"Triton kernels unavailable \(\w*Error: .*references serve"):
        out = kernels.attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, reference.attention(q, k, v))
    with warnings.catch_warnings():  # once a process
        warnings.simplefilter("error")
        kernels.attention(q, k, v, backend="triton")
        kernels.gelu_tanh(q)


def test_streamgen_kernels_other_than_reference_is_a_warning():
    assert kernels._forces_reference("reference") and kernels._forces_reference(" Reference ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels._forces_reference("")
    for typo in ("references", "triton"):
        with pytest.warns(UserWarning, match=f"STREAMGEN_KERNELS='{typo}' is not a setting, ignored"):
            assert not kernels._forces_reference(typo)


def test_fp8_attention_takes_the_reference_when_forced_or_traced(monkeypatch):
    """STREAMGEN_KERNELS=reference is the references everywhere (an A/B of the kernels), FP8
    attention's too; and a graph torch.compile traces gets the traceable reference."""
    from streamgen import kernels
    from streamgen.kernels import attention_backends

    monkeypatch.setattr(kernels, "_TRITON_ON_CPU", True)  # as if on a GPU with the kernel
    monkeypatch.setattr(attention_backends, "_triton_attention", lambda: "the kernel")
    q = torch.randn(1, 4, 2, 8)
    assert attention_backends.fp8_ops(q, q, q) == "the kernel"
    monkeypatch.setattr(kernels, "_FORCE_REFERENCE", True)
    assert attention_backends.fp8_ops(q, q, q) is attention_backends.reference
    monkeypatch.setattr(kernels, "_FORCE_REFERENCE", False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attention_backends.fp8_ops(q, q, q) is attention_backends.reference


# --- a query that may see no key (every key frame's block id above its frame's)

# query frame 0 (block 0) sees no key frame (blocks 1..3); frames 1 and 2 see some
EMPTY_FIRST_FRAME = (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 2, 3]))


@pytest.mark.parametrize("backend", kernels.ATTENTION_BACKENDS)
def test_a_query_that_sees_no_key_gets_zeros_from_every_backend(backend):
    """The contract of every backend (through the dispatch): a row with no key to attend to is 0,
    not NaN (which would spread through the rest of the model), with gradients 0 for its query
    and nothing from it for the keys and values. The other rows are those of attention alone."""
    s = 3
    q, k, v = (t.requires_grad_() for t in _qkv(3 * s, 4 * s, seed=5))
    mask = _frame_mask(*EMPTY_FIRST_FRAME, s)[..., s:, :]
    expected = reference.attention_reference_math(q[:, s:], k, v, mask)  # the rows that see keys
    with torch.no_grad():  # inference: the FP8 backends' own numerics
        out = kernels.attention(q.detach(), k.detach(), v.detach(), EMPTY_FIRST_FRAME, s, backend=backend)
    assert torch.equal(out[:, :s], torch.zeros_like(out[:, :s])) and out.isfinite().all()
    out = kernels.attention(q, k, v, EMPTY_FIRST_FRAME, s, backend=backend)  # with gradients
    assert torch.equal(out[:, :s].detach(), torch.zeros_like(out[:, :s]))
    torch.testing.assert_close(out[:, s:], expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.equal(grads[0][:, :s], torch.zeros_like(q[:, :s]))
    for g, r in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "triton", "flash"])
def test_a_partial_with_no_key_is_zero_with_a_log_sum_exp_of_minus_infinity(backend):
    """Ring attention's partials: such a row is 0 with a log-sum-exp of -inf (the log of an empty
    sum), so a merge gives it no weight; merged with a partial that saw keys it is that partial,
    and where no block had a key the merge is 0 and -inf again, gradients finite."""
    from streamgen.parallel.ring import merge_partials

    s = 3
    q, k, v = (t.requires_grad_() for t in _qkv(3 * s, 4 * s, seed=6))
    out, lse = attention_backends.attention_with_lse(q, k, v, EMPTY_FIRST_FRAME, s, backend)
    assert torch.equal(out[:, :s].detach(), torch.zeros_like(out[:, :s]))
    assert (lse[..., :s] == float("-inf")).all() and lse[..., s:].isfinite().all()
    empty = (out, lse)  # frame 0 has no key here either
    other = attention_backends.attention_with_lse(q, k, v, (torch.tensor([3, 1, 2]), EMPTY_FIRST_FRAME[1]), s)
    merged, merged_lse = merge_partials(*empty, *other)
    torch.testing.assert_close(merged[:, :s], other[0][:, :s])
    torch.testing.assert_close(merged_lse[..., :s], other[1][..., :s])
    both, both_lse = merge_partials(*empty, *empty)
    assert torch.equal(both[:, :s].detach(), torch.zeros_like(both[:, :s])) and (both_lse[..., :s] < 0).all()
    assert both_lse[..., :s].isinf().all()
    grads = torch.autograd.grad(both.sum() + both_lse[..., s:].sum(), (q, k, v))
    assert all(g.isfinite().all() for g in grads)


def test_partials_merged_by_log_sum_exp_have_the_gradients_of_whole_attention(monkeypatch):
    """SDPA's flash kernel gives the log-sum-exp without a gradient, while a merge's weights
    depend on it: calls that need gradients take the math, whose log-sum-exp differentiates.
    (The flash path forced on the CPU, through its CPU twin, which behaves the same.)"""
    from streamgen.parallel.ring import merge_partials

    monkeypatch.setattr(attention_backends, "_flash_lse_serves", lambda q, mask: mask is None)
    q, k, v = (t.requires_grad_() for t in _qkv(5, 12, seed=7))
    merged = lse = None
    for keys in (slice(0, 5), slice(5, 12)):
        part = attention_backends.attention_with_lse(q, k[:, keys], v[:, keys])
        merged, lse = merge_partials(merged, lse, *part)
    expected = reference.attention_reference_math(q, k, v)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((merged.square().sum() + lse.sum()), (q, k, v))
    full_lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, dim=-1)
    for g, r in zip(grads, torch.autograd.grad((expected.square().sum() + full_lse.sum()), (q, k, v))):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes the kernel
        calls = []
        monkeypatch.setattr(attention_backends, "_sdpa_flash_with_lse", lambda *a: calls.append(1) or (0, 0))
        attention_backends.attention_with_lse(q, k, v)
    assert calls == [1]


def test_partials_take_sdpa_s_flash_kernel_only_on_gpus_it_runs_on(monkeypatch):
    """Called directly, the flash kernel does not fall back: a GPU before sm_80 or a head wider
    than 256 gets the math (a stand-in for a CUDA tensor: the rule reads only these fields)."""
    from types import SimpleNamespace

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)

    def on_gpu(head_dim=64, dtype=torch.bfloat16):
        return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 8, 2, head_dim), device="cuda:0")

    serves = attention_backends._flash_lse_serves
    assert serves(on_gpu(), None) and serves(on_gpu(dtype=torch.float16), None)
    assert not serves(on_gpu(), (torch.tensor([0]), torch.tensor([0])))  # a mask
    assert not serves(on_gpu(dtype=torch.float32), None) and not serves(on_gpu(head_dim=512), None)
    capability[0] = (7, 5)  # a T4
    assert not serves(on_gpu(), None)
    capability[0] = (9, 0)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: False)  # switched off
    assert not serves(on_gpu(), None)
    assert not serves(torch.randn(1, 8, 2, 64, dtype=torch.bfloat16), None)  # a CPU tensor


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", kernels.ATTENTION_BACKENDS)
def test_a_call_with_no_keys_at_all_gets_zeros_from_every_backend(backend, masked):
    """Lk = 0: every query sees no key, with a mask (no key frames) or without one. The empty-row
    rule holds there too: 0 out (gradients 0 for the queries) and a log-sum-exp of -inf, where
    the FP8 emulation's scales and row max, eager flex and the empty-row rule's own minimum over
    the key frames refused the empty reduction."""
    s = 3
    q, k, v = (t.requires_grad_() for t in _qkv(2 * s, 0, seed=9))
    mask = (torch.tensor([0, 1]), torch.tensor([], dtype=torch.long)) if masked else None
    with torch.no_grad():
        out = kernels.attention(q, k, v, mask, s, backend=backend)
        assert torch.equal(out, torch.zeros_like(q))
        out, lse = attention_backends.attention_with_lse(q, k, v, mask, s, backend)
        assert torch.equal(out, torch.zeros_like(q)) and lse.shape == (2, 2, 2 * s)
        assert (lse == float("-inf")).all()
    out = kernels.attention(q, k, v, mask, s, backend=backend)  # with gradients
    assert torch.equal(out.detach(), torch.zeros_like(q))
    (grad_q,) = torch.autograd.grad(out.square().sum() + out.sum(), q)
    assert torch.equal(grad_q, torch.zeros_like(q))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", kernels.ATTENTION_BACKENDS)
def test_a_call_with_no_queries_gets_an_empty_output_from_every_backend(backend, masked):
    """Lq = 0 (no query frame): flex's block mask was an IndexError, where the others gave [B, 0, H, D]."""
    s = 3
    q, k, v = _qkv(0, 2 * s, seed=9)
    mask = (torch.tensor([], dtype=torch.long), torch.tensor([0, 1])) if masked else None
    out = kernels.attention(q, k, v, mask, s, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    out, lse = attention_backends.attention_with_lse(q, k, v, mask, s, backend)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
