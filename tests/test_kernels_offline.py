"""The Triton kernels compiled for Hopper (sm_90) by Triton's own compiler, on a CPU-only machine.

The CPU tests run the kernels under the interpreter, which accepts code the
compiler rejects and says nothing of registers or shared memory. Here each
kernel and autotune config is built at the Wan2.1-1.3B shapes, as the GPU run
will build it, and its resource usage is read from the binary
(`streamgen bench resources`). Nothing is launched.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_bench import CASES  # noqa: E402

from bench import resources  # noqa: E402
from streamgen.kernels import triton_attention, triton_ops  # noqa: E402


def test_compile_only_builds_without_launching_and_restores_triton():
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    before = (JITFunction.run, Autotuner.run, driver._active)
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    x = torch.full((3000,), 2.0)
    with resources.compile_only(90) as compiled:
        out = triton_ops.gelu_tanh(x)
    ((name, variant, kernel, _seconds, report),) = compiled
    assert name == "_gelu_tanh_kernel" and variant["BLOCK"] == 1024
    assert resources.ptxas_usage(report)["registers"] > 0
    assert kernel.metadata.target.arch == 90 and kernel.asm["cubin"]
    assert out.shape == x.shape  # and nothing launched, which would have failed without a GPU
    assert (JITFunction.run, Autotuner.run, driver._active) == before
    assert "TRITON_DUMP_PTXAS_LOG" not in os.environ and os.environ.get("TRITON_CACHE_DIR") == cache_dir
    assert not triton_ops._gelu_tanh_kernel.device_caches  # no sm_90 binary left to serve a real device


@pytest.fixture(scope="module")
def resources_run():
    """`streamgen bench resources --json`, in this process (Triton's compiler is loaded and warm
    once for the file's tests): (its JSON, each case's builds by case name). Two tests read it:
    the FP8 products' check built its own two FP8 modes, every config, which the run builds too."""
    from streamgen.cli import main

    builds, compile_only = [], resources.compile_only

    @contextlib.contextmanager
    def recorded(arch, cache_dir=None):
        with compile_only(arch, cache_dir) as compiled:
            yield compiled
        builds.append(compiled)

    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        patch.setattr(resources, "compile_only", recorded)
        code = main(["bench", "resources", "--json"])
    assert code == 0, err.getvalue()[-3000:]
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    cases = list(dict.fromkeys(row["case"] for row in result["kernels"]))  # run in the cases' order
    assert len(cases) == len(builds)
    return result, dict(zip(cases, builds))


@pytest.mark.slow
def test_every_kernel_builds_for_hopper_without_spills_within_shared_memory(resources_run):
    result, builds = resources_run
    assert result["target"] == "sm_90" and result["dtype"] == "bfloat16"
    assert result["ptxas_reports"] == result["compiled"]  # every kernel was really built and reported
    # a binary two cases build alike is built in the first, read from the run's cache in the second
    # (no ptxas run, no report of its own: its row has the build's)
    for case, kernel in (
        ("attention_stream_fp8", "_quantize_fp8_rows_kernel"),
        ("quantize_fp8_values", "_quantize_fp8_values_kernel"),
    ):
        reports = [report for name, _variant, _kernel, _s, report in builds[case] if name == kernel]
        assert reports and not any(reports), (case, kernel)
    rows = result["kernels"]
    assert {row["case"] for row in rows} == CASES

    def attention_configs(case):
        return sum(row["case"] == case and row["kernel"] == "_attention_kernel" for row in rows)

    configs = len(triton_attention._ATTN_CONFIGS)
    for case in CASES:  # every autotune config is built, in bf16 and in each FP8 mode
        if case.startswith("attention"):
            assert attention_configs(case) == configs, case
    assert result["over_shared_memory"] == [], result
    # none spills but PV in FP8, whose blocks' products are added in fp32 (a second tile of
    # registers: test_fp8_pv_adds_each_key_blocks_product_in_fp32); the autotuner has a clean tile
    assert all(s.startswith("attention_stream_fp8 _attention_kernel ") for s in result["spilling"]), result
    assert attention_configs("attention_stream_fp8") > len(result["spilling"]), result["spilling"]
    assert all(0 < row["registers"] <= 255 for row in rows)
    # the softmax scales and subtracts each score's running max in one fma (the scale applied
    # in the exponent), so next to each score's exp2 there is no separate multiply and subtract
    for row in rows:
        if row["kernel"] == "_attention_kernel":
            ops = row["float_ops"]
            assert ops["ex2"] >= 16 and ops["fma"] >= ops["ex2"] - 4 and ops["sub"] <= ops["ex2"] // 8, row
    # RoPE from a table loads each pair's (cos, sin): no sine and cosine polynomials per pair of
    # every head (they were 136-144 fma per thread, the positions mode's still are)
    rope = {row["case"]: row["float_ops"]["fma"] for row in rows if "rope" in row["case"]}
    assert rope["rmsnorm_rope"] < 60 and rope["apply_rope_ring_keys"] < 60, rope
    assert rope["rmsnorm_rope_positions"] > 100, rope
    # the attention runs on Hopper's tensor cores in every config, in bf16 and in FP8
    assert {row["tensor_cores"] for row in rows if row["kernel"] == "_attention_kernel"} == {"wgmma"}
    # q and k quantized by one kernel, built once per case; v by another (`fp8`)
    assert sum(row["kernel"] == "_quantize_fp8_rows_kernel" for row in rows) == 4
    assert [row["case"] for row in rows if row["kernel"] == "_quantize_fp8_values_kernel"] == [
        "attention_stream_fp8",
        "quantize_fp8_values",
    ]


