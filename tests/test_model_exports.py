"""A model directory exported over (a re-export, ship): every reader finds one whole export, old or
new, at every step of the writing, and what else the directory holds stays."""

from __future__ import annotations

import os

import pytest
import torch
from file_steps import check_after_each_file_step

pytest.importorskip("diffusers")

from test_model_dirs import HEIGHT, WIDTH, export, wan_based_model  # noqa: E402

from streamgen.model import DiT, get_config  # noqa: E402
from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig, TinyDecoderVAE  # noqa: E402
from streamgen.model.wan_vae import WanVAE  # noqa: E402
from streamgen.models import AvatarModel, load_autoencoder, load_model  # noqa: E402


def test_an_export_over_a_model_directory_replaces_its_whole_autoencoder(tmp_path):
    """A re-export (or ship) into a directory that held another autoencoder left that one's files:
    a tiny decoder, or a Wan VAE, that load_autoencoder then took over the new one."""
    from streamgen.model.vae import TinyCausalVAE

    d = tmp_path / "model"
    export(wan_based_model(tiny_decoder=True), d)
    assert isinstance(load_autoencoder(d), TinyDecoderVAE)
    plain = AvatarModel(
        "plain", DiT(get_config("debug")).eval(), TinyCausalVAE(latent_channels=4), HEIGHT, WIDTH
    )
    export(plain, d)
    assert type(load_autoencoder(d)) is TinyCausalVAE
    assert not (d / "wan_vae").exists() and not (d / "tiny_decoder.safetensors").exists()
    export(wan_based_model(), d)  # and back: the TinyCausalVAE's files go
    assert type(load_autoencoder(d)) is WanVAE and not (d / "vae_config.json").exists()


def _autoencoder(name: str):
    """`tiny`, `tiny-other-config`, `wan`, `wan-other-weights`, `wan-other-config`, and `+td` /
    `+other-td`: behind a tiny decoder (of other weights)."""
    from diffusers import AutoencoderKLWan

    from streamgen.model.vae import TinyCausalVAE

    base, _, decoder = name.partition("+")
    torch.manual_seed(len(base))
    if base.startswith("wan"):
        # (another config.json: the latent statistics of a VAE tuned again)
        stats = {"latents_mean": [0.1, -0.2, 0.0, 0.3], "latents_std": [1.5, 0.5, 1.0, 2.0]}
        config = stats if base == "wan-other-config" else {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
        vae = WanVAE(
            AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, **config).eval()
        )
    else:
        vae = TinyCausalVAE(4, (16, 32, 48, 64) if base == "tiny-other-config" else (8, 16, 24, 32))
    if decoder:
        torch.manual_seed(len(decoder))
        cfg = TinyDecoderConfig(latent_channels=4, widths=(16, 12, 8, 8), blocks_per_stage=1)
        vae = TinyDecoderVAE(vae, TinyDecoder(cfg).eval())
    return vae.eval()


