"""Stage `tiny_decoder`: TAEHV's decoder distilled from an autoencoder's, on the debug config."""

from __future__ import annotations

import json

import pytest
import torch
from test_distill_helpers import debug_config, final_tensors, max_difference, run

from distill.autoencoder import VideoSource, video_to_input
from distill.tiny_decoder import psnr
from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderVAE


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    run(debug_config("tiny_decoder", tmp_path / "whole"))
    run(debug_config("tiny_decoder", tmp_path / "split"), stop_after=3)
    run(debug_config("tiny_decoder", tmp_path / "split"), resume=True)
    assert max_difference(final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "split")) <= 1e-6


def test_it_learns_the_teachers_frames_and_exports_what_streams(tmp_path):
    from distill.build import load_vae
    from streamgen.model.config import get_config

    cfg = debug_config("tiny_decoder", tmp_path / "run", **{"run.steps": 40, "run.checkpoint_every": 40})
    steps = []
    run(cfg)
    for line in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines():
        steps.append(json.loads(line))
    # the student comes closer to the teacher's frames than it started
    assert steps[-1]["psnr_vs_teacher"] > steps[0]["psnr_vs_teacher"] + 3, (steps[0], steps[-1])

    model = tmp_path / "run" / "model"
    report = json.loads((model / "tiny_decoder.json").read_text())
    assert (model / "tiny_decoder.png").stat().st_size > 5_000  # video, teacher, student
    assert report["clips"] == 2 and report["frames_per_clip"] == 12
    assert report["decode_ms_per_clip"]["student"] > 0
    # the exported weights load as a decoder of the teacher's latents and give the reported frames
    mcfg = get_config(cfg.model.flavor)
    teacher = load_vae(cfg.model, mcfg.in_channels, mcfg.temporal_compression, cfg.run.seed)
    vae = TinyDecoderVAE(teacher, TinyDecoder.from_checkpoint(model / "tiny_decoder.safetensors").eval())
    source = VideoSource(cfg)
    with torch.no_grad():
        scores = []
        for i in range(2):
            latents = teacher.encode(video_to_input(source.clip(i)[None]))
            scores.append(psnr(vae.decode(latents), teacher.decode(latents)))
    assert sum(scores) / 2 == pytest.approx(report["psnr_db_student_vs_teacher"], abs=0.01)
    assert report["psnr_db_student_vs_teacher"] > steps[0]["psnr_vs_teacher"]


@pytest.mark.parametrize("widths", [[16, 8, 8], [8, 8], [8]])  # x4, x2 and x1, not x8
def test_a_decoder_that_does_not_fit_the_teachers_latents_is_refused(tmp_path, widths):
    """Named by its setting and the count it takes (two widths or one were "1 stages need 1
    time_upscale and space_upscale flags", three "spatial factor 4 != 8")."""
    cfg = debug_config("tiny_decoder", tmp_path / "run", **{"tiny_decoder.widths": widths})
    with pytest.raises(ValueError, match=r"tiny_decoder.widths .*autoencoder's x8 takes 4 widths"):
        run(cfg)


