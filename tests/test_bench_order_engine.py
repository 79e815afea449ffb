"""`bench engine`'s ratios from arms in a balanced order (bench/rounds.py), under stubbed clocks: a
load that rises steadily through a run must favour no arm."""

import pytest

from bench import engine, engine_baselines
from tests.test_bench_order import drifting


class DriftingSession:
    """`session_speed` for arms equally fast on a machine that slows steadily: its n-th call's fps
    (and first_chunk_ms) one worse than the one before. `kwargs`: what each call was asked."""

    def __init__(self):
        self.kwargs = []

    def __call__(self, model, height, width, steps, chunks, **kwargs):
        self.kwargs.append(kwargs)
        n = len(self.kwargs)
        return {"fps": 100.0 - n, "first_chunk_ms": 10.0 + n}


@pytest.fixture
def session_speed(monkeypatch) -> DriftingSession:
    fake = DriftingSession()
    monkeypatch.setattr(engine, "session_speed", fake)
    return fake


def test_the_session_arms_take_turns_so_a_drift_favours_neither(session_speed):
    # in the order A B, A B the arm timed second was always the slower: auto_speedup 0.99 for two
    # equally fast ways
    got = engine.cpu_threads_speedup(None, 64, 64, 4, 5, rounds=4)
    assert [k["cpu_threads"] for k in session_speed.kwargs] == ["all", "auto", "auto", "all"] * 2
    assert got["auto_speedup"] == 1.0 and got["fps"] == got["auto_fps"] == 95.5
    # fps 99 / 98, 97 / 96, 95 / 94, 93 / 92 (auto over all)
    rounds = got["auto_speedup_rounds"]
    assert rounds["ratios"] == [round(98 / 99, 3), round(97 / 96, 3), round(94 / 95, 3), round(93 / 92, 3)]
    assert rounds["min"] == round(94 / 95, 3) and rounds["max"] == round(93 / 92, 3)
    assert rounds["median"] == round((98 / 99 + 97 / 96) / 2, 3)


def test_a_time_ratio_is_the_slower_arms_time_over_the_faster_ones(session_speed):
    # first_chunk_ms: a time, so float32's over bfloat16's; rounds 1 (float32 11, bfloat16 12) and
    # 2 (bfloat16 13, float32 14)
    got = engine.float32_speedup(None, 64, 64, 4, 5, "encode_dtype", key="first_chunk_ms")
    assert [k.get("encode_dtype") for k in session_speed.kwargs] == [engine.torch.float32, None, None,
                                                                     engine.torch.float32]  # fmt: skip
    assert got["first_chunk_ms"] == got["bfloat16_first_chunk_ms"] == 12.5 and got["bfloat16_speedup"] == 1.0
    assert got["bfloat16_speedup_rounds"]["ratios"] == [round(11 / 12, 3), round(14 / 13, 3)]


def test_the_batch_and_the_streams_alone_take_turns(monkeypatch):
    # per chunk the batch, then the streams alone: spans 1 3 against 2 4 made equal ways 1.5x apart
    import types

    import streamgen.stream_batch as stream_batch

    class Session:
        frames_per_chunk = 8
        cfg = types.SimpleNamespace(window_frames=4, frames_per_chunk=2)

        def __init__(self, *args, **kwargs):
            pass

        def start(self, *args, **kwargs):
            pass

        def push_audio(self, pcm):
            pass

        def next_chunk(self):
            pass

    monkeypatch.setattr(engine, "StreamSession", Session)
    monkeypatch.setattr(stream_batch, "next_chunks", lambda sessions: None)
    drifting(monkeypatch, engine)
    got = engine.batch_throughput(None, 64, 64, 4, sessions=3, chunks=2)
    assert got["batch_speedup"] == 1.0 and got["batched_fps_total"] == got["sequential_fps_total"]
    assert got["batch_speedup_rounds"] == {"ratios": [2.0, 0.75], "median": 1.375, "min": 0.75, "max": 2.0}


def test_compiled_and_eager_take_turns(monkeypatch, session_speed):
    import streamgen.model.compile as compile_module

    backends = []
    monkeypatch.setattr(engine, "session_dit", lambda model, hw: None)
    monkeypatch.setattr(compile_module, "compiled_backend", lambda dit: None)
    monkeypatch.setattr(compile_module, "compile_blocks", lambda dit, backend="inductor": backends.append(backend))
    model = type("Model", (), {"vae": type("VAE", (), {"latent_hw": staticmethod(lambda h, w: (8, 8))})})
    got = engine.compile_speedup(model, 64, 64, 4, 5, rounds=2)
    # compiled for the warm-up, then eager, compiled | compiled, eager, and the eager blocks restored
    assert backends == ["inductor", None, "inductor", "inductor", None, None]
    assert got["speedup"] == 1.0 and got["eager_fps"] == got["compiled_fps"] == 96.5
    assert got["speedup_rounds"]["ratios"] == [round(97 / 98, 3), round(96 / 95, 3)]