def _parts(vae) -> tuple:
    """What a reader loaded: its base autoencoder and its tiny decoder (None), as (class, tensors)."""
    base, decoder = (vae.vae, vae.decoder) if isinstance(vae, TinyDecoderVAE) else (vae, None)
    return tuple(None if m is None else (type(m).__name__, m.state_dict()) for m in (base, decoder))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize(
    "old, new, whole",
    [
        ("tiny", "tiny-other-config", True),
        ("tiny", "wan", True),
        ("wan", "tiny", True),
        ("wan", "wan-other-weights", True),
        ("wan", "wan-other-config", True),  # its weights were renamed in before its config.json
        ("wan+td", "wan+other-td", True),
        ("wan+td", "wan", True),
        ("wan", "wan+td", True),
        ("tiny+td", "tiny", True),
        # the tiny decoder and the base both change: a tiny decoder is never over a base it was
        # not saved with; the base meanwhile decodes with its own decoder
        ("wan+td", "tiny", False),
        ("tiny", "wan+td", False),
    ],
)
def test_a_reader_finds_the_whole_old_or_the_whole_new_autoencoder_at_every_step(
    tmp_path, monkeypatch, old, new, whole
):
    """The old autoencoder's files were deleted before the new ones were moved in, a Wan VAE's
    folder file by file: a server loading the model meanwhile found no autoencoder, half a Wan VAE,
    or one autoencoder's config beside another's weights. Every rename and removal of the swap is
    followed here by a load of the directory."""

    from streamgen.model_export import _replace_autoencoder

    expected = {}
    for which, name in (("old", old), ("new", new)):
        _autoencoder(name).save(tmp_path / which)
        expected[which] = _parts(load_autoencoder(tmp_path / which))
    d = tmp_path / "model"
    d.mkdir()
    _autoencoder(old).save(d)
    allowed = [expected["old"], expected["new"]]
    if not whole:
        allowed += [(expected["old"][0], None), (expected["new"][0], None)]
    def whole_one(after):
        try:
            found = _parts(load_autoencoder(d))
        except Exception as e:
            found = f"{type(e).__name__}: {e}"
        what = found if isinstance(found, str) else [part and part[0] for part in found]
        whole = not isinstance(found, str) and any(
            _same(found[0], a[0]) and _same(found[1], a[1]) for a in allowed
        )
        assert whole, f"{after}: a reader found {what}"

    seen = check_after_each_file_step(monkeypatch, whole_one)
    _replace_autoencoder(_autoencoder(new), d)
    monkeypatch.undo()
    assert seen and all(_same(a, b) for a, b in zip(_parts(load_autoencoder(d)), expected["new"]))
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def _model(name: str, autoencoder: str, seed: int) -> AvatarModel:
    """A debug DiT of its own weights (one config: the other's weights load without an error) over
    `_autoencoder(autoencoder)`, named `name`."""
    torch.manual_seed(seed)
    dit = DiT(get_config("debug", frames_per_chunk=3, window_frames=6, in_channels=4)).eval()
    return AvatarModel(name, dit, _autoencoder(autoencoder), HEIGHT, WIDTH, steps=seed + 2)


def _whole(d, models: list[AvatarModel]) -> str | None:
    """None where loading `d` gives one of `models` whole (model.json, DiT weights, autoencoder and
    tiny decoder all of one export), else what it gave."""
    try:
        found = load_model(str(d))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    parts = _parts(found.vae)
    dit = found.dit.state_dict()
    for m in models:
        same_dit = all(torch.equal(v, dit[k]) for k, v in m.dit.state_dict().items())
        expected = _parts(m.vae)
        if same_dit and all(_same(a, b) for a, b in zip(parts, expected)) and found.name == m.name:
            return None
    return f"model.json of {found.name!r}, autoencoder {[p and p[0] for p in parts]}, DiT of neither"


