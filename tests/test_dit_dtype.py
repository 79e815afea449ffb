"""A session's DiT dtype: "auto" runs a shared bfloat16 copy of a float32 DiT where that is faster
on the CPU (streamgen.precision.default_dit_dtype), and keeps a dtype that was asked for."""

import numpy as np
import pytest
import torch

import streamgen.cpu_threads as cpu_threads
import streamgen.models as models
import streamgen.precision as precision
from streamgen.cpu_threads import chunk_forward_flop
from streamgen.model.float8 import float8_linears
from streamgen.models import load_model
from streamgen.stream import StreamSession
from streamgen.stream_batch import next_chunks

BF16 = {"atol": 0.0, "rtol": 2**-8}  # bfloat16 rounding of the float32 weights


def face(seed=0, size=64):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def speech(seconds=3.0):
    return (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def native_bfloat16(monkeypatch, present: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: present)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: present)


@pytest.fixture
def model(monkeypatch):
    monkeypatch.delenv(models.DTYPE_ENV, raising=False)
    return load_model("debug")


def chunk_flop(model, size=64):
    return chunk_forward_flop(model.dit, model.vae.latent_hw(size, size), model.cfg.frames_per_chunk)


def test_auto_runs_bfloat16_from_the_threshold_on_cpus_with_native_bfloat16(model, monkeypatch):
    native_bfloat16(monkeypatch, True)
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", chunk_flop(model))
    a, b = StreamSession(model), StreamSession(model, dtype="auto")
    assert a.dtype == torch.bfloat16 and a.dit is b.dit  # one copy, shared by the model's sessions
    assert a.dit is not model.dit and next(model.dit.parameters()).dtype == torch.float32
    assert a.dit.blocks[0].ffn.up.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        a.dit.blocks[0].ffn.up.weight.float(), model.dit.blocks[0].ffn.up.weight, **BF16
    )
    assert StreamSession(model, dtype="bfloat16").dit is a.dit  # the command-line names
    for kept in (None, torch.float32, "float32"):  # the model's own, or float32 asked for
        s = StreamSession(model, dtype=kept)
        assert s.dit is model.dit and s.dtype == torch.float32
    # below the threshold, or without native bfloat16: float32
    assert StreamSession(model, height=32, width=32).dit is model.dit
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", chunk_flop(model) + 1)
    assert StreamSession(model).dit is model.dit
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", 0)
    native_bfloat16(monkeypatch, False)
    assert StreamSession(model).dit is model.dit
    with pytest.raises(ValueError, match="dtype must be one of"):
        StreamSession(model, dtype="float16")


def bfloat16_without_amx(monkeypatch) -> None:
    """AVX512-BF16 and no AMX tiles: the AMD EPYC (Zen 4) of some of this farm's machines."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)


def test_without_amx_auto_keeps_the_dit_in_float32_and_decodes_in_bfloat16(model, monkeypatch):
    """On AVX512-BF16 alone a bfloat16 DiT gained at most 1.04x (224x224) and lost up to 0.90x
    (320x320) on its best threads, and the float32 DiT ran the session 1.21x / 1.35x faster at
    320 / 384 than the bfloat16 one on AMX's rules; the decoder and the reference encoder still
    gain (1.19-1.41x, 1.15-1.32x)."""
    bfloat16_without_amx(monkeypatch)
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", 0)
    s = StreamSession(model)
    assert s.dit is model.dit and s.dtype == torch.float32
    assert next(getattr(s.vae, s.vae.DECODER[0]).parameters()).dtype == torch.bfloat16
    assert StreamSession(model, dtype="bfloat16").dtype == torch.bfloat16  # asked for: still given


def test_without_amx_a_bfloat16_dit_goes_parallel_where_float32_does(model, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bfloat16_without_amx(monkeypatch)
        s16 = StreamSession(model, dtype="bfloat16")
        flop = chunk_flop(model)
        monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP", flop)
        monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP_HALF", flop + 1)
        with s16.stage_threads("denoise"):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_auto_keeps_a_dtype_asked_for_and_an_fp8_dit(monkeypatch):
    native_bfloat16(monkeypatch, True)
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", 0)
    monkeypatch.delenv(models.DTYPE_ENV, raising=False)
    assert StreamSession(load_model("debug")).dtype == torch.bfloat16
    asked = load_model("debug", dtype=torch.float32)  # `--dtype float32`, or a caller's choice
    assert asked.dtype_asked and StreamSession(asked).dit is asked.dit
    monkeypatch.setenv(models.DTYPE_ENV, "float32")  # what `serve --dtype float32` leaves its model process
    assert StreamSession(load_model("debug")).dtype == torch.float32
    monkeypatch.delenv(models.DTYPE_ENV)
    fp8 = load_model("debug")
    float8_linears(fp8.dit)
    assert StreamSession(fp8).dit is fp8.dit
    with pytest.raises(ValueError, match="FP8 DiT runs in the dtype it was loaded in"):
        fp8.dit_in(torch.bfloat16)


def test_a_bfloat16_session_streams_the_float32_frames_and_batches(model, monkeypatch):
    native_bfloat16(monkeypatch, True)
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", 0)
    frames = {}
    for dtype in ("float32", "auto"):
        s = StreamSession(model, dtype=dtype, decode_dtype=torch.float32)
        s.start(face(), seed=3)
        s.push_audio(speech())
        frames[dtype] = np.concatenate([s.next_chunk()[0] for _ in range(3)]).astype(int)
    assert s.dtype == torch.bfloat16
    diff = np.abs(frames["float32"] - frames["auto"])
    assert diff.max() <= 4 and diff.mean() < 0.5
    # two bfloat16 sessions of one size share the copy, so their steps run as one batch
    sessions = []
    for i in range(2):
        s = StreamSession(model, decode_dtype=torch.float32)
        s.start(face(i), seed=i)
        s.push_audio(speech())
        sessions.append(s)
    forwards = []
    forward = sessions[0].dit.forward
    monkeypatch.setattr(
        sessions[0].dit, "forward", lambda x, *a, **k: forwards.append(len(x)) or forward(x, *a, **k)
    )
    next_chunks(sessions)
    assert 2 in forwards


def test_a_bfloat16_dit_goes_parallel_at_its_own_threshold(model, monkeypatch):
    """bfloat16's products are faster and its per-operator cost is not: two threads pay later."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native_bfloat16(monkeypatch, True)
        monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", 0)
        s32, s16 = StreamSession(model, dtype="float32"), StreamSession(model)
        flop = chunk_flop(model)
        monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP", flop)
        monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP_HALF", flop + 1)
        with s32.stage_threads("denoise"):
            assert torch.get_num_threads() == 2
        with s16.stage_threads("denoise"):
            assert torch.get_num_threads() == 1
        monkeypatch.setattr(cpu_threads, "DIT_PARALLEL_FLOP_HALF", flop)
        with s16.stage_threads("denoise"):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# The fewest of each: these tests check which DiT each timing runs on, not the timings. Every stage