@pytest.fixture(scope="module")
def fp32_attention_builds():
    """What each of two exact fp32 attention calls built, query lengths 5 and 40 (length buckets
    8 and 64) against the same keys: the fp32 kernel is built once for the two tests below."""
    k = torch.randn(1, 70, 2, 128)
    builds = []
    with resources.compile_only(90) as compiled:
        for lq in (5, 40):
            before = len(compiled)
            triton_attention.attention(torch.randn(1, lq, 2, 128), k, k)
            builds.append(compiled[before:])
    return builds


@pytest.mark.slow
def test_exact_fp32_attention_builds_one_config_instead_of_autotuning(fp32_attention_builds):
    smallest = triton_attention._ATTN_CONFIGS[-1]
    for built in fp32_attention_builds:
        ((_name, variant, kernel, _seconds, _report),) = built
        assert variant["DOT_FP32"] and (variant["BLOCK_M"], variant["BLOCK_N"]) == (64, 32) == tuple(
            smallest.kwargs.values()
        )
        assert kernel.metadata.shared <= resources.SHARED_BYTES_PER_BLOCK[90]


@pytest.mark.slow
def test_ring_attention_blocks_build_for_hopper_without_spills():
    """Ring attention's blocks return each row's log-sum-exp (`return_lse`). With PV in FP8 as
    well, the kernel is at the edge (244-255 registers, Triton 3.9): at a Wan ring block's shapes
    it built every tile without spilling while PV's products were chained through one
    accumulator; adding each block's in fp32 (test_fp8_pv_adds_each_key_blocks_product_in_fp32)
    takes a second tile of registers, and some tiles spill: one at least builds clean, for the
    autotuner."""
    from streamgen.kernels import reference

    torch.manual_seed(0)
    s = 390  # a quarter of a 1560-token frame: a 4-process ring's block
    q = torch.randn(1, 3 * s, 12, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 25 * s, 12, 128, dtype=torch.bfloat16) for _ in range(2))
    inputs = reference.quantize_fp8_attention(q, k, v, pv=True)
    with resources.compile_only(90) as compiled:
        triton_attention.fp8_attention_quantized(*inputs, None, 1, torch.bfloat16, return_lse=True)
    tiles, clean = [], []
    for _name, variant, kernel, _seconds, report in compiled:
        usage = resources.ptxas_usage(report)
        clean.append(usage["spill_stores"] == usage["spill_loads"] == 0)
        assert kernel.metadata.shared <= resources.SHARED_BYTES_PER_BLOCK[90]
        tiles.append((variant["BLOCK_M"], variant["BLOCK_N"]))
    assert any(clean), tiles
    assert sorted(tiles) == sorted(
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in triton_attention._ATTN_CONFIGS
    )


def test_the_attention_tile_is_tuned_per_power_of_two_of_the_lengths(monkeypatch):
    """The autotuner keys on the query and key lengths rounded up to powers of two, so a stream's
    first call (the sink: 1560 keys at 832x480) does not choose the tile of its steady chunks
    (39,000 keys), nor a cross-attention's (512 text tokens) that of the self-attention."""
    tuner = triton_attention._attention_kernel
    assert {"LQ_BUCKET", "LK_BUCKET"} <= set(tuner.keys)
    launches = []

    class Launcher:  # the launch's arguments, by the kernel's parameter names; nothing runs
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append({**dict(zip(tuner.arg_names, args)), **kwargs})

    monkeypatch.setattr(triton_attention, "_attention_kernel", Launcher())
    q, k = torch.randn(1, 40, 2, 16), torch.randn(1, 1000, 2, 16)
    triton_attention.attention(q, k, k)
    triton_attention.attention(k, q, q)
    assert [(a["Lq"], a["Lk"], a["LQ_BUCKET"], a["LK_BUCKET"]) for a in launches] == [
        (40, 1000, 64, 1024),
        (1000, 40, 1024, 64),
    ]


