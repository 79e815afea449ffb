"""The files of a model directory are written whole or not at all (streamgen.model.files): each
through a temp file of its own beside it, fsynced, then renamed over it."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch


def test_a_write_cut_short_leaves_the_old_file_and_no_temp_file(tmp_path):
    from streamgen.model.files import write_atomically, write_text_atomically

    path = tmp_path / "model.json"
    write_text_atomically(path, '{"old": 1}')

    def cut_short(tmp):
        tmp.write_text('{"ne')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, cut_short)
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["model.json"]
    write_text_atomically(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2} and os.listdir(tmp_path) == ["model.json"]
    umask = os.umask(0)
    os.umask(umask)  # (mkstemp's files are the user's alone: a server of another user could not read them)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_two_writers_of_one_weight_file_do_not_share_a_temp_file(tmp_path, monkeypatch):
    """The temp file's name was fixed: a second export into the same directory wrote the first one's
    temp file and renamed it away, and the first one's rename failed (or took the other's bytes)."""
    import safetensors.torch

    from streamgen.model.files import load_safetensors, save_safetensors

    path = tmp_path / "dit.safetensors"
    real = safetensors.torch.save_file
    temps = []

    def meanwhile_another_writer(tensors, filename, metadata=None):
        temps.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(temps) == 1:
            save_safetensors({"w": torch.zeros(2)}, path)

    monkeypatch.setattr(safetensors.torch, "save_file", meanwhile_another_writer)
    save_safetensors({"w": torch.ones(2)}, path)
    assert temps[0] != temps[1]
    assert torch.equal(load_safetensors(path)["w"], torch.ones(2))  # the last rename's
    assert os.listdir(tmp_path) == ["dit.safetensors"]


def test_every_file_of_an_export_is_fsynced_then_renamed_into_place(tmp_path, monkeypatch):
    """vae_config.json was written in place (a kill mid-write left half a JSON file beside whole
    weights), and no file was fsynced before its rename (a power cut could leave it empty)."""
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.model_export import save_model
    from streamgen.models import load_model

    synced, replaced = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add((os.fstat(fd).st_dev, os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        replaced.append((os.path.basename(dst), (os.stat(src).st_dev, os.stat(src).st_ino) in synced))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    TinyCausalVAE(latent_channels=4).save(tmp_path / "vae")
    assert sorted(replaced) == [("vae.safetensors", True), ("vae_config.json", True)]
    replaced.clear()
    save_model(load_model("debug"), tmp_path / "model")
    files = ["dit.safetensors", "model.json", "vae.safetensors", "vae_config.json"]
    assert {name for name, _ in replaced} >= set(files)
    assert all(was_synced for _, was_synced in replaced), replaced
    assert sorted(os.listdir(tmp_path / "model")) == files  # (and no temp file or folder)


def _small_wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    from streamgen.model.wan_vae import WanVAE

    torch.manual_seed(seed)
    return WanVAE(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval())  # fmt: skip


def test_a_wan_vae_is_saved_whole_fsynced_or_not_at_all(tmp_path, monkeypatch):
    """WanVAE.save was diffusers' save_pretrained into wan_vae/ in place: no file fsynced (a power
    cut soon after could leave them empty), a kill mid-save left half a folder over the old one. It
    is written in a folder beside, its files and it fsynced, then put in wan_vae/'s place whole."""
    pytest.importorskip("diffusers")
    from streamgen.model.wan_vae import WanVAE

    old, new = _small_wan_vae(0), _small_wan_vae(1)
    old.save(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "wan_vae").iterdir()}
    real_save = type(new.vae).save_pretrained

    def cut_short(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(new.vae), "save_pretrained", cut_short)
    with pytest.raises(OSError, match="No space left"):
        new.save(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "wan_vae").iterdir()} == before
    assert os.listdir(tmp_path) == ["wan_vae"]

    synced, real_fsync = set(), os.fsync

    def fsync(fd):
        synced.add((os.fstat(fd).st_dev, os.fstat(fd).st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    new.save(tmp_path)
    monkeypatch.undo()
    paths = [tmp_path / "wan_vae", *(tmp_path / "wan_vae").iterdir(), tmp_path]
    assert [p.name for p in paths if (p.stat().st_dev, p.stat().st_ino) not in synced] == []
    assert os.listdir(tmp_path) == ["wan_vae"]
    loaded = WanVAE.load(tmp_path).vae.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in new.vae.state_dict().items())


def test_an_exports_weights_have_the_umasks_mode(tmp_path):
    """safetensors' save_file (0.8) writes a file of its own and renames it over the one it is
    given, with mode 0600: every weights file written atomically (a model's DiT and autoencoder,
    checkpoints) was the writer's alone, so a server run as another user could not load a model
    `make model` had exported, unlike its model.json beside them."""
    from streamgen.model.config import get_config
    from streamgen.model.files import save_safetensors
    from streamgen.model.model import DiT
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.model_export import save_model
    from streamgen.models import AvatarModel

    umask = os.umask(0o022)
    try:
        model = AvatarModel("m", DiT(get_config("debug")).eval(), TinyCausalVAE(4, (8, 16), 4).eval())
        save_model(model, tmp_path / "model")
        save_safetensors({"w": torch.ones(2)}, tmp_path / "step.safetensors")
    finally:
        os.umask(umask)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert modes == dict.fromkeys(modes, oct(0o644))


@pytest.mark.parametrize("breakage", ["a folder", "a link's loop"])
def test_a_weight_file_that_cannot_be_read_says_why(tmp_path, breakage, capsys):
    """safetensors called any file it could not open "No such file or directory": a folder in its
    place, a symbolic link's loop, a file it may not read (as root no file is unreadable here)."""
    import shutil

    from streamgen.cli import main
    from streamgen.models import MODELS_DIR, load_model

    model = tmp_path / "model"
    shutil.copytree(MODELS_DIR / "tiny-avatar", model)
    weights = model / "dit.safetensors"
    weights.unlink()
    if breakage == "a folder":
        weights.mkdir()
        why = "Is a directory"
    else:
        weights.symlink_to(weights)
        why = "Too many levels of symbolic links"
    with pytest.raises(ValueError, match=f"dit.safetensors: cannot read it \\({why}\\)"):
        load_model(str(model))
    assert main(["generate", "--model", str(model), "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"cannot read it ({why})") and len(err.splitlines()) == 1, err


def test_a_model_json_that_cannot_be_read_says_why(tmp_path):
    """Its PermissionError (or IsADirectoryError) was a traceback through every command."""
    from streamgen.model.files import read_json

    (tmp_path / "model.json").mkdir()
    with pytest.raises(ValueError, match="model.json: cannot read it \\(Is a directory\\)"):
        read_json(tmp_path / "model.json")
    with pytest.raises(FileNotFoundError):  # (not there stays not there: callers tell it apart)
        read_json(tmp_path / "missing.json")


def test_loading_a_model_leaves_torch_dynamo_unimported():
    """The DiT's shapes, checked on the meta device before its weights load, divided two of its
    parameters out of place: on meta tensors that goes through torch's Python references, which
    import torch._dynamo (and Triton): 2-3 s more for every process that loads a model (a
    server, each --sp rank, the model process)."""
    import subprocess
    import sys

    probe = "import sys; from streamgen.models import load_model; load_model('tiny-avatar'); print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("file, bad", [("dit.safetensors", float("nan")), ("vae.safetensors", float("-inf"))])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(tmp_path, file, bad):
    """A diverged run's NaN or infinite weights loaded without a word: generate wrote a black video."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from streamgen.models import MODELS_DIR, load_model

    d = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "tiny-avatar", d)
    tensors = load_file(str(d / file))
    with safe_open(str(d / file), "pt") as f:
        metadata = f.metadata()  # (the autoencoder's config)
    name = sorted(tensors)[3]
    tensors[name].view(-1)[-1] = bad
    save_file(tensors, str(d / file), metadata=metadata)
    with pytest.raises(ValueError) as e:
        load_model(str(d))
    assert str(e.value).startswith(f"{d / file}: its {name} holds NaN or infinite values"), e.value


def test_large_finite_half_precision_weights_are_finite():
    """The check reads each tensor's least and greatest value: a sum of float16 weights overflowed."""
    from streamgen.model.files import non_finite_tensor

    tensors = {"big": torch.full((4096,), 60000.0, dtype=torch.float16), "empty": torch.zeros(0),
               "steps": torch.arange(3), "low": torch.full((8,), -3e38)}  # fmt: skip
    assert non_finite_tensor(tensors) is None
    tensors["later"] = torch.tensor([1.0, float("inf"), -float("inf")], dtype=torch.bfloat16)
    assert non_finite_tensor(tensors) == "later"