def test_compiles_default_rounds_balance_its_medians(monkeypatch, session_speed):
    # 3 rounds (eager, compiled | compiled, eager | eager, compiled): each way's median was its
    # run in the middle round, where compiled ran first (1.011x for two equal ways)
    import streamgen.model.compile as compile_module

    monkeypatch.setattr(engine, "session_dit", lambda model, hw: None)
    monkeypatch.setattr(compile_module, "compiled_backend", lambda dit: None)
    monkeypatch.setattr(compile_module, "compile_blocks", lambda dit, backend="inductor": None)
    model = type("Model", (), {"vae": type("VAE", (), {"latent_hw": staticmethod(lambda h, w: (8, 8))})})
    got = engine.compile_speedup(model, 64, 64, 4, 5)
    assert got["speedup"] == 1.0 and got["eager_first_chunk_ms"] == got["compiled_first_chunk_ms"]


@pytest.fixture(scope="module")
def debug_model():
    from streamgen.models import load_model

    return load_model("debug")


def test_the_last_steps_dit_and_the_reencodes_take_turns(monkeypatch, session_speed, debug_model):
    # each rep re-encode then last step: past the first quarter spans 3 5 7 9 against 4 6 8 10
    drifting(monkeypatch, engine)
    got = engine.cache_from_speedup(debug_model, 32, 32, 2, 3, reps=5)
    assert got["last_step_speedup"] == 1.0 and got["last_step_dit_speedup"] == 1.0
    assert got["reencode_dit_ms"] == got["last_step_dit_ms"] == 6500.0
    # reps 1-4: last step 3, 6, 7, 10 (the first quarter's 2 left out) against re-encode 4, 5, 8, 9
    assert got["last_step_dit_speedup_rounds"]["ratios"] == [round(4 / 3, 3), round(5 / 6, 3), round(8 / 7, 3), 0.9]


def test_the_dits_default_reps_balance_its_medians(monkeypatch, session_speed, debug_model):
    # the 15 reps past the first quarter of 20: each way's median was the middle rep's alone, in
    # which the re-encode ran first (0.962x for two equal ways); 14 have reverse orders in the middle
    drifting(monkeypatch, engine)
    got = engine.cache_from_speedup(debug_model, 32, 32, 2, 3)
    assert got["last_step_dit_speedup"] == 1.0 and len(got["last_step_dit_speedup_rounds"]["ratios"]) == 14


def test_cached_and_recomputed_chunks_take_turns(monkeypatch, debug_model):
    # each chunk cached, then recomputed: spans 1 3 against 2 4, a 1.5x "speedup" from the order
    drifting(monkeypatch, engine_baselines)
    latent_hw = debug_model.vae.latent_hw(32, 32)
    got = engine_baselines.cache_speedup(debug_model, latent_hw, 2, 2, 2)
    assert got["cache_speedup"] == 1.0 and got["cache_max_abs_diff"] < 1e-3
    assert got["cache_speedup_rounds"]["ratios"] == [2.0, 0.75]


def test_an_odd_number_of_chunks_is_timed_as_one_more(monkeypatch, debug_model):
    # 3 chunks (cached first, recomputed first, cached first): spans 1 4 5 against 2 3 6, 1.1x
    drifting(monkeypatch, engine_baselines)
    latent_hw = debug_model.vae.latent_hw(32, 32)
    got = engine_baselines.cache_speedup(debug_model, latent_hw, 2, 3, 2)
    assert got["cache_speedup"] == 1.0 and len(got["cache_speedup_rounds"]["ratios"]) == 4


def test_each_student_step_count_is_timed_as_far_before_the_teacher_as_after(monkeypatch, debug_model):
    # the warm-up's span 1, the students' 2 3 4, the teacher's 5, then the students again: in
    # the same order (6 7 8) 4 steps came out 1.25x and 1 step 0.83x for equally fast students
    drifting(monkeypatch, engine_baselines)
    latent_hw = debug_model.vae.latent_hw(32, 32)
    got = engine_baselines.teacher_speedup(debug_model, latent_hw, 2, [4, 2, 1], teacher_steps=2)
    assert got["teacher_speedup"] == got["teacher_speedup_2step"] == got["teacher_speedup_1step"] == 1.0
    assert got["teacher_speedup_rounds"]["ratios"] == [2.5, 0.625]
    assert got["teacher_speedup_1step_rounds"]["ratios"] == [1.25, round(5 / 6, 3)]