# on all threads ("all", as `bench --cpu-threads all`), which is one in these tests (`one_thread`):
# under "auto" each size was timed against "all" too (cpu_threads_all, four more timed sessions), of
# which these tests check nothing
BENCH_SIZES = dict(steps=2, chunks=2, context=4, teacher_frames=2, decode_dtype=torch.float32, cpu_threads="all")


@pytest.mark.usefixtures("one_thread")
def test_bench_engine_times_a_bfloat16_dit_against_float32(model, monkeypatch):
    import bench.engine as engine

    native_bfloat16(monkeypatch, True)
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", 0)
    baselines = {}  # the DiT each baseline ran on

    def recording(name):
        real = getattr(engine, name)

        def run(*args, **kwargs):
            baselines[name] = next(kwargs["dit"].parameters()).dtype
            return real(*args, **kwargs)

        return run

    for name in ("cache_speedup", "teacher_speedup"):
        monkeypatch.setattr(engine, name, recording(name))
    m = engine.measure_size(model, 32, 32, **BENCH_SIZES)
    assert m["dit_dtype"] == "bfloat16"
    assert m["dit_float32"]["fps"] > 0 and m["dit_float32"]["bfloat16_speedup"] > 0
    # the baselines run on the session's DiT: cached and recomputed agree to bf16's rounding
    assert baselines == {"cache_speedup": torch.bfloat16, "teacher_speedup": torch.bfloat16}
    assert m["cache_max_abs_diff"] <= 0.1
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", float("inf"))
    m = engine.measure_size(model, 32, 32, **BENCH_SIZES)
    assert m["dit_dtype"] == "float32" and "dit_float32" not in m
    assert baselines == {"cache_speedup": torch.float32, "teacher_speedup": torch.float32}


@pytest.mark.usefixtures("one_thread")
def test_bench_engine_without_amx_times_float32_against_a_bfloat16_dit_where_amx_would_run_one(
    model, monkeypatch
):
    import bench.engine as engine

    bfloat16_without_amx(monkeypatch)
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", 0)
    m = engine.measure_size(model, 32, 32, **BENCH_SIZES)
    assert m["dit_dtype"] == "float32" and "dit_float32" not in m
    assert m["dit_bfloat16"]["fps"] > 0 and m["dit_bfloat16"]["bfloat16_fps"] > 0
    monkeypatch.setattr(precision, "DIT_BFLOAT16_FLOP", float("inf"))  # below it: nothing to compare
    assert "dit_bfloat16" not in engine.measure_size(model, 32, 32, **BENCH_SIZES)


def test_a_dtype_no_model_runs_in_is_a_value_error_that_names_it(model):
    """StreamSession(dtype=torch.int8) was a raw TypeError from inside nn.Module.to; complex and
    float8 dtypes loaded and failed at the first chunk; a number a TypeError of `to`."""
    for wrong in (torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=f"dtype must be a floating-point dtype.*{wrong}"):
            StreamSession(model, dtype=wrong)
        with pytest.raises(ValueError, match="floating-point"):
            load_model("debug", dtype=wrong)
        with pytest.raises(ValueError, match="decode dtype must be a floating-point"):
            StreamSession(model, decode_dtype=wrong)
        with pytest.raises(ValueError, match="encode dtype must be a floating-point"):
            StreamSession(model, encode_dtype=wrong)
    with pytest.raises(ValueError, match="dtype must be a torch dtype"):
        StreamSession(model, dtype=5)
    with pytest.raises(ValueError, match="decode dtype must be a torch dtype"):
        StreamSession(model, decode_dtype=16)
    assert StreamSession(model, dtype=torch.float16).dtype == torch.float16  # a float dtype still runs


def test_serves_dtype_help_says_what_auto_is_on_a_gpu(model, monkeypatch):
    """`serve --help` said '--dtype auto: ...; bfloat16 on GPUs', where auto keeps the model's own
    dtype on a GPU (float32 for ours): `serve --device cuda` ran a float32 DiT its help said was not."""
    import argparse

    from server.cli import add_arguments

    native_bfloat16(monkeypatch, True)
    assert precision.default_dit_dtype(model, "cuda", (16, 16), amx=True) is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = next(a.help for a in parser._actions if "--dtype" in a.option_strings)
    assert "bfloat16 on GPUs" not in help_text and "on a GPU the model's own" in help_text
