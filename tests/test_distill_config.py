"""distill configs: found by name, loaded, overridden with --set, and what they say of a value they refuse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import distill
from distill.config import ConfigError, find_config, load_config


def write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_every_shipped_config_loads():
    from pathlib import Path

    import distill

    configs = sorted((Path(distill.__file__).parent / "configs").glob("*.yaml"))
    names = {p.stem for p in configs}
    for stage in ("autoencoder", "teacher", "ode", "self_forcing", "chunk"):
        assert {f"{stage}-debug", f"{stage}-tiny-avatar"} <= names
    for p in configs:
        stage = p.name.split("-")[0]
        cfg = load_config(p, stage)
        assert cfg.stage == stage


def test_a_config_name_a_stage_has_not_names_the_ones_it_has(tmp_path, monkeypatch):
    """`distill latents --config debug` (no stage but latents has a debug config) said "not found"
    and no more."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"; the latents stage's: tiny-avatar\)$"):
        find_config("debug", "latents")
    with pytest.raises(ConfigError, match=r"; the self_forcing stage's: debug, tiny-avatar, tiny-avatar-last-step\)$"):
        find_config("nope", "self_forcing")


def test_set_overrides_config_values_and_is_kept_with_the_config(tmp_path):
    p = write(tmp_path, "stage: ode\nrun: {out: runs/a, steps: 10}\nmodel: {overrides: {window_frames: 6}}\n")
    sets = [
        "run.out=runs/b",
        "model.overrides.window_frames=2",
        "data.root=data/mine",
        "optim.betas=[0.0, 0.9]",
    ]
    cfg = load_config(p, "ode", [*sets, "optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4  # (YAML alone reads 1e-4 as text)
    texts = load_config(p, "ode", ['data.latents="1e4"', "run.out=nan", "run.export=m", 'run.export_name="2024"'])
    assert (texts.data.latents, texts.run.out, texts.run.export_name) == ("1e4", "nan", "2024")
    # (a shell drops its own comments: a ` #` that reaches a --set was quoted, part of the value;
    # YAML read it as a comment, and `runs/a #1` trained into runs/a)
    hashes = load_config(p, "ode", ["run.out=runs/a #1", "run.export=#2", "data.root= data/w #3 "])
    assert (hashes.run.out, hashes.run.export, hashes.data.root) == ("runs/a #1", "#2", "data/w #3")
    with pytest.raises(ConfigError, match=r"^--set 'run.steps=5 # five': run.steps: expected int, got '5 # five'$"):
        load_config(p, "ode", ["run.steps=5 # five"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("stage: ode\noptim:\n")  # a section left empty
    assert load_config(empty, "ode", ["optim.lr=1.0e-3"]).optim.lr == 1e-3
    assert cfg.run.out == "runs/b" and cfg.run.steps == 10 and cfg.data.root == "data/mine"
    assert cfg.model.overrides == {"window_frames": 2} and list(cfg.optim.betas) == [0.0, 0.9]
    assert "# --set run.out=runs/b" in cfg.source  # the checkpoints' record of the config
    spaced = load_config(p, "ode", ["run.out = runs/c", " optim.lr =2.0e-4"])  # (as a YAML file spaces it)
    assert (spaced.run.out, spaced.optim.lr) == ("runs/c", 2e-4)
    for bad, says in (
        ("run=3", "expected SECTION.KEY=VALUE"),
        ("run.out", "expected SECTION.KEY=VALUE"),
        ("run.out.x=1", "run.out is not a section"),
        ("run.stpes=3", r"run\.stpes \(did you mean run\.steps\?\)"),
        ("optim.lr=-1", "optim.lr"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_config(p, "ode", [bad])


def test_the_makefile_carries_runs_and_data_into_every_stage():
    """`make model RUNS=... DATA=...` made the data there, then trained from data/world into
    runs/tiny-avatar (the configs' paths) while make waited on files under RUNS."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    # (PY: this python; the Makefile's default, .venv/bin/python, is not there in a checkout without
    # ./run's .venv, where the dry run stopped at once and the test failed)
    plan = subprocess.run(
        ["make", "-n", "-B", "model", "results", "RUNS=/elsewhere/runs", "DATA=/elsewhere/data",
         f"PY={sys.executable}"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    stages = [line for line in plan.replace("\\\n", " ").splitlines() if "distill" in line]
    assert len(stages) >= 9, plan
    assert "runs/tiny-avatar" not in plan and "data/world" not in plan, plan
    for line in stages:
        if " latents " in line or "--config" in line:
            assert "--set data.root=/elsewhere/data" in line and "--set run.out=/elsewhere/runs/" in line, (
                line
            )
    # every path a stage reads from another: what the configs name under runs/tiny-avatar
    for stage, key in (("ode", "ode.teacher"), ("chunk", "chunk.teacher"), ("teacher", "model.vae")):
        assert any(f"distill {stage} " in line and f"--set {key}=/elsewhere/runs/" in line for line in stages)
    # without the venv ./run makes, every recipe failed in turn on .venv/bin/python; now it is said once
    missing = subprocess.run(["make", "-n", "model", "PY=/nonexistent/python"], cwd=root, capture_output=True, text=True)
    assert missing.returncode != 0 and "run `bash scripts/setup.sh` first" in missing.stderr, missing.stderr


def test_a_config_name_is_found_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """`--config debug` in a folder holding ./debug (a run's `--out debug`) read the folder:
    "cannot read config debug: Is a directory"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "debug").mkdir()
    assert find_config("debug", "teacher") == Path(distill.__file__).parent / "configs" / "teacher-debug.yaml"


def test_a_config_under_the_home_folder_is_found_by_its_tilde(tmp_path, monkeypatch):
    """`--config=~/mine.yaml` reaches the program unexpanded (no shell expands it after `=`)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("stage: teacher\n")
    assert find_config("~/mine.yaml", "teacher") == tmp_path / "mine.yaml"


def test_the_folders_a_run_writes_and_reads_take_a_tilde(tmp_path, monkeypatch, capsys):
    """`--set run.out=~/runs/t` (and `--out=~/...`) reach the program unexpanded: the run made a
    folder named `~` in the current one."""
    from streamgen.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sets = ["run.out=~/runs/t", "run.export=~/models/t", "data.root=~/data/world"]
    cfg = load_config(find_config("debug", "teacher"), "teacher", sets)
    home = str(tmp_path / "home")
    assert (cfg.run.out, cfg.run.export, cfg.data.root) == (
        f"{home}/runs/t", f"{home}/models/t", f"{home}/data/world"
    )
    assert main(["distill", "teacher", "--config", "debug", "--steps", "1", "--out=~/runs/u"]) == 0
    assert (tmp_path / "home" / "runs" / "u" / "model" / "model.json").is_file()
    assert not (tmp_path / "~").exists()


def test_a_whole_number_written_as_a_float_is_taken_for_a_count(tmp_path):
    """`--set run.steps=1e4` was "run.steps: expected int, got 10000.0"; 2.5 steps still is refused."""
    cfg = load_config(find_config("debug", "teacher"), "teacher", ["run.steps=1e4", "optim.warmup=1.0e3"])
    assert (cfg.run.steps, cfg.optim.warmup) == (10000, 1000)
    assert type(cfg.run.steps) is int and type(cfg.optim.warmup) is int
    with pytest.raises(ConfigError, match=r"run.steps: expected int, got 2.5"):
        load_config(find_config("debug", "teacher"), "teacher", ["run.steps=2.5"])


def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    p = write(tmp_path, "stage: teacher\noptim: {lr: 1.0e-3, warmpu: 10}\n")
    with pytest.raises(ConfigError, match=r"optim\.warmpu \(did you mean optim\.warmup\?\)"):
        load_config(p, "teacher")
    p = write(tmp_path, "teacher: {p_drop_audoi: 0.1}\n")
    with pytest.raises(ConfigError, match=r"teacher\.p_drop_audoi"):
        load_config(p, "teacher")
    p = write(tmp_path, "self_forcing: {critic_optim: {lrr: 1.0}}\n")
    with pytest.raises(ConfigError, match=r"self_forcing\.critic_optim\.lrr"):
        load_config(p, "self_forcing")


def test_unknown_section_wrong_type_and_wrong_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"ode \(a section of stage 'ode', not 'teacher'\)"):
        load_config(write(tmp_path, "ode: {trajectories: 3}\n"), "teacher")
    with pytest.raises(ConfigError, match=r"run\.steps: expected int"):
        load_config(write(tmp_path, "run: {steps: many}\n"), "teacher")
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got '1e-3' \(YAML reads 1e-3 as text"):
        load_config(write(tmp_path, "optim: {lr: 1e-3}\n"), "teacher")
    with pytest.raises(ConfigError, match="config for stage 'ode'"):
        load_config(write(tmp_path, "stage: ode\n"), "teacher")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: {steps: [\n"), "teacher")


def test_yaml_that_does_not_parse_is_one_line_naming_where(tmp_path, capsys):
    """PyYAML's error was six lines: the line quoted, a caret, and "<unicode string>" for the file."""
    from streamgen.cli import main

    p = write(tmp_path, "run: {out: x, steps: 4\n")
    assert main(["distill", "teacher", "--config", str(p)]) == 2
    assert capsys.readouterr().err == (
        f"streamgen distill: error: {p}: not valid YAML: line 2, column 1: expected ',' or '}}', but got "
        "'<stream end>' (while parsing a flow mapping from line 1, column 6)\n"
    )
    p = write(tmp_path, "run:\n\tout: x\n")
    assert main(["distill", "teacher", "--config", str(p)]) == 2
    assert capsys.readouterr().err.endswith(
        "not valid YAML: line 2, column 1: found character '\\t' that cannot start any token "
        "(while scanning for the next token)\n"
    )
    assert main(["distill", "teacher", "--config", "debug", "--set", "run.steps=[1"]) == 2
    assert capsys.readouterr().err == (
        "streamgen distill: error: --set 'run.steps=[1': the value is not valid YAML: line 1, column 3: "
        "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence from line 1, column 1)\n"
    )


@pytest.mark.parametrize(
    "stage, text, says",
    [
        ("teacher", "optim: {lr: -1.0e-3}", "optim.lr must be >= 0"),
        ("teacher", "optim: {betas: [1.5, 0.9]}", "optim.betas must each be >= 0 and < 1"),
        ("teacher", "optim: {betas: [a, b]}", "optim.betas must be two numbers"),
        ("teacher", "optim: {lr: 1.0e-4, min_lr: 1.0e-3, decay_steps: 10}", "optim.min_lr (0.001) is where the"),
        ("teacher", "optim: {ema: 1.5}", "optim.ema is a decay"),  # exported weights of 1e4
        ("teacher", "optim: {lr: .inf}", "optim.lr must be a finite number, got inf"),  # a nan loss
        ("teacher", "teacher: {cfg_scale: .inf}", "teacher.cfg_scale must be a finite number"),
        ("teacher", "run: {log_every: 0}", "run.log_every must be >= 1"),  # ZeroDivisionError
        ("teacher", "run: {seed: -1}", "run.seed must be >= 0"),
        ("teacher", "run: {threads: 99999}", "run.threads is 99999: this process may use"),  # OpenMP crashed
        ("teacher", "run: {device: gpu}", "run.device must be auto, cpu or cuda"),
        ("teacher", "data: {latent_frames: 0}", "data.latent_frames must be >= 1"),
        ("teacher", "data: {split: bogus}", "data.split must name splits"),
        ("teacher", "model: {flavor: nope}", "model.flavor: unknown model flavor 'nope'"),
        ("teacher", "model: {overrides: {bogus: 1}}", "unknown model config key model.overrides.bogus"),
        (
            "teacher",
            "model: {overrides: {windw_frames: 2}}",
            "model.overrides.windw_frames (did you mean model.overrides.window_frames?)",
        ),
        ("teacher", "teacher: {sample_steps: 0}", "teacher.sample_steps must be >= 1"),
        ("teacher", "teacher: {p_drop_audio: 1.5}", "teacher.p_drop_audio is a probability"),
        # (0 trained with one motion frame, as 1 does: p_motion_prefix 0 is none)
        ("teacher", "teacher: {max_motion_frames: 0}", "teacher.max_motion_frames must be >= 1, got 0"),
        ("autoencoder", "autoencoder: {stats_clips: 0}", "autoencoder.stats_clips must be >= 1"),
        ("ode", "ode: {trajectory_batch: 0}", "ode.trajectory_batch must be >= 1"),
        ("ode", "ode: {trajectories: 0}", "ode.trajectories must be >= 1"),
        ("chunk", "chunk: {max_chunks_back: -1}", "chunk.max_chunks_back must be >= 0"),
        ("self_forcing", "self_forcing: {cache_from: bogus}", "self_forcing.cache_from must be one of"),
        ("self_forcing", "self_forcing: {cache_from: last_step, student_steps: 1}", "needs student_steps 2 or more"),
        ("self_forcing", "self_forcing: {score_t_min: 0.9, score_t_max: 0.5}", "score_t_min must be below"),
        (
            "self_forcing",
            "self_forcing: {critic_optim: {eps: -1.0}}",
            "self_forcing.critic_optim.eps must be >= 0",
        ),
        ("tiny_decoder", "tiny_decoder: {architecture: taehvx}", "tiny_decoder.architecture must be taehv"),
        ("tiny_decoder", "tiny_decoder: {widths: [16, 0]}", "tiny_decoder.widths must be a list"),
        ("latents", "latents: {splits: [train, dev]}", "latents.splits must name splits"),
    ],
)
def test_values_out_of_range_are_named_before_any_work(tmp_path, stage, text, says):
    """Each of these was a traceback from deep inside torch or numpy, or trained and exported
    nonsense (an EMA decay of 1.5), or crashed after the training (no clips for the statistics)."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text + "\n"), stage)
    assert says in str(e.value)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".."])
def test_a_latents_name_that_is_a_path_is_one_line_before_any_work(tmp_path, capsys, name):
    """data.latents went into DATA/latents/NAME unchecked: `../x` wrote a latent bank outside
    DATA/latents/, where no stage looks for it."""
    from streamgen.cli import main

    argv = ["distill", "latents", "--config", "tiny-avatar", "--set", f"data.root={tmp_path / 'data'}"]
    assert main([*argv, "--set", f"data.latents={json.dumps(name)}"]) == 2
    err = capsys.readouterr().err
    assert "is not a name for a folder of DATA/latents/" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, says",
    [
        ("../x", "run.export_name '../x' is not a model name: letters, digits"),
        ("", "run.export_name '' is not a model name"),  # (exported as the folder's name, silently)
        ("my\nmodel", "run.export_name 'my\\nmodel' is not a model name"),  # (a newline: JSON's escape below)
        ("a/b", "run.export_name 'a/b' is not a model name"),
        ("-x", "run.export_name '-x' is not a model name"),
        ("a" * 300, "run.export_name 'aaaaaaaaaaaaaaaaaaaa'... is not a model name: 300 characters, over 255"),
    ],
)
def test_an_export_name_that_is_no_model_name_is_one_line_before_any_work(tmp_path, capsys, name, says):
    """run.export_name went into model.json unchecked: a path, an empty name, a newline or a name
    no folder can have, which `distill.ship` then refused (or wrote outside the shipped models)."""
    from streamgen.cli import main

    out = tmp_path / "run"
    argv = ["distill", "teacher", "--config", "debug", "--out", str(out), "--set", f"run.export={tmp_path / 'm'}"]
    assert main([*argv, "--set", f"run.export_name={json.dumps(name)}"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "stage, setting, says",
    [
        ("teacher", "run.out", "run.out is empty: give a path"),  # (trained into the current folder)
        ("teacher", "run.export", "run.export is empty: give a path, or leave it out for none"),
        ("teacher", "data.root", "data.root is empty: give a path"),
        ("teacher", "data.latents", "data.latents is empty: give a name"),
        ("teacher", "model.vae", "model.vae is empty: give a path, or leave it out for none"),
        ("ode", "ode.teacher", "ode.teacher is empty: give a path"),
        ("chunk", "chunk.critic_init", "chunk.critic_init is empty: give a path, or leave it out for none"),
        ("tiny_decoder", "tiny_decoder.init", "tiny_decoder.init is empty: give a path, or leave it out"),
    ],
)
def test_an_empty_path_is_named_at_config_load(tmp_path, stage, setting, says):
    """An empty path was the current folder (`run.out: ""` trained into it), or ignored as unset."""
    with pytest.raises(ConfigError, match=says):
        load_config(find_config("debug", stage), stage, [f'{setting}=" "'])


@pytest.mark.parametrize("stage, setting", [("teacher", "model.init"), ("teacher", "model.vae"), ("ode", "ode.teacher")])
def test_a_wan_path_without_its_folder_is_named_at_config_load(tmp_path, stage, setting):
    """`wan:` with no folder after it was the current folder: "cannot load the Wan checkpoint : .
    has no config.json"."""
    with pytest.raises(ConfigError, match=f"{setting} is 'wan: ': give the Wan checkpoint's folder after wan:"):
        load_config(find_config("debug", stage), stage, [f'{setting}="wan: "'])


@pytest.mark.parametrize(
    "item, says",
    [
        # (was "teacher-debug.yaml: model.init: expected str/NoneType, got {'wan': None}")
        ("model.init=wan:", "give the Wan checkpoint's folder right after wan:"),
        ("model.vae=wan: /w", "give the Wan checkpoint's folder right after wan:"),
        ("run.out=off", "YAML reads off as false: quote it for text, as in 'off'"),
        ("run.out=~", "run.out: must not be empty (YAML reads ~ as null: quote it for text, as in '~')"),
        ("run.out=12:30", "YAML reads 12:30 as the base-60 number 750: quote it"),
        ("run.out=2024-01-01", "YAML reads 2024-01-01 as a date: quote it"),
        ("run.out=a: b", "YAML reads a: b as a mapping: quote it"),
        ("run.steps=0", "run.steps must be >= 1, got 0"),  # (the range checks too)
    ],
)
def test_a_set_value_yaml_reads_as_another_type_names_the_set_not_the_file(tmp_path, item, says):
    """The message of a --set value's problem named the config file, which does not hold it, and
    said nothing of how YAML had read it."""
    path = find_config("debug", "teacher")
    with pytest.raises(ConfigError) as refused:
        load_config(path, "teacher", [item, "run.seed=3"])
    said = str(refused.value)
    assert said.startswith(f"--set {item!r}: ") and says in said and str(path) not in said, said
    with pytest.raises(ConfigError) as refused:  # (not a field of text: no advice to quote it)
        load_config(path, "teacher", ["run.threads=on"])
    assert str(refused.value) == "--set 'run.threads=on': run.threads: expected int, got True"
    own = write(tmp_path, "stage: teacher\nrun: {steps: 0}\n")  # (the file's own value: the file named)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(own))}: run.steps must be >= 1"):
        load_config(own, "teacher", ["run.seed=3"])


def test_an_unknown_key_or_section_given_with_set_names_the_set_not_the_file(tmp_path):
    """`--set runn.out=x` was "teacher-debug.yaml: unknown config section(s): runn": the file blamed."""
    path = find_config("debug", "teacher")
    for item, says in [
        ("runn.out=x", "unknown config section(s): runn (did you mean run?)"),
        ("ode.teacher=x", "unknown config section(s): ode (a section of stage 'ode', not 'teacher')"),
        ("run.stpes=3", "unknown config key(s): run.stpes (did you mean run.steps?)"),
        # (the model's own keys are checked later, against its config: they too blamed the file)
        ("model.overrides.bogus=1", "unknown model config key model.overrides.bogus"),
        (
            "model.overrides.windw_frames=2",
            "unknown model config key model.overrides.windw_frames (did you mean model.overrides.window_frames?)",
        ),
    ]:
        with pytest.raises(ConfigError) as refused:
            load_config(path, "teacher", ["run.seed=3", item])
        assert str(refused.value) == f"--set {item!r}: {says}"
    own = write(tmp_path, "stage: teacher\nrunn: {out: x}\n")  # (the file's own: the file named)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(own))}: unknown config section"):
        load_config(own, "teacher", ["run.seed=3"])


def test_a_set_override_the_model_config_refuses_names_the_set_not_the_file(tmp_path):
    """`--set model.overrides.dim=-1` was "teacher-debug.yaml: model.overrides: dim must be at least 1"."""
    path = find_config("debug", "teacher")
    for items, blamed, says in [
        (["model.overrides.dim=-1"], ["model.overrides.dim=-1"], "dim must be at least 1, not -1"),
        # (a field the message does not name, head_dim: the sets without which the config is made)
        (["model.overrides.dim=12", "model.overrides.num_heads=6"], ["model.overrides.dim=12", "model.overrides.num_heads=6"],
         "head_dim 2 must be even"),  # fmt: skip
    ]:
        with pytest.raises(ConfigError) as refused:
            load_config(path, "teacher", ["run.seed=3", *items])
        sets = ", ".join(f"--set {item!r}" for item in blamed)
        assert str(refused.value).startswith(f"{sets}: model.overrides: {says}"), str(refused.value)
    own = write(tmp_path, "stage: teacher\nmodel: {flavor: tiny-avatar, overrides: {dim: -1}}\n")  # (the file's own)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(own))}: model.overrides: dim must be at least 1"):
        load_config(own, "teacher", ["run.seed=3", "model.overrides.window_frames=2"])


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from streamgen.cli import main

    p = write(tmp_path, f"run: {{out: {tmp_path / 'o'}, stepz: 3}}\n")
    assert main(["distill", "teacher", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "run.stepz" in err and "did you mean run.steps" in err and "Traceback" not in err
    p = write(tmp_path, f"run: {{out: {tmp_path / 'o'}}}\ndata: {{root: {tmp_path / 'missing'}}}\n")
    assert main(["distill", "teacher", "--config", str(p)]) == 2
    assert "missing does not exist" in capsys.readouterr().err
