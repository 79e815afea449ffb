"""The distillation stages over a real (tiny) avatar world: the latents stage, and resumes that
would read other data than the checkpoint's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from distill_two_banks import latents_config, world_config
from test_distill_helpers import debug_config, run

from streamgen import checkpoint as ckpt


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from streamgen.data.shards import make_dataset

    root = tmp_path_factory.mktemp("world") / "world"
    make_dataset(root, 4, 0, 32, 32, 1.0, 4, 50, 1)  # 4 clips of 1 s at 32x32: one shard per split
    return root


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    from streamgen.model.vae import TinyCausalVAE

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("autoencoder")
    TinyCausalVAE(4, (8, 16), 4).save(folder)
    return folder


def test_the_latents_stage_hashes_each_shard_once(world, autoencoder, tmp_path, monkeypatch):
    """build_latents made the split's dataset twice (to encode it, then to read its latents), and
    each hashed every shard: 7 ms per 9 MB shard, twice."""
    import shutil

    from distill.latents import build_latents
    from streamgen.data import shards

    root = tmp_path / "world"
    shutil.copytree(world, root)
    hashed = []
    real = shards._sha256
    monkeypatch.setattr(shards, "_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    banks = build_latents(latents_config(root, autoencoder))
    assert len(banks) == 2
    assert sorted(hashed) == ["shard-00000.npz", "shard-00000.npz"]  # train's and test's, once each
    hashed.clear()
    assert build_latents(latents_config(root, autoencoder)) == banks  # all cached: still checked, once
    assert len(hashed) == 2


def test_the_latents_stage_gathers_a_bank_one_clip_at_a_time(world, autoencoder, tmp_path, monkeypatch):
    """Every item of the split (its video too, five times the rest) was read and held until the bank
    was made: the split's frames in memory (120 clips of 64x64: 580 MB peak, 440 MB now). The bank
    is the same."""
    import shutil
    import weakref

    from safetensors.torch import load_file

    from distill.latents import build_latents
    from streamgen.data.dataset import AvatarWorldDataset

    root = tmp_path / "world"
    shutil.copytree(world, root)
    cfg = latents_config(root, autoencoder, splits=["train"])
    (bank,) = build_latents(cfg)
    kept = load_file(bank)
    bank.unlink()
    alive, most = set(), [0]
    read = AvatarWorldDataset.__getitem__

    def item(self, k):
        got = read(self, k)
        alive.add(id(got["video"]))
        weakref.finalize(got["video"], alive.discard, id(got["video"]))
        most[0] = max(most[0], len(alive))
        return got

    monkeypatch.setattr(AvatarWorldDataset, "__getitem__", item)
    assert build_latents(cfg) == [bank]
    assert most[0] == 1 and len(kept["latents"]) == 2
    again = load_file(bank)
    assert kept.keys() == again.keys() and all(torch.equal(kept[k], again[k]) for k in kept)


def test_a_resume_on_other_data_is_refused_unless_set_on_purpose(world, tmp_path):
    """Only run.seed and data.batch_size were compared: a resume with another data.root or
    data.split, or over a dataset made again where the run's was, trained on other clips from
    there on without a word."""
    import shutil

    from streamgen.data.shards import make_dataset

    root, moved = tmp_path / "world", tmp_path / "moved"
    shutil.copytree(world, root)
    shutil.copytree(world, moved)
    out = tmp_path / "ae"
    run(world_config("autoencoder", out, root), stop_after=2)
    for key, value in (("data.root", str(moved)), ("data.split", "val")):
        changed = world_config("autoencoder", out, root, **{key: value})
        with pytest.raises(
            ckpt.CheckpointError,
            match=rf"{re.escape(key)}: checkpoint '[^']*', config '{re.escape(value)}'\).*--set {re.escape(key)}=",
        ):
            run(changed, resume=True)
    # the same folder, the dataset in it made again (another seed): other clips at the same paths
    shutil.rmtree(root)
    make_dataset(root, 4, 1, 32, 32, 1.0, 4, 50, 1)
    remade = world_config("autoencoder", out, root, **{"run.steps": 3})
    remade.set_keys = ("data.root",)  # (as `make model` gives it to every stage: not a change)
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"the dataset in {re.escape(str(root))} was made again since \(manifest\.json sha256 "
        r"[0-9a-f]{16} then, [0-9a-f]{16} now\).*--set data\.accept_remade=true",
    ):
        run(remade, resume=True)
    assert ckpt.latest_checkpoint(out).name == "step-00000002.safetensors"
    # on purpose: the one made again; then another folder (its data other than the checkpoint's
    # too, which data.root given with --set says already)
    remade = world_config("autoencoder", out, root, **{"run.steps": 3, "data.accept_remade": True})
    run(remade, resume=True)
    moved_on = world_config("autoencoder", out, moved, **{"run.steps": 4})
    moved_on.set_keys = ("data.root",)
    run(moved_on, resume=True)
    header = ckpt.checkpoint_header(ckpt.latest_checkpoint(out))
    assert header["step"] == 4 and header["run_settings"]["data.root"] == str(moved)


def test_a_resume_on_other_latents_is_refused_unless_set_on_purpose(world, autoencoder, tmp_path):
    """The diffusion stages read a latent bank: another data.latents name, or the same name
    encoded again by another autoencoder, are other clips for every later step."""
    import shutil

    from distill.latents import build_latents
    from streamgen.model.vae import TinyCausalVAE

    root = tmp_path / "world"
    shutil.copytree(world, root)
    build_latents(latents_config(root, autoencoder, "dbg", ["train"]))
    build_latents(latents_config(root, autoencoder, "dbg2", ["train"]))
    out = tmp_path / "t"
    edits = {"data.latents": "dbg", "model.vae": str(autoencoder), "data.batch_size": 2}
    run(world_config("teacher", out, root, **edits), stop_after=2)
    with pytest.raises(ckpt.CheckpointError, match=r"data\.latents: checkpoint 'dbg', config 'dbg2'"):
        run(world_config("teacher", out, root, **{**edits, "data.latents": "dbg2"}), resume=True)
    torch.manual_seed(1)
    other = tmp_path / "other-autoencoder"
    TinyCausalVAE(4, (8, 16), 4).save(other)
    shutil.rmtree(root / "latents" / "dbg")
    build_latents(latents_config(root, other, "dbg", ["train"]))
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"the latents dbg were encoded again since, by another autoencoder.*--set data\.accept_remade=true",
    ):
        run(world_config("teacher", out, root, **edits), resume=True)
    run(world_config("teacher", out, root, **edits, **{"data.accept_remade": True}), resume=True)
    assert ckpt.checkpoint_header(ckpt.latest_checkpoint(out))["step"] == 4


def test_a_resume_on_the_same_data_root_spelt_otherwise_is_not_refused(world, tmp_path, monkeypatch):
    """data.root was compared as written: the same folder with a trailing slash (a shell's
    completion), or relative where the run had it absolute, was refused as another dataset."""
    import shutil

    root = tmp_path / "world"
    shutil.copytree(world, root)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ae"
    run(world_config("autoencoder", out, f"{root}/"), stop_after=2)
    run(world_config("autoencoder", out, root, **{"run.steps": 3}), resume=True)
    run(world_config("autoencoder", out, "./world", **{"run.steps": 4}), resume=True)
    assert ckpt.checkpoint_header(ckpt.latest_checkpoint(out))["step"] == 4


def test_a_stage_decoding_with_another_autoencoder_than_the_banks_is_refused(world, autoencoder, tmp_path):
    """The latents stage records which autoencoder encoded a bank; the teacher never compared its
    own (model.vae, or a random one where none is given) with it, trained on one's latents and
    shipped the other, whose decoder made nothing of them. The same one shipped compactly (its
    parameters in float16) is the same; data.accept_remade lets another through on purpose."""
    import shutil

    from distill.build import export_model
    from distill.config import ConfigError
    from distill.latents import build_latents
    from streamgen.model.config import get_config
    from streamgen.model.model import DiT
    from streamgen.model.vae import TinyCausalVAE

    root = tmp_path / "world"
    shutil.copytree(world, root)
    build_latents(latents_config(root, autoencoder, "dbg", ["train"]))
    torch.manual_seed(1)
    other = tmp_path / "other-autoencoder"
    TinyCausalVAE(4, (8, 16), 4).save(other)
    edits = {"data.latents": "dbg", "data.batch_size": 2, "run.steps": 1}
    for vae, says in ((other, str(other)), (None, "a random one")):
        with pytest.raises(
            ConfigError, match=rf"encoded by the autoencoder {re.escape(str(autoencoder))}.*{says}"
        ):
            run(
                world_config(
                    "teacher", tmp_path / "refused", root, **edits, **{"model.vae": vae and str(vae)}
                )
            )
    assert not (tmp_path / "refused" / "checkpoints").exists()
    shipped = export_model(DiT(get_config("debug")), TinyCausalVAE.load(autoencoder), tmp_path / "shipped",
                           "shipped", 32, 32, 3.0, 4, compact=True)  # fmt: skip
    for vae in (autoencoder, shipped):
        run(world_config("teacher", tmp_path / f"t-{vae.name}", root, **edits, **{"model.vae": str(vae)}))
    accepted = {**edits, "model.vae": str(other), "data.accept_remade": True}
    run(world_config("teacher", tmp_path / "on-purpose", root, **accepted))


def test_latents_kept_from_before_with_other_captions_are_refused(world, autoencoder, tmp_path, capsys):
    """A bank encoded before is kept: with another latents.captions it was kept all the same, its
    captions not what was asked for, with no word said."""
    import shutil

    from distill.config import ConfigError
    from distill.latents import build_latents

    root = tmp_path / "world"
    shutil.copytree(world, root)
    cfg = latents_config(root, autoencoder, "dbg", ["train"])
    cfg.options.captions = False
    banks = build_latents(cfg)
    assert build_latents(cfg) == banks and "kept" in capsys.readouterr().out  # the same: said kept
    cfg.options.captions = True
    with pytest.raises(ConfigError, match=r"encoded with latents\.captions=false, not true: choose another"):
        build_latents(cfg)


def test_latents_that_cannot_be_written_are_one_line(world, autoencoder, tmp_path):
    """A file in the way of DATA/latents was a NotADirectoryError's traceback."""
    import shutil

    from distill.data import DataMissing
    from distill.latents import build_latents

    root = tmp_path / "world"
    shutil.copytree(world, root)
    (root / "latents").write_text("in the way")
    with pytest.raises(DataMissing, match=r"cannot write the latents into .*latents/dbg: Not a directory"):
        build_latents(latents_config(root, autoencoder, "dbg", ["train"]))


