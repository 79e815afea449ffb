"""Micro-benchmark of each fused kernel vs eager PyTorch and vs torch.compile.

For the memory-bound ops (norms, residuals, RoPE, GELU) it reports the
achieved bandwidth (minimum bytes read + written / time) and its fraction of
the measured H200 copy rate (~4.3 TB/s; this device's copy rate is measured
too, 1 GiB each way and at the kernels' own size). For attention it reports
GFLOP/s (4 * Lq * Lk * D per head, counting only the query/key pairs the mask
allows).

Shapes are those of Wan2.1-1.3B streaming at 832x480: a chunk of 3 latent
frames of 30 x 52 = 1560 tokens, width 1536 = 12 heads x 128, MLP 8960, a
ring of 21 latent frames, so a steady chunk attends to 25 (the sink, the ring
and itself). `--quick` uses tiny shapes (CPU tests).
Every variant is timed in its own try block: a failure is reported in the
JSON, never raised.

    python bench/kernels.py [--device cuda] [--quick] [--no-compile] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repo's `kernels`, not this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from streamgen.kernels import attention_backends, reference  # noqa: E402

H200_COPY_RATE_GBPS = 4300.0


def kernel_shapes(quick: bool) -> dict:
    if quick:
        return dict(
            batch=1, frames=2, grid=(2, 3), width=64, heads=4, mlp=96, ring_frames=5, train_frames=6,
            vae_channels=8, vae_frames=4, vae_hw=(16, 24),
        )  # fmt: skip
    # the Wan VAE decoder's widest stage: 96 channels at 832x480, one latent frame's 4 frames
    return dict(
        batch=1, frames=3, grid=(30, 52), width=1536, heads=12, mlp=8960, ring_frames=21, train_frames=21,
        vae_channels=96, vae_frames=4, vae_hw=(480, 832),
    )  # fmt: skip


def _time_ms(fn, device: torch.device, quick: bool) -> float:
    """Median time of one call in milliseconds (L2 flushed between calls on CUDA)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            # on `device`: do_bench records its events on, and waits for, the current device
            with torch.cuda.device(device):
                return float(
                    do_bench(fn, warmup=10 if quick else 25, rep=20 if quick else 100, return_mode="median")
                )
        except ImportError:
            pass
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(3 if quick else 10):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits, so tiny CPU figures do not print as 0.0."""
    return float(f"{x:.{digits}g}")


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kernel_cases(shapes: dict, device, dtype, values: bool = True) -> dict:
    """name -> (eager fn, triton op name, args, bytes moved or None, flops or None). values=False:
    the tensors' values uninitialised, for compiling the kernels, which reads only their shapes,
    strides and dtypes (random values at the Wan sizes were 4.5 s of CPU)."""
    b, f, (hp, wp), d = shapes["batch"], shapes["frames"], shapes["grid"], shapes["width"]
    s, heads = hp * wp, shapes["heads"]
    head_dim = d // heads

    def rnd(*shape, dt=dtype):
        if not values:
            return torch.empty(*shape, device=device, dtype=dt)
        return torch.randn(*shape, device=device).to(dt)

    x, y = rnd(b, f, s, d), rnd(b, f, s, d)
    gate, shift, scale = rnd(b, f, d), rnd(b, f, d), rnd(b, f, d)
    mod = _nbytes(shift)
    tokens = rnd(b, f * s, d)
    weight = rnd(d)
    frame_pos = torch.arange(f, device=device, dtype=torch.int32) + 7
    # the rotations as the model passes them: a Rope, its (cos, sin) made once per forward
    angles = reference.Rope.of(reference.rope_angles(frame_pos, (hp, wp), head_dim))
    hidden = rnd(b, f * s, shapes["mlp"])
    # the cache re-rotates its whole ring of un-rotated keys at read time
    ring_keys = rnd(b, shapes["ring_frames"] * s, heads, head_dim)
    ring_angles = reference.Rope.of(
        reference.rope_angles(torch.arange(shapes["ring_frames"], device=device), (hp, wp), head_dim)
    )
    vae_x = rnd(b, shapes["vae_channels"], shapes["vae_frames"], *shapes["vae_hw"])
    vae_gamma = rnd(shapes["vae_channels"], 1, 1, 1)
    cases = {
        "layernorm_modulate": (reference.layernorm_modulate, (x, shift, scale), 2 * _nbytes(x) + 2 * mod),
        # the cross-attention's and the audio cross-attention's norm: a weight and bias per channel
        "layernorm_affine": (
            reference.layernorm_affine,
            (x, weight, rnd(d)),
            2 * _nbytes(x) + 2 * _nbytes(weight),
        ),
        "gated_residual": (reference.gated_residual, (x, y, gate), 3 * _nbytes(x) + mod),
        "gated_residual_layernorm_modulate": (
            reference.gated_residual_layernorm_modulate,
            (x, y, gate, shift, scale),
            4 * _nbytes(x) + 3 * mod,
        ),
        "rmsnorm_rope": (
            reference.rmsnorm_rope,
            (tokens, weight, heads, angles),
            2 * _nbytes(tokens) + _nbytes(weight, angles.cis),
        ),
        "rmsnorm_rope_positions": (
            reference.rmsnorm_rope_positions,
            (tokens, weight, heads, frame_pos, (hp, wp)),
            2 * _nbytes(tokens) + _nbytes(weight),
        ),
        "apply_rope_ring_keys": (
            reference.apply_rope,
            (ring_keys, ring_angles),
            2 * _nbytes(ring_keys) + _nbytes(ring_angles.cis),
        ),
        "gelu_tanh": (reference.gelu_tanh, (hidden,), 2 * _nbytes(hidden)),
        "rmsnorm_channels_vae": (reference.rmsnorm_channels, (vae_x, vae_gamma), 2 * _nbytes(vae_x)),
        # the decoder's residual blocks: the norm and the SiLU after it
        "rmsnorm_silu_channels_vae": (
            reference.rmsnorm_channels,
            (vae_x, vae_gamma, None, 1e-12, True),
            2 * _nbytes(vae_x),
        ),
        # FP8 linears: a block's input, and the MLP's hidden activation through its GELU (bytes:
        # read once, one byte out per element, a scale per row)
        "quantize_fp8_rows": (
            reference.quantize_fp8_rows,
            (tokens,),
            _nbytes(tokens) + tokens.numel() + 4 * b * f * s,
        ),
        "gelu_quantize_fp8_rows": (
            reference.quantize_fp8_rows,
            (hidden, True),
            _nbytes(hidden) + hidden.numel() + 4 * b * f * s,
        ),
    }
    op_names = {
        "apply_rope_ring_keys": "apply_rope",
        "rmsnorm_channels_vae": "rmsnorm_channels",
        "rmsnorm_silu_channels_vae": "rmsnorm_channels",
        "gelu_quantize_fp8_rows": "quantize_fp8_rows",
    }
    cases = {
        name: (fn, op_names.get(name, name), args, nbytes, None) for name, (fn, args, nbytes) in cases.items()
    }

    # attention: one streaming chunk against the visible K/V, and block-causal training
    lq, lk = f * s, (1 + shapes["ring_frames"] + f) * s  # the sink, a full ring, the chunk itself
    q, k, v = rnd(b, lq, heads, head_dim), rnd(b, lk, heads, head_dim), rnd(b, lk, heads, head_dim)
    flops = 4 * b * heads * lq * lk * head_dim
    cases["attention_stream"] = (reference.attention, "attention", (q, k, v), _nbytes(q, k, v, q), flops)
    # the same call with QK^T in FP8, and PV too; against `eager`, the attention in `dtype` they
    # replace (bytes: what the kernel reads and writes, the quantization passes aside)
    for name, pv in (("attention_stream_fp8_qk", False), ("attention_stream_fp8", True)):
        # q and k in e4m3 (a byte each), v in e4m3 too with PV in FP8, the output in `dtype`
        fp8_bytes = q.numel() + k.numel() + (v.numel() if pv else _nbytes(v)) + _nbytes(q)
        cases[name] = (_attention_in_dtype, "fp8_attention", (q, k, v, None, 1, pv), fp8_bytes, flops)
    # the values' quantization for `fp8` (read twice: the scales, then the e4m3 values out)
    values = (reference.quantize_fp8_values, "quantize_fp8_values", (v,), 2 * _nbytes(v) + v.numel(), None)
    cases["quantize_fp8_values"] = values
    n_train = shapes["train_frames"]
    blocks = torch.arange(n_train, device=device) // f  # chunks of `f` frames
    allowed = float((blocks[None, :] <= blocks[:, None]).float().mean())
    qt, kt, vt = (rnd(b, n_train * s, heads, head_dim) for _ in range(3))
    train_flops = 4 * b * heads * (n_train * s) ** 2 * head_dim * allowed
    cases["attention_block_causal"] = (
        reference.attention,
        "attention",
        (qt, kt, vt, (blocks, blocks), s),
        _nbytes(qt, kt, vt, qt),
        train_flops,
    )
    return cases


def _attention_in_dtype(q, k, v, block_mask_frames, tokens_per_frame, _pv):
    """The eager counterpart of `triton_attention.fp8_attention`: SDPA in the inputs' dtype."""
    return reference.attention(q, k, v, block_mask_frames, tokens_per_frame)