@pytest.mark.parametrize(
    "old, new", [("tiny", "tiny"), ("wan+td", "tiny"), ("tiny", "wan+td"), ("wan", "wan-other-config")]
)
def test_a_reader_finds_the_whole_old_or_the_whole_new_model_at_every_step_of_an_export(
    tmp_path, monkeypatch, old, new
):
    """save_model renamed dit.safetensors in before model.json, and the autoencoder's files one by
    one: a reader in between paired the new DiT weights with the old model.json (another name,
    steps, size; another config failed to load), and where the tiny decoder and the base both
    changed, found the base decoding without its tiny decoder. The export is a whole folder put in
    the directory's place in one step; every rename, removal and exchange here is followed by a
    load. (A listing of models meanwhile shows no staging folder.)"""

    from streamgen.model_export import save_model
    from streamgen.models import available_models

    models = [_model("old", old, 0), _model("new", new, 1)]
    d = tmp_path / "model"
    save_model(models[0], d)
    (d / "notes.txt").write_text("kept")  # not the export's: stays
    monkeypatch.setenv("STREAMGEN_MODELS", str(tmp_path))
    def whole_one(after):
        wrong = _whole(d, models)
        listed = [n for n in available_models() if n.startswith(".")]
        assert wrong is None, f"{after}: a reader found {wrong}"
        assert listed == [], f"{after}: listed {listed}"

    seen = check_after_each_file_step(monkeypatch, whole_one)
    save_model(models[1], d)
    monkeypatch.undo()
    assert seen and _whole(d, models[1:]) is None
    assert (d / "notes.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # (no staging folder left)
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("old, new", [("tiny", "tiny"), ("wan+td", "tiny"), ("tiny", "wan+td")])
def test_a_reader_of_a_folder_written_file_by_file_finds_one_export_or_is_told(
    tmp_path, monkeypatch, old, new
):
    """Where the system cannot exchange folders (not Linux, overlayfs' lower layers), the export
    goes into the directory file by file: a reader between two renames loaded the new DiT weights
    with the old model.json (its name and steps). At every step a reader finds one whole export,
    or is told that one is being written (`ExportUnderWay`)."""
    from streamgen import folders
    from streamgen.model_export import save_model

    models = [_model("old", old, 0), _model("new", new, 1)]
    d = tmp_path / "model"
    save_model(models[0], d)
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(folders, "READ_AGAIN_AFTER_S", 0.0)  # (no waits between reads)
    told = []

    def whole_one(after):
        wrong = _whole(d, models)
        if wrong is not None and wrong.startswith("ExportUnderWay:"):
            told.append(after)
            return
        assert wrong is None, f"{after}: a reader found {wrong}"

    seen = check_after_each_file_step(monkeypatch, whole_one)
    save_model(models[1], d)
    monkeypatch.undo()
    assert seen and told and _whole(d, models[1:]) is None


@pytest.mark.parametrize("can_exchange", [True, False], ids=["exchanged", "file_by_file"])
def test_a_reader_whose_load_straddles_an_export_reads_again(tmp_path, monkeypatch, can_exchange):
    """A load reads model.json, then dit.safetensors, then the autoencoder: an export that put the
    new folder in place between those reads gave it the old model.json with the new weights. The
    reader reads again where the folder it started in is no longer there, or where an export went
    into it file by file meanwhile (no exchange: its stamp is another)."""
    from streamgen import folders
    from streamgen.model import files as model_files
    from streamgen.model_export import save_model

    models = [_model("old", "wan+td", 0), _model("new", "tiny", 1)]
    d = tmp_path / "model"
    save_model(models[0], d)
    if not can_exchange:
        monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    real, exported = model_files.load_safetensors, []

    def export_meanwhile(path):
        if not exported:
            exported.append(path)
            save_model(models[1], d)
        return real(path)

    monkeypatch.setattr(model_files, "load_safetensors", export_meanwhile)
    assert _whole(d, models) is None and exported
    assert load_model(str(d)).name == "new"


def test_a_distill_stage_loads_its_dit_from_one_export(tmp_path, monkeypatch):
    """distill's load_dit (a stage's teacher or student) reads model.json, then dit.safetensors:
    an export between the two paired the old config with the new weights, which failed to load
    where their sizes differ. It reads again from the folder now there."""
    import dataclasses

    from distill.build import load_dit
    from streamgen.model import files as model_files
    from streamgen.model_export import save_model

    old = _model("old", "tiny", 0)
    torch.manual_seed(1)
    new = _model("new", "tiny", 1)
    new.dit = DiT(dataclasses.replace(old.cfg, num_layers=old.cfg.num_layers + 1)).eval()
    d = tmp_path / "model"
    save_model(old, d)
    real, exported = model_files.load_safetensors, []

    def export_meanwhile(path):
        if not exported:
            exported.append(path)
            save_model(new, d)
        return real(path)

    monkeypatch.setattr(model_files, "load_safetensors", export_meanwhile)
    dit = load_dit(str(d))
    assert exported and dit.cfg.num_layers == new.cfg.num_layers
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in new.dit.state_dict().items())


