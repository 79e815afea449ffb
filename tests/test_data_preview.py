"""`streamgen data preview` of many clips: one clip in memory at a time, not all of them."""

import shutil
import weakref

from PIL import Image

from streamgen.cli import main
from streamgen.data import world
from streamgen.data.manifest import load_manifest
from streamgen.data.shards import make_dataset


def test_a_preview_reads_its_clips_one_at_a_time(tmp_path, monkeypatch):
    """All the clips were read (or made) first, then upscaled and joined into one video, each copy
    as big as all the clips (--data of 64x64, 40 clips: 628 MB)."""
    alive, most = set(), [0]
    make_clip = world.make_clip

    def made(*args):
        clip = make_clip(*args, seconds=0.4)  # (short: the test's time)
        alive.add(id(clip.video))
        weakref.finalize(clip.video, alive.discard, id(clip.video))
        most[0] = max(most[0], len(alive))
        return clip

    monkeypatch.setattr(world, "make_clip", made)
    out = tmp_path / "p"
    assert main(["data", "preview", "--clips", "5", "--size", "16", "--out", str(out)]) == 0
    assert most[0] <= 3
    import av

    with av.open(str(out / "preview.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 5 * 10
    with av.open(str(out / "preview.mp4")) as video:
        assert sum(f.samples for f in video.decode(audio=0)) >= 5 * 0.4 * 16000


def test_a_preview_that_meets_a_corrupted_shard_after_its_first_clips_leaves_nothing(tmp_path, capsys):
    root = tmp_path / "ds"
    make_dataset(root, 20, seed=3, height=16, width=16, seconds=0.2, shard_size=4, n_identities=40)
    second = root / load_manifest(root)["splits"]["train"]["shards"][1]["file"]
    second.write_bytes(second.read_bytes()[:100])
    out = tmp_path / "p"
    assert main(["data", "preview", "--data", str(root), "--clips", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "corrupted shard" in err and "shard-00001.npz" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    out.mkdir()  # a folder of the user's: kept, with nothing in it
    assert main(["data", "preview", "--data", str(root), "--clips", "8", "--out", str(out)]) == 2
    assert out.is_dir() and not any(out.iterdir())
    shutil.rmtree(out)
    assert main(["data", "preview", "--data", str(root), "--clips", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "preview.mp4"]
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height == 4 * 128 + 3 * 2  # (a row a clip, upscaled to 128)


def test_options_for_clips_made_on_the_fly_are_refused_with_data(tmp_path, capsys):
    """`--size 256` or `--seed 5` with --data were ignored without a word: the preview was the
    dataset's clips at their own size. (One alone was said as many: "--size make clips".)"""
    root = tmp_path / "ds"
    make_dataset(root, 2, seed=3, height=16, width=16, seconds=0.04, shard_size=4, n_identities=20)
    out = tmp_path / "p"
    for given, says in [
        (["--size", "256"], "--size makes"),
        (["--seed", "5", "--size", "32"], "--seed and --size make"),
    ]:
        assert (
            main(["data", "preview", "--data", str(root), "--split", "test", *given, "--out", str(out)]) == 2
        )
        err = capsys.readouterr().err
        assert f"{says} clips on the fly: not with --data" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["data", "preview", "--data", str(root), "--split", "test", "--out", str(out)]) == 0


def test_a_preview_of_many_clips_shows_evenly_spaced_ones_on_its_sheet(tmp_path, monkeypatch, capsys):
    """The sheet had a row for each clip: 10 000 clips made one 1.3 million pixels tall, its rows
    held in memory meanwhile (4 GB). The video has them all; the sheet at most SHEET_ROWS."""
    from streamgen.data import cli

    make_clip = world.make_clip
    monkeypatch.setattr(world, "make_clip", lambda *args: make_clip(*args, seconds=0.2))
    monkeypatch.setattr(cli, "SHEET_ROWS", 3)
    out = tmp_path / "p"
    assert main(["data", "preview", "--clips", "7", "--size", "16", "--out", str(out)]) == 0
    assert "(7 clips; the sheet shows 3 of them, one in 3)" in capsys.readouterr().out
    one_row = tmp_path / "one"
    assert main(["data", "preview", "--clips", "1", "--size", "16", "--out", str(one_row)]) == 0
    row_height = Image.open(one_row / "contact_sheet.png").height
    assert Image.open(out / "contact_sheet.png").height == 3 * row_height + 2 * 2  # (2-pixel gaps)


def test_the_sheet_of_a_split_of_fewer_clips_than_asked_for_shows_what_it_can(tmp_path, monkeypatch, capsys):
    """`--clips 1000` of a split of 16 clips spaced the sheet's rows as if 1000 were there: it showed
    one of them (at most SHEET_ROWS of 1000: one in 334), where it had room for them all."""
    from streamgen.data import cli

    monkeypatch.setattr(cli, "SHEET_ROWS", 8)
    root = tmp_path / "ds"
    make_dataset(root, 20, seed=3, height=16, width=16, seconds=0.04, shard_size=8, n_identities=40)
    out = tmp_path / "p"
    assert main(["data", "preview", "--data", str(root), "--clips", "1000", "--out", str(out)]) == 0
    assert "(16 clips; the sheet shows 8 of them, one in 2)" in capsys.readouterr().out


def test_one_clip_is_said_as_one(tmp_path, monkeypatch, capsys):
    """`data make --clips 1` said "wrote 1 clips", and a preview of it "(1 clips)"."""
    root = tmp_path / "ds"
    tiny = ["--size", "16", "--seconds", "0.04"]
    assert main(["data", "make", "--out", str(root), "--clips", "1", *tiny]) == 0
    assert "wrote 1 clip (train 0, val 0, test 1)" in capsys.readouterr().out
    make_clip = world.make_clip  # (the preview's clip made on the fly: as short)
    monkeypatch.setattr(world, "make_clip", lambda *args: make_clip(*args, seconds=0.04))
    assert main(["data", "preview", "--clips", "1", "--size", "16", "--out", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("(1 clip)")


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, capsys):
    """`data make --out "$UNSET"` made its dataset in the current folder (Path("") is "."), and
    `data preview --out ""` wrote its sheet and video there."""
    import pytest

    monkeypatch.chdir(tmp_path)
    for argv in (["make", "--clips", "1", "--seconds", "0.04", "--size", "16"], ["preview", "--clips", "1"]):
        with pytest.raises(SystemExit) as exited:
            main(["data", *argv, "--out", ""])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "argument --out: '' names no folder" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_out_under_the_home_folder_is_written_there_not_into_a_folder_named_tilde(
    tmp_path, monkeypatch, capsys
):
    """`--out=~/x` (no shell expands `~` after `=`) made a folder named "~" in the current one: data
    make's dataset there, eval's report; generate said "output directory does not exist: ~"."""
    from streamgen.cli import build_parser

    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir(), here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    assert main(["data", "make", "--clips", "1", "--seconds", "0.04", "--size", "16", "--workers", "1",
                 "--identities", "10", "--out=~/ds"]) == 0  # fmt: skip
    assert (home / "ds" / "manifest.json").is_file() and list(here.iterdir()) == []
    distill = ["distill", "teacher", "--config", "debug", "--out=~/t"]
    for argv in (["data", "preview", "--out=~/p"], ["eval", "--out=~/e"], distill):
        assert build_parser().parse_args(argv).out == home / argv[-1][len("--out=~/") :], argv
    assert main(["generate", "--model", "debug", "--quiet", "--out=~/a.mp4"]) == 0
    assert (home / "a.mp4").is_file() and list(here.iterdir()) == []


def test_inputs_under_the_home_folder_are_read_from_there(tmp_path, monkeypatch, capsys):
    """`--audio=~/a.wav` (no shell expands `~` after `=`) was "No such file or directory: ~/a.wav",
    the file there all the same; so were data preview's and train-evaluators' --data, eval's --evaluators."""
    import shutil

    from streamgen.cli import build_parser
    from streamgen.commands.generate import ASSETS

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(ASSETS / "sample_speech.wav", tmp_path / "a.wav")
    shutil.copy(ASSETS / "sample_face.png", tmp_path / "f.png")
    out = tmp_path / "a.mp4"
    argv = ["generate", "--model", "debug", "--quiet", "--audio=~/a.wav", "--reference=~/f.png", "--out", str(out)]
    assert main(argv) == 0
    assert out.is_file()
    for argv, dest in ((["data", "preview", "--data=~/ds"], "data"), (["eval", "--evaluators=~/ev"], "evaluators"),
                       (["eval", "train-evaluators", "--data=~/ds"], "data")):  # fmt: skip
        assert getattr(build_parser().parse_args(argv), dest) == tmp_path / argv[-1].split("~/")[1], argv


def test_a_preview_sent_sigterm_leaves_nothing(tmp_path):
    """SIGTERM (`timeout`, `kill`) ended a preview where it was: the folder it made was left, with the
    video's temp file in it. It ends as a Ctrl-C does: nothing left, exit 143."""
    from cli_helpers import terminated_once

    out = tmp_path / "p"
    argv = ["data", "preview", "--clips", "400", "--size", "16", "--out", str(out)]
    # (the imports and the first clip: seconds)
    code, err = terminated_once(argv, lambda: out.exists() and any(out.iterdir()), polls=1200)
    assert code == 143 and "Traceback" not in err, err
    assert not out.exists()


def test_a_preview_into_a_folder_with_an_earlier_one_says_it_replaces_it(tmp_path, capsys):
    """A second preview into the same --out replaced the first's video and sheet without a word."""
    out = tmp_path / "p"
    command = ["data", "preview", "--clips", "1", "--size", "16", "--out", str(out)]
    assert main(command) == 0
    assert "replacing" not in capsys.readouterr().err
    assert main([*command[:-2], "--seed", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"replacing the earlier preview in {out}" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "preview.mp4"]


def test_a_preview_into_a_folder_with_the_users_own_files_of_its_names_refuses_it(tmp_path, capsys):
    """`data preview --out .` replaced a preview.mp4 or contact_sheet.png of the user's own without a word."""
    for name in ("preview.mp4", "contact_sheet.png"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_bytes(b"the user's own")
        assert main(["data", "preview", "--clips", "1", "--size", "16", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} holds {name}, which no preview wrote there" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == b"the user's own"


def test_a_data_path_that_is_no_folder_says_so_not_to_run_data_make(tmp_path, capsys):
    """A --data mistyped, or a file, was "not a finished dataset (no manifest.json); run `streamgen
    data make`", as of an empty folder: it sent one making a dataset that is there under another name."""
    (tmp_path / "a_file").write_text("x")
    for data, says in (
        (tmp_path / "typo", f"{tmp_path / 'typo'} is not a finished dataset: there is no such folder"),
        (tmp_path / "a_file", f"{tmp_path / 'a_file'} is not a finished dataset: it is a file, not a dataset's folder"),
    ):
        assert main(["data", "preview", "--data", str(data), "--out", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"streamgen data preview: error: {says}"]


def _tone(hz: float, samples: int):
    import numpy as np

    return (0.5 * np.sin(2 * np.pi * hz * np.arange(samples) / 16000)).astype(np.float32)


def _loudest_hz(pcm, start_s: float) -> float:
    """The loudest frequency of 0.25 s of 16 kHz `pcm` from `start_s` (a tone's, well inside its piece)."""
    import numpy as np

    window = pcm[int(start_s * 16000) : int(start_s * 16000) + 4000]
    return float(np.abs(np.fft.rfft(window)).argmax() * 16000 / len(window))


def test_a_data_subcommands_errors_name_it_whether_its_parser_or_its_checks_refuse(tmp_path, capsys):
    """A bad option was "streamgen data make: error: ...", argparse's, but what the subcommand
    refused after parsing "streamgen data: error: ...": two names for one program."""
    import pytest

    for action, bad_option, refused_later in (
        ("make", ["--clips", "0", "--out", str(tmp_path / "m")], ["--clips", "1", "--out", "/proc/sg-data"]),
        ("preview", ["--clips", "0"], ["--data", str(tmp_path / "typo"), "--out", str(tmp_path / "p")]),
    ):
        with pytest.raises(SystemExit):
            main(["data", action, *bad_option])
        parse_error = capsys.readouterr().err.strip().splitlines()[-1]
        assert main(["data", action, *refused_later]) == 2
        check_error = capsys.readouterr().err.strip().splitlines()[-1]
        assert parse_error.startswith(f"streamgen data {action}: error: "), parse_error
        assert check_error.startswith(f"streamgen data {action}: error: "), check_error


def test_each_pieces_audio_lands_with_its_frames(tmp_path):
    """write_mp4 wrote the pieces' audio one after the other, whatever their frames' length: audio
    shorter than its piece's frames moved the next piece's sound earlier than its frames (a 600 Hz tone
    of the second second heard from 0.5 s), a piece without audio dropped its time from the sound
    (the third piece's tone heard in the second), and a first piece without audio made a later
    piece's audio fail (TypeError). Each piece's audio now starts with its frames, silence where it
    has none or runs short."""
    import av
    import numpy as np

    from streamgen.data.media import write_mp4

    frames = np.zeros((25, 16, 16, 3), np.uint8)  # 1 s a piece at 25 fps
    cases = {
        "short": [(frames, _tone(300, 8000)), (frames, _tone(600, 16000)), (frames, _tone(900, 16000))],
        "none_between": [(frames, _tone(300, 16000)), (frames, None), (frames, _tone(900, 16000))],
        "none_first": [(frames, None), (frames, _tone(600, 16000)), (frames, _tone(900, 16000))],
        "long": [(frames, _tone(300, 24000)), (frames, _tone(600, 16000)), (frames, _tone(900, 16000))],
    }
    for name, pieces in cases.items():
        path = tmp_path / f"{name}.mp4"
        write_mp4(path, iter(pieces))
        with av.open(str(path)) as video:
            pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in video.decode(audio=0)])
        assert len(pcm) >= 3 * 16000, name
        heard = [_loudest_hz(pcm, second + 0.6) for second in range(3)]
        silent = [float(np.abs(pcm[int((s + 0.6) * 16000) : int((s + 0.85) * 16000)]).max()) < 0.02 for s in range(3)]
        expected = {"short": [None, 600, 900], "none_between": [300, None, 900], "none_first": [None, 600, 900],
                    "long": [300, 600, 900]}[name]  # fmt: skip
        for second, hz in enumerate(expected):
            if hz is None:
                assert silent[second], (name, second, heard)
            else:
                assert not silent[second] and abs(heard[second] - hz) < 10, (name, second, heard)
