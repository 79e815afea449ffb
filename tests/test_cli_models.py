"""`streamgen models`: the models a --model NAME can name, where each is from, its flavor and size
(the list was only in the unknown-model message, without any of that)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from streamgen.cli import main
from streamgen.model.config import FLAVORS


def _model_dir(folder, kind="teacher", size=32):
    """A model directory as far as the listing reads it: model.json and the DiT's weights (17 values)."""
    folder.mkdir(parents=True)
    meta = {"name": folder.name, "config": FLAVORS["debug"].to_dict(), "kind": kind, "height": size, "width": size}
    (folder / "model.json").write_text(json.dumps(meta))
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float16)}, str(folder / "dit.safetensors"))
    return folder


@pytest.fixture
def listed(tmp_path, monkeypatch, capsys):
    """`streamgen models --json` with a STREAMGEN_MODELS folder of tmp_path's: its models by name."""
    monkeypatch.setenv("STREAMGEN_MODELS", str(tmp_path / "mine"))

    def listed():
        capsys.readouterr()
        assert main(["models", "--json"]) == 0
        out, err = capsys.readouterr()
        entries = json.loads(out)
        assert len({e["name"] for e in entries}) == len(entries), entries  # (each name once)
        return {e["name"]: e for e in entries}, err

    return listed


def test_models_lists_each_model_with_where_it_is_from_and_its_flavor_and_size(tmp_path, listed):
    mine = _model_dir(tmp_path / "mine" / "avatar")
    nested = _model_dir(tmp_path / "mine" / "org" / "student", kind="student", size=48)
    models, err = listed()
    assert err == ""
    assert models["avatar"] == {
        "name": "avatar", "path": str(mine), "from": "STREAMGEN_MODELS", "flavor": "debug", "kind": "teacher",
        "height": 32, "width": 32, "steps": 4, "parameters": 17,
        "weights_bytes": sum(p.stat().st_size for p in mine.iterdir()), "problem": None,
    }  # fmt: skip
    assert models["org/student"]["path"] == str(nested) and models["org/student"]["height"] == 48
    shipped = models["tiny-avatar-teacher"]
    assert shipped["from"] == "shipped" and shipped["kind"] == "teacher" and shipped["steps"] == 50
    assert shipped["flavor"] == "tiny-avatar" and shipped["parameters"] > 10**6
    # a flavor's stand-in: seeded random weights, no folder; the tests' debug flavor is not listed
    assert models["wan2.1-1.3b"]["path"] is None and models["wan2.1-1.3b"]["parameters"] > 10**9
    assert "debug" not in models


def test_a_flavors_stand_in_teacher_is_listed_as_the_teacher_it_loads(listed):
    """`--model wan2.1-1.3b-teacher` loads that flavor's teacher on seeded random weights (the
    README's model table), but the list of what a --model NAME can name left every such name out."""
    from streamgen.models import model_kind, model_settings

    models, _ = listed()
    for flavor in ("wan2.1-1.3b", "wan2.1-14b"):
        teacher = models[f"{flavor}-teacher"]
        assert teacher["path"] is None and "seeded random weights" in teacher["from"]
        assert teacher["flavor"] == flavor and teacher["kind"] == model_kind(f"{flavor}-teacher") == "teacher"
        assert teacher["steps"] == model_settings(f"{flavor}-teacher")["steps"] == 50
        assert teacher["parameters"] == models[flavor]["parameters"]
        assert models[flavor]["kind"] is None  # (the flavor's own stand-in streams as a student)
    # a trained teacher of the flavor's name comes first, listed once, as the one it loads
    assert models["tiny-avatar-teacher"]["from"] == "shipped" and "debug-teacher" not in models


def test_a_name_in_two_folders_is_listed_once_as_the_one_it_loads(tmp_path, listed):
    _model_dir(tmp_path / "mine" / "tiny-avatar", kind="student")  # (before the shipped one)
    models, _ = listed()
    assert models["tiny-avatar"]["from"] == "STREAMGEN_MODELS" and models["tiny-avatar"]["flavor"] == "debug"


def test_a_model_whose_files_do_not_read_is_listed_with_why(tmp_path, listed, capsys):
    broken = _model_dir(tmp_path / "mine" / "broken")
    (broken / "model.json").write_text("{not json")
    models, _ = listed()
    assert "its files do not read" in models["broken"]["problem"] and models["broken"]["flavor"] is None
    assert main(["models"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("broken "))
    assert "its files do not read" in line


def test_the_table_has_a_line_per_model(tmp_path, listed, capsys):
    _model_dir(tmp_path / "mine" / "avatar")
    models, _ = listed()
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "FLAVOR", "KIND"] and len(lines) == 1 + len(models)
    avatar = next(line for line in lines if line.startswith("avatar "))
    assert avatar.split()[1:5] == ["debug", "teacher", "32x32", "4"] and str(tmp_path / "mine" / "avatar") in avatar


def test_a_model_folder_that_cannot_be_read_is_said(tmp_path, monkeypatch, listed):
    (tmp_path / "mine").mkdir()
    from streamgen import model_names

    real = model_names._models_in

    def models_in(root):
        if root == tmp_path / "mine":
            raise PermissionError(13, "Permission denied")
        return real(root)

    monkeypatch.setattr(model_names, "_models_in", models_in)
    models, err = listed()
    assert f"STREAMGEN_MODELS's {tmp_path / 'mine'} cannot be read: Permission denied" in err
    assert "tiny-avatar" in models


@pytest.mark.parametrize("locked_name, model", [("avatar", "avatar"), ("org/avatar", "org/avatar"), ("org", "org/avatar")],
                         ids=["model", "org-model", "org"])
def test_a_folder_in_the_models_folder_that_cannot_be_read_is_said(tmp_path, monkeypatch, listed, locked_name, model):
    """A model folder, or an org's folder of models, of another user's (mode 700) inside
    STREAMGEN_MODELS: its model.json could not be looked at, and the folder was left out of the list
    without a word, where an unreadable models folder itself is said ('cannot be read') and a model
    whose files do not read is listed with why: the user saw no sign of the model that a `--model`
    of its name then called unknown."""
    import errno
    import os
    from pathlib import Path

    mine = tmp_path / "mine"
    _model_dir(mine / "other")
    _model_dir(mine / model)
    locked = mine / locked_name
    real_stat, real_iterdir = Path.stat, Path.iterdir

    def denied(path) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def stat(self, *args, **kwargs):  # (as root, the tests' user here, reads every folder: as chmod 700
        if locked in self.parents:  # of another user's would have it, the folder is there, not what is in it)
            raise denied(self)
        return real_stat(self, *args, **kwargs)

    def iterdir(self):
        if self == locked:
            raise denied(self)
        return real_iterdir(self)

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    models, err = listed()
    assert "other" in models and model not in models
    assert err.count("warning") == 1, err
    assert f"streamgen models: warning: STREAMGEN_MODELS's {locked} cannot be read: Permission denied" in err