@pytest.mark.slow
def test_a_new_length_bucket_builds_nothing_new(fp32_attention_builds):
    """The buckets are for the autotuner's key only: query lengths of 5 and 40 (buckets 8 and 64)
    run one binary (fp32 inputs: one config, built once)."""
    (first,), (second,) = fp32_attention_builds
    assert first[2] is second[2]


def test_an_unknown_case_is_one_line_and_exit_code_2(capsys):
    from streamgen.cli import main

    assert main(["bench", "resources", "--only", "layernorm", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(
        "streamgen bench resources: error: --only: unknown case(s) layernorm; the cases are layernorm_"
    )


def test_the_head_dim_tile_is_at_least_32_for_fp8_products():
    """tl.dot takes K >= 16, and K >= 32 with e4m3 operands (Hopper's FP8 products sum 32 values):
    QK^T in e4m3 pads head dims of 16 and below to 32 (masked loads: zeros, which add nothing).
    With a 16-wide tile Triton refused the FP8 backends' QK^T on sm_90 ("K >= 32") for heads of 16
    and less. That the 32-wide tile builds, in both FP8 modes, with the head dim a mask's bound
    inside it (the kernel's only use of HEAD_DIM but the value scales' offset), is
    test_kernels_quick_shapes.py's build for Hopper, at heads of 24."""
    tile = triton_attention.head_dim_tile
    assert [tile(d, fp8=False) for d in (6, 8, 16, 24, 32, 64, 128)] == [16, 16, 16, 32, 32, 64, 128]
    assert [tile(d, fp8=True) for d in (6, 8, 16, 24, 32, 64, 128)] == [32, 32, 32, 32, 32, 64, 128]


# --- every kernel in fp32 (the exact path): the type and lowering errors the interpreter cannot see


_FLOAT_ARGS = {"eps", "qk_scale", "scale"}


_TYPED_POINTERS = {
    "frame_pos_ptr": "*i32",
    "q_block_ptr": "*i32",
    "k_block_ptr": "*i32",
    "fp8_ptr": "*fp8e4nv",
}


_FP32_POINTERS = {
    "cos_sin_ptr",
    "inv_freq_ptr",
    "row_scale_ptr",
    "channel_scale_ptr",
    "applied_scale_ptr",
} | {f"{t}_scale_ptr" for t in "qkv"}


def _compile_for_hopper(kernel, dtype: str, constexprs: dict, **options):
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):  # the autotuner wraps the JITFunction
        fn = fn.fn
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _TYPED_POINTERS.get(name, "*fp32" if name in _FP32_POINTERS else f"*{dtype}")
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, does not interpret")
def test_kernels_compile_for_hopper_in_fp32():
    # (bf16, every autotune config through the launchers, with ptxas's report: the slow tests above)
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    from streamgen.kernels import triton_attention as attn
    from streamgen.kernels import triton_ops as ops

    assert not ops.INTERPRET
    dtype = "fp32"
    for affine in (False, True):
        meta = dict(BLOCK_D=2048, AFFINE=affine)
        _compile_for_hopper(ops._layernorm_modulate_kernel, dtype, meta, num_warps=4)
    for with_norm in (False, True):
        _compile_for_hopper(ops._gated_residual_kernel, dtype, dict(BLOCK_D=2048, WITH_NORM=with_norm))
    for mode in (ops.ROPE_NONE, ops.ROPE_TABLE, ops.ROPE_POSITIONS):
        _compile_for_hopper(ops._rmsnorm_rope_kernel, dtype, dict(BLOCK_HALF=1024, ROPE_MODE=mode, NORM=True))
    _compile_for_hopper(
        ops._rmsnorm_rope_kernel, dtype, dict(BLOCK_HALF=1024, ROPE_MODE=ops.ROPE_TABLE, NORM=False)
    )
    _compile_for_hopper(ops._gelu_tanh_kernel, dtype, dict(BLOCK=1024))
    for gelu in (False, True):
        for rows, block in ((1, 2048), (16, 128)):  # a linear layer's row; attention's heads
            meta = dict(GELU=gelu, ROWS=rows, BLOCK_K=block)
            _compile_for_hopper(ops._quantize_fp8_rows_kernel, dtype, meta, num_warps=4)
    for changed_only in (False, True):  # a whole call's values; a KV cache's moved channels
        meta = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_L=64, CHANGED_ONLY=changed_only)
        _compile_for_hopper(ops._quantize_fp8_values_kernel, dtype, meta, num_warps=4)
    for with_bias, silu in ((False, False), (True, False), (False, True)):
        meta = dict(HAS_BIAS=with_bias, SILU=silu, BLOCK_C=32, BLOCK_P=64)
        _compile_for_hopper(ops._rmsnorm_channels_kernel, dtype, meta, num_warps=4)
    attention = dict(HEAD_DIM=128, BLOCK_D=128, DOT_FP32=True, FP8_QK=False, FP8_PV=False)
    for causal in (False, True):  # ring attention's blocks return the log-sum-exp, masked or not
        meta = dict(attention, BLOCK_CAUSAL=causal, RETURN_LSE=causal)
        _compile_for_hopper(attn._attention_kernel, dtype, dict(meta, BLOCK_M=64, BLOCK_N=32))
    # at least one autotune config must fit Hopper's shared memory (227 KiB) for fp32 operands
    meta = dict(attention, BLOCK_CAUSAL=False, RETURN_LSE=False)
    smallest = attn._ATTN_CONFIGS[-1]
    compiled = _compile_for_hopper(
        attn._attention_kernel, dtype, dict(meta, **smallest.kwargs), num_warps=smallest.num_warps,
        num_stages=smallest.num_stages,
    )  # fmt: skip
    assert compiled.metadata.shared <= 227 * 1024