def _measure(fn, args, nbytes, flops, device, quick) -> dict:
    try:
        ms = _time_ms(lambda: fn(*args), device, quick)
    except Exception as e:  # report, keep going
        return {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc(limit=3)[-1500:]}
    out = {"ms": _sig(ms)}
    if nbytes:
        gbps = nbytes / (ms * 1e-3) / 1e9
        out.update(gb_per_s=_sig(gbps), fraction_of_h200_copy=_sig(gbps / H200_COPY_RATE_GBPS, 3))
    if flops:
        out["gflop_per_s"] = _sig(flops / (ms * 1e-3) / 1e9)
    return out


def _max_err(fn_a, fn_b, args) -> float | str:
    try:
        a, b = fn_a(*args), fn_b(*args)
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        return max(float((u.float() - w.float()).abs().max()) for u, w in zip(a, b))
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"[:300]


def triton_function(op_name: str):
    """The Triton implementation a case names: attention's in `kernels.triton_attention`, the
    others' in `kernels.triton_ops`."""
    from streamgen.kernels import triton_attention, triton_ops

    return getattr(triton_attention if hasattr(triton_attention, op_name) else triton_ops, op_name)


def _autotuner(op_name: str):
    """The autotuned Triton kernel behind a case's op (the attention kernel), or None."""
    if op_name not in ("attention", "fp8_attention"):
        return None
    from streamgen.kernels import triton_attention

    return triton_attention._attention_kernel


