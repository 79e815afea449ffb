import numpy as np
import pytest

from streamgen.data.motion import Motion, mouth_curves, neutral_motion, plan_motion
from streamgen.data.render import Identity, render_clip, render_frame, render_reference
from streamgen.data.speech import Phoneme


def test_any_resolution_and_deterministic_identities():
    ident = Identity.from_id(3)
    for h, w in [(32, 32), (48, 80), (96, 64)]:
        frame = render_reference(ident, h, w)
        assert frame.shape == (h, w, 3) and frame.dtype == np.uint8
    assert Identity.from_id(3) == ident and Identity.from_id(4) != ident
    a, b = render_reference(Identity.from_id(3), 64, 64), render_reference(Identity.from_id(4), 64, 64)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_mouth_opening_changes_only_the_lower_face():
    ident = Identity.from_id(7)
    closed = neutral_motion(1).frame(0)
    opened = dict(closed, mouth_open=1.0)
    a = render_frame(ident, closed, 96, 96).astype(int)
    b = render_frame(ident, opened, 96, 96).astype(int)
    diff = np.abs(a - b).sum(-1)
    assert diff[50:85].sum() > 2000  # the mouth area changed
    assert diff[:40].sum() == 0  # eyes, brows and hair did not


def test_edges_are_anti_aliased():
    frame = render_reference(Identity.from_id(1), 128, 128)
    # a hard-edged renderer would only produce the palette's few colours
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 200


def test_bilabials_close_the_mouth_and_vowels_open_it():
    phonemes = [
        Phoneme("m", 0.2, 0.32),
        Phoneme("ˈɑː", 0.32, 0.6),
        Phoneme("p", 0.6, 0.7),
        Phoneme("_", 0.7, 1.0),
    ]
    open_, width, round_ = mouth_curves(phonemes, 25)
    assert open_[int(0.26 * 25)] < 0.15
    assert open_[int(0.46 * 25)] > 0.7
    assert open_[int(0.65 * 25)] < 0.2
    assert open_[24] < 0.1


def test_captions_drive_expression():
    rng = lambda: np.random.default_rng(0)
    smiling = plan_motion(rng(), 50, caption="smiling while talking")
    serious = plan_motion(rng(), 50, caption="serious")
    surprised = plan_motion(rng(), 50, caption="Surprised!")
    assert smiling.smile.mean() > serious.smile.mean() + 0.5
    assert surprised.brow.mean() > serious.brow.mean() + 0.8
    clip = render_clip(Identity.from_id(2), smiling, 32, 32)
    assert clip.shape == (50, 32, 32, 3)
    assert Motion.from_array(smiling.as_array()).smile.tolist() == smiling.smile.tolist()


def test_make_assets_into_a_file_is_one_line(tmp_path, capsys):
    """`python -m streamgen.data.make_assets --out FILE` was a FileExistsError's traceback."""
    from streamgen.data.make_assets import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"cannot write into --out {tmp_path / 'file'}" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("stopped_in", ["sample_speech.wav", "sample_face.png"])
def test_make_assets_stopped_while_writing_leaves_the_earlier_assets_whole(tmp_path, monkeypatch, stopped_in):
    """make_assets wrote each asset in place: stopped while writing one (a Ctrl-C, a kill, a full disk),
    it left that asset cut short under its own name, the bundled sample `generate` reads by default.
    Each is now written to a temp file and put in place whole; stopped, the earlier one stays."""
    import wave

    from PIL import Image

    from streamgen.data.make_assets import make_assets

    paths = make_assets(tmp_path)
    before = {p.name: p.read_bytes() for p in paths}

    if stopped_in == "sample_speech.wav":
        def write_half(self, data):
            self.writeframesraw(bytes(data)[: len(data) // 2])
            raise KeyboardInterrupt

        monkeypatch.setattr(wave.Wave_write, "writeframes", write_half)
    else:
        save = Image.Image.save

        def save_half(self, fp, *args, **kwargs):
            save(self.crop((0, 0, self.width, self.height // 2)), fp, *args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(Image.Image, "save", save_half)
    with pytest.raises(KeyboardInterrupt):
        make_assets(tmp_path)
    assert {p.name: p.read_bytes() for p in paths} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # (no temp file left)