def test_a_second_latents_run_on_the_same_name_is_refused_and_torchruns_other_ranks_leave_it(
    world, autoencoder, tmp_path, monkeypatch
):
    """Two latents runs on one data.latents name (two shells, or every rank of a torchrun) encoded
    the same clips side by side into the same files, and both claimed the folder."""
    import shutil

    from distill.cli import run as distill_run
    from distill.data import DataMissing
    from distill.latents import build_latents
    from streamgen.folder_lock import no_other_writer

    root = tmp_path / "world"
    shutil.copytree(world, root)
    folder = root / "latents" / "dbg"
    folder.mkdir(parents=True)
    with no_other_writer(folder, lambda: AssertionError("held")):  # (a lock is per open file: as another run's)
        with pytest.raises(DataMissing, match=r"another `distill latents` run is writing .*latents/dbg"):
            build_latents(latents_config(root, autoencoder, "dbg", ["train"]))
    assert not (folder / "autoencoder.json").exists()
    # a rank other than 0 of a torchrun leaves it to rank 0
    import distill.latents

    built = []
    monkeypatch.setattr(distill.latents, "build_latents", lambda cfg: built.append(cfg.data.root))
    args = type("Args", (), dict(stage="latents", config="tiny-avatar", out=None, steps=None, resume=False,
                                 sets=[f"data.root={root}"]))()  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distill_run(args) == 0 and built == []
    monkeypatch.setenv("RANK", "0")
    assert distill_run(args) == 0 and built == [str(root)]
    build_latents(latents_config(root, autoencoder, "dbg", ["train"]))  # the lock let go: it runs
    assert (folder / "autoencoder.json").exists()


