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
