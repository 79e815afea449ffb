"""`streamgen bench engine` with the speed options its users combine: every figure it can measure
is kept, and one that cannot be measured here says why (in the JSON) instead of losing the rest."""

import json

import pytest
import torch
from cli_helpers import streamgen_without_a_compiler

import bench.engine as engine
import streamgen.models as models
from streamgen.models import load_model


def test_one_step_measures_the_session_and_skips_only_the_last_step_cache(monkeypatch):
    # a 1-step session cannot keep its last step's keys and values (it sees only noise): the
    # comparison raised StreamSession's ValueError after the session was measured, losing the run
    monkeypatch.delenv(models.DTYPE_ENV, raising=False)
    model = load_model("debug")
    m = engine.measure_size(
        model, 32, 32, steps=1, chunks=2, context=4, teacher_frames=2, decode_dtype=torch.float32
    )
    assert m["fps"] > 0 and m["cache_speedup"] > 0 and m["teacher_speedup"] > 0
    assert "a 1-step chunk" in m["cache_from_last_step"]["skipped"]


@pytest.mark.slow
def test_a_compile_that_fails_is_said_in_the_json_and_the_eager_figures_stand(tmp_path):
    # measured last, after every eager figure: without a C++ compiler its traceback lost them all.
    # (One step and every stage on all threads: the last step's cache and the threads' arm are
    # eager figures this test does not read, ~4 of its run's ~15 CPU s; the compile is the same.)
    r = streamgen_without_a_compiler(
        tmp_path, "bench", "engine", "--json", "--model", "debug", "--height", "32", "--width", "32",
        "--chunks", "2", "--context", "4", "--teacher-frames", "2", "--batch-sessions", "2", "--steps", "1",
        "--cpu-threads", "all", "--compile",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["fps"] > 0 and result["batched_fps_total"] > 0
    error = result["compile"]["error"]
    assert "C++ compiler" in error and "\n" not in error


def test_a_teacher_is_refused_in_one_line(capsys):
    from streamgen.cli import main

    assert main(["bench", "engine", "--json", "--model", "tiny-avatar-teacher"]) == 2  # was a traceback
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("streamgen bench engine: error: tiny-avatar-teacher is a bidirectional teacher")


def test_a_model_larger_than_the_memory_is_refused_in_one_line(monkeypatch, capsys):
    # wan2.1-14b on this machine: load_model's ValueError, a traceback
    from streamgen.cli import main

    monkeypatch.setattr(models, "free_memory", lambda: 2**30)
    assert main(["bench", "engine", "--json", "--model", "wan2.1-1.3b"]) == 2
    captured = capsys.readouterr()
    lines = [x for x in captured.err.strip().splitlines() if "no trained weights" not in x]
    assert captured.out == "" and lines == [lines[0]], captured.err
    assert lines[0].startswith("streamgen bench engine: error: wan2.1-1.3b: its DiT takes"), captured.err


def test_the_json_names_the_precision_and_attention_the_environment_chose(monkeypatch):
    # STREAMGEN_FP8 / STREAMGEN_ATTENTION / STREAMGEN_DTYPE, exported for a whole shell, changed
    # every figure while the JSON said "dtype": "auto" and named neither FP8 nor the backend
    monkeypatch.setenv(models.FP8_ENV, "1")
    monkeypatch.setenv(models.ATTENTION_ENV, "fp8_qk")
    monkeypatch.setenv(models.DTYPE_ENV, "bfloat16")
    # (ratio_chunks=1: each ratio's arms still run, a chunk each, not the floor's 5; none is read here)
    r = engine.run(
        "debug", 32, 32, steps=2, chunks=1, context=4, teacher_frames=2, batch_sessions=1, ratio_chunks=1
    )
    assert r["dtype"] == "bfloat16" and r["dit_dtype"] == "bfloat16"
    assert r["attention"] == "fp8_qk" and r["fp8_linears"] > 0
    assert r["environment"][models.FP8_ENV] == "1" and r["cache_from"] in ("reencode", "last_step")
    json.dumps(r)


def test_sweep_without_a_size_is_refused(monkeypatch, capsys):
    # `--sweep` and no size took zero values and ran no sweep, with exit 0 and not a word
    from streamgen.cli import main

    monkeypatch.setattr(engine, "run", lambda *args: {"sweep": list(args[7])})  # (not the minutes' measure)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "engine", "--json", "--model", "debug", "--sweep"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == "", captured.err
    assert "argument --sweep: expected at least one argument" in captured.err, captured.err


def test_batched_throughput_times_the_batch_warmed_as_the_streams_alone_are(monkeypatch):
    # the streams alone had run their shapes before they were timed (they filled their rings one
    # by one); the batch's first forward at its batch size, its first-call allocations, was timed
    # in its sum. A stubbed clock: a session's chunk alone costs 1, a batch of 3 costs 2, and the
    # batch's first call 100
    import types

    import streamgen.stream_batch as stream_batch

    clock = [0.0]
    cfg = types.SimpleNamespace(window_frames=4, frames_per_chunk=2)

    class Session:
        frames_per_chunk = 8

        def __init__(self, *args, **kwargs):
            self.cfg = cfg

        def start(self, *args, **kwargs):
            pass

        def push_audio(self, pcm):
            pass

        def next_chunk(self):
            clock[0] += 1.0

    batched_calls = []

    def next_chunks(sessions):
        clock[0] += 100.0 if not batched_calls else 2.0
        batched_calls.append(len(sessions))

    monkeypatch.setattr(engine, "StreamSession", Session)
    monkeypatch.setattr(stream_batch, "next_chunks", next_chunks)
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    got = engine.batch_throughput(None, 64, 64, 4, sessions=3, chunks=6)
    assert got["batch_speedup"] == 1.5  # 3 chunks alone against a batch's 2
    assert got["batched_fps_total"] == 12.0 and got["sequential_fps_total"] == 8.0  # 24 frames in 2 and 3


def test_the_chunks_each_size_and_ratio_times_are_said_in_help_and_json(monkeypatch):
    # each --sweep size and every ratio arm timed half of --chunks (at least 5), which neither
    # --chunks' help nor the JSON said
    import argparse

    timed = []

    def session_speed(model, height, width, steps, chunks, **kwargs):
        timed.append((height, chunks))
        return {"fps": 30.0, "first_chunk_ms": 1.0}

    monkeypatch.setattr(engine, "session_speed", session_speed)
    monkeypatch.setattr(engine, "cache_speedup", lambda *args, **kwargs: {"cache_speedup": 2.0})
    monkeypatch.setattr(engine, "teacher_speedup", lambda *args, **kwargs: {"teacher_speedup": 2.0})
    monkeypatch.setattr(engine, "batch_throughput", lambda *args, **kwargs: {})
    # (the last step's cache's DiT part: 40 real chunk forwards a run, whose times are not read here)
    monkeypatch.setattr(engine, "generate_chunk", lambda *args, **kwargs: None)
    result = engine.run("debug", 32, 32, steps=2, chunks=24, context=4, teacher_frames=2, sweep=(48,))
    assert (result["timed_chunks"], result["ratio_chunks"]) == (24, 12)
    (size,) = result["resolution_sweep"]
    assert (size["timed_chunks"], size["ratio_chunks"]) == (12, 6)
    assert {c for h, c in timed if h == 32} == {24, 12} and {c for h, c in timed if h == 48} == {12, 6}
    timed.clear()  # --ratio-chunks: that many for each --sweep size and each ratio's arm, below the floor too
    result = engine.run(
        "debug", 32, 32, steps=2, chunks=24, context=4, teacher_frames=2, sweep=(48,), ratio_chunks=3
    )
    assert (result["timed_chunks"], result["ratio_chunks"]) == (24, 3)
    (size,) = result["resolution_sweep"]
    assert (size["timed_chunks"], size["ratio_chunks"]) == (3, 3)
    assert {c for h, c in timed if h == 32} == {24, 3} and {c for h, c in timed if h == 48} == {3}
    parser = argparse.ArgumentParser()
    engine.add_arguments(parser)
    chunks = next(a for a in parser._actions if "--chunks" in a.option_strings)
    assert "half" in chunks.help and "at least 5" in chunks.help and "ratio_chunks" in chunks.help
    assert "--ratio-chunks" in chunks.help and parser.parse_args(["--ratio-chunks", "2"]).ratio_chunks == 2
