"""Resume: what a checkpoint's run was made of, checked against the config that continues it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from test_distill_helpers import debug_config, final_tensors, max_difference, run

import distill
from streamgen import checkpoint as ckpt

CONFIGS = Path(distill.__file__).parent / "configs"


# --- a Wan-initialised run from before the audio-width change ------------------------------------


def test_a_wan_run_from_before_the_audio_width_change_resumes_with_the_width_given(
    tmp_path, monkeypatch, capsys
):
    """config_from_diffusers now gives a Wan checkpoint the size of a flavor that flavor's audio
    width (wan2.1-1.3b: 512); a run started before took the default 256, and its checkpoints are
    refused (`audio_dim: checkpoint 256, config 512`). The refusal says how to go on, and going on
    that way resumes it: the same weights as the run never interrupted."""
    from streamgen.cli import main
    from streamgen.model import config as model_config
    from streamgen.model.model import DiT
    from streamgen.model.wan import save_pretrained

    sizes = dict(in_channels=4, out_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                 text_dim=16, freq_dim=32)  # fmt: skip
    torch.manual_seed(3)
    save_pretrained(DiT(model_config.ModelConfig(**sizes, audio_mels=16)), tmp_path / "wan")
    yaml = tmp_path / "wan-teacher.yaml"
    yaml.write_text(
        (CONFIGS / "teacher-debug.yaml")
        .read_text()
        .replace(
            "model: {flavor: debug,",
            f"model: {{flavor: debug, init: 'wan:{tmp_path / 'wan'}', "
            "overrides: {audio_mels: 16, frames_per_chunk: 2, window_frames: 6},",
        )
    )

    def command(out, *extra):
        return ["distill", "teacher", "--config", str(yaml), "--out", str(tmp_path / out), *extra]

    # before the change: no flavor has these sizes, so the default audio width (256)
    assert main(command("whole")) == 0
    assert main([*command("cut"), "--steps", "2"]) == 0
    header = ckpt.checkpoint_header(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert header["model_configs"]["teacher"]["audio_dim"] == 256
    # the change: a flavor of these sizes, 512 wide
    wide = model_config.ModelConfig(name="wan-tiny", **sizes, audio_dim=512)
    monkeypatch.setitem(model_config.FLAVORS, "wan-tiny", wide)
    capsys.readouterr()
    assert main([*command("cut"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "teacher.audio_dim: checkpoint 256, config 512" in err, err
    assert "--set model.overrides.audio_dim=256" in err, err
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000002.safetensors"
    # the way the message says: resumed where it stopped, and the same run as the whole one
    assert main([*command("cut"), "--resume", "--set", "model.overrides.audio_dim=256"]) == 0, (
        capsys.readouterr()
    )
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000004.safetensors"
    assert max_difference(final_tensors(tmp_path / "cut"), final_tensors(tmp_path / "whole")) < 1e-6
    from streamgen.models import load_model

    assert load_model(str(tmp_path / "cut" / "model")).dit.cfg.audio_dim == 256


# --- settings a resume would silently change ------------------------------------------------------


def test_a_resume_with_other_crops_or_clips_is_refused_unless_set_on_purpose(tmp_path):
    """Only run.seed and data.batch_size were compared: another data.latent_frames (every crop
    another length) or data.synthetic_clips (other clips) went on as a run no config describes."""
    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)
    for key, value, was in (("data.latent_frames", 2, 4), ("data.synthetic_clips", 5, 6)):
        changed = debug_config("teacher", out, **{key: value})
        with pytest.raises(
            ckpt.CheckpointError,
            match=rf"{re.escape(key)}: checkpoint {was}, config {value}\).*--set {key}={value}",
        ):
            run(changed, resume=True)
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    on_purpose = debug_config("teacher", out, **{"data.latent_frames": 2})
    on_purpose.set_keys = ("data.latent_frames",)
    run(on_purpose, resume=True)
    header = ckpt.checkpoint_header(ckpt.latest_checkpoint(out))
    assert header["step"] == 4 and header["run_settings"]["data.latent_frames"] == 2


def test_a_resume_with_other_student_steps_is_refused_unless_set_on_purpose(tmp_path):
    """self_forcing.student_steps (and shift) make the student's noise levels: changed on a resume,
    the run went on training (and exported) another schedule than the one it began."""
    teacher = tmp_path / "teacher"
    run(debug_config("teacher", teacher, **{"run.steps": 1}))
    out = tmp_path / "sf"
    cfg = debug_config("self_forcing", out, teacher=teacher / "model", init=teacher / "model")
    run(cfg, stop_after=2)
    fewer = debug_config("self_forcing", out, teacher=teacher / "model", init=teacher / "model",
                         **{"self_forcing.student_steps": 1})  # fmt: skip
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"self_forcing\.student_steps: checkpoint 2, config 1\).*--set self_forcing\.student_steps=1",
    ):
        run(fewer, resume=True)
    fewer.set_keys = ("self_forcing.student_steps",)
    run(fewer, resume=True)
    assert ckpt.checkpoint_header(ckpt.latest_checkpoint(out))["step"] == 4


def test_a_resume_with_another_chunk_size_is_refused(tmp_path):
    """frames_per_chunk is the model's (its config in the checkpoint): already refused, by name."""
    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)
    cfg = debug_config("teacher", out, **{"model.overrides": {"frames_per_chunk": 3}})
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"teacher\.frames_per_chunk: checkpoint 2, config 3.*--set model\.overrides\.frames_per_chunk=2",
    ):
        run(cfg, resume=True)


