"""What the docs say a command writes is what it writes: the files and their fields."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def eval_outputs_documented() -> tuple[set[str], set[str]]:
    """docs/eval.md's "Outputs:" sentence: report.json's keys, and the files written beside it."""
    text = (ROOT / "docs" / "eval.md").read_text()
    outputs = text.split("\nOutputs: ", 1)[1].split(". ", 1)[0]
    keys = re.search(r"keys `([^`]+)`, plus ((?:`\w+`(?:,| and| )*)+)", outputs)
    assert keys, outputs
    named = set(keys.group(1).split()) | set(re.findall(r"`(\w+)`", keys.group(2)))
    files = set(re.findall(r"`([\w.]+\.(?:json|md|png))`", outputs))
    return named, files


@pytest.mark.slow  # about 7 s: generates and scores a clip
def test_the_eval_reports_keys_and_files_are_those_the_doc_lists(tmp_path):
    """docs/eval.md listed 12 of report.json's 21 keys as if they were all of them (`model`, `split`,
    `size`, `cache_from`, `dtype`, `encode_dtype`, `drift_source`, `colour_drift_slope` and
    `wall_seconds` were not said): the keys and files of a run are those it lists."""
    from streamgen.cli import main

    out = tmp_path / "gt"
    assert main(["eval", "--model", "ground-truth", "--clips", "1", "--out", str(out)]) == 0
    keys, files = eval_outputs_documented()
    assert sorted(json.loads((out / "report.json").read_text())) == sorted(keys)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(files)


def model_json_keys_documented() -> dict[str, set[str]]:
    """docs/distill.md's `model.json` keys: every export's, a teacher's and a Self-Forcing student's."""
    text = (ROOT / "docs" / "distill.md").read_text()
    said = text.split("`model.json` (keys ", 1)[1].split("), `dit.safetensors`", 1)[0]
    every = set(re.match(r"`([^`]+)`", said).group(1).split())
    teacher = set(re.search(r"a teacher's also `([^`]+)`", said).group(1).split())
    student = set(re.search(r"a Self-Forcing\s+student's `([^`]+)`", said).group(1).split())
    return {"teacher": every | teacher, "student-ode": every, "student": every | student}


@pytest.mark.slow  # about 20 s: a debug teacher, its ODE student and a Self-Forcing one, a step each
def test_an_exported_model_json_holds_the_keys_the_doc_lists(tmp_path):
    """docs/distill.md said a model.json held 'config, size, steps; trained_steps': its kind (which
    eval, generate and the stages read to tell a teacher), stage, shift, a teacher's cfg_scale and
    motion_prefix_frames and a Self-Forcing student's cache_from were not said."""
    from test_distill_helpers import debug_config, run

    teacher = tmp_path / "teacher" / "model"
    run(debug_config("teacher", tmp_path / "teacher", **{"run.steps": 1}))
    run(debug_config("ode", tmp_path / "ode", teacher=teacher, init=teacher, **{"run.steps": 1}))
    ode = tmp_path / "ode" / "model"
    run(debug_config("self_forcing", tmp_path / "sf", teacher=teacher, init=ode, **{"run.steps": 1}))
    written = {}
    for folder in (teacher, ode, tmp_path / "sf" / "model"):
        meta = json.loads((folder / "model.json").read_text())
        written[meta["kind"]] = set(meta)
    assert written == model_json_keys_documented()


def test_a_shards_clip_holds_the_members_and_meta_keys_the_doc_lists(tmp_path):
    """docs/data.md's `.meta` of a clip left out its index, seed and speech_offset (the silence before
    the speech): the members of a clip and its meta's keys are those the doc lists."""
    import numpy as np

    from streamgen.cli import main

    text = (ROOT / "docs" / "data.md").read_text().split("Per clip i\nof a shard:", 1)[1]
    members = set(re.findall(r"`(?:\{i:04d\})?\.(\w+)`", text.split("Latent caches", 1)[0]))
    keys = set(re.search(r"`\.meta` \(JSON, keys `([^`]+)`", text).group(1).split())
    out = tmp_path / "world"
    argv = ["data", "make", "--out", str(out), "--clips", "1", "--seconds", "0.2", "--size", "16", "--workers", "1"]
    assert main(argv) == 0
    shard = np.load(out / "test" / "shard-00000.npz")
    assert {name.split(".")[1] for name in shard.files if name != "made_for"} == members
    assert set(json.loads(shard["0000.meta"].tobytes())) == keys