@pytest.mark.parametrize("can_exchange", [True, False], ids=["exchanged", "file_by_file"])
def test_a_re_export_keeps_what_else_the_directory_holds_and_a_symlink_to_it(
    tmp_path, monkeypatch, can_exchange
):
    """What is not the export's in a model directory (a report, a folder of samples) stays; a
    symlink at the directory's path stays a symlink to the new model. Where the system cannot
    exchange folders (not Linux, overlayfs' lower layers), the export is written into the
    directory in place, file by file, model.json last."""
    from streamgen import folders
    from streamgen.model_export import save_model

    models = [_model("old", "wan+td", 0), _model("new", "tiny", 1)]
    real = tmp_path / "store" / "model"
    save_model(models[0], real)
    (real / "notes.txt").write_text("kept")
    (real / "samples").mkdir()
    (real / "samples" / "a.png").write_bytes(b"png")
    (tmp_path / "link").symlink_to(real)
    if not can_exchange:
        monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    save_model(models[1], tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert _whole(tmp_path / "link", models[1:]) is None
    assert (real / "notes.txt").read_text() == "kept" and (real / "samples" / "a.png").read_bytes() == b"png"
    assert sorted(p.name for p in real.parent.iterdir()) == ["model"]
    export = ["dit.safetensors", "model.json", "vae.safetensors", "vae_config.json"]
    if not can_exchange:
        export.append(folders.EXPORT_STAMP)  # (written into the directory file by file)
    assert sorted(p.name for p in real.iterdir()) == sorted([*export, "notes.txt", "samples"])


def test_ship_takes_one_export_of_its_source(tmp_path, monkeypatch):
    """ship read the source's model.json, then its DiT weights, then its autoencoder, each on its
    own: a re-export of the source meanwhile shipped one export's model.json with the other's
    weights. It reads the source through one load, read again where the folder changed."""
    from distill.ship import ship
    from streamgen.model import files as model_files
    from streamgen.model_export import save_model

    models = [_model("old", "wan+td", 0), _model("new", "tiny", 1)]
    save_model(models[0], tmp_path / "source")
    real, exported = model_files.load_safetensors, []

    def export_meanwhile(path):
        if not exported:
            exported.append(path)
            save_model(models[1], tmp_path / "source")
        return real(path)

    monkeypatch.setattr(model_files, "load_safetensors", export_meanwhile)
    shipped = ship(str(tmp_path / "source"), "shipped", assets=tmp_path / "assets")
    monkeypatch.undo()
    found = load_model(str(shipped))
    new = models[1]
    dit = found.dit.state_dict()
    assert found.meta["steps"] == new.steps and type(found.vae) is type(new.vae)
    assert all(torch.allclose(v, dit[k].float(), atol=1e-2) for k, v in new.dit.state_dict().items())


def test_distillation_refuses_a_wan_vae_folder_whose_save_was_cut_short(tmp_path, monkeypatch):
    """`model.vae: wan:DIR` over a folder WanVAE.save wrote into file by file (no exchange): a save
    cut short after the new weights went in left them beside the old config.json, which
    diffusers' from_pretrained loaded as one autoencoder. load_vae reads it as every other model
    source is read (`read_folder`): told that the save was cut short."""
    import errno
    from pathlib import Path

    from distill.build import ModelSourceError, load_vae
    from distill.config import ModelConfigSection
    from streamgen import folders

    folder = tmp_path / "model" / WanVAE.DIRECTORY
    old = wan_based_model().vae
    old.save(folder.parent)
    assert load_vae(ModelConfigSection(vae=f"wan:{folder}"), latent_channels=4, temporal=4, seed=0)
    real_replace = os.replace

    def cut_short_after_weights(src, dst):
        real_replace(src, dst)
        if os.fspath(dst).endswith(".safetensors") and Path(dst).parent == folder:
            raise OSError(errno.EIO, "an I/O error")

    from diffusers import AutoencoderKLWan

    new = WanVAE(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval())  # fmt: skip
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    monkeypatch.setattr(os, "replace", cut_short_after_weights)
    with pytest.raises(OSError, match="I/O error"):
        new.save(folder.parent)
    monkeypatch.undo()
    with pytest.raises(ModelSourceError, match="cut short"):
        load_vae(ModelConfigSection(vae=f"wan:{folder}"), latent_channels=4, temporal=4, seed=0)
