"""Trainer infrastructure: configs, checkpoints, resume, bad input (debug configs, seconds each)."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from test_distill_helpers import debug_config, final_tensors, max_difference, run

import distill
from distill.config import ConfigError, find_config, load_config
from distill.data import DataMissing
from distill.trainer import TrainingError
from streamgen import checkpoint as ckpt


def write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


# --- configs -------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "stage, sets, says",
    [
        ("teacher", ["run.fsdp=true"], "run.fsdp shards over the processes of a torchrun launch"),
        ("chunk", ["chunk.max_chunks_back=0"], "chunk.p_self_correct does nothing with chunk.max_chunks_back 0"),
        ("autoencoder", ["data.latent_frames=3"], "data.latent_frames does not apply to the autoencoder stage"),
        ("tiny_decoder", ["data.latents=other"], "data.latents does not apply to the tiny_decoder stage"),
        ("ode", ["data.video_frames=4"], "data.video_frames does not apply to the ode stage"),
        (
            "teacher",
            ["teacher.max_motion_frames=9"],
            "teacher.max_motion_frames 9 is more than crops of data.latent_frames 4 take: motion prefixes are "
            "at most 3 frames",
        ),
        (
            "tiny_decoder",
            ["tiny_decoder.architecture=causal_vae", "tiny_decoder.blocks_per_stage=2"],
            "tiny_decoder.blocks_per_stage is for a taehv decoder",
        ),
        ("self_forcing", ["self_forcing.critic_optim.ema=0.99"], "self_forcing.critic_optim.ema keeps an average"),
        ("chunk", ["chunk.critic_optim.ema=0.99"], "chunk.critic_optim.ema keeps an average of the critic"),
        (
            "teacher",
            ["model.vae=runs/ae/model", "model.vae_res_blocks=1"],
            "model.vae_res_blocks shapes the autoencoder the autoencoder stage trains (or a random one); this "
            "run reads model.vae's, runs/ae/model",
        ),
        ("tiny_decoder", ["model.vae=tiny-avatar", "model.vae_widths=[8, 8]"], "model.vae_widths shapes"),
    ],
)
def test_a_setting_that_does_not_apply_is_named_in_a_warning(stage, sets, says):
    """They were ignored without a word: the run trained as if they had not been given."""
    from distill.config import ignored_settings

    cfg = load_config(find_config("debug", stage), stage, sets)
    assert [note for note in ignored_settings(cfg, 1) if says in note], ignored_settings(cfg, 1)
    plain = load_config(find_config("debug", stage), stage)  # (the debug configs use all they set)
    assert ignored_settings(plain, 1) == []
    if sets == ["run.fsdp=true"]:
        assert ignored_settings(cfg, 2) == []  # (sharded under torchrun)


def test_a_run_warns_of_the_settings_it_does_not_use(tmp_path, capsys):
    run(debug_config("teacher", tmp_path / "t", **{"run.steps": 1, "run.fsdp": True}))
    assert "warning: run.fsdp shards over the processes of a torchrun launch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "stage, edit, says",
    [
        ("autoencoder", {"autoencoder.stats_clips": 9}, "autoencoder.stats_clips is 9, more than the 4 clips of"),
        ("tiny_decoder", {"tiny_decoder.eval_clips": 9}, "tiny_decoder.eval_clips is 9, more than the 4 clips of"),
    ],
)
def test_a_count_of_clips_over_the_clips_there_are_is_a_warning(tmp_path, capsys, stage, edit, says):
    """All the clips there were were used, and nothing said the count asked for was not."""
    run(debug_config(stage, tmp_path / "run", **{"run.steps": 1, **edit}))
    assert f"warning: {says} the synthetic data (data.synthetic_clips)" in capsys.readouterr().err


def test_an_empty_out_is_one_line_not_the_configs_folder(tmp_path, capsys, monkeypatch):
    """`--out "$UNSET"` trained into the config's run.out."""
    from streamgen.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:  # (streamgen.cli.named_folder, as eval's and data's --out)
        main(["distill", "teacher", "--config", "debug", "--out", ""])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.endswith("error: argument --out: '' names no folder: give the folder to write into\n"), err
    assert list(tmp_path.iterdir()) == []


def test_an_export_name_names_the_exported_model(tmp_path):
    from streamgen.models import load_model

    sets = [f"run.export={tmp_path / 'm'}", "run.export_name=my-avatar_2.1"]
    cfg = load_config(find_config("debug", "teacher"), "teacher", sets)
    cfg.run.out, cfg.run.steps = str(tmp_path / "run"), 1
    run(cfg)
    assert load_model(str(tmp_path / "m")).name == "my-avatar_2.1"


