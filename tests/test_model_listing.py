"""The models a name can give, as listed where a name names none (`available_models`)."""

from __future__ import annotations

import pytest


def _model(folder):
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("{}")


def test_nested_models_under_streamgen_models_are_listed_by_their_org_model_names(tmp_path, monkeypatch):
    """`--model org/avatar` loads STREAMGEN_MODELS/org/avatar, but the list of models (an unknown
    model's message) named only the model folders' own models: org/avatar was nowhere in it."""
    from streamgen.models import available_models, require_model, resolve_model_dir

    models = tmp_path / "models"
    _model(models / "plain")
    _model(models / "org" / "avatar")
    _model(models / "org" / "other")
    _model(models / "org" / ".staging")  # (an export's staging folder: no model's name)
    _model(models / "org" / "deeper" / "than" / "one")  # (not looked into: a folder may be a home's)
    (models / "org" / "notes.txt").write_text("not a model")
    (models / "readme.txt").write_text("not a model")
    monkeypatch.setenv("STREAMGEN_MODELS", str(models))
    listed = available_models()
    assert {"plain", "org/avatar", "org/other"} <= set(listed)
    assert not [name for name in listed if "." in name.split("/")[-1][:1] or name.startswith("org/deeper")]
    assert resolve_model_dir("org/avatar") == models / "org" / "avatar"
    with pytest.raises(FileNotFoundError, match=r"unknown model 'nothing': .* not one of .*org/avatar, org/other"):
        require_model("nothing")


def test_an_org_folder_that_cannot_be_read_leaves_its_models_out_not_a_traceback(tmp_path, monkeypatch):
    import errno
    import os
    from pathlib import Path

    from streamgen.models import available_models

    models = tmp_path / "models"
    _model(models / "org" / "avatar")
    _model(models / "private" / "avatar")
    real_iterdir = Path.iterdir

    def iterdir(self):  # (as root, the tests' user here, reads every folder)
        if self == models / "private":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setenv("STREAMGEN_MODELS", str(models))
    listed = available_models()
    assert "org/avatar" in listed and "private/avatar" not in listed