@pytest.mark.parametrize("kept", ["seed and batch size", "config text only"])
def test_checkpoints_from_before_the_new_settings_are_not_checked_for_them(tmp_path, monkeypatch, kept):
    """A checkpoint that does not record a setting resumes whatever the config says of it."""
    real = ckpt.save_checkpoint

    def as_before(out, step, tensors, meta, keep=3):
        meta = {k: v for k, v in meta.items() if k not in ("run_settings", "data_identity")}
        if kept == "seed and batch size":
            meta["run_settings"] = {"run.seed": 0, "data.batch_size": 4}
        return real(out, step, tensors, meta, keep)

    monkeypatch.setattr(ckpt, "save_checkpoint", as_before)
    out = tmp_path / "t"
    run(debug_config("teacher", out), stop_after=2)
    run(debug_config("teacher", out, **{"data.latent_frames": 2, "data.synthetic_clips": 5}), resume=True)
    assert ckpt.checkpoint_header(ckpt.latest_checkpoint(out))["step"] == 4
    with pytest.raises(ckpt.CheckpointError, match=r"run\.seed: checkpoint 0, config 1"):
        run(debug_config("teacher", out, **{"run.seed": 1, "run.steps": 6}), resume=True)


def test_a_teacher_digest_of_no_file_recorded_before_is_not_checked(tmp_path):
    """weights_digest hashed no file of a `wan:` pipeline folder (its weights are in transformer/):
    trajectories and checkpoints recorded then keep the digest of nothing, which says nothing about
    the teacher. Now that the folder's weights are hashed, such a record is taken as no record, as
    a checkpoint from before digests were kept is; another digest is still refused."""
    import hashlib
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from distill.config import ConfigError
    from distill.ode import Stage
    from distill.trainer import Trainer

    nothing, now = hashlib.sha1().hexdigest()[:16], "0123456789abcdef"
    trajectories = tmp_path / "trajectories.safetensors"
    save_file({"states": torch.zeros(1)}, str(trajectories), metadata={"teacher_weights": nothing})
    Stage._check_trajectories(trajectories, {"teacher_weights": now})
    cfg = debug_config("self_forcing", tmp_path / "sf", teacher=tmp_path / "wan")
    trainer = SimpleNamespace(cfg=cfg, input_identity={"self_forcing.teacher": now})
    meta = {"step": 2, "stage": "self_forcing", "input_identity": {"self_forcing.teacher": nothing}}
    Trainer._check_inputs(trainer, ckpt.save_checkpoint(tmp_path / "sf", 2, {}, meta))
    # a digest of some file still tells another teacher
    save_file({"states": torch.zeros(1)}, str(trajectories), metadata={"teacher_weights": "fedcba9876543210"})
    with pytest.raises(ConfigError, match="teacher_weights: fedcba9876543210 there"):
        Stage._check_trajectories(trajectories, {"teacher_weights": now})
    meta["input_identity"] = {"self_forcing.teacher": "fedcba9876543210"}
    with pytest.raises(ckpt.CheckpointError, match="other weights than the run's"):
        Trainer._check_inputs(trainer, ckpt.save_checkpoint(tmp_path / "sf", 4, {}, meta))


