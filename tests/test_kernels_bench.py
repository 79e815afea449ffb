"""bench/kernels.py at tiny sizes on CPU: complete, JSON, and failures reported rather than raised."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import refused

from streamgen.kernels import reference

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "layernorm_modulate",
    "layernorm_affine",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "rmsnorm_rope",
    "rmsnorm_rope_positions",
    "apply_rope_ring_keys",
    "gelu_tanh",
    "rmsnorm_channels_vae",
    "quantize_fp8_rows",
    "gelu_quantize_fp8_rows",
    "rmsnorm_silu_channels_vae",
    "attention_stream",
    "attention_stream_fp8_qk",
    "attention_stream_fp8",
    "quantize_fp8_values",
    "attention_block_causal",
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_quick_run_covers_every_kernel(bench):
    result = bench.run(device="cpu", quick=True, compile=False)
    json.dumps(result)
    assert set(result["kernels"]) == CASES
    for name, entry in result["kernels"].items():
        assert entry["eager"]["ms"] > 0 and entry["bytes"] > 0, name
        assert "skipped" in entry["triton"] and "skipped" in entry["compile"], name
    for name in ("attention_stream", "attention_block_causal"):
        entry = result["kernels"][name]
        assert entry["gflop"] >= 0 and entry["eager"]["gflop_per_s"] > 0
        assert entry["backends"]["flex"]["max_abs_err_vs_eager"] < 1e-4  # eager flex on CPU
        for kernel in ("sdpa:flash", "sdpa:math"):  # SDPA's own kernels, one at a time
            assert entry["backends"][kernel]["gflop_per_s"] > 0
            assert entry["backends"][kernel]["max_abs_err_vs_eager"] < 1e-4
    assert result["copy"]["gb_per_s"] > 0 and result["copy"]["at_kernel_size"]["gb_per_s"] > 0


def test_the_device_copy_rate_is_measured_past_l2(bench, monkeypatch):
    """The device's copy rate moves 1 GiB each way (an H200's 50 MB L2 cannot hold it); the
    copy at the kernels' size (one chunk's activation, ~14 MB) is reported beside it."""
    moved = []
    monkeypatch.setattr(bench, "_measure", lambda fn, args, nbytes, *rest: moved.append(nbytes) or {})
    result = bench._copy_rate(torch.device("meta"), torch.bfloat16, bench.kernel_shapes(False), quick=False)
    assert moved == [2 * (1 << 30), 2 * 2 * 3 * 30 * 52 * 1536] and "at_kernel_size" in result


def test_a_failing_kernel_is_reported_not_raised(bench, monkeypatch):
    def broken(x):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(reference, "gelu_tanh", broken)
    result = bench.run(device="cpu", quick=True, compile=False, only=["gelu_tanh", "gated_residual"])
    assert set(result["kernels"]) == {"gelu_tanh", "gated_residual"}
    assert "kernel exploded" in result["kernels"]["gelu_tanh"]["eager"]["error"]
    assert result["kernels"]["gated_residual"]["eager"]["ms"] > 0


def test_cuda_requested_without_cuda_is_an_error_entry(bench):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert "error" in bench.run(device="cuda", quick=True)


def test_command_line_prints_json():
    proc = subprocess.run(
        [
            sys.executable,
            "bench/kernels.py",
            "--device",
            "cpu",
            "--quick",
            "--no-compile",
            "--only",
            "gelu_tanh",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert list(result["kernels"]) == ["gelu_tanh"] and result["device"] == "cpu"


class StandInTuner:
    """As triton's Autotuner: a cache of key -> config, the last tuning's timings, the choice."""

    def __init__(self, timings=None):
        self.cache, self.configs_timings, self.best_config = {}, None, None
        self.timings = timings or {"config": [1.0]}

    def run(self, key, benchmarks=True):
        if key not in self.cache:
            self.cache[key] = next(iter(self.timings))
            if benchmarks:  # one config offered: chosen without timing (old timings stay)
                self.configs_timings = {c: [t[0] * len(self.cache), *t[1:]] for c, t in self.timings.items()}
        self.best_config = self.cache[key]
        return key


def test_autotune_report_names_the_chosen_tile_and_times_only_a_fresh_tuning(bench):
    """What the GPU run reports of the attention kernel's autotuner: the tile it ran with, and
    each tile's median where this call tuned (a tile that could not run: null)."""
    triton = pytest.importorskip("triton")

    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    tuner = StandInTuner({big: [0.5, 0.45, 0.6], small: [float("inf")] * 3})
    with bench.recording_tunings(tuner) as tunings:
        tuner.run("shape")
    report = bench.autotune_report(tuner, tunings)
    assert report == {"tile": "128x64 w8 s3", "tile_ms": {"128x64 w8 s3": 0.5, "64x32 w4 s2": None}}
    json.dumps(report, allow_nan=False)
    # the same shape again: it reused the earlier choice, so no times of its own
    with bench.recording_tunings(tuner) as tunings:
        tuner.run("shape")
    assert bench.autotune_report(tuner, tunings) == {"tile": "128x64 w8 s3"}
    assert bench._autotuner("gelu_tanh") is None