def test_an_export_name_without_an_export_is_one_line_before_any_work(tmp_path, capsys):
    """run.export_name names run.export's model: without run.export it was ignored without a word
    (OUT/model is exported under its folder's name)."""
    from streamgen.cli import main

    out = tmp_path / "run"
    assert main(["distill", "teacher", "--config", "debug", "--out", str(out), "--set", "run.export_name=mine"]) == 2
    err = capsys.readouterr().err
    assert "run.export_name names the model exported to run.export, which is not given" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_distill_steps_take_positive_numbers(tmp_path, capsys):
    """`--steps 0` ran the config's steps; `--steps -3` exported the untrained model as finished."""
    from streamgen.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "teacher", "--config", "debug", "--steps", "-3", "--out", str(tmp_path / "o")])
    assert "argument --steps: '-3' is not a positive" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "world_size, says",
    [("2", "environment variable RANK expected"), ("two", "WORLD_SIZE='two' is not a whole number")],
)
def test_a_world_size_without_torchrun_is_one_line(tmp_path, capsys, monkeypatch, world_size, says):
    """A WORLD_SIZE left in the shell, no torchrun around it: a traceback from inside torch's
    env:// rendezvous (or from int())."""
    from streamgen.cli import main

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert main(["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert says in err and "torchrun --nproc_per_node N" in err and "Traceback" not in err


@pytest.mark.parametrize("stage", ["ode", "teacher"])
def test_a_batch_the_ranks_do_not_divide_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, stage):
    """data.batch_size 3 under torchrun --nproc_per_node 2: the ode stage trained every step on
    samples 0 and 1 alone (1 a rank), unsaid; the teacher stopped at its first step, once built."""
    import distill.trainer
    from distill.distributed import World
    from streamgen.cli import main

    monkeypatch.setattr(distill.trainer, "init_world", lambda device: World(rank=0, size=2))
    out = tmp_path / "o"
    assert main(["distill", stage, "--config", "debug", "--out", str(out), "--set", "data.batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size 3 (the global batch) does not split evenly over 2 ranks" in err
    assert "Traceback" not in err and not out.exists()


def test_more_ranks_than_gpus_is_one_line(tmp_path, capsys, monkeypatch):
    """torchrun --nproc_per_node 3 on a machine with 2 GPUs: the third rank's set_device raised a
    CUDA error, a traceback."""
    from streamgen.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device reached"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    out = str(tmp_path / "o")
    assert main(["distill", "teacher", "--config", "debug", "--out", out, "--set", "run.device=cuda"]) == 2
    assert "the rank with LOCAL_RANK 2 has no GPU: this machine has 2" in capsys.readouterr().err


# --- a run's outputs -----------------------------------------------------------------------


def test_a_teacher_run_writes_checkpoints_logs_curves_and_a_loadable_model(tmp_path):
    from streamgen.models import load_model

    out = tmp_path / "teacher"
    last = run(debug_config("teacher", out))
    assert set(last) >= {"loss_teacher", "grad_norm_teacher", "lr_teacher"}
    assert [p.name for p in ckpt.list_checkpoints(out)] == [
        "step-00000002.safetensors",
        "step-00000004.safetensors",
    ]
    records = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r["steps_per_s"] > 0 for r in records)
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert meta["step"] == 4 and meta["stage"] == "teacher"
    assert any(k.startswith("ema/teacher/") for k in tensors) and any(
        k.startswith("optim/teacher/") for k in tensors
    )
    assert "rng/torch" in tensors and "python" in meta["rng"]
    model = load_model(str(out / "model"))
    assert model.trained and model.meta["kind"] == "teacher" and model.cfg.num_layers == 2
    # the exported model holds the EMA weights, not the last raw weights
    ema = {k[len("ema/teacher/") :]: v for k, v in tensors.items() if k.startswith("ema/teacher/")}
    assert torch.equal(model.dit.state_dict()["head.proj.weight"], ema["head.proj.weight"])


def test_the_loss_curves_of_a_single_logged_step_show_it(tmp_path):
    """A one-step run (or a first checkpoint before the second logged step: log_every 10,
    checkpoint_every 5) drew its one point as a line of one point: blank axes."""
    import numpy as np
    from PIL import Image

    from distill.monitor import Monitor

    monitor = Monitor(tmp_path, 1, 0, enabled=True, progress=False, desc="teacher")
    monitor.log(0, {"loss_teacher": 2.0})
    monitor.close()
    pixels = np.asarray(Image.open(monitor.plot()).convert("RGB")).astype(int)
    line = np.array([31, 119, 180])  # matplotlib's first colour, the curve's
    assert (np.abs(pixels - line).sum(-1) < 60).sum() >= 9


def test_a_fresh_start_over_a_run_killed_before_its_first_checkpoint_shows_its_own_steps(tmp_path):
    """TensorBoard kept the killed run's steps beside the new run's (scalars.jsonl was cut)."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distill.monitor import Monitor

    for loss in (1.0, 2.0):  # the killed run, then the fresh start
        monitor = Monitor(tmp_path, 10, 0, enabled=True, progress=False, desc="teacher")
        for step in range(3 if loss == 1.0 else 2):
            monitor.log(step, {"loss_teacher": loss})
        monitor.close()
        time.sleep(1.1)  # (event files are read in name order: their names begin with the second)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss_teacher")] == [(0, 2.0), (1, 2.0)]
    assert len((tmp_path / "scalars.jsonl").read_text().splitlines()) == 2


def test_a_rerun_without_resume_refuses_to_overwrite(tmp_path):
    cfg = debug_config("teacher", tmp_path / "t", **{"run.steps": 2})
    run(cfg)
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume"):
        run(cfg)


# --- exact resume ---------------------------------------------------------------------------


def test_teacher_killed_and_resumed_equals_uninterrupted(tmp_path):
    run(debug_config("teacher", tmp_path / "whole"))
    # "killed" after step 3: the step-2 checkpoint is the newest; step 3 is recomputed on resume
    run(debug_config("teacher", tmp_path / "split"), stop_after=3)
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step-00000002.safetensors"
    run(debug_config("teacher", tmp_path / "split"), resume=True)
    assert max_difference(final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "split")) <= 1e-6
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "split" / "scalars.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 1, 2, 3]  # the log of the resumed run is the log of one run


def test_a_resume_takes_the_configs_optimizer_settings_and_refuses_fewer_steps(tmp_path):
    """Loading the optimizer's state brought back the settings it was saved with, whatever the
    config said; a resume with fewer steps than the checkpoint's exported it as a shorter run."""
    run(debug_config("teacher", tmp_path / "t"), stop_after=2)
    changed = debug_config("teacher", tmp_path / "t", **{"optim.betas": [0.5, 0.9], "optim.eps": 1e-3,
                                                           "optim.weight_decay": 0.5})  # fmt: skip
    from distill.trainer import Trainer

    trainer = Trainer(changed, resume=True)
    seen = []
    real = torch.optim.AdamW.step

    def step(opt, *args, **kwargs):
        seen.append({k: opt.param_groups[0][k] for k in ("betas", "eps", "weight_decay")})
        return real(opt, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        trainer.run()
    finally:
        torch.optim.AdamW.step = real
    assert seen and all(s == {"betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.5} for s in seen), seen[:1]
    with pytest.raises(TrainingError, match="at step 4, past run.steps 3"):
        run(debug_config("teacher", tmp_path / "t", **{"run.steps": 3}), resume=True)


def test_a_resume_with_another_seed_or_batch_size_is_refused_unless_set_on_purpose(tmp_path, capsys):
    """Only the model configs were compared: a resume with another run.seed or data.batch_size drew
    other samples and noise for every later step, a run that no config describes, without a word."""
    from streamgen.cli import main

    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)
    changed = debug_config("teacher", out, **{"run.seed": 1, "data.batch_size": 2})
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"run\.seed: checkpoint 0, config 1; data\.batch_size: checkpoint 4, config 2.*"
        r"--set run\.seed=1 --set data\.batch_size=2",
    ):
        run(changed, resume=True)
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    # the command line: one line, unless the new value is given with --set (a change on purpose)
    yaml = tmp_path / "seed1.yaml"
    yaml.write_text((Path(distill.__file__).parent / "configs" / "teacher-debug.yaml").read_text()
                    .replace("seed: 0", "seed: 1"))  # fmt: skip
    command = ["distill", "teacher", "--config", str(yaml), "--out", str(out), "--resume"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "run.seed: checkpoint 0, config 1" in err and len(err.strip().splitlines()) == 1
    assert main([*command, "--set", "run.seed=1"]) == 0
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out))[1]["run_settings"]["run.seed"] == 1


def test_a_checkpoint_from_before_the_settings_were_recorded_is_checked_against_its_config(
    tmp_path, monkeypatch
):
    """Older checkpoints keep the settings only in their config text (with its --set lines)."""
    real = ckpt.save_checkpoint

    def as_before(out, step, tensors, meta, keep=3):
        return real(out, step, tensors, {k: v for k, v in meta.items() if k != "run_settings"}, keep)

    monkeypatch.setattr(ckpt, "save_checkpoint", as_before)
    cfg = load_config(find_config("debug", "teacher"), "teacher", [f"run.out={tmp_path / 't'}",
                                                                   "data.batch_size=2"])  # fmt: skip
    run(cfg, stop_after=2)
    with pytest.raises(ckpt.CheckpointError, match=r"data\.batch_size: checkpoint 2, config 4"):
        run(debug_config("teacher", tmp_path / "t"), resume=True)
    run(cfg, resume=True)  # the same settings: resumed


def test_a_resume_skips_a_log_line_cut_short(tmp_path):
    run(debug_config("teacher", tmp_path / "t"), stop_after=3)
    with open(tmp_path / "t" / "scalars.jsonl", "a") as f:
        f.write('{"step": 3, "loss_te')  # killed while writing it
    run(debug_config("teacher", tmp_path / "t"), resume=True)
    lines = (tmp_path / "t" / "scalars.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    last = run(debug_config("teacher", tmp_path / "t", **{"run.steps": 1}), resume=True)
    assert (
        "loss_teacher" in last and ckpt.latest_checkpoint(tmp_path / "t").name == "step-00000001.safetensors"
    )


# --- bad input ---------------------------------------------------------------------------------


def test_mismatched_checkpoint_and_config_names_the_difference(tmp_path):
    run(debug_config("teacher", tmp_path / "t", **{"run.steps": 2}))
    cfg = debug_config("teacher", tmp_path / "t", **{"model.overrides": {"num_layers": 3}})
    with pytest.raises(ckpt.CheckpointError, match=r"teacher\.num_layers: checkpoint 2, config 3"):
        run(cfg, resume=True)


def test_missing_data_directory(tmp_path):
    cfg = debug_config(
        "teacher", tmp_path / "t", **{"data.source": "world", "data.root": str(tmp_path / "nope")}
    )
    with pytest.raises(DataMissing, match="nope does not exist"):
        run(cfg)
    (tmp_path / "empty").mkdir()
    cfg = debug_config(
        "teacher", tmp_path / "t", **{"data.source": "world", "data.root": str(tmp_path / "empty")}
    )
    with pytest.raises(DataMissing, match="bank-train.safetensors is missing"):
        run(cfg)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--steps", "5"], "--steps is for the training stages"),
        (["--resume"], "--resume is for the training stages"),
        (["--out", "OUT", "--resume"], "--resume, --out are for the training stages"),
    ],
)
def test_the_latents_stage_refuses_the_training_stages_options(tmp_path, capsys, monkeypatch, flags, says):
    """`distill latents --steps 5 --resume --out DIR` encoded the dataset as ever, the three ignored
    without a word (it trains nothing and writes into DATA/latents/NAME, not a run.out)."""
    from distill import latents
    from streamgen.cli import main

    monkeypatch.setattr(latents, "build_latents", lambda cfg: pytest.fail("it went on to encode"))
    flags = [str(tmp_path / "out") if flag == "OUT" else flag for flag in flags]
    assert main(["distill", "latents", "--config", "tiny-avatar", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from streamgen.cli import main

    p = write(tmp_path, f"run: {{out: {tmp_path / 'o'}, stepz: 3}}\n")
    assert main(["distill", "teacher", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "run.stepz" in err and "did you mean run.steps" in err and "Traceback" not in err
    p = write(tmp_path, f"run: {{out: {tmp_path / 'o'}}}\ndata: {{root: {tmp_path / 'missing'}}}\n")
    assert main(["distill", "teacher", "--config", str(p)]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    import distill.teacher

    real = distill.teacher._per_frame_flow_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 4 else loss  # step 3 (0-based)

    monkeypatch.setattr(distill.teacher, "_per_frame_flow_loss", poisoned)
    out = tmp_path / "t"
    with pytest.raises(
        TrainingError, match=r"loss is nan at step 3; stopped\. Last good checkpoint: .*step-00000002"
    ) as stopped:
        run(debug_config("teacher", out))
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    # a resume is exact: resumed as it was, the run met the same nan again (the message said only
    # "resume with --resume")
    assert "repeats the same steps: change what made it non-finite (a lower optim.lr" in str(stopped.value)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)
    good = ckpt.latest_checkpoint(out)
    before = good.read_bytes()

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_bytes", full)
    with pytest.raises(
        ckpt.CheckpointError, match=r"step 4 \(No space left on device\).*step-00000002.*intact"
    ):
        run(debug_config("teacher", out), resume=True)
    assert ckpt.list_checkpoints(out) == [good] and good.read_bytes() == before
    assert not list((out / "checkpoints").glob(".*tmp"))  # no half-written file left behind
    monkeypatch.undo()
    run(debug_config("teacher", out), resume=True)  # and training continues from it
    assert ckpt.latest_checkpoint(out).name == "step-00000004.safetensors"


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "t"
    run(debug_config("teacher", out, **{"run.steps": 2}))
    path = ckpt.latest_checkpoint(out)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        ckpt.CheckpointError,
        match="cannot read checkpoint.*no checkpoint in .* can be read: to start the run again, set run.out",
    ):
        run(debug_config("teacher", out, **{"run.steps": 4}), resume=True)
    assert ckpt.list_checkpoints(out) == [path]  # nothing set aside: the user decides


def test_a_resume_sets_a_damaged_newest_checkpoint_aside_for_the_one_before(tmp_path, capsys):
    """A checkpoint damaged after it was written (a copy cut short, a disk error): --resume stopped
    at it, though the step before was intact. It goes on from the newest checkpoint that reads,
    with a warning, and reaches what an undamaged run does; the damaged file is kept aside."""
    run(debug_config("teacher", tmp_path / "whole"))
    out = tmp_path / "damaged"
    run(debug_config("teacher", out))
    first, newest = ckpt.list_checkpoints(out)  # steps 2 and 4
    newest.write_bytes(newest.read_bytes()[:-100])
    capsys.readouterr()
    run(debug_config("teacher", out), resume=True)
    warning = capsys.readouterr().err
    assert "cannot read checkpoint" in warning and "resuming from step-00000002" in warning, warning
    aside = newest.with_name(newest.name + ".damaged")
    assert aside.exists() and [p.name for p in ckpt.list_checkpoints(out)] == [first.name, newest.name]
    assert max_difference(final_tensors(tmp_path / "whole"), final_tensors(out)) <= 1e-6


def test_the_newest_checkpoint_is_the_highest_step_past_eight_digits(tmp_path):
    """Names are zero-padded to 8 digits: step 10^8 has 9, and sorted by name it came before
    step 99999999, so a resume took the older one and pruning deleted the newer."""
    out = tmp_path / "t"
    for step in (99_999_998, 99_999_999, 100_000_000):
        ckpt.save_checkpoint(out, step, {"w": torch.zeros(1)}, {}, keep=3)
    assert ckpt.latest_checkpoint(out).name == "step-100000000.safetensors"
    ckpt.save_checkpoint(out, 100_000_001, {"w": torch.zeros(1)}, {}, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(out)] == [
        "step-99999999.safetensors",
        "step-100000000.safetensors",
        "step-100000001.safetensors",
    ]
    (out / "checkpoints" / "step-latest.safetensors").write_bytes(b"")  # not a step: not a checkpoint
    (out / "checkpoints" / "step-00000002.safetensors").write_bytes(b"")  # the 8-digit names still read
    assert ckpt.list_checkpoints(out)[0].name == "step-00000002.safetensors"
    assert ckpt.latest_checkpoint(out).name == "step-100000001.safetensors"


def test_the_teacher_starts_from_a_wan_checkpoint_through_the_adapter(tmp_path):
    from streamgen.model.config import get_config
    from streamgen.model.model import DiT
    from streamgen.model.wan import save_pretrained
    from streamgen.models import load_model

    torch.manual_seed(5)
    wan = DiT(get_config("debug"))
    save_pretrained(wan, tmp_path / "wan")
    avatar = {"audio_dim": 16, "audio_mels": 16, "frames_per_chunk": 2, "window_frames": 6}
    cfg = debug_config(
        "teacher", tmp_path / "t", **{"model.init": f"wan:{tmp_path / 'wan'}", "model.overrides": avatar,
                                      "optim.lr": 0.0, "optim.ema": 0.0, "run.steps": 1},
    )  # fmt: skip
    run(cfg)
    trained = load_model(str(tmp_path / "t" / "model")).dit.state_dict()
    assert torch.equal(trained["blocks.1.ffn.up.weight"], wan.state_dict()["blocks.1.ffn.up.weight"])
    cfg.model.init = f"wan:{tmp_path / 'nowhere'}"
    cfg.run.out = str(tmp_path / "t2")
    from distill.build import ModelSourceError

    with pytest.raises(ModelSourceError, match="cannot load the Wan checkpoint"):
        run(cfg)


@pytest.mark.parametrize(
    "kind, says",
    [
        ("wan z_dim 8", r"wan:.* has 8 latent channels, the model 4"),
        ("wan temporal 2", r"wan:.* makes 2 video frames of each latent frame, the model's temporal_compression is 4"),
        ("autoencoder temporal 2", r"makes 2 video frames of each latent frame, the model's temporal_compression is 4"),
    ],
)
def test_a_model_vae_of_other_latents_or_frames_is_one_line_before_any_work(tmp_path, kind, says):
    """load_vae returned a `wan:` VAE before its latent channels were compared, and compared no
    autoencoder's temporal factor with the model's temporal_compression (the model directory's
    loader refuses both)."""
    from distill.build import load_vae
    from streamgen.model.config import get_config
    from streamgen.model.vae import TinyCausalVAE

    torch.manual_seed(0)
    if kind.startswith("wan"):
        diffusers = pytest.importorskip("diffusers")
        z_dim = 8 if "z_dim" in kind else 4
        downsample = [False, True, False] if "temporal" in kind else [False, True, True]
        wan = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=downsample,
            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        )  # fmt: skip
        wan.save_pretrained(tmp_path / "vae")  # (diffusers' AutoencoderKLWan folder)
        source = f"wan:{tmp_path / 'vae'}"
    else:
        TinyCausalVAE(4, (8, 16), 2).save(tmp_path / "vae")
        source = str(tmp_path / "vae")
    cfg = debug_config("teacher", tmp_path / "t", **{"model.vae": source})
    mcfg = get_config("debug")
    with pytest.raises(ConfigError, match=says):
        load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)
    if kind == "wan z_dim 8":  # a taehv tiny decoder is made for the teacher's latents, whatever the flavor
        from distill.distributed import World
        from distill.tiny_decoder import Stage

        cfg = debug_config("tiny_decoder", tmp_path / "td", **{"model.vae": source})
        assert Stage(cfg, World()).teacher.latent_channels == 8


def test_a_model_directory_given_as_wan_is_told_to_drop_the_prefix(tmp_path):
    """`model.init: wan:DIR` (or `model.vae`) of a streamgen model directory said "DIR has no
    config.json", as if the folder were damaged."""
    from distill.build import ModelSourceError, export_model, load_dit, load_vae
    from streamgen.model.config import get_config
    from streamgen.model.model import DiT
    from streamgen.model.vae import TinyCausalVAE

    mcfg = get_config("debug")
    torch.manual_seed(0)
    vae = TinyCausalVAE(mcfg.in_channels, (8, 16), mcfg.temporal_compression)
    model = export_model(DiT(mcfg).eval(), vae, tmp_path / "model", "debug", 32, 32, 5.0, 2)
    says = f"{model} is a streamgen model directory, not a diffusers Wan checkpoint: give it without wan:"
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_dit(f"wan:{model}")
    cfg = debug_config("teacher", tmp_path / "t", **{"model.vae": f"wan:{model}"})
    with pytest.raises(ModelSourceError, match=re.escape(says)):
        load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)


def test_learning_rate_warms_up_then_decays_on_a_cosine():
    from distill.config import OptimConfig
    from distill.trainer import learning_rate

    constant = OptimConfig(lr=1e-3, warmup=10)
    assert learning_rate(constant, 0) == pytest.approx(1e-4) and learning_rate(constant, 9) == 1e-3
    assert learning_rate(constant, 10_000) == 1e-3
    cosine = OptimConfig(lr=1e-3, warmup=10, decay_steps=100, min_lr=1e-5)
    assert learning_rate(cosine, 10) == pytest.approx(1e-3)
    assert learning_rate(cosine, 60) == pytest.approx((1e-3 + 1e-5) / 2)  # half way down
    assert learning_rate(cosine, 110) == pytest.approx(1e-5) and learning_rate(cosine, 500) == pytest.approx(
        1e-5
    )
    rates = [learning_rate(cosine, u) for u in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_nan_gradient_behind_a_finite_loss_stops_the_update(grad_clip):
    """With grad_clip 0 the gradient's norm was not looked at: a NaN gradient went into the weights."""
    from distill.config import OptimConfig
    from distill.distributed import World
    from distill.trainer import NonFiniteLoss, Updater

    module = torch.nn.Linear(2, 1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    updater = Updater("student", module, OptimConfig(grad_clip=grad_clip), World())
    y = module(torch.tensor([[-1.0, 0.5]])).sum()
    # 0, whose gradient is NaN: where's unchosen branch still sends 0 * d sqrt(-1) back
    loss = torch.where(torch.tensor(False), (-y.abs() - 1).sqrt(), torch.zeros(()))
    assert torch.isfinite(loss)
    with pytest.raises(NonFiniteLoss, match="gradient"):
        updater.update(loss)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_resumed_ema_lives_where_its_module_does():
    """A checkpoint's tensors load on the CPU; the EMA stayed there, and a resumed GPU run's first
    update failed (the meta device stands in for the GPU here)."""
    from distill.config import OptimConfig
    from distill.distributed import World
    from distill.trainer import Updater

    cfg = OptimConfig(lr=1e-3, ema=0.9)
    saved = Updater("m", torch.nn.Linear(3, 3), cfg, World())
    saved.update(saved.module(torch.ones(2, 3)).square().mean())
    tensors, meta = saved.state()
    resumed = Updater("m", torch.nn.Linear(3, 3, device="meta"), cfg, World())
    resumed.load_state({k: v.cpu() for k, v in tensors.items()}, meta, "ckpt")
    assert {v.device.type for v in resumed.ema.values()} == {"meta"}


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--set", "model.height=17"], "cannot build the teacher stage from this config: frame size 17x"),
        # latents smaller than a patch, or not a whole number of patches (a convolution's traceback)
        (["--set", "model.width=2"], "make latents of 8x1, which the model's 2x2 patches do not tile: set them to multiples of 4x4"),
        (["--set", "model.width=6"], "make latents of 8x3, which the model's 2x2 patches do not tile"),
        # (at the first step, naming no setting: "crops of 12 latent frames do not fit clips of 8")
        (["--set", "data.latent_frames=12"], "data.latent_frames 12: crops that long do not fit the clips "
         "(data.synthetic_clip_latents: 8 latent frames); set it to at most 8"),  # fmt: skip
        (["--set", "model.overrides.num_layers=0"], "num_layers must be at least 1, not 0"),
        # (was "model.overrides: '<' not supported between instances of 'str' and 'int'")
        (["--set", "model.overrides.window_frames=abc"], "overrides.window_frames: expected int, got 'abc'"),
        (["--set", "model.overrides.patch_size=2"], "model.overrides.patch_size: expected tuple, got 2"),
        # (was "(YAML reads nan as text: give it a decimal point, as in 1.0e-3)")
        (["--set", "optim.lr=nan"], "optim.lr: expected float, got 'nan' (not a finite number)"),
        (["--out", "{file}/x"], "a file is in its way ({file})"),
        (["--set", "run.export={file}"], "run.export {file} is a file, not a folder"),  # was: after training
        (["--out", "/proc/streamgen-run"], "run.out: cannot make /proc/streamgen-run: No such file"),  # (a traceback)
        # overrides of other sizes than a model folder's weights: load_state_dict's traceback
        (["--set", "model.init={model}", "--set", "model.overrides.num_layers=9"],
         "dit.safetensors does not fit the model config (with model.overrides): "),  # fmt: skip
    ],
)
def test_a_config_the_stage_cannot_take_is_one_line_before_training(tmp_path, extra, says, capsys):
    from streamgen.cli import main
    from streamgen.models import MODELS_DIR

    a_file = tmp_path / "afile"
    a_file.write_text("")
    model = MODELS_DIR / "tiny-avatar"
    extra = [arg.replace("{file}", str(a_file)).replace("{model}", str(model)) for arg in extra]
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says.replace("{file}", str(a_file)) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("key", ["run.export", "run.out"])
def test_a_run_that_would_write_into_the_shipped_models_is_one_line_before_training(
    tmp_path, monkeypatch, capsys, key
):
    """run.export into streamgen/assets/models overwrote a shipped model (tiny-avatar-teacher, the
    default of every command that takes a teacher) with the run's, which only `distill.ship` does."""
    import streamgen.models
    from streamgen.cli import main

    shipped = tmp_path / "assets" / "models"
    (shipped / "tiny-avatar-teacher").mkdir(parents=True)
    (shipped / "tiny-avatar-teacher" / "model.json").write_text("{}")
    monkeypatch.setattr(streamgen.models, "MODELS_DIR", shipped)
    into = shipped / "tiny-avatar-teacher"
    out = into if key == "run.out" else tmp_path / "run"
    argv = ["distill", "teacher", "--config", "debug", "--out", str(out), "--steps", "1"]
    assert main([*argv, "--set", f"run.export={into}"] if key == "run.export" else argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"streamgen distill: error: {key} {into} is in the shipped models ({shipped}): give another folder, "
        "and ship a trained model with python -m distill.ship MODEL_DIR NAME\n"
    )
    assert sorted(p.name for p in shipped.rglob("*")) == ["model.json", "tiny-avatar-teacher"]
    assert (into / "model.json").read_text() == "{}" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["autoencoder", "tiny_decoder"])