def test_a_narrower_decoder_of_the_teachers_architecture_learns_and_exports_a_model_that_streams(tmp_path):
    """architecture causal_vae: the teacher's TinyCausalVAE decoder with narrower widths, started
    from the teacher's leading channels; exported as an autoencoder and, the teacher being a
    model directory's, as that model with the narrower decoder."""
    from distill.build import export_model
    from streamgen.model import DiT, get_config
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.models import load_model
    from streamgen.stream import StreamSession

    mcfg = get_config("debug")
    torch.manual_seed(0)
    teacher = TinyCausalVAE(mcfg.in_channels, (8, 8, 16, 16), mcfg.temporal_compression).eval()
    export_model(DiT(mcfg).eval(), teacher, tmp_path / "teacher", "debug", 32, 32, 5.0, 2)
    edits = {"tiny_decoder.architecture": "causal_vae", "tiny_decoder.widths": [4, 4, 8, 16]}
    edits.update({"model.vae": str(tmp_path / "teacher"), "run.steps": 30, "run.checkpoint_every": 30})
    cfg = debug_config("tiny_decoder", tmp_path / "run", **edits)
    run(cfg)
    steps = [json.loads(line) for line in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert steps[-1]["psnr_vs_teacher"] > steps[0]["psnr_vs_teacher"] + 1, (steps[0], steps[-1])

    out = tmp_path / "run" / "model"
    report = json.loads((out / "tiny_decoder.json").read_text())
    assert report["architecture"] == "causal_vae" and report["decoder"]["decoder_widths"] == [4, 4, 8, 16]
    assert report["parameters"]["student"] < report["parameters"]["teacher"]
    student = TinyCausalVAE.load(out).eval()
    model = load_model(str(out / "model"))
    assert model.name == "debug-narrow-decoder" and model.vae.config == student.config
    # the encoder, its latent statistics and the DiT are the teacher's: the same latents
    assert torch.equal(student.enc[0].weight, teacher.enc[0].weight)
    dit = load_model(str(tmp_path / "teacher")).dit.state_dict()
    assert all(torch.equal(v, dit[k]) for k, v in model.dit.state_dict().items())
    source = VideoSource(cfg)
    with torch.no_grad():
        scores = []
        for i in range(2):
            latents = teacher.encode(video_to_input(source.clip(i)[None]))
            assert torch.equal(student.encode(video_to_input(source.clip(i)[None])), latents)
            scores.append(psnr(student.decode(latents), teacher.decode(latents)))
    assert sum(scores) / 2 == pytest.approx(report["psnr_db_student_vs_teacher"], abs=0.01)
    # and the model streams through it
    session = StreamSession(model, steps=2, dtype=torch.float32)
    session.start((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy(), seed=0)
    session.push_audio(torch.randn(16000 * 2).mul(0.1).numpy())
    frames = session.next_chunk()[0]
    assert frames.shape[1:] == (32, 32, 3)


def test_an_unknown_decoder_architecture_is_refused(tmp_path):
    cfg = debug_config("tiny_decoder", tmp_path / "run", **{"tiny_decoder.architecture": "unet"})
    with pytest.raises(ValueError, match="architecture must be one of"):
        run(cfg)


def test_a_narrower_decoder_mixes_the_leading_channels_of_this_frame_and_the_previous_one():
    """The mixing convolution reads [this frame's features, the previous frame's]: the pruned start
    takes each half's leading channels (the first half's alone read this frame's channels as the
    previous frame's). With the teacher's other channels at zero, it mixes as the teacher does."""
    from distill.tiny_decoder import narrower_decoder
    from streamgen.model.vae import TinyCausalVAE

    torch.manual_seed(0)
    teacher = TinyCausalVAE(latent_channels=4, widths=(8, 16))
    student = narrower_decoder(teacher, [4, 8])
    now, before = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    zeros = torch.zeros(2, 8, 3, 3)
    mixed = student.dec_mix(torch.cat([now, before], 1))
    expected = teacher.dec_mix(torch.cat([now, zeros, before, zeros], 1))[:, :8]
    torch.testing.assert_close(mixed, expected)


def test_a_narrower_decoders_model_is_re_exported_whole(tmp_path, monkeypatch):
    """The narrower decoder's model directory was written file by file, its autoencoder first: a
    reader meanwhile found the new decoder beside the previous export's DiT weights (the teacher's,
    copied, retrained since). It is put in place whole (streamgen.model_export.write_model_dir)."""
    from types import SimpleNamespace

    from file_steps import check_after_each_file_step

    from distill.build import export_model
    from distill.tiny_decoder import Stage
    from streamgen.model import DiT, get_config
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.models import load_model

    mcfg, teacher, out = get_config("debug"), tmp_path / "teacher", tmp_path / "run" / "model"
    stage = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(vae=str(teacher), init=None)))
    exports = []
    for seed in (0, 1):  # the teacher retrained, and the narrower decoder again
        torch.manual_seed(seed)
        vae = TinyCausalVAE(mcfg.in_channels, (8, 8, 16, 16), mcfg.temporal_compression).eval()
        export_model(DiT(mcfg).eval(), vae, teacher, "debug", 32, 32, 5.0, 2)
        narrow = TinyCausalVAE(**{**vae.config, "decoder_widths": [4, 4, 8, 8 + 8 * seed]}).eval()
        exports.append((load_model(str(teacher)).dit.state_dict(), narrow.config))
        if seed == 0:
            Stage._export_model(stage, narrow, out)

    def one_export(after):
        model = load_model(str(out))
        dit = model.dit.state_dict()
        assert any(
            model.vae.config == config and all(torch.equal(v, dit[k]) for k, v in weights.items())
            for weights, config in exports
        ), f"{after}: one export's decoder beside the other's DiT"

    check_after_each_file_step(monkeypatch, one_export)
    Stage._export_model(stage, narrow, out)
    monkeypatch.undo()
    assert load_model(str(out)).vae.config == exports[1][1]