def test_attention_tiles_name_each_choice_by_its_flags_and_length_buckets(bench):
    triton = pytest.importorskip("triton")
    from types import SimpleNamespace

    from streamgen.kernels import triton_attention

    keys = triton_attention._attention_kernel.keys
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)

    def key(**on):  # the autotuner's key: its keys' values in order, then the tensors' dtypes
        values = {"HEAD_DIM": 128, "LQ_BUCKET": 8192, "LK_BUCKET": 65536, **on}
        return (*(values.get(k, False) for k in keys), "torch.bfloat16", "torch.float32")

    fp8_key = key(FP8_QK=True, FP8_PV=True, LK_BUCKET=2048)
    tuner = SimpleNamespace(keys=keys, cache={key(): big, fp8_key: small})
    timings = {fp8_key: {big: [0.9, 0.8, 1.0], small: [0.4, 0.3, 0.5]}}  # tuned while recorded
    assert bench.attention_tiles(tuner, timings) == {
        "q8192 k65536": {"tile": "128x128 w8 s3"},
        "FP8_QK FP8_PV q8192 k2048": {
            "tile": "64x32 w4 s2",
            "tile_ms": {"128x128 w8 s3": 0.9, "64x32 w4 s2": 0.4},
        },
    }


def test_recording_tunings_keeps_each_tuning_and_restores_the_launch(bench):
    """Triton keeps only the last tuning's timings: bench gpu's streams record each, by key."""
    tuner = StandInTuner()
    tuner.run("before")  # tuned before the recording: not in it
    with bench.recording_tunings(tuner) as recorded:
        assert [tuner.run(k) for k in ("a", "a", "b")] == ["a", "a", "b"]
        tuner.run("single", benchmarks=False)
    assert recorded == {"a": {"config": [2.0]}, "b": {"config": [3.0]}}
    assert "run" not in vars(tuner)  # the class's run again


@pytest.mark.parametrize("case", ["attention_stream_fp8_qk", "attention_stream_fp8"])
def test_fp8_attention_from_a_kv_cache_is_timed_and_gives_the_same_output(bench, case):
    """(On a GPU `run` adds it to the FP8 cases' `triton` entry; here the CPU's emulation.)"""
    import torch

    shapes, device = bench.kernel_shapes(True), torch.device("cpu")
    _eager, _op, args, nbytes, flops = bench.kernel_cases(shapes, device, torch.float32)[case]
    out = bench.fp8_from_kv_cache(args, shapes, nbytes, flops, device, True)
    assert out["ms"] > 0 and out["gflop_per_s"] > 0
    assert out["max_abs_diff_vs_every_call"] == 0


def test_the_command_s_help_names_the_command(capsys):
    """`streamgen bench kernels --help` said `usage: __main__.py`, and its options were not checked
    as every other benchmark's are."""
    from streamgen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "kernels", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: streamgen bench kernels [-h] [--json]")


def test_the_help_says_the_defaults_that_depend_on_the_device(capsys):
    """--compile and --no-compile were listed side by side with no word of which is the default (it
    is the device's: on CUDA compiled, on a CPU not), nor what --dtype and --device default to."""
    import argparse

    from bench.kernels import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    said = {a.option_strings[0]: a.help or "" for a in parser._actions if a.option_strings}
    assert "default on CUDA" in said["--compile"] and "default on a CPU" in said["--no-compile"]
    assert "bfloat16 on CUDA, float32 on a CPU" in said["--dtype"] and "needs --quick" in said["--device"]


def test_only_without_a_case_is_refused(capsys):
    # `--only` and no name took zero values: an empty list that ran every case, as if not given
    err = refused(capsys, "bench", "kernels", "--json", "--device", "cpu", "--quick", "--only")
    assert "argument --only: expected at least one argument" in err, err


def test_cuda_timings_run_on_the_device_timed(bench, monkeypatch):
    """triton's do_bench records its events on, and waits for, the current device (cuda:0 unless
    set): `--device cuda:1` timed the calls' launches, not their kernels. It runs on the device."""
    import contextlib

    import triton.testing

    current = ["cuda:0"]

    @contextlib.contextmanager
    def device(d):
        was, current[0] = current[0], str(torch.device(d))
        try:
            yield
        finally:
            current[0] = was

    seen = []
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: seen.append(current[0]) or 1.0)
    assert bench._time_ms(lambda: None, torch.device("cuda:1"), quick=True) == 1.0
    assert seen == ["cuda:1"]
