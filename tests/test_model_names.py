"""What a model's name or path given to a command is looked up as (a shipped model's name, a folder
under STREAMGEN_MODELS, a path here, under ~), and what is said where it names no model."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("diffusers")

from test_model_dirs import export, wan_based_model  # noqa: E402

from streamgen.models import load_model  # noqa: E402


def test_a_folder_that_is_no_model_is_named_for_what_it_is(tmp_path, capsys):
    """A Wan checkpoint's folder, a run's folder and an empty one were all "unknown model ...: not
    a model directory", the first though the README said such a folder loads."""
    import json

    from streamgen.cli import main
    from streamgen.models import require_model

    wan = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    (wan / "transformer").mkdir(parents=True)
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (wan / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    run = tmp_path / "runs" / "teacher"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, says in [
        (wan, f"is a diffusers Wan2.1 checkpoint, not a streamgen model: distill it into one first "
              f"(a distill config's model.init: wan:{wan}"),
        (wan / "transformer", "is a diffusers Wan2.1 checkpoint"),
        (run, f"{run} is a run's folder: its model is {run / 'model'}"),
        (empty, f"{empty} is a folder without model.json: not a streamgen model"),
    ]:  # fmt: skip
        with pytest.raises(FileNotFoundError) as refused:
            require_model(str(folder))
        assert says in str(refused.value)
    assert main(["serve", "--port", "0", "--model", str(empty)]) == 2  # (its own message, that said less)
    assert f"{empty} is a folder without model.json" in capsys.readouterr().err
    # distill's wan:DIR given as the model was "unknown model 'wan:...'"
    with pytest.raises(FileNotFoundError, match=re.escape(f"wan:{wan}: wan:DIR names a diffusers Wan2.1 checkpoint")):
        require_model(f"wan:{wan}")


@pytest.mark.parametrize("name", ["", "../evaluators", "tiny-avatar/sub", "/tmp/x", ".hidden"])
def test_ship_takes_a_plain_name(tmp_path, name, capsys):
    """'' wrote a model's files into the models folder itself, '../evaluators' into the evaluators'."""
    from distill.ship import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "no-matter"), name])
    assert exit_.value.code == 2 and "is not a model name" in capsys.readouterr().err


def test_a_model_path_under_the_home_folder_is_found_by_its_tilde(tmp_path, monkeypatch):
    """`~` reaches the loaders unexpanded where no shell expands it (`--model=~/m`, a distill
    config's `model.init: ~/m` or `wan:~/w`, `model.vae: ~/m`): "unknown model '~/m'", of a model
    that was there. It is the home folder, as in a shell."""
    from distill.build import load_dit, load_vae
    from distill.config import ModelConfigSection
    from streamgen.model.wan import save_pretrained
    from streamgen.models import require_model, resolve_model_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    model = wan_based_model()
    export(model, tmp_path / "m")
    assert resolve_model_dir("~/m") == tmp_path / "m"
    assert load_model("~/m").trained
    vae = load_vae(ModelConfigSection(vae="~/m"), latent_channels=model.vae.latent_channels, temporal=4, seed=0)
    assert type(vae) is type(model.vae)
    save_pretrained(model.dit, tmp_path / "wan")
    assert load_dit("wan:~/wan").cfg.num_layers == model.cfg.num_layers
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without model.json"):
        require_model("~/empty")


def test_a_path_under_the_home_of_no_such_user_says_it_is_not_there(tmp_path, capsys):
    """`--set model.init=~someone/m`, `--model ~someone/m`, `--config ~someone/c.yaml` (a config or
    a command line from another machine, whose user this one has not) was pathlib's RuntimeError
    "Could not determine home directory.", a traceback. It is a folder that is not there."""
    from distill.build import ModelSourceError, load_dit, load_vae
    from distill.config import ConfigError, ModelConfigSection, find_config
    from distill.ship import _run_hint
    from streamgen.cli import main
    from streamgen.models import require_model, resolve_model_dir

    path = "~no-such-user-of-streamgen/m"
    assert resolve_model_dir(path) is None
    with pytest.raises(FileNotFoundError, match=re.escape(f"no model directory {path}: there is no such folder")):
        require_model(path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no model directory {path}")):
        load_model(path)
    with pytest.raises(ModelSourceError, match=re.escape(f"'{path}' is not a model directory")):
        load_dit(path)
    with pytest.raises(ModelSourceError, match=re.escape(f"'{path}' is not a model directory")):
        load_vae(ModelConfigSection(vae=path), latent_channels=4, temporal=4, seed=0)
    with pytest.raises(ConfigError, match=re.escape(f"config '{path}.yaml' not found")):
        find_config(f"{path}.yaml", "teacher")
    assert _run_hint(path) == ""
    out = str(tmp_path / "run")
    assert main(["distill", "teacher", "--config", "debug", "--set", f"model.init={path}", "--out", out]) == 2
    assert f"'{path}' is not a model directory" in capsys.readouterr().err


def test_a_folder_here_named_as_a_shipped_model_is_not_passed_over_unsaid(tmp_path, monkeypatch, caplog):
    """`--model tiny-avatar` beside a run's folder ./tiny-avatar (its model in tiny-avatar/model)
    loaded the shipped tiny-avatar without a word: the run's model was taken to be streaming. The
    shipped one still loads (the name is the shipped model's), and the folder passed over is said."""
    run = tmp_path / "tiny-avatar"
    export(wan_based_model(), run / "model")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="streamgen.models"):
        model = load_model("tiny-avatar")
    assert model.meta.get("name") == "tiny-avatar"  # (the shipped one)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "tiny-avatar is a run's folder: its model is tiny-avatar/model" in said
    assert "loading the model named tiny-avatar in " in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="streamgen.models"):
        load_model("tiny-avatar/model")
    assert not caplog.records