def test_a_frame_size_the_autoencoder_cannot_take_is_one_line_before_training(stage, tmp_path, capsys):
    """The stages that train an autoencoder or its decoder did not check the frame size: a
    shape mismatch's traceback at the first step ("The size of tensor a (16) must match ...")."""
    from streamgen.cli import main

    argv = ["distill", stage, "--config", "debug", "--out", str(tmp_path / "run"), "--set", "model.height=17"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot build the {stage} stage from this config: frame size 17x" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_results_table_keeps_each_row_as_it_is_made(tmp_path, monkeypatch, capsys):
    """results.json was written once every row was evaluated: a failure on a late row (hours in)
    lost the others, and --missing-only had nothing to go on from; --render-only without it was
    a traceback."""
    from distill import results

    def one_row_then_fail(runs, out, clips, minutes, size, skip, on_row):
        on_row([{"row": "ground truth (renderer)", "model": "ground-truth"}])
        raise RuntimeError("the next row's model is missing")

    monkeypatch.setattr(results, "evaluate_rows", one_row_then_fail)
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--doc", str(tmp_path / "r.md")]
    with pytest.raises(RuntimeError):
        results.main(argv)
    assert [r["row"] for r in json.loads((tmp_path / "out" / "results.json").read_text())] == [
        "ground truth (renderer)"
    ]
    with pytest.raises(SystemExit) as exited:
        results.main(["--render-only", "--out", str(tmp_path / "none"), "--doc", str(tmp_path / "r.md")])
    assert exited.value.code == 2 and "run without --render-only first" in capsys.readouterr().err


def test_the_results_table_goes_into_a_document_without_its_markers_keeping_the_text(tmp_path):
    """A --doc without the table's markers (another document, or results.md from elsewhere) was
    replaced whole by the table: its text lost. The table is added at its end; a second run
    replaces that table only."""
    from distill import results

    row = {k: 0.0 for k in results.REPORT_KEYS} | {"row": "ground truth (renderer)", "nfe": None}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps([row]))
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nhours of writing\n")
    argv = ["--render-only", "--out", str(tmp_path / "out"), "--doc", str(doc)]
    for _ in range(2):
        assert results.main(argv) == 0
        text = doc.read_text()
        assert text.startswith("# Notes\n\nhours of writing\n")
        assert text.count("<!-- results:begin -->") == 1 and text.count("| ground truth (renderer) |") == 1