def _fp8_dots_chaining_an_imprecise_accumulator(ttgir: str) -> list[str]:
    """The FP8 products (e4m3 operands) of a kernel's TTGIR that add into an accumulator carried
    from earlier products while Triton lets the tensor cores keep it in their reduced precision
    throughout (maxNumImpreciseAcc above the product's K): their third operand is not a zero."""
    zeros = set(re.findall(r"(%[\w.]+) = arith\.constant dense<0\.0+e\+00> : tensor", ttgir))
    chained = []
    for line in ttgir.splitlines():
        dot = re.search(r"(?:ttng\.warp_group_dot|tt\.dot) (%[\w.]+), (%[\w.]+), (%[\w.]+)", line)
        if dot is None or line.count("f8E4M3FN") < 2:
            continue
        imprecise = re.search(r"maxNumImpreciseAcc = (\d+)", line)
        k = re.search(r"tensor<\d+x(\d+)xf8E4M3FN", line) or re.search(r"memdesc<\d+x(\d+)xf8E4M3FN", line)
        limit = int(imprecise.group(1)) if imprecise else 0
        if dot.group(3) not in zeros and (k is None or limit > int(k.group(1))):
            chained.append(line.strip())
    return chained


@pytest.mark.slow
def test_fp8_pv_adds_each_key_blocks_product_in_fp32(resources_run):
    """On sm_90 Triton lets e4m3 products accumulate in the tensor cores' reduced precision
    (about 14 bits: maxNumImpreciseAcc 2^30 by default). PV's product of each key block was
    chained through tl.dot's accumulator operand, so a steady chunk's whole PV sum (39,000 keys at
    832x480, 600 key blocks) was kept in that precision, an error neither the interpreter nor the
    CPU's emulation (`bench fp8`'s accuracy) has, and not the fp32 sum docs/kernels.md says. Each
    block's product starts from zero and is added to the running sum in fp32. (The builds are
    `bench resources`' of a steady chunk in each FP8 mode: QK^T alone, and PV too.)"""
    _result, builds = resources_run
    built = {}  # (by identity: a case may launch a build twice)
    for case in ("attention_stream_fp8_qk", "attention_stream_fp8"):
        built |= {id(kernel): kernel for name, _v, kernel, _s, _r in builds[case] if name == "_attention_kernel"}
    built = list(built.values())
    assert len(built) == 2 * len(triton_attention._ATTN_CONFIGS)
    for kernel in built:
        ttgir = kernel.asm["ttgir"]
        assert ttgir.count("f8E4M3FN") > 0
        assert _fp8_dots_chaining_an_imprecise_accumulator(ttgir) == []