def tile_name(config) -> str:
    """A Triton config as 'BLOCK_MxBLOCK_N wWARPS sSTAGES'."""
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{config.num_warps} s{config.num_stages}"


def _tile_medians(timings: dict) -> dict:
    """Each config's median ms by tile name: do_bench's quantiles (median first) or one number; a
    config that could not run (out of resources) is timed as infinity: null."""
    medians = {tile_name(c): t[0] if isinstance(t, (list, tuple)) else t for c, t in timings.items()}
    return {k: None if math.isinf(v) else _sig(v) for k, v in medians.items()}


def autotune_report(tuner, tunings: dict) -> dict:
    """The tile the autotuner ran the call just timed with ("tile"), and each tile's median ms
    ("tile_ms") where it tuned for that call (`tunings`, from `recording_tunings`: empty when it
    reused a choice made earlier in the process)."""
    out = {"tile": tile_name(tuner.best_config)}
    if tunings:
        out["tile_ms"] = _tile_medians(list(tunings.values())[-1])
    return out


@contextlib.contextmanager
def recording_tunings(tuner):
    """Within: each tuning the autotuner `tuner` does (a key it had not seen) is recorded, key ->
    its configs' timings (Triton keeps only the last tuning's)."""
    recorded = {}
    run = tuner.run

    def run_and_record(*args, **kwargs):
        keys, timings = set(tuner.cache), getattr(tuner, "configs_timings", None)
        out = run(*args, **kwargs)
        new_timings = getattr(tuner, "configs_timings", None)
        if new_timings is not timings:  # it benchmarked (a single config is chosen untimed)
            for key in set(tuner.cache) - keys:
                recorded[key] = dict(new_timings)
        return out

    tuner.run = run_and_record  # the launch (`kernel[grid](...)`) calls the instance's run
    try:
        yield recorded
    finally:
        del tuner.run