def test_a_resume_that_turns_the_ema_on_starts_it_from_the_weights_resumed(tmp_path, capsys):
    """A checkpoint trained with optim.ema 0 was refused by a resume with an EMA ('no EMA weights'):
    the run could only start over. The average starts from the weights resumed."""
    out = tmp_path / "t"
    run(debug_config("teacher", out, **{"optim.ema": 0.0}), stop_after=2)
    assert not any(k.startswith("ema/") for k in final_tensors(out))
    run(debug_config("teacher", out, **{"optim.ema": 0.9, "run.steps": 3}), resume=True)
    assert "has no EMA weights for" in capsys.readouterr().err
    tensors = final_tensors(out)
    ema = {k.removeprefix("ema/"): v for k, v in tensors.items() if k.startswith("ema/")}
    module = {k.removeprefix("module/"): v for k, v in tensors.items() if k.startswith("module/")}
    assert ema.keys() == module.keys() and ckpt.checkpoint_header(ckpt.latest_checkpoint(out))["step"] == 3


def test_a_resume_over_a_safetensors_file_that_is_no_checkpoint_says_so(tmp_path):
    """A model's weights (or any safetensors file) in checkpoints/ was "written by stage None"."""
    from safetensors.torch import save_file

    from distill.trainer import Trainer

    folder = ckpt.checkpoint_dir(tmp_path / "run")
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "step-00000002.safetensors"))
    with pytest.raises(ckpt.CheckpointError) as e:
        Trainer(debug_config("teacher", tmp_path / "run"), resume=True).run()
    assert str(e.value) == (
        f"{folder / 'step-00000002.safetensors'} is not a streamgen training checkpoint (no streamgen "
        f"metadata in its header): move it out of {folder}, or set run.out to a new folder"
    )


def test_a_sigterm_says_which_checkpoint_a_resume_goes_on_from(tmp_path):
    """SIGTERM (`timeout`, `kill`, a job scheduler) ended a run without a word (exit 143 and
    nothing said); it ends as a Ctrl-C does, naming the checkpoint a --resume goes on from."""
    from cli_helpers import terminated_once

    out = tmp_path / "t"
    argv = ["distill", "teacher", "--config", "debug", "--out", str(out), "--steps", "100000"]
    # (the imports and the first checkpoint, at step 2: seconds)
    code, err = terminated_once(argv, lambda: ckpt.latest_checkpoint(out) is not None)
    assert code == 143 and "Traceback" not in err, err
    newest = ckpt.latest_checkpoint(out)
    assert f"teacher: the newest checkpoint is {newest}" in err and "with --resume goes on from it" in err, err
    assert "terminated" in err


def test_a_sigterm_that_failed_an_import_says_where_a_resume_goes_on_from(tmp_path, monkeypatch):
    """The SIGTERM of the test above came once (CI) as the first checkpoint's plot imported
    matplotlib: its import failed, an ImportError caused by the stop, and the run ended in that
    traceback, exit 1, saying nothing of the checkpoint to go on from."""
    import distill.cli
    import streamgen.cli
    from distill.trainer import Trainer
    from streamgen.cli import main

    def run(self):
        raise ImportError("initialization failed") from streamgen.cli.Terminated(15)

    said = []
    monkeypatch.setattr(Trainer, "run", run)
    monkeypatch.setattr(distill.cli, "_say_where_to_go_on", lambda args, out, *_: said.append(out))
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as ended:
        main(["distill", "teacher", "--config", "debug", "--out", str(out), "--steps", "4"])
    assert ended.value.code == 143 and said == [str(out)]


