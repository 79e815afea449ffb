"""The distillation stages on their debug configs: exact resume, rollouts equal inference, DMD."""

from __future__ import annotations

import pytest
import torch
from distill_pipeline import stage_config, train_pipeline
from test_distill_helpers import debug_config, final_tensors, max_difference, run

from streamgen import checkpoint as ckpt


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A debug teacher and its ODE-initialised student (each a few steps), shared by the tests."""
    return train_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory, pipeline):
    """A stage's whole debug run (4 steps) against the pipeline, made once on first use: the
    uninterrupted run a resumed one is compared with, and the student that streams. (Only read.)"""
    root = tmp_path_factory.mktemp("whole")
    made = {}

    def get(stage: str):
        if stage not in made:
            made[stage] = (root / stage, run(stage_config(stage, root / stage, pipeline)))
        return made[stage]

    return get


@pytest.mark.parametrize("stage", ["ode", "self_forcing", "chunk"])
def test_killed_and_resumed_equals_uninterrupted(stage, tmp_path, pipeline, whole_runs):
    out, _ = whole_runs(stage)
    run(stage_config(stage, tmp_path / "split", pipeline), stop_after=3)
    run(stage_config(stage, tmp_path / "split", pipeline), resume=True)
    whole, split = final_tensors(out), final_tensors(tmp_path / "split")
    assert max_difference(whole, split) <= 1e-6
    # and training did change the weights (the comparison is not of two untouched copies)
    first, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(out)[0])
    name = next(k for k in whole if k.startswith("module/") and "blocks.0.self_attn.q.weight" in k)
    assert not torch.equal(first[name], whole[name])


def test_the_distilled_students_stream_through_the_inference_session(whole_runs):
    from streamgen.models import load_model
    from streamgen.stream import StreamSession

    for stage in ("self_forcing", "chunk"):
        out, last = whole_runs(stage)
        assert {"loss_generator", "loss_critic", "dmd_grad_norm"} <= set(last)
        model = load_model(str(out / "model"))
        assert model.steps == 2 and model.meta["stage"] == stage
        session = StreamSession(model, height=16, width=16)
        session.start(torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy(), seed=0)
        session.push_audio(torch.zeros(16000).numpy())
        frames, _ = session.next_chunk()
        assert frames.shape == (8, 16, 16, 3)
    assert load_model(str(whole_runs("chunk")[0] / "model")).cfg.window_frames == 2


def _student_and_conditions(pipeline, batch=2, frames=6):
    from distill.build import load_dit
    from distill.flow import Conditions

    torch.manual_seed(0)
    student = load_dit(str(pipeline["student"])).eval()
    cfg = student.cfg
    cond = Conditions.full(
        torch.randn(batch, cfg.in_channels, 1, 8, 8),
        torch.randn(batch, frames, cfg.audio_window, cfg.audio_dim),
        torch.randn(batch, 1, cfg.text_dim),
    )
    return student, cond


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_rollout_equals_the_inference_path(pipeline, cache_from):
    """The training rollout (sink, cached steps, the chunk's cache write) is `generate_chunk`, chunk for chunk."""
    from distill.rng import SampleRandom
    from distill.rollout import rollout
    from streamgen.sampling import encode_sink, generate_chunk, student_sigmas

    student, cond = _student_and_conditions(pipeline)
    sigmas = student_sigmas(1)  # one step: no re-noising, so both paths see the same noise
    rnd = SampleRandom(0, 0, [0, 1])
    with torch.no_grad():
        video, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=None, cache_from=cache_from)
        cache = student.new_cache(2, (8, 8))
        encode_sink(student, cache, cond.reference, cond.context)
        chunks = []
        for j in range(3):
            noise = rnd.randn(f"r/noise{j}", student.cfg.in_channels, 2, 8, 8)
            audio = cond.audio[:, 2 * j : 2 * j + 2]
            chunks.append(
                generate_chunk(student, cache, noise, cond.context, audio, sigmas, cache_from=cache_from)
            )
    assert torch.allclose(video, torch.cat(chunks, 2), atol=1e-5)