def attention_tiles(tuner, timings_by_key=None) -> dict:
    """Each tile the attention kernel's autotuner has chosen in this process, by what it keyed on
    (the flags that are on, the length buckets): e.g. {"FP8_QK q8192 k65536": {"tile": "128x64
    w8 s3", "tile_ms": {...}}}, each tile's median where `timings_by_key` (`recording_tunings`)
    holds that key's tuning."""
    out = {}
    for key, config in tuner.cache.items():
        named = dict(zip(tuner.keys, key))  # the dtypes the autotuner appends come after: dropped
        flags = [k for k in ("BLOCK_CAUSAL", "DOT_FP32", "FP8_QK", "FP8_PV", "RETURN_LSE") if named.get(k)]
        entry = {"tile": tile_name(config)}
        if timings_by_key and key in timings_by_key:
            entry["tile_ms"] = _tile_medians(timings_by_key[key])
        out[" ".join([*flags, f"q{named['LQ_BUCKET']}", f"k{named['LK_BUCKET']}"])] = entry
    return out


def _triton_functions(device):
    """(`triton_function`, None), or (None, why the Triton kernels cannot run here)."""
    if device.type != "cuda":
        return None, "Triton kernels run on CUDA only (CPU uses the references)"
    try:
        import streamgen.kernels.triton_attention  # noqa: F401
    except Exception as e:
        return None, f"the Triton kernels did not import: {type(e).__name__}: {e}"
    return triton_function, None


