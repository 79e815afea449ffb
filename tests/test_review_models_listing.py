"""`streamgen models` over a models folder whose entries do not read (streamgen/commands/models.py)."""

from __future__ import annotations

import json

import pytest

from streamgen.cli import main
from streamgen.model.config import FLAVORS


@pytest.mark.parametrize("weights", [b"", b"\x07\x00\x00"], ids=["empty", "three-bytes"])
def test_a_model_whose_weights_file_is_cut_short_is_listed_with_why(tmp_path, monkeypatch, capsys, weights):
    """A dit.safetensors shorter than its header's 8-byte length (a download cut off, a file
    emptied) raised struct.error, which the listing did not take for a file that does not read:
    a traceback, no model listed."""
    folder = tmp_path / "mine" / "cut"
    folder.mkdir(parents=True)
    meta = {"name": "cut", "config": FLAVORS["debug"].to_dict(), "kind": "teacher", "height": 32, "width": 32}
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / "dit.safetensors").write_bytes(weights)
    monkeypatch.setenv("STREAMGEN_MODELS", str(tmp_path / "mine"))
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    entry = next(e for e in json.loads(capsys.readouterr().out) if e["name"] == "cut")
    assert entry["parameters"] is None and "dit.safetensors" in entry["problem"], entry
    assert "no safetensors header" in entry["problem"], entry