def test_gradient_truncation_same_values_gradient_only_through_the_exit_step(pipeline):
    from distill.rng import SampleRandom
    from distill.rollout import rollout
    from streamgen.sampling import student_sigmas

    student, cond = _student_and_conditions(pipeline)
    sigmas = student_sigmas(2)
    rnd = SampleRandom(0, 0, [0, 1])
    with torch.no_grad():
        plain, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=1)
        full, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=None)
    graded, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=1, grad=True)
    assert torch.allclose(plain, graded.detach(), atol=1e-5) and torch.allclose(plain, full, atol=1e-5)
    assert graded.requires_grad
    graded.square().mean().backward()
    g = student.blocks[0].self_attn.q.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the exit step trains every weight it uses: the caption's cross-attention keys/values too,
    # which the sink write and the steps before it (without gradient) keep on the cache
    unused = [name for name, p in student.named_parameters() if p.grad is None]
    assert [name for name in unused if not name.startswith("audio_encoder.")] == []  # (windows given)
    g = student.blocks[0].cross_attn.k.weight.grad
    assert g.abs().sum() > 0 and student.text_embed[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cache_from", ["reencode", "last_step"])
def test_long_rollout_scores_only_the_last_window(pipeline, cache_from):
    """Lead chunks run as plain inference (no gradient, all steps); the scored chunks carry the gradient."""
    from distill.rng import SampleRandom
    from distill.rollout import rollout
    from streamgen.sampling import student_sigmas

    student, cond = _student_and_conditions(pipeline)
    sigmas = student_sigmas(2)
    rnd = SampleRandom(0, 0, [0, 1])
    with torch.no_grad():
        plain, _ = rollout(student, cond, (8, 8), 3, sigmas, rnd, "r", exit_step=None, cache_from=cache_from)
    video, _ = rollout(
        student,
        cond,
        (8, 8),
        3,
        sigmas,
        rnd,
        "r",
        exit_step=0,
        grad=True,
        first_free_chunk=2,
        cache_from=cache_from,
    )
    assert torch.allclose(video[:, :, :4].detach(), plain[:, :, :4], atol=1e-5)  # the lead: inference
    q = student.blocks[0].self_attn.q.weight
    video[:, :, :4].square().sum().backward(retain_graph=True)
    assert q.grad is None or q.grad.abs().sum() == 0
    video[:, :, 4:].square().sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_self_forcing_rollout_length_is_drawn_per_step(tmp_path, pipeline, whole_runs):
    import json

    from distill.config import ConfigError

    # The whole debug run's log (seed 0): its 4 steps drew 8, 4, 4 and 6 frames, three lengths of
    # the three there are (a 6-step run of this test's own drew 6 and 4 more, nothing new).
    out, _ = whole_runs("self_forcing")
    lengths = {json.loads(line)["rollout_frames"] for line in (out / "scalars.jsonl").open()}
    assert lengths <= {4, 6, 8} and len(lengths) > 1
    with pytest.raises((ValueError, ConfigError), match="rollout_frames"):
        run(stage_config("self_forcing", tmp_path / "bad", pipeline, **{"self_forcing.rollout_frames": 5}))


def test_rollouts_longer_than_the_clips_are_refused_before_the_first_step(tmp_path, pipeline):
    """The length is drawn per step: rollout_frames past the clips' length trained until a step
    drew it (here step 3 of 30), then stopped with "crops of 10 latent frames do not fit"."""
    from distill.config import ConfigError

    edits = {"run.steps": 30, "run.checkpoint_every": 1, "self_forcing.rollout_frames": 10}
    with pytest.raises(ConfigError, match=r"self_forcing.rollout_frames 10: .* of 8 latent frames: set it to at most 8"):
        run(stage_config("self_forcing", tmp_path / "long", pipeline, **edits))
    assert ckpt.latest_checkpoint(tmp_path / "long") is None


def test_a_student_trained_to_keep_its_last_step_streams_that_way(tmp_path, pipeline):
    from distill.config import ConfigError
    from streamgen.stream import StreamSession

    # (one step: what is checked is what the export says and how it streams, as after any number)
    edits = {"run.steps": 1, "self_forcing.cache_from": "last_step"}
    run(stage_config("self_forcing", tmp_path / "sf", pipeline, **edits))
    session = StreamSession(str(tmp_path / "sf" / "model"))
    assert session.model.meta["cache_from"] == session.cache_from == "last_step"
    with pytest.raises((ValueError, ConfigError), match="cache_from"):
        run(stage_config("self_forcing", tmp_path / "bad", pipeline, **{"self_forcing.cache_from": "never"}))


def test_trajectory_schedule_holds_the_student_sigmas():
    from distill.ode import trajectory_schedule
    from streamgen.sampling import student_sigmas

    for steps in (1, 2, 4):
        s = student_sigmas(steps, 5.0)
        grid = trajectory_schedule(10, s, 5.0)
        assert grid[0] == 1 and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
        assert all(bool((grid == v).any()) for v in s)


def test_the_chunk_stage_refuses_a_motion_prefix_other_than_one_chunk(tmp_path, pipeline):
    """The teacher's motion prefix is the chunk before; a longer one failed on a shape mismatch at
    the second chunk, after the stage had started."""
    from distill.config import ConfigError

    cfg = stage_config("chunk", tmp_path / "c", pipeline, **{"chunk.motion_frames": 4})
    cfg.model.overrides = {**cfg.model.overrides, "window_frames": 4}
    with pytest.raises(
        ConfigError, match="motion_frames \\(4\\) must equal the student's frames_per_chunk \\(2\\)"
    ):
        run(cfg)


def test_dmd_generator_loss_pushes_along_fake_minus_real():
    """d loss / d x0 = (fake - real) * weight / numel per sample (DMD's update direction)."""
    from types import SimpleNamespace

    from distill import dmd
    from distill.flow import Conditions
    from distill.rng import SampleRandom

    class Const(torch.nn.Module):  # velocity = a constant field -> x0 prediction known in closed form
        def __init__(self, value):
            super().__init__()
            self.value = value
            self.cfg = SimpleNamespace(sink_frames=1)

        def forward(self, x, t, context, audio, mask, mode, frame_pos=None):
            return torch.full_like(x, self.value)

    opts = SimpleNamespace(score_t_min=0.5, score_t_max=0.5, shift=1.0, cfg_scale=1.0)
    x0 = torch.randn(1, 2, 2, 4, 4, requires_grad=True)
    cond = Conditions.full(torch.zeros(1, 2, 1, 4, 4), None, torch.zeros(1, 1, 3))
    loss, _ = dmd.generator_loss(Const(1.0), Const(3.0), x0, cond, cond, SampleRandom(0, 0, [0]), "t", opts)
    loss.backward()
    sigma = 0.5
    noise = SampleRandom(0, 0, [0]).randn("t/noise", *x0.shape[1:])
    xt = (1 - sigma) * x0.detach() + sigma * noise
    real, fake = xt - sigma * 1.0, xt - sigma * 3.0
    weight = 1 / (x0.detach() - real).abs().mean()
    assert torch.allclose(x0.grad, (fake - real) * weight / x0.numel(), atol=1e-6)


@torch.no_grad()
def test_a_batch_mixing_kept_and_dropped_references_takes_the_models_output_channels():
    """out_channels != in_channels (a Wan config field): the mixed batch's output was allocated with
    the input's channels and the first sample's velocity did not fit in it."""
    from distill.flow import Conditions
    from streamgen.conditioning import sequence_velocity
    from streamgen.model import DiT, get_config

    torch.manual_seed(0)
    model = DiT(get_config("debug", in_channels=4, out_channels=8, audio=False)).eval()
    x, t = torch.randn(2, 4, 2, 4, 4), torch.rand(2, 2) * 1000
    cond = Conditions.full(torch.randn(2, 4, 1, 4, 4), None, torch.randn(2, 1, model.cfg.text_dim))
    cond.keep_reference = torch.tensor([True, False])
    mixed = sequence_velocity(model, x, t, cond)
    for i, kept in enumerate((True, False)):
        cond.keep_reference = torch.tensor([kept, kept])
        alone = sequence_velocity(model, x, t, cond)
        assert mixed.shape == (2, 8, 2, 4, 4) and torch.allclose(mixed[i], alone[i], atol=1e-5)


def test_both_kinds_runs_two_forwards_for_a_batch_of_one_kind_with_its_values_and_gradients():
    """run.fsdp's teacher step (distill/teacher.py): a rank whose samples all keep the reference runs
    the dropped kind's forward too, as a rank whose samples mix does, without changing the step."""
    from distill.flow import Conditions
    from streamgen.conditioning import sequence_velocity
    from streamgen.model import DiT, get_config

    torch.manual_seed(0)
    model = DiT(get_config("debug", audio=False))
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[2]))
    x, t = torch.randn(2, 4, 2, 4, 4), torch.rand(2, 2) * 1000
    cond = Conditions.full(torch.randn(2, 4, 1, 4, 4), None, torch.randn(2, 1, model.cfg.text_dim))
    results = []
    for both in (False, True):
        model.zero_grad()
        v = sequence_velocity(model, x, t, cond, both_kinds=both)
        v.square().mean().backward()
        results.append((v.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    sink = model.cfg.sink_frames
    assert forwards == [sink + 2, sink + 2, 2]  # (alone: one; both kinds: with, then without the reference)
    (plain, plain_grads), (both, both_grads) = results
    assert torch.equal(plain, both)
    assert all(torch.equal(plain_grads[n], both_grads[n]) for n in plain_grads)


def test_the_teacher_streams_for_the_results_table(pipeline):
    """TeacherSession: windows of Euler + CFG samples, each continuing the last one's motion frames."""
    from distill.results import markdown
    from streamgen.eval.report import generate_with_stream_session
    from streamgen.teacher import TeacherSession

    session = TeacherSession(str(pipeline["teacher"]), 16, 16, steps=3, window=4, motion=2)
    ref = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy()
    audio = (0.1 * torch.randn(16000 * 2)).numpy()
    with pytest.raises(ValueError, match="text features"):  # as StreamSession: no silent drop
        session.start(ref, text="smiling")
    frames = generate_with_stream_session(session, ref, audio, "smiling", 40, seed=1)  # scored uncaptioned
    assert frames.shape == (40, 16, 16, 3) and frames.dtype.name == "uint8"
    assert session.position == 12  # three windows of 4 latent frames
    row = {"row": "teacher", "nfe": 100, "sync_c": 1.0, "sync_d": 0.5, "av_offset_frames": 0, "csim": 0.9,
           "fid": 1.0, "fvd": None, "drift_slope": 0.0, "drift_source": "x", "black_frames": 0,
           "frozen_frames": 0, "fps": 12.0}  # fmt: skip
    table = markdown([row], 8, 5.0, 1)
    assert "| teacher | 1.000 | 0.500 | 0 | 0.900 | 1.00 | — |" in table and "| 625.0 |" in table


@pytest.mark.slow
def test_autoencoder_latents_and_teacher_on_a_small_avatar_world(tmp_path):
    """The real data path: `streamgen data make` -> autoencoder -> latent bank -> teacher."""
    from distill.config import find_config, load_config
    from distill.latents import build_latents
    from streamgen.data.shards import make_dataset

    world = tmp_path / "world"
    make_dataset(world, 4, 0, 32, 32, 1.0, 4, 50, 1)  # 4 clips of 1 s at 32x32
    ae = debug_config("autoencoder", tmp_path / "ae", **{"data.source": "world", "data.root": str(world),
                                                         "model.height": 32, "model.width": 32})  # fmt: skip
    last = run(ae)
    assert "psnr" in last
    vae_dir = tmp_path / "ae" / "model"
    cfg = load_config(find_config("tiny-avatar", "latents"), "latents")
    cfg.data.root, cfg.data.latents, cfg.model.flavor, cfg.model.vae = (
        str(world),
        "dbg",
        "debug",
        str(vae_dir),
    )
    cfg.options.splits = ["train", "test"]
    banks = build_latents(cfg)
    from safetensors.torch import load_file

    bank = load_file(str(banks[0]))
    assert bank["latents"].shape[:3] == (2, 4, 6) and bank["audio"].shape == (2, 6 * 4 * 640)
    assert bank["reference"].shape == (2, 4, 1, 16, 16)
    # normalised by the statistics measured at export: roughly zero-mean, unit-variance latents
    assert abs(float(bank["latents"].mean())) < 0.5 and 0.3 < float(bank["latents"].std()) < 3
    assert build_latents(cfg) == banks  # cached: a second run reuses the banks
    teacher = debug_config("teacher", tmp_path / "t", **{
        "data.source": "world", "data.root": str(world), "data.latents": "dbg", "model.vae": str(vae_dir),
        "model.height": 32, "model.width": 32, "run.steps": 2})  # fmt: skip
    assert "loss_teacher" in run(teacher)