def test_an_export_that_another_export_keeps_out_is_one_line_and_resume_exports(tmp_path, monkeypatch, capsys):
    """The final export into `run.export` gives up after `LOCK_WAIT_S` where another export into
    the folder in place holds its lock (`streamgen.folder_lock`): that was a traceback after the
    whole run. It is one line that says how to export the trained weights, and --resume does."""
    import fcntl

    from streamgen import folder_lock, folders
    from streamgen.cli import main

    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("another export's")
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)  # (written in place, under the lock)
    monkeypatch.setattr(folder_lock, "LOCK_WAIT_S", 0.3)
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run"), "--steps", "1",
            "--set", f"run.export={export}"]  # fmt: skip
    held = os.open(export, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(argv) == 2
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert "gave up" in err and "--resume" in err and len(err.strip().splitlines()) == 1, err
    assert not (export / "model.json").exists()
    assert main([*argv, "--resume"]) == 0
    assert (export / "model.json").exists()
    # (it said "finished 1 step in ..." and no loss: no step ran)
    assert "had finished its 1 step already: its model was exported again" in capsys.readouterr().out


def test_a_full_disk_at_the_export_says_the_run_is_kept_and_resume_exports(tmp_path, monkeypatch, capsys):
    """The final export onto a full disk said "No space left on device" and no more, after the
    whole run: as if it were lost. It says where the trained weights are and how to export them."""
    from streamgen import model_export
    from streamgen.cli import main

    real_write = model_export.write_model_dir

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_export, "write_model_dir", full_disk)
    argv = ["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "run"), "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "could not export the trained model (No space left on device)" in err, err
    assert "last checkpoint" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(model_export, "write_model_dir", real_write)
    assert main([*argv, "--resume"]) == 0
    assert (tmp_path / "run" / "model" / "model.json").exists()


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Two runs into one run.out at once, before the first had saved a checkpoint, both trained and
    both said "finished": one log of both runs' steps, checkpoints and exports over each other."""
    import os

    from distill.trainer import RUN_LOCK, TrainingError, one_run_at_a_time

    out = tmp_path / "t"
    out.mkdir()
    with one_run_at_a_time(out):  # as the first run holds it
        in_use = rf"{out} is in use by another training run \(pid {os.getpid()} on "
        with pytest.raises(TrainingError, match=in_use):
            run(debug_config("teacher", out, **{"run.steps": 2}))
        assert not (out / "checkpoints").exists() and not (out / "scalars.jsonl").exists()
    run(debug_config("teacher", out, **{"run.steps": 2}))  # free once it ends
    assert (out / RUN_LOCK).exists() and ckpt.latest_checkpoint(out) is not None


def test_another_stages_model_is_not_written_into_when_its_checkpoints_are_gone(tmp_path):
    """Only checkpoints told a run.out apart: with them deleted, an autoencoder run replaced the
    autoencoder inside a teacher's exported model and left its DiT and model.json."""
    import shutil

    from distill.trainer import TrainingError

    out = tmp_path / "t"
    run(debug_config("teacher", out, **{"run.steps": 2}))
    shutil.rmtree(out / "checkpoints")
    before = (out / "model" / "vae.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"holds the model the teacher stage exported .* set run\.out"):
        run(debug_config("autoencoder", out, **{"run.steps": 2}))
    assert (out / "model" / "vae.safetensors").read_bytes() == before
    run(debug_config("teacher", out, **{"run.steps": 2}))  # its own stage: a fresh run, as before


def test_the_loss_plot_is_drawn_while_the_other_ranks_wait_for_rank_0(tmp_path, monkeypatch):
    """Rank 0 drew the loss curves (matplotlib's import, seconds under load) after the checkpoint's
    wait had ended: the other ranks' next collective waited under the process group's timeout."""
    import contextlib

    import distill.trainer
    from distill.monitor import Monitor

    waiting, plotted = [False], []

    @contextlib.contextmanager
    def others_wait(world):
        waiting[0] = True
        try:
            yield
        finally:
            waiting[0] = False

    plot = Monitor.plot
    monkeypatch.setattr(distill.trainer, "others_wait_for_main", others_wait)
    monkeypatch.setattr(Monitor, "plot", lambda self: (plotted.append(waiting[0]), plot(self)))
    run(debug_config("teacher", tmp_path / "t", **{"run.steps": 2, "run.checkpoint_every": 1}))
    assert plotted == [True, True] and (tmp_path / "t" / "loss_curves.png").is_file()


def test_a_run_refused_as_its_stage_is_built_leaves_no_folder_it_made(tmp_path, monkeypatch, capsys):
    """The ode stage without its teacher: refused once run.out was made and locked, which was left
    holding `.run.lock` alone (and the folders above it). A run.out there before stays."""
    from streamgen.cli import main

    monkeypatch.chdir(tmp_path)  # (the debug config's teacher, runs/debug/teacher/model: not there)
    assert main(["distill", "ode", "--config", "debug", "--out", "a/b/run"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    assert main(["distill", "ode", "--config", "debug", "--out", "mine"]) == 2
    assert (tmp_path / "mine").is_dir()


def test_a_missing_model_names_the_stage_and_the_command_that_make_it(tmp_path):
    """"... is not a model directory (no model.json); train the stage that makes it first" named
    neither the stage nor its command: a run's folder named as the Makefile names them says both."""
    from distill.build import ModelSourceError, load_dit

    runs = tmp_path / "runs"
    for folder, says in (("ode", "the ode stage makes it: `make ode RUNS="),
                         ("self_forcing_last_step", "the self_forcing stage makes it: `make self_forcing_last_step RUNS="),
                         ("elsewhere", "`python -m streamgen distill STAGE --config CONFIG --set run.out=RUN`")):  # fmt: skip
        with pytest.raises(ModelSourceError, match=re.escape(says)) as refused:
            load_dit(str(runs / folder / "model"))
        assert "train the stage that makes it first" in str(refused.value)
    with pytest.raises(ModelSourceError) as refused:
        load_dit(str(runs / "self_forcing_last_step" / "model"))
    assert f"--config tiny-avatar-last-step --set run.out={runs / 'self_forcing_last_step'}`" in str(refused.value)