def test_a_bank_of_a_dataset_made_again_with_more_clips_is_made_again(autoencoder, tmp_path, capsys):
    """A dataset made again in place (its latents kept) with more clips keeps its first shards byte
    for byte, and so their cached latents: the bank gathered from the first dataset's clips was
    kept ('encoded before'), and the stages trained on a third of the clips without a word."""
    import shutil

    from distill.data import LatentBank
    from distill.latents import build_latents
    from streamgen.data.shards import make_dataset

    root = tmp_path / "world"
    make_dataset(root, 4, 0, 32, 32, 0.4, 2, 50, 1)  # train: clips 2 and 3, one shard
    cfg = latents_config(root, autoencoder, "dbg", ["train"])
    build_latents(cfg)
    assert LatentBank.load(root, "dbg", "train").num_clips == 2
    for made in ("manifest.json", "train", "val", "test"):
        (root / made).unlink() if made.endswith(".json") else shutil.rmtree(root / made)
    make_dataset(root, 8, 0, 32, 32, 0.4, 2, 50, 1)  # train: clips 2..7, its first shard the same
    capsys.readouterr()
    build_latents(cfg)
    assert "holds other shards' clips" in capsys.readouterr().out
    assert LatentBank.load(root, "dbg", "train").num_clips == 6
    build_latents(cfg)
    assert "kept" in capsys.readouterr().out  # (and kept from then on)


