"""bench/kept_kv.py: its "every_forward" arm is the model before the change (each forward of a
chunk computes the audio keys/values again), and it prints one JSON object of both arms."""

import torch

from bench import kept_kv
from streamgen.model.model import Block, CrossAttention
from streamgen.models import load_model


def test_the_arms_compute_the_audio_keys_and_values_once_and_at_every_forward(monkeypatch):
    model = load_model("debug")
    (session,) = kept_kv.started_sessions(model, 1, 32, chunks=2)
    audio_attns = [blk.audio_attn for blk in model.dit.blocks]
    calls = []
    context_kv = CrossAttention.context_kv
    monkeypatch.setattr(
        CrossAttention, "context_kv", lambda self, c: calls.append(self in audio_attns) or context_kv(self, c)
    )
    layers, steps = model.dit.cfg.num_layers, len(session.sigmas)
    for kept, per_chunk in ((True, layers), (False, steps * layers + layers - 1)):
        with kept_kv.audio_kept(kept), torch.no_grad():
            session.next_chunk()  # writes the chunk before's re-encode (kept: computed by its steps)
            session.write_pending_chunk()
        assert sum(calls) == per_chunk, kept
        calls.clear()
    assert Block.kept_kv is kept_kv._KEPT_KV  # restored


def test_it_reports_every_way_of_running_chunks():
    result = kept_kv.run("debug", size=32, batch=2, rounds=2, chunks=2)
    for key in ("one_session", "2_sessions_one_by_one", "2_sessions_batched"):
        arms = result[key]["ms_per_session_chunk"]
        assert arms["kept"] > 0 and arms["every_forward"] > 0 and result[key]["speedup"] > 0