def test_a_missing_init_checkpoint_is_one_line(tmp_path):
    """A missing tiny_decoder.init was a FileNotFoundError's traceback (a bad file was one line)."""
    from distill.config import ConfigError

    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=rf"tiny_decoder.init: no tiny decoder checkpoint at {missing}"):
        run(debug_config("tiny_decoder", tmp_path / "td", **{"tiny_decoder.init": str(missing)}))


@pytest.mark.parametrize(
    "widths, message",
    [
        ([32, 8, 16, 16], r"tiny_decoder.widths \[32, 8, 16, 16\] is wider than the teacher's decoder "
                          r"\[8, 8, 16, 16\] \(32 > 8\)"),
        ([8, 8, 16, 24], r"is wider than the teacher's decoder \[8, 8, 16, 16\] \(24 > 16\)"),
        ([8, 16], r"tiny_decoder.widths \[8, 16\]: a causal_vae decoder takes one width per scale of the "
                  r"teacher's decoder, \[8, 8, 16, 16\] \(4 widths\)"),
    ],
)  # fmt: skip
def test_a_causal_vae_decoder_wider_than_its_teacher_is_refused_before_training(tmp_path, widths, message):
    """A wider layer has no teacher channels to start from: it trained from random weights, into a
    decoder slower than the teacher's, without a word."""
    from distill.config import ConfigError
    from streamgen.checkpoint import latest_checkpoint

    edits = {"tiny_decoder.architecture": "causal_vae", "tiny_decoder.widths": widths}
    cfg = debug_config("tiny_decoder", tmp_path / "run", **edits)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert latest_checkpoint(tmp_path / "run") is None and not (tmp_path / "run" / "scalars.jsonl").exists()


def test_a_causal_vae_decoder_as_wide_as_its_teacher_starts_as_the_teacher():
    """The same widths are allowed: the teacher's own decoder, fine-tuned (video_weight)."""
    from distill.tiny_decoder import narrower_decoder
    from streamgen.model.vae import TinyCausalVAE

    torch.manual_seed(0)
    teacher = TinyCausalVAE(latent_channels=4, widths=(8, 16))
    student = narrower_decoder(teacher, [8, 16])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())


def test_an_init_checkpoint_for_a_causal_vae_decoder_is_refused_at_config_load(tmp_path):
    """tiny_decoder.init is a taehv decoder's start: with causal_vae it was ignored without a word
    (the decoder trained from the teacher's weights)."""
    from distill.config import ConfigError, find_config, load_config

    sets = ["tiny_decoder.architecture=causal_vae", f"tiny_decoder.init={tmp_path / 'taew2_1.pth'}"]
    with pytest.raises(ConfigError, match="tiny_decoder.init starts a taehv decoder; a causal_vae one starts"):
        load_config(find_config("debug", "tiny_decoder"), "tiny_decoder", sets)


@pytest.mark.parametrize("widths", [[16, 8], [16, 8, 8]])
def test_a_taehv_decoder_of_an_autoencoder_that_upsamples_x2_is_refused_saying_why(tmp_path, widths):
    """No taehv decoder fits an x2 autoencoder: two widths were told "takes 3 widths", and three
    then "spatial factor 4 != 2"."""
    from distill.config import ConfigError

    cfg = debug_config("tiny_decoder", tmp_path / "run", **{"model.vae_widths": [8, 16], "tiny_decoder.widths": widths})
    with pytest.raises(ConfigError, match=r"a taehv decoder upsamples x4 at least .* this autoencoder's x2: set "
                                          r"tiny_decoder.architecture causal_vae"):  # fmt: skip
        run(cfg)


