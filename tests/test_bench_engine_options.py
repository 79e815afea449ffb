"""`streamgen bench engine` with the speed options its users combine: every figure it can measure
is kept, and one that cannot be measured here says why (in the JSON) instead of losing the rest."""

import torch

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