def _copy_rate(device, dtype, shapes, quick) -> dict:
    """This device's copy rate, 1 GiB each way (far past any L2), with the rate of a copy the
    size of one chunk's activation under "at_kernel_size": the like-for-like reference for the
    fused kernels, since a ~14 MB copy is too short to reach the device's rate."""

    def copy(numel: int) -> dict:
        src = torch.randn(numel, device=device).to(dtype)
        dst = torch.empty_like(src)
        return _measure(lambda: dst.copy_(src), (), 2 * _nbytes(src), None, device, quick)

    element_size = torch.empty((), dtype=dtype).element_size()
    activation = shapes["batch"] * shapes["frames"] * math.prod(shapes["grid"]) * shapes["width"]
    large = copy(4096 if quick else (1 << 30) // element_size)
    return {**large, "at_kernel_size": copy(activation)}


def run(
    device: str = "cuda", quick: bool = False, compile: bool | None = None, only=None, dtype=None
) -> dict:
    """Benchmark every kernel variant; returns a JSON-serialisable dict.

    compile: also time torch.compile of the reference (default: on CUDA only).
    only: names of cases to run (default all). dtype: default bf16 on CUDA, fp32 on CPU.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return {"error": "CUDA requested but not available", "device": device}
    compile = dev.type == "cuda" if compile is None else compile
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    shapes = kernel_shapes(quick)
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "quick": quick,
        "shapes": {k: list(v) if isinstance(v, tuple) else v for k, v in shapes.items()},
        "h200_copy_rate_gb_per_s": H200_COPY_RATE_GBPS,
        "kernels": {},
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    result["copy"] = _copy_rate(dev, dtype, shapes, quick)
    triton_fn, why_no_triton = _triton_functions(dev)
    try:
        cases = kernel_cases(shapes, dev, dtype)
    except Exception as e:
        result["error"] = f"building inputs failed: {type(e).__name__}: {e}"
        return result

    for name, (eager, op_name, args, nbytes, flops) in cases.items():
        if only and name not in only:
            continue
        entry = {"bytes": nbytes}
        if flops:
            entry["gflop"] = _sig(flops / 1e9)
        entry["eager"] = _measure(eager, args, nbytes, flops, dev, quick)
        if compile:
            try:
                compiled = torch.compile(eager, dynamic=False)
            except Exception as e:
                entry["compile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            else:
                entry["compile"] = _measure(compiled, args, nbytes, flops, dev, quick)
        else:
            entry["compile"] = {"skipped": "compile disabled"}
        if triton_fn is None:
            entry["triton"] = {"skipped": why_no_triton}
        else:
            fused = triton_fn(op_name)
            tuner = _autotuner(op_name)
            with recording_tunings(tuner) if tuner is not None else contextlib.nullcontext({}) as tunings:
                entry["triton"] = _measure(fused, args, nbytes, flops, dev, quick)
            if tuner is not None and "error" not in entry["triton"]:
                entry["triton"].update(autotune_report(tuner, tunings))
            entry["triton"]["max_abs_err_vs_eager"] = _max_err(fused, eager, args)
            if op_name == "fp8_attention":
                entry["triton"]["from_kv_cache"] = fp8_from_kv_cache(args, shapes, nbytes, flops, dev, quick)
        if op_name == "attention":
            entry["backends"] = _attention_backends(args, nbytes, flops, dev, quick)
        result["kernels"][name] = entry
    return result


def fp8_from_kv_cache(args, shapes, nbytes, flops, device, quick) -> dict:
    """An FP8 attention case's call reading a KV cache that keeps its keys and values in e4m3
    (`KVCache.fp8_keys`, `fp8_values`): the chunk's quantized at each call, the sink's and ring's
    kept. The chunk does not change between the timed calls, so no channel's value scale moves:
    the least such a call costs (a stream's calls also requantize the channels a chunk moved).
    Its output is that of quantizing everything at every call (`max_abs_diff_vs_every_call`)."""
    from streamgen.model.cache import KVCache

    q, k, v, _mask, _tokens_per_frame, pv = args
    b, lk, heads, head_dim = k.shape
    s, f = shapes["grid"][0] * shapes["grid"][1], shapes["frames"]
    cache = KVCache(b, s, f * s, lk - (1 + f) * s, heads, head_dim, k.dtype, k.device)
    cache.k.copy_(k)
    cache.v.copy_(v)

    def from_cache():
        return attention_backends.fp8_attention(q, cache.k, cache.v, pv=pv, kv_cache=cache)

    out = _measure(from_cache, (), nbytes, flops, device, quick)
    if "error" not in out:
        every_call = lambda: attention_backends.fp8_attention(q, cache.k, cache.v, pv=pv)  # noqa: E731
        out["max_abs_diff_vs_every_call"] = _max_err(from_cache, every_call, ())
    return out


def _attention_backends(args, nbytes, flops, device, quick) -> dict:
    """Every attention backend that runs natively here (sdpa is `eager`, triton is `triton`), and
    SDPA's own kernels one at a time (`sdpa:NAME`: which one `eager` picked, and the fastest; an
    `error` where that kernel cannot serve the call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def only(kernel):
        def fn(*a):
            with sdpa_kernel(kernel):
                return reference.attention(*a)

        return fn

    fns = {}
    for backend in attention_backends.available_backends(device):
        if backend not in ("sdpa", "triton"):
            fns[backend] = lambda *a, backend=backend: attention_backends.attention(*a, backend=backend)
    kernels = ("FLASH_ATTENTION", "MATH")  # on a CPU, SDPA's fused kernel and the math
    if device.type == "cuda":
        kernels = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    for kernel in kernels:
        fns["sdpa:" + kernel.removesuffix("_ATTENTION").lower()] = only(getattr(SDPBackend, kernel))
    out = {}
    for name, fn in fns.items():
        out[name] = _measure(fn, args, nbytes, flops, device, quick)
        if "error" not in out[name]:
            out[name]["max_abs_err_vs_eager"] = _max_err(fn, reference.attention, args)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # (defaults that depend on the device, which --help left unsaid: --compile and --no-compile
    # listed side by side, neither marked as the default)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda where there is one, else cpu (which needs --quick)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU tests)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also time torch.compile of the reference ops (the default on CUDA)")  # fmt: skip
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="do not (the default on a CPU)")  # fmt: skip
    parser.add_argument("--only", nargs="+", help="case names to run (default: all)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on a CPU")  # fmt: skip


def main(args) -> dict:
    from streamgen.cli import UserError, check_device

    check_device(args.device)
    names = list(kernel_cases(kernel_shapes(quick=True), torch.device("cpu"), torch.float32))
    if unknown := sorted(set(args.only or ()) - set(names)):  # (an unknown one ran nothing: {})
        raise UserError(f"--only: unknown case(s) {', '.join(unknown)}; the cases are {', '.join(names)}")
    if torch.device(args.device).type == "cpu" and not args.quick:
        # (Wan2.1-1.3B's shapes: `--only layernorm_modulate` alone took 28 s, and the block-causal
        # attention over 32760 tokens would take far longer, and tens of GB)
        raise UserError(
            "the kernels' Wan-size shapes take minutes each on the CPU (Triton runs on CUDA only): "
            "add --quick for small shapes, or run it with --device cuda"
        )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return run(args.device, quick=args.quick, compile=args.compile, only=args.only, dtype=dtype)


if __name__ == "__main__":
    from streamgen.cli import UserError

    parser = argparse.ArgumentParser(prog="python bench/kernels.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        result = main(parser.parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result, indent=2, default=str))