def test_a_sigterm_that_comes_while_a_finalizer_runs_still_ends_the_run(tmp_path):
    """A SIGTERM that came while a finalizer ran (a weakref callback of torch's, once in a few tries
    of the test above) raised its SystemExit inside it, where Python prints "Exception ignored in"
    and goes on: the run trained on, the signal lost."""
    import subprocess
    import sys

    script = """
import os, signal, sys, time
from streamgen.cli import terminate_as_exit
terminate_as_exit()
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # (its handler runs here, inside the finalizer)
        sum(range(1000))
Finalized()
end = time.monotonic() + 20
while time.monotonic() < end:  # (the training going on)
    pass
print("went on", file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143 and "went on" not in done.stderr, done.stderr
    assert done.stderr.count("terminated") == 1, done.stderr


def test_a_ctrl_c_says_which_checkpoint_a_resume_goes_on_from(tmp_path, monkeypatch, capsys):
    """A Ctrl-C said "interrupted" and no more: nothing said that a run goes on with --resume, nor
    from which step."""
    from streamgen.cli import main

    real_save = ckpt.save_checkpoint

    def stopped_after_the_first(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        raise KeyboardInterrupt  # (a Ctrl-C right after the checkpoint)

    monkeypatch.setattr(ckpt, "save_checkpoint", stopped_after_the_first)
    out = tmp_path / "t"
    command = ["distill", "teacher", "--config", "debug", "--out", str(out)]
    assert main(command) == 130
    err = capsys.readouterr().err
    newest = ckpt.latest_checkpoint(out)
    assert f"teacher: the newest checkpoint is {newest} (step 2); the same command with --resume goes on from it" in err
    assert err.rstrip().endswith("interrupted"), err
    assert main([*command, "--resume"]) == 130  # (stopped again: a --resume is the same command)
    assert "(step 4); the same command goes on from it" in capsys.readouterr().err


def test_a_ctrl_c_before_the_first_checkpoint_says_the_steps_taken_are_lost(tmp_path, monkeypatch, capsys):
    """A Ctrl-C before the first checkpoint (a tiny-avatar stage saves every 250 steps, minutes
    apart) said "interrupted" alone: nothing said that the steps taken were lost, nor that the same
    command starts again from step 0."""
    from streamgen.cli import main

    def stopped_before_the_first(*args, **kwargs):
        raise KeyboardInterrupt  # (a Ctrl-C at step 2, as its checkpoint was to be written)

    monkeypatch.setattr(ckpt, "save_checkpoint", stopped_before_the_first)
    out = tmp_path / "t"
    command = ["distill", "teacher", "--config", "debug", "--out", str(out)]
    assert main(command) == 130
    err = capsys.readouterr().err
    assert ckpt.latest_checkpoint(out) is None
    said = (
        f"teacher: no checkpoint was saved yet in {out} (the first comes after step 2; --set "
        "run.checkpoint_every=N saves more often): the steps taken are not kept, and the same command "
        "starts the run again from step 0"
    )
    assert said in err, err
    assert err.rstrip().endswith("interrupted"), err
    assert main([*command, "--steps", "1"]) == 130  # (fewer steps than run.checkpoint_every: the last one's)
    assert "(the first comes after step 1;" in capsys.readouterr().err


# --- the run's own model sources -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """The folder of a 4-step debug teacher run of `seed`, trained once for the module (on first use):
    eight tests' models of their own autoencoders were the same two runs, each trained again."""
    root = tmp_path_factory.mktemp("trained")
    made = {}

    def get(seed: int) -> Path:
        if seed not in made:
            run(debug_config("teacher", root / f"seed-{seed}", **{"run.seed": seed}))
            made[seed] = root / f"seed-{seed}"
        return made[seed]

    return get


def _model_with_its_own_autoencoder(trained_runs, tmp_path, name: str = "first", seed: int = 5) -> Path:
    """A teacher model whose autoencoder is not the random one a config without model.init makes
    (another seed's), in the test's folder `name` (a copy of trained_runs': the tests move and remove
    it, and a copy is the same model, whose digest is of its files' bytes)."""
    shutil.copytree(trained_runs(seed), tmp_path / name)
    return tmp_path / name / "model"


def test_a_resume_without_model_init_goes_on_with_the_runs_autoencoder(trained_runs, tmp_path, capsys):
    """A run begun with model.init and resumed without it went on with a new random autoencoder (and
    exported it with the model), without a word: the resume takes the run's from its checkpoint."""
    from safetensors.torch import load_file

    init = _model_with_its_own_autoencoder(trained_runs, tmp_path)
    run(debug_config("teacher", tmp_path / "whole", init=init))
    run(debug_config("teacher", tmp_path / "cut", init=init, **{"run.steps": 2}))
    capsys.readouterr()
    run(debug_config("teacher", tmp_path / "cut"), resume=True)
    assert f"resuming with model.init: {init.resolve()}, the run's" in capsys.readouterr().err
    made, whole = (load_file(tmp_path / out / "model" / "vae.safetensors") for out in ("cut", "whole"))
    assert made.keys() == whole.keys() and all(torch.equal(made[k], whole[k]) for k in whole)
    assert max_difference(final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "cut")) == 0