def test_a_resume_against_a_teacher_autoencoder_retrained_at_the_same_path_is_refused(tmp_path):
    """The tiny decoder distills toward its teacher's frames: resumed against another autoencoder
    at model.vae (retrained since), the run went on toward that one without a word."""
    from streamgen.checkpoint import CheckpointError
    from streamgen.model import get_config
    from streamgen.model.vae import TinyCausalVAE

    mcfg, teacher = get_config("debug"), tmp_path / "vae"
    torch.manual_seed(0)
    TinyCausalVAE(mcfg.in_channels, (8, 8, 16, 16), mcfg.temporal_compression).save(teacher)
    cfg = lambda: debug_config("tiny_decoder", tmp_path / "run", **{"model.vae": str(teacher)})  # noqa: E731
    run(cfg(), stop_after=2)
    run(cfg(), resume=True, stop_after=3)  # the same teacher: it goes on
    TinyCausalVAE(mcfg.in_channels, (8, 8, 16, 16), mcfg.temporal_compression).save(teacher)  # retrained
    with pytest.raises(CheckpointError, match=rf"the vae {teacher} \(model.vae\) has other weights than the run's"):
        run(cfg(), resume=True)
    accepted = cfg()
    accepted.data.accept_remade = True
    run(accepted, resume=True)


@pytest.mark.parametrize(
    "stage, sets, exports",
    [("autoencoder", [], "an autoencoder"), ("tiny_decoder", [], "a tiny decoder")],
)
def test_an_export_name_where_nothing_exported_has_a_name_is_refused(stage, sets, exports):
    """The autoencoder stage and a taehv tiny decoder export no model.json: run.export_name was
    ignored without a word."""
    from distill.config import ConfigError, find_config, load_config

    with pytest.raises(ConfigError, match=rf"the {stage} stage exports {exports}, which has none"):
        load_config(find_config("debug", stage), stage, [*sets, "run.export_name=mine", "run.export=/tmp/x"])


def test_a_narrower_decoders_model_takes_the_export_name(tmp_path):
    """A causal_vae decoder's exported model/ was named after the teacher whatever run.export_name said."""
    from distill.build import export_model
    from streamgen.model import DiT, get_config
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.models import load_model

    mcfg = get_config("debug")
    torch.manual_seed(0)
    teacher = TinyCausalVAE(mcfg.in_channels, (8, 8, 16, 16), mcfg.temporal_compression).eval()
    export_model(DiT(mcfg).eval(), teacher, tmp_path / "teacher", "debug", 32, 32, 5.0, 2)
    edits = {"tiny_decoder.architecture": "causal_vae", "tiny_decoder.widths": [4, 4, 8, 16], "run.steps": 1}
    edits.update({"model.vae": str(tmp_path / "teacher"), "run.export": str(tmp_path / "export")})
    edits["run.export_name"] = "slim-avatar"
    run(debug_config("tiny_decoder", tmp_path / "run", **edits))
    assert load_model(str(tmp_path / "export" / "model")).name == "slim-avatar"
    assert load_model(str(tmp_path / "run" / "model" / "model")).name == "debug-narrow-decoder"


def test_an_export_killed_while_scoring_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    """The export wrote the new decoder, then scored it (half a minute and more on tiny-avatar), then
    wrote its report and picture: killed while scoring, the folder held the new decoder beside the
    previous export's tiny_decoder.json and .png, of another decoder. It scores first now."""
    from distill.tiny_decoder import Stage

    out = tmp_path / "run"
    run(debug_config("tiny_decoder", out, **{"run.steps": 2}))
    exported = {name: (out / "model" / name).read_bytes() for name in ("tiny_decoder.safetensors", "tiny_decoder.json")}

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Stage, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run(debug_config("tiny_decoder", out, **{"run.steps": 4}), resume=True)
    assert {name: (out / "model" / name).read_bytes() for name in exported} == exported
    monkeypatch.undo()
    run(debug_config("tiny_decoder", out, **{"run.steps": 4}), resume=True)  # (the export again, whole)
    assert (out / "model" / "tiny_decoder.safetensors").read_bytes() != exported["tiny_decoder.safetensors"]


def test_with_run_export_the_decoder_is_scored_once(tmp_path, monkeypatch):
    """With run.export set the stage exported twice (OUT/model, then run.export) and scored
    eval_split for each, half a minute and more apiece on tiny-avatar, the same decoder both times.
    It scores once; both folders hold that report."""
    from distill.tiny_decoder import Stage

    scored = []
    evaluate = Stage.evaluate

    def counted(self):
        scored.append(1)
        return evaluate(self)

    monkeypatch.setattr(Stage, "evaluate", counted)
    run(debug_config("tiny_decoder", tmp_path / "run", **{"run.steps": 2, "run.export": str(tmp_path / "export")}))
    assert len(scored) == 1
    report = (tmp_path / "run" / "model" / "tiny_decoder.json").read_text()
    assert (tmp_path / "export" / "tiny_decoder.json").read_text() == report