def test_a_path_to_no_model_is_not_taken_for_a_shipped_models_name(tmp_path, monkeypatch):
    """`--model ./tiny-avatar` with no such folder loaded the shipped tiny-avatar without a word
    (the search path was tried with the path as a name); a path is only ever that path."""
    monkeypatch.chdir(tmp_path)
    for path in ("./tiny-avatar", f"{tmp_path}/tiny-avatar"):
        with pytest.raises(FileNotFoundError, match=f"no model directory {re.escape(path)}: there is no such folder"):
            load_model(path)
    export(wan_based_model(), tmp_path / "tiny-avatar" / "model")  # a run's folder there
    with pytest.raises(FileNotFoundError, match=r"\./tiny-avatar is a run's folder: its model is"):
        load_model("./tiny-avatar")
    assert load_model("./tiny-avatar/model").meta.get("name") != "tiny-avatar"


def test_an_empty_model_name_is_said_to_be_empty(tmp_path, monkeypatch, capsys):
    """`--model "$MODEL"` of an unset variable: Path("") is the current folder, so the error began
    " is a folder without model.json", and in a model's folder that model loaded unasked."""
    from streamgen.cli import main
    from streamgen.models import resolve_model_dir

    export(wan_based_model(), tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("") is None
    with pytest.raises(FileNotFoundError, match=re.escape("the model's name is empty ('')")):
        load_model("")
    assert main(["generate", "--model", "", "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert "the model's name is empty" in capsys.readouterr().err


def test_a_file_of_a_model_directory_given_as_the_model_names_the_directory(tmp_path, capsys):
    """`--model DIR/model.json` (or its dit.safetensors) was "unknown model ...: not a model
    directory and not one of tiny-avatar, ...", not saying that its folder is the model."""
    from streamgen.cli import main

    export(wan_based_model(), tmp_path / "m")
    for given in (tmp_path / "m" / "model.json", tmp_path / "m" / "dit.safetensors"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"{given} is a file of the model directory {tmp_path / 'm'}: give the directory")):  # fmt: skip
            load_model(str(given))
    assert main(["generate", "--model", str(given), "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert "give the directory" in capsys.readouterr().err


def test_a_model_name_too_long_for_the_file_system_is_an_unknown_model(tmp_path, capsys):
    """A --model longer than a file name may be was exists()' OSError (ENAMETOOLONG): a traceback
    from generate, and "cannot write the model" from distill.ship, which had written nothing."""
    from distill.ship import main as ship
    from streamgen.cli import main

    name = "a" * 300
    with pytest.raises(FileNotFoundError, match=re.escape(f"unknown model {name!r}")):
        load_model(name)
    assert main(["generate", "--model", name, "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        ship([name, "x"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "is not a model directory" in err and "cannot write" not in err


def test_a_relative_path_that_is_not_there_is_said_to_be_no_folder(tmp_path, monkeypatch):
    # `--model runs/tiny-avatar/ode/model` before that stage ran: "unknown model '...': not a model
    # directory and not one of tiny-avatar, ...", as if a model's name had been mistyped
    from streamgen.models import MODELS_DIR, require_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMGEN_MODELS", raising=False)
    with pytest.raises(FileNotFoundError) as refused:
        require_model("runs/ode/model")
    assert str(refused.value) == (
        f"no model directory runs/ode/model: there is no such folder in {tmp_path}, nor under the shipped "
        f"models ({MODELS_DIR}; STREAMGEN_MODELS names more folders to look under)"
    )


@pytest.mark.parametrize("listed", [True, False], ids=["STREAMGEN_MODELS", "shipped_only"])
def test_a_nested_model_name_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch, listed):
    # `--model org/avatar`, looked for under every model folder (STREAMGEN_MODELS's, then the shipped
    # models'), was "there is no such folder in <the current folder>", as if no other had been looked in
    from streamgen import models

    shipped, extra = tmp_path / "shipped", [tmp_path / "mine", tmp_path / "theirs"]
    monkeypatch.setattr(models, "MODELS_DIR", shipped)
    monkeypatch.setenv("STREAMGEN_MODELS", os.pathsep.join(map(str, extra)) if listed else "")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as refused:
        models.require_model("org/avatar")
    looked_under = f"STREAMGEN_MODELS ({extra[0]}, {extra[1]}) or the shipped models ({shipped})"
    if not listed:
        looked_under = f"the shipped models ({shipped}; STREAMGEN_MODELS names more folders to look under)"
    assert str(refused.value) == (
        f"no model directory org/avatar: there is no such folder in {tmp_path}, nor under {looked_under}"
    )


def test_a_model_name_whose_folder_under_streamgen_models_is_no_model_is_named_for_what_it_is(
    tmp_path, monkeypatch
):
    # a name found as a folder under STREAMGEN_MODELS without model.json (a copy cut short, a run's
    # folder) was "unknown model" or, nested, "no such folder", though the folder was there
    from streamgen.models import require_model

    models_dir, here = tmp_path / "models", tmp_path / "here"
    (models_dir / "org" / "avatar").mkdir(parents=True)
    (models_dir / "run" / "model").mkdir(parents=True)
    (models_dir / "run" / "model" / "model.json").write_text("{}")
    here.mkdir()
    monkeypatch.setenv("STREAMGEN_MODELS", str(models_dir))
    monkeypatch.chdir(here)
    for name, says in [
        ("org/avatar", f"{models_dir / 'org' / 'avatar'} is a folder without model.json: not a streamgen model"),
        ("run", f"{models_dir / 'run'} is a run's folder: its model is {models_dir / 'run' / 'model'}"),
    ]:
        with pytest.raises(FileNotFoundError) as refused:
            require_model(name)
        assert str(refused.value).startswith(says), str(refused.value)
    require_model("run/model")



@pytest.mark.parametrize("given", ["avatar", "{models}/avatar"], ids=["name", "path"])
def test_a_model_named_whose_folder_cannot_be_looked_into_is_said_so_not_a_traceback(tmp_path, monkeypatch, capsys, given):
    """`--model avatar` where STREAMGEN_MODELS's avatar is another user's folder (mode 700): what
    the name is instead of a model was looked for inside it (a run's model folder), whose stat's
    PermissionError was a traceback of the command."""
    import errno
    from pathlib import Path

    from streamgen.cli import main

    models_dir = tmp_path / "models"
    locked = models_dir / "avatar"
    locked.mkdir(parents=True)
    (locked / "model.json").write_text("{}")
    real_stat = Path.stat

    def stat(self, *args, **kwargs):  # (as root, the tests' user here, reads every folder: as chmod 700
        if locked in self.parents:  # of another user's would have it, the folder is there, not what is in it)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setenv("STREAMGEN_MODELS", str(models_dir))
    monkeypatch.chdir(tmp_path)
    model = given.format(models=models_dir)
    assert main(["generate", "--model", model, "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    assert f"{locked} is a folder that cannot be read: Permission denied" in capsys.readouterr().err


def test_model_folders_under_the_home_folder_in_streamgen_models_are_found_by_their_tilde(tmp_path, monkeypatch):
    # STREAMGEN_MODELS="~/models" as a systemd unit, a Docker env file or a quoted export give it (no
    # shell expands it there): the folder looked under was ./~/models, no model found in it nor listed
    from streamgen.models import available_models, resolve_model_dir

    home = tmp_path / "home"
    model = home / "models" / "avatar"
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("STREAMGEN_MODELS", os.pathsep.join(["~/more", "~/models"]))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("avatar") == model
    assert "avatar" in available_models()


def test_a_model_folder_that_cannot_be_read_is_said_so_not_a_traceback(tmp_path, monkeypatch):
    # STREAMGEN_MODELS naming a folder this user may not read (another user's, 0700): an unknown
    # model's message, listing the models, was iterdir's PermissionError traceback
    import errno
    from pathlib import Path

    from streamgen.models import require_model

    private = tmp_path / "private"
    private.mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):  # (as root, the tests' user here, reads every folder)
        if self == private:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setenv("STREAMGEN_MODELS", str(private))
    with pytest.raises(FileNotFoundError) as refused:
        require_model("nothing-here")
    said = str(refused.value)
    assert said.startswith("unknown model 'nothing-here': not a model directory and not one of ") and "tiny-avatar" in said
    assert said.endswith(f" (STREAMGEN_MODELS's {private} cannot be read: Permission denied)"), said


def test_an_unknown_models_message_names_the_flavors_teachers_too():
    """`--model wan2.1-1.3b-teacher` loads that flavor's teacher (the README's table, `streamgen
    models`), but a mistyped name was told the names it could be without any FLAVOR-teacher."""
    from streamgen.models import require_model

    with pytest.raises(FileNotFoundError) as refused:
        require_model("wan2.1-1.3b-teachr")
    named = str(refused.value).split("not one of ", 1)[1].split(", ")
    assert {"wan2.1-1.3b", "wan2.1-1.3b-teacher", "wan2.1-14b-teacher", "tiny-avatar-teacher"} <= set(named)
    assert "debug-teacher" not in named and named == sorted(named)