def test_a_bank_cut_short_is_one_error_naming_it_and_the_latents_stage_makes_it_again(
    world, autoencoder, tmp_path, capsys
):
    """A bank file cut short (a copy that stopped) was safetensors' own traceback, no file named, in
    every stage that reads it, and in the latents stage run again (which kept it, had it read)."""
    import shutil

    from distill.data import LatentBank
    from distill.latents import build_latents
    from streamgen.data.shards import DataError

    root = tmp_path / "world"
    shutil.copytree(world, root)
    cfg = latents_config(root, autoencoder, "dbg", ["train"])
    (bank,) = build_latents(cfg)
    whole = LatentBank.load(root, "dbg", "train")  # (its tensors mapped from the file: not cut in place)
    cut = bank.with_name("cut")
    cut.write_bytes(bank.read_bytes()[: bank.stat().st_size // 2])
    cut.replace(bank)
    says = rf"corrupted latent bank {re.escape(str(bank))}: .*run `streamgen distill latents`"
    with pytest.raises(DataError, match=says):
        LatentBank.load(root, "dbg", "train")
    capsys.readouterr()
    assert build_latents(cfg) == [bank] and "cannot be read" in capsys.readouterr().out
    again = LatentBank.load(root, "dbg", "train")  # (gathered again from the cached latents)
    assert torch.equal(again.latents, whole.latents) and torch.equal(again.audio, whole.audio)
    # a stage that reads it says so as it is (it was "cannot build the teacher stage from this config: ...")
    cut.write_bytes(bank.read_bytes()[: bank.stat().st_size // 2])
    cut.replace(bank)
    edits = {"data.latents": "dbg", "model.vae": str(autoencoder), "data.batch_size": 2}
    with pytest.raises(DataError) as e:
        run(world_config("teacher", tmp_path / "t", root, **edits))
    assert str(e.value).startswith(f"corrupted latent bank {bank}: "), e.value


@pytest.mark.parametrize(
    "stage, edits, key",
    [
        ("autoencoder", {}, "data.split"),
        ("tiny_decoder", {"tiny_decoder.eval_split": "val"}, "data.split"),
        # (found after the training: a report of 0 clips, its PSNRs 0.0)
        ("tiny_decoder", {"data.split": "val", "tiny_decoder.eval_split": "train"}, "tiny_decoder.eval_split"),
    ],
)
def test_a_split_with_no_clips_is_one_line_before_training(tmp_path, stage, edits, key):
    """A dataset of 2 clips has none in train: the video stages trained into a traceback of
    torch.randint ("random_ expects 'from' to be less than 'to'") at their first step."""
    from distill.data import DataMissing
    from streamgen.data.shards import make_dataset

    root = tmp_path / "world"
    make_dataset(root, 2, 0, 32, 32, 1.0, 4, 50, 1)  # train 0, val 1, test 1
    cfg = world_config(stage, tmp_path / "run", root, **edits)
    if stage == "tiny_decoder":
        cfg.model.vae_widths = [8, 8, 16, 16]
    with pytest.raises(DataMissing, match=rf"the train split of {root} holds no clips \({key}\): choose another"):
        run(cfg)
    assert not ckpt.list_checkpoints(tmp_path / "run")


def test_latents_of_a_split_with_no_clips_name_the_setting(tmp_path, autoencoder):
    """It said "options.splits", a name of the code's, not of the config."""
    from distill.data import DataMissing
    from distill.latents import build_latents
    from streamgen.data.shards import make_dataset

    root = tmp_path / "world"
    make_dataset(root, 2, 0, 32, 32, 1.0, 4, 50, 1)  # train 0, val 1, test 1
    cfg = latents_config(root, autoencoder)
    cfg.options.captions = False
    with pytest.raises(DataMissing, match=r"has no train clips to encode \(latents.splits names the splits\)"):
        build_latents(cfg)


def refused_before_any_work(cfg, message: str) -> None:
    """The stage refuses `cfg` with a ConfigError that says `message` (a regex), its run folder not made."""
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not Path(cfg.run.out).exists()


@pytest.mark.parametrize("stage", ["autoencoder", "tiny_decoder"])
@pytest.mark.parametrize("source", ["world", "synthetic"])
def test_crops_longer_than_the_clips_name_data_video_frames_before_any_work(world, tmp_path, stage, source):
    """The pixel stages found crops longer than the clips at their first step, after the stage was
    built, naming no setting: "clips of 25 frames are shorter than a crop of 40"."""
    out = tmp_path / "run"
    if source == "world":  # 1 s clips: 25 frames
        clips, most = 25, 24
    else:  # debug configs: 4 and 3 latent frames of 4
        clips = most = 16 if stage == "autoencoder" else 12

    def config(**edits):
        if source == "world":
            return world_config(stage, out, world, **edits)
        return debug_config(stage, out, **edits)

    refused_before_any_work(
        config(**{"data.video_frames": 40}),
        rf"^data\.video_frames 40: crops that long do not fit the clips \(.*: {clips} frames\); "
        rf"set it to at most {most}$",
    )
    run(config(**{"data.video_frames": most, "run.steps": 1}))
    assert ckpt.latest_checkpoint(out).name == "step-00000001.safetensors"


@pytest.mark.parametrize("stage", ["autoencoder", "tiny_decoder"])
def test_a_frame_size_other_than_the_datasets_is_one_line_before_any_work(world, tmp_path, stage):
    """The pixel stages trained on the dataset's own frames (32x32) whatever model.height x model.width
    said (64x64), and the autoencoder laid its mouth box out for the config's size."""
    refused_before_any_work(
        world_config(stage, tmp_path / "run", world, **{"model.height": 64, "model.width": 64}),
        rf"^model\.height x model\.width \(64x64\) are not the size of the frames of {re.escape(str(world))} "
        r"\(32x32\): set them to it \(--set model\.height=32 --set model\.width=32\)$",
    )


@pytest.mark.parametrize("stage", ["ode", "self_forcing"])
def test_a_teacher_trained_on_another_autoencoders_latents_is_refused(teachers_of_two_banks, tmp_path, stage):
    """The stage's own autoencoder was checked against the bank's; its teacher's was not: a teacher
    trained on another autoencoder's latents scored (or sampled the trajectories of) this bank's,
    of another latent space, without a word. The teacher of these latents goes on, and so does
    another given on purpose."""
    import shutil

    from distill_two_banks import EDITS

    from distill.config import ConfigError

    # (the world, both banks and both teachers: tests/distill_two_banks.py's, made once and only read)
    teachers, root = teachers_of_two_banks, teachers_of_two_banks / "world"
    autoencoder = teachers / "autoencoder-dbg"

    def config(teacher: str, **more):
        cfg = world_config(stage, tmp_path / "run", root,
                           **{**EDITS, "data.latents": "dbg", "model.vae": str(autoencoder),
                              **more})  # fmt: skip
        cfg.options.teacher = str(teachers / f"teacher-{teacher}" / "model")
        cfg.model.init = str(teachers / "teacher-dbg" / "model")
        if stage == "self_forcing":
            cfg.options.rollout_frames = 0  # (the clips' 6 latent frames)
        return cfg

    key = f"{stage}.teacher"
    with pytest.raises(
        ConfigError,
        match=rf"^the teacher {re.escape(str(teachers / 'teacher-other' / 'model'))} \({key}\) was trained on the "
        rf"latents of another autoencoder than the one that encoded the latents 'dbg' in .* "
        rf"\({re.escape(str(autoencoder))}\): .*--set data\.accept_remade=true",
    ):
        run(config("other"))  # (as the stage is built)
    assert not (tmp_path / "run" / "checkpoints").exists()
    run(config("dbg"))
    shutil.rmtree(tmp_path / "run")
    run(config("other", **{"data.accept_remade": True}))


def test_captions_a_model_cannot_take_are_a_warning(world, autoencoder, tmp_path, capsys):
    """latents.captions (true by default) with a model whose text width is not MiniLM's 384 (the debug
    flavor's 16, Wan's 4096) gave every clip a zero context, recorded as captioned, without a word."""
    import shutil

    from distill.latents import build_latents

    root = tmp_path / "world"
    shutil.copytree(world, root)
    cfg = latents_config(root, autoencoder, splits=["train"])  # (the debug flavor: text 16 wide)
    build_latents(cfg)
    said = capsys.readouterr().err
    assert (
        "warning: latents.captions embeds each caption with MiniLM (384 wide), and the model (debug) takes text "
        "16 wide: the captions are left out (zero contexts); set latents.captions false to say so" in said
    ), said
    cfg = latents_config(root, autoencoder, "plain", splits=["train"])
    cfg.options.captions = False
    build_latents(cfg)
    assert "latents.captions" not in capsys.readouterr().err