def test_a_resume_whose_runs_model_init_is_gone_says_so(trained_runs, tmp_path, capsys):
    from streamgen.cli import main

    init = _model_with_its_own_autoencoder(trained_runs, tmp_path)
    run(debug_config("teacher", tmp_path / "cut", init=init, **{"run.steps": 2}))
    where = init.resolve()
    init.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["distill", "teacher", "--config", "debug", "--out", str(tmp_path / "cut"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"read model.init: {where}, which is no longer there" in err and "--set model.init=PATH" in err
    assert "Traceback" not in err


def _a_run_cut_at_step_2_from_one_of_two_models(trained_runs, tmp_path, key: str) -> tuple[Path, Path, Path]:
    """(first, second, cut): two teacher models of their own autoencoders, and a run's folder cut
    at step 2 whose `key` (model.init or model.vae) read the first."""
    first = _model_with_its_own_autoencoder(trained_runs, tmp_path)
    _model_with_its_own_autoencoder(trained_runs, tmp_path, "second", seed=6)
    cut = tmp_path / "cut"
    cfg = debug_config("teacher", cut, **{"run.steps": 2})
    setattr(cfg.model, key.split(".")[1], str(first))
    run(cfg)
    return first, tmp_path / "second" / "model", cut


@pytest.mark.parametrize("key", ["model.init", "model.vae"])
def test_a_resume_whose_config_names_another_model_source_is_refused(
    trained_runs, tmp_path, monkeypatch, capsys, key
):
    """A run's checkpoint keeps its model.init and model.vae (model_sources), but a resume whose config
    named another went on from that one without a word: its frozen autoencoder, which checkpoints do
    not keep, trained the rest of the run through other latents and was exported with the model. It
    is refused in one line (exit 2), before anything is built; the run's own source spelt otherwise
    (relative, from another folder), and where it is now once moved, still resume."""
    from streamgen.cli import main

    first, second, cut = _a_run_cut_at_step_2_from_one_of_two_models(trained_runs, tmp_path, key)
    capsys.readouterr()
    command = ["distill", "teacher", "--config", "debug", "--out", str(cut), "--resume", "--steps", "4"]
    assert main([*command, "--set", f"{key}={second}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning: model.vae_widths")]
    assert len(lines) == 1 and lines[0].startswith("streamgen distill: error: ") and "Traceback" not in err, err
    assert f"read {key}: {first.resolve()}, and this config gives {second}" in err
    assert f"--set {key}={first.resolve()}" in err and "set run.out to a new folder" in err
    assert ckpt.latest_checkpoint(cut).name == "step-00000002.safetensors"
    # a run that read none, resumed with one: its autoencoder was a seeded random one
    none = tmp_path / "none"
    run(debug_config("teacher", none, **{"run.steps": 2}))
    capsys.readouterr()
    assert main([*command[:4], "--out", str(none), "--resume", "--set", f"{key}={second}"]) == 2
    assert f"of a run that read no {key}, and this config gives {second}" in capsys.readouterr().err
    # the same source, relative from another folder: the run goes on
    monkeypatch.chdir(tmp_path)
    assert main([*command[:6], "--resume", "--steps", "3", "--set", f"{key}=first/model"]) == 0
    assert ckpt.latest_checkpoint(cut).name == "step-00000003.safetensors"
    # moved, and given where it is now (as the refusal of a source no longer there says to)
    first.rename(tmp_path / "moved")
    assert main([*command, "--set", f"{key}=moved"]) == 0
    assert ckpt.latest_checkpoint(cut).name == "step-00000004.safetensors"


@pytest.mark.parametrize("key", ["model.init", "model.vae"])
def test_a_resume_whose_runs_model_source_moved_takes_only_a_copy_of_the_same_model(
    trained_runs, tmp_path, capsys, key
):
    """Where the run's model.init (or model.vae) was no longer there, a resume took whatever source
    its config gave as the moved one: another model's autoencoder went on training the run without a
    word. The checkpoint keeps the digest of the source's weights: a moved copy of the same model
    resumes, another is refused in one line (exit 2)."""
    from streamgen.cli import main

    first, second, cut = _a_run_cut_at_step_2_from_one_of_two_models(trained_runs, tmp_path, key)
    shutil.copytree(first, tmp_path / "copy")
    shutil.rmtree(tmp_path / "first")
    capsys.readouterr()
    command = ["distill", "teacher", "--config", "debug", "--out", str(cut), "--resume", "--steps", "3"]
    assert main([*command, "--set", f"{key}={second}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning: model.vae_widths")]
    assert len(lines) == 1 and lines[0].startswith("streamgen distill: error: ") and "Traceback" not in err, err
    assert f"read {key}: {first.resolve()}, which is no longer there, and {second} is another model" in err
    assert ckpt.latest_checkpoint(cut).name == "step-00000002.safetensors"
    assert main([*command, "--set", f"{key}={tmp_path / 'copy'}"]) == 0
    assert ckpt.latest_checkpoint(cut).name == "step-00000003.safetensors"


def test_the_model_sources_of_a_checkpoint_from_before_they_were_kept_are_read_from_its_config():
    from distill.config import model_sources_in_text

    text = "stage: teacher\nmodel: {flavor: debug, init: runs/t/model}\n# --set model.vae=runs/ae/model\n"
    assert model_sources_in_text(text) == {"model.init": "runs/t/model", "model.vae": "runs/ae/model"}
    assert model_sources_in_text("model: {flavor: debug}\n") == {"model.init": None, "model.vae": None}
    assert model_sources_in_text("model: [") == {}


def test_where_a_model_source_is_found_again(trained_runs, tmp_path, monkeypatch):
    """A folder by its absolute path (a resume from another folder finds it), a shipped model by its
    name, and nothing for what is not there (a name too long for the file system: no OSError)."""
    from distill.build import found_source

    model = _model_with_its_own_autoencoder(trained_runs, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert found_source("first/model") == str(model.resolve())
    assert found_source(f"wan:{tmp_path / 'first'}") == f"wan:{(tmp_path / 'first').resolve()}"
    assert found_source("tiny-avatar") == "tiny-avatar"
    assert found_source("first/none") is None and found_source("x" * 5000) is None
    assert found_source("wan:" + "x" * 5000) is None


def test_a_runs_model_source_digest_is_taken_from_the_bytes_its_load_reads(trained_runs, tmp_path, monkeypatch):
    """The digest a checkpoint keeps of model.init (model_source_digests) read every weight file of
    the source again once the stage had loaded it: a Wan checkpoint's transformer, GBs, read twice.
    It is hashed from the bytes the load reads (those the load does not read, from disk), and is
    the digest `source_digest` gives of the same files, which a moved source is checked against."""
    from safetensors.torch import save_file

    import distill.build as build
    from streamgen.model import config as model_config
    from streamgen.model.files import watching_loads
    from streamgen.model.model import DiT
    from streamgen.model.wan import load_pretrained, save_pretrained

    read_from_disk = []
    hash_file = build._hash_file
    monkeypatch.setattr(build, "_hash_file", lambda h, path: (read_from_disk.append(path.name), hash_file(h, path)))
    # a run from a model directory: its dit.safetensors is read by the load alone
    init = _model_with_its_own_autoencoder(trained_runs, tmp_path)
    read_from_disk.clear()
    run(debug_config("teacher", tmp_path / "from-init", init=init, **{"run.steps": 1}))
    kept = ckpt.checkpoint_header(ckpt.latest_checkpoint(tmp_path / "from-init"))["model_source_digests"]
    assert "dit.safetensors" not in read_from_disk and "vae.safetensors" in read_from_disk
    read_from_disk.clear()
    assert kept == {"model.init": build.source_digest(str(init))} and "dit.safetensors" in read_from_disk
    # a Wan pipeline: its transformer's shards from the load's bytes, its vae/ (not loaded) from disk
    sizes = dict(in_channels=4, out_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                 text_dim=16, freq_dim=32)  # fmt: skip
    save_pretrained(DiT(model_config.ModelConfig(**sizes, audio_mels=16)), tmp_path / "wan" / "transformer")
    (tmp_path / "wan" / "vae").mkdir()
    save_file({"w": torch.ones(3)}, tmp_path / "wan" / "vae" / "diffusion_pytorch_model.safetensors")
    source = f"wan:{tmp_path / 'wan'}"
    read_from_disk.clear()
    with watching_loads(build.SourceDigests({"model.init": source, "model.vae": source})) as digests:
        load_pretrained(tmp_path / "wan")
    found = digests.digests()
    assert read_from_disk == ["diffusion_pytorch_model.safetensors"] * 2  # (vae/'s, once a source)
    assert found == {"model.init": build.source_digest(source), "model.vae": build.source_digest(source)}
