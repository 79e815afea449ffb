"""bench/floor.py: the work of each stage of a chunk, counted, and the floor it sets."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench import ceilings as device_ceilings
from bench import floor, gpu, stage_timing
from streamgen.model.wan_vae import WanVAE
from streamgen.stream import CHUNK_STAGES, StreamSession

STEPS = 4
# the small model's frames: its autoencoder's convolutions, counted, took most of the time at 64x96
HEIGHT, WIDTH = 32, 48
MODELS = Path(__file__).resolve().parents[1] / "streamgen" / "assets" / "models"


def bench_floor(capsys, *args, env=None) -> dict:
    """`streamgen bench floor --json *args`'s JSON, run in this process (a fresh one took seconds
    to import torch), with `env`'s variables set for it."""
    import logging

    from streamgen.cli import main

    with pytest.MonkeyPatch.context() as mp:
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        assert main(["bench", "floor", "--json", *args]) == 0, capsys.readouterr().err
    assert logging.root.manager.disable == logging.NOTSET  # (--json's for the benchmark alone)
    return json.loads(capsys.readouterr().out)


def counted(device, clip_frames=floor.CLIP_FRAMES):
    model = gpu.build_model("wan2.1-1.3b", HEIGHT, WIDTH, device, torch.float32, quick=True, backend="sdpa")
    session = StreamSession(model, steps=STEPS, device=device, dtype=torch.float32)
    context = torch.zeros(1, 8, model.cfg.text_dim, device=device)
    start = lambda: gpu.start_stream(session, context, 10.0)  # noqa: E731
    return model, floor.chunk_work(session, start, STEPS, clip_frames)


# the clip counted on the CPU: the first chunk, two as the ring grows (this model's ring holds two
# chunks) and one on the full ring, as the steady chunk; the default 81 frames (`floor.CLIP_FRAMES`)
# counted three more chunks on the full ring, each the same as that last one
CPU_CLIP_FRAMES = 9 + 3 * 12


@pytest.fixture(scope="module")
def on_cpu():
    return counted("cpu", clip_frames=CPU_CLIP_FRAMES)


def test_counting_on_the_meta_device_gives_what_running_gives(on_cpu):
    # the wan2.1-1.3b floor is counted on meta (no values); here both run the same small model.
    # On meta a clip of 21 frames: the first chunk and one as the ring grows (this model's ring
    # is full from the third, each later chunk of the 81 frames counted as the steady chunk is,
    # compared below), then the ring filled by uncounted chunks; half the time of the 81 frames
    _, on_meta = counted("meta", clip_frames=21)
    _, real = on_cpu
    assert [chunk["frames"] for chunk in on_meta["clip"]] == [9, 12]
    assert on_meta == {**real, "clip": real["clip"][:2]}


def numbers(tree, path=""):
    """{path: number} of every number in a nested dict/list of counts."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{path}[{i}]").items()}
    return {path: tree}


def test_one_block_and_two_extrapolate_to_the_counts_of_every_block(on_cpu, monkeypatch):
    # bench floor counts the Wan flavors on meta from one block and two: the blocks are identical,
    # so every count is affine in their number (the start, the autoencoder and what a forward runs
    # once do not change with it; a cache write's last block stores keys and values only)
    model, _ = on_cpu
    decoded = []
    decode_stream = model.vae.decode_stream
    monkeypatch.setattr(model.vae, "decode_stream", lambda *a: decoded.append(1) or decode_stream(*a))

    def work_with_layers(layers, decodes=None):
        shallow = floor.with_layers(model, layers)
        assert shallow.cfg.num_layers == layers and shallow.vae is model.vae
        # frames of 32x32 and a clip of two chunks (the second re-encodes into a ring not yet
        # full): the autoencoder's convolutions at 64x96 over 81 frames took most of a minute
        session = StreamSession(shallow, 32, 32, steps=STEPS, device="cpu", dtype=torch.float32)
        context = torch.zeros(1, 8, model.cfg.text_dim)
        start = lambda: gpu.start_stream(session, context, 10.0)  # noqa: E731
        return floor.chunk_work(session, start, STEPS, 21, decodes)

    counted = numbers(work_with_layers(5))
    decoded_per_count = len(decoded)
    decodes = floor.KeptDecodes()
    extrapolated = numbers(floor.layer_extrapolated(lambda n: work_with_layers(n, decodes), 5))
    assert extrapolated.keys() == counted.keys() and len(counted) > 100
    assert extrapolated == pytest.approx(counted, rel=1e-9, abs=1e-15)
    # the autoencoder ran in the one-block count alone, the two-block count took its decodes (it
    # ran in both: half of a Wan count's time on meta)
    assert len(decoded) == 2 * decoded_per_count
    # and where the two counts do not have the same parts, it says so rather than guess
    with pytest.raises(ValueError, match="differ"):
        floor.layer_extrapolated(
            lambda layers: {"stages": {"denoise": 1.0}} if layers == 1 else {"stages": {}}, 30
        )


def test_attention_is_counted_over_the_sink_the_chunk_and_the_filled_ring(on_cpu):
    model, work = on_cpu
    cfg = model.cfg
    tokens_per_frame = (HEIGHT // 8 // cfg.patch_size[1]) * (WIDTH // 8 // cfg.patch_size[2])
    q = cfg.frames_per_chunk * tokens_per_frame
    dim = cfg.num_heads * cfg.head_dim

    def self_attention_tflop(key_frames, layers):  # QK^T and PV, a multiply-add counting two
        return 4 * q * key_frames * tokens_per_frame * dim * layers / 1e12

    def attention(stage):
        return stage["tflop_by_kind"]["attention"]

    # a chunk's call re-encodes the chunk before it: the first chunk's frames come before any
    # re-encode, and the second chunk's call re-encodes the first (attending to the sink and itself)
    first, steady = work["first_chunk"]["stages"], work["steady_chunk"]["stages"]
    first_reencode = work["clip"][1]["stages"]["reencode"]
    assert first["reencode"]["tflop"] == first["reencode"]["kv_gb"] == first["reencode"]["weights_gb"] == 0
    # a cache write keeps keys and values only: its last layer attends to nothing
    reencode_layers = cfg.num_layers - 1

    def cross_attention(reencode, ring_frames):  # text and audio: the same in every chunk
        return attention(reencode) - self_attention_tflop(
            cfg.sink_frames + cfg.frames_per_chunk + ring_frames, reencode_layers
        )

    assert cross_attention(first_reencode, 0) == pytest.approx(
        cross_attention(steady["reencode"], cfg.window_frames)
    )
    assert attention(steady["denoise"]) - attention(first["denoise"]) == pytest.approx(
        STEPS * self_attention_tflop(cfg.window_frames, cfg.num_layers)
    )
    assert attention(steady["reencode"]) - attention(first_reencode) == pytest.approx(
        self_attention_tflop(cfg.window_frames, reencode_layers)
    )
    # the steps and the re-encode are the same forward but for that last layer
    step = attention(steady["denoise"]) / STEPS
    assert attention(steady["reencode"]) == pytest.approx(step * reencode_layers / cfg.num_layers)
    assert steady["reencode"]["tflop"] < steady["denoise"]["tflop"] / STEPS
    # the Wan VAE decodes 1 frame from the first latent frame and 4 from each after it
    assert (work["first_chunk"]["frames"], work["steady_chunk"]["frames"]) == (9, 12)
    assert set(steady) == set(CHUNK_STAGES) - {"to_host"}


def test_a_fresh_clip_is_counted_chunk_by_chunk_as_its_cache_grows(on_cpu):
    model, work = on_cpu
    cfg = model.cfg
    clip = work["clip"]
    assert clip[0] == work["first_chunk"]
    assert floor.CLIP_FRAMES == 81  # what bench floor counts unless told: the first 81 frames, as Self-Forcing's
    assert [c["frames"] for c in clip] == [9] + [12] * 3
    attention = [c["stages"]["denoise"]["tflop_by_kind"]["attention"] for c in clip]
    growth = [b - a for a, b in zip(attention, attention[1:])]
    # each chunk attends to one more chunk of the ring until the ring is full, then no more
    fills = cfg.window_frames // cfg.frames_per_chunk
    assert growth[:fills] == pytest.approx([growth[0]] * fills) and growth[0] > 0
    assert growth[fills:] == pytest.approx([0.0] * (len(growth) - fills), abs=1e-12)
    assert clip[-1]["stages"] == work["steady_chunk"]["stages"]  # this ring fills before the clip ends

    fl = floor.floor(work, 100.0, 1000.0)
    assert fl["clip"]["frames"] == CPU_CLIP_FRAMES and fl["clip"]["chunks"] == len(clip)
    assert fl["clip"]["chunk_floor_ms"][0] == pytest.approx(fl["first_chunk"]["floor_ms"])
    assert fl["clip"]["fps_ceiling"] == pytest.approx(
        CPU_CLIP_FRAMES / (sum(fl["clip"]["chunk_floor_ms"]) / 1e3)
    )
    # until the ring is full a chunk attends to less than the steady chunk does
    steady_ms = fl["steady_chunk"]["floor_ms"]
    assert all(ms < steady_ms for ms in fl["clip"]["chunk_floor_ms"][:fills])


def test_the_cache_reads_follow_the_ring(on_cpu):
    model, work = on_cpu
    first, steady = work["clip"][1]["stages"], work["steady_chunk"]["stages"]  # the first re-encode
    cfg = model.cfg
    key_frames = cfg.sink_frames + cfg.frames_per_chunk
    ratio = (key_frames + cfg.window_frames) / key_frames
    assert steady["reencode"]["kv_gb"] == pytest.approx(ratio * first["reencode"]["kv_gb"])
    # a cache write's last layer stores keys and values and reads none
    layers = cfg.num_layers
    assert steady["denoise"]["kv_gb"] == pytest.approx(
        STEPS * steady["reencode"]["kv_gb"] * layers / (layers - 1)
    )

    # every step reads every weight again; the re-encode all but its last layer's queries,
    # attention output, cross-attention, MLP and the head
    # (the text's cross-attention keys and values are kept for the stream: neither reads them;
    # the audio's for the chunk: its first step reads them, for the others and the re-encode)
    def gb(params):
        return sum(p.numel() * p.element_size() for p in params) / 1e9

    last = model.dit.blocks[-1]
    read_by_both = ("modulation", "self_attn.k.", "self_attn.v.", "self_attn.norm_k.")
    audio_kv = ("audio_attn.k.", "audio_attn.v.", "audio_attn.norm_k.")
    by_neither = ("cross_attn.k.", "cross_attn.v.", "cross_attn.norm_k.", *audio_kv)
    unread = [p for n, p in last.named_parameters() if not n.startswith(read_by_both + by_neither)]
    unread_gb = gb(unread + list(model.dit.head.parameters()))
    first_step_only = gb(
        p for n, p in model.dit.blocks.named_parameters() if n.split(".", 1)[1].startswith(audio_kv)
    )
    assert first_step_only > 0
    per_step = (steady["denoise"]["weights_gb"] - first_step_only) / STEPS
    assert per_step - steady["reencode"]["weights_gb"] == pytest.approx(unread_gb)
    assert steady["decode"]["kv_gb"] == 0 and steady["decode"]["weights_gb"] > 0


def test_weights_are_counted_once_however_often_they_are_used():
    used, unused = nn.Linear(8, 8), nn.Linear(8, 1000)
    _, work = floor.count(lambda: (used(used(torch.randn(2, 8))), unused.weight.shape))
    assert work["weights_gb"] * 1e9 == pytest.approx((64 + 8) * 4)  # used's weight and bias, once
    assert work["tflop"] * 1e12 == 2 * (2 * 2 * 8 * 8)


def test_fp8_products_are_counted_apart_with_their_weights():
    from streamgen.model.float8 import Float8Linear

    layer = Float8Linear(nn.Linear(64, 32))
    with torch.no_grad():
        _, work = floor.count(lambda: layer(torch.randn(5, 64)))
    assert work["tflop_by_kind"]["fp8_linear"] * 1e12 == 2 * 5 * 64 * 32
    assert work["tflop_by_kind"]["linear"] == 0
    assert work["weights_gb"] * 1e9 == pytest.approx(64 * 32 + 4 * 32 + 4 * 32)  # e4m3, scales, bias


def test_fp8_products_take_their_own_rate():
    stage = {"tflop": 1.0, "weights_gb": 0.0, "kv_gb": 0.0, "tflop_by_kind": {"fp8_linear": 0.6}}
    work = {
        "start": stage,
        "first_chunk": {"frames": 12, "stages": {}},
        "steady_chunk": {"frames": 12, "stages": {"denoise": stage}},
    }
    # 0.4 TFLOP at 100 TFLOP/s and 0.6 at 200: 4 + 3 ms; without an FP8 rate all at 100: 10 ms
    assert floor.floor(work, 100.0, 1000.0, fp8_tflops=200.0)["steady_chunk"]["floor_ms"] == pytest.approx(
        7.0
    )
    assert floor.floor(work, 100.0, 1000.0)["steady_chunk"]["floor_ms"] == pytest.approx(10.0)


def synthetic_work(tflop, weights_gb, frames=12):
    stage = {"tflop": tflop, "weights_gb": weights_gb, "kv_gb": 0.0, "tflop_by_kind": {}}
    return {
        "start": stage,
        "first_chunk": {"frames": frames, "stages": {"denoise": stage}},
        "steady_chunk": {"frames": frames, "stages": {"denoise": stage, "decode": stage}},
    }


def test_the_floor_is_the_larger_of_the_arithmetic_and_the_memory_time():
    # 1 TFLOP per stage at 100 TFLOP/s: 10 ms; 10 GB at 1000 GB/s: 10 ms; either may bound
    arithmetic = floor.floor(synthetic_work(1.0, 5.0), 100.0, 1000.0, target_fps=300)
    assert arithmetic["steady_chunk"]["stages"]["denoise"] == {
        "floor_ms": pytest.approx(10.0),
        "bound": "arithmetic",
        "flop_per_byte": pytest.approx(200.0),
    }
    assert arithmetic["steady_chunk"]["floor_ms"] == pytest.approx(20.0)
    assert arithmetic["steady_chunk"]["fps_ceiling"] == pytest.approx(600.0)  # 12 frames in 20 ms
    assert arithmetic["steady_chunk"]["matmul_rate_needed_for_target"] == pytest.approx(0.5)
    assert arithmetic["first_chunk"]["floor_ms_from_start"] == pytest.approx(20.0)
    memory = floor.floor(synthetic_work(1.0, 20.0), 100.0, 1000.0)
    assert memory["steady_chunk"]["stages"]["decode"]["bound"] == "memory"
    assert memory["steady_chunk"]["floor_ms"] == pytest.approx(40.0)


def staged_work(stages: dict, frames=12) -> dict:
    """A chunk of these stages (name -> (tflop, weights_gb)), steady, first and as a one-chunk clip."""
    chunk = {
        "frames": frames,
        "stages": {
            name: {"tflop": tflop, "weights_gb": gb, "kv_gb": 0.0, "tflop_by_kind": {}}
            for name, (tflop, gb) in stages.items()
        },
    }
    start = {"tflop": 0.0, "weights_gb": 0.0, "kv_gb": 0.0, "tflop_by_kind": {}}
    return {"start": start, "first_chunk": chunk, "steady_chunk": chunk, "clip": [chunk]}


def test_stages_run_at_once_share_the_devices_rates():
    """The decode beside the re-encode (StreamSession.decode_beside_reencode) runs on the same
    device: together they take the floor of their summed work, not the longer one's alone, and
    the sum of both only where they are bound by the same ceiling."""
    at_once = floor.DECODE_BESIDE_REENCODE
    # at 100 TFLOP/s and 1000 GB/s: decode 1 ms of products, 10 of memory; re-encode 10 and 1
    apart = staged_work({"denoise": (2.0, 1.0), "decode": (0.1, 10.0), "reencode": (1.0, 1.0)})
    one_after_the_other = floor.floor(apart, 100.0, 1000.0)["steady_chunk"]
    beside = floor.floor(apart, 100.0, 1000.0, overlapped=at_once)["steady_chunk"]
    assert one_after_the_other["floor_ms"] == pytest.approx(20.0 + 10.0 + 10.0)
    assert beside["floor_ms"] == pytest.approx(20.0 + 11.0)  # 11 ms of products, 11 of memory
    assert beside["overlapped"]["stages"] == list(at_once)
    assert beside["stages"]["decode"]["floor_ms"] == pytest.approx(10.0)  # each stage's own, as timed
    # both arithmetic: the same matrix units, one after the other's products (what the H200's
    # counts are: 52 and 58 ms of products, 0.04 and 2.3 ms of memory)
    both_arithmetic = staged_work({"decode": (1.0, 0.1), "reencode": (1.0, 0.1)})
    assert floor.floor(both_arithmetic, 100.0, 1000.0, overlapped=at_once)["steady_chunk"][
        "floor_ms"
    ] == pytest.approx(20.0)


def test_a_variant_decoding_beside_its_reencode_gets_their_floor_at_once():
    from bench import variant_floor

    counts = {"default": staged_work({"denoise": (2.0, 1.0), "decode": (0.1, 10.0), "reencode": (1.0, 1.0)})}
    ceilings = {"matmul_tflop_per_s": 100.0, "copy_gb_per_s": 1000.0}

    def fps_ceiling(variant):
        return variant_floor.own_ceilings(counts, {"fps_steady": 1.0, **variant}, ceilings, 4)["fps_ceiling"]

    assert fps_ceiling({}) == pytest.approx(12 / 0.040)  # 20 + 10 + 10 ms
    assert fps_ceiling({"decode_beside_reencode": True}) == pytest.approx(12 / 0.031, rel=1e-3)  # 20 + 11


def test_measured_ceilings_are_positive_rates():
    # small products: a bfloat16 one of the CPU's 1024 took 7 s here, on a CPU without native bf16
    dtypes = [torch.float32, torch.bfloat16]
    ceilings = device_ceilings.measure_ceilings("cpu", dtypes, repeats=2, size=128, copy_mib=16)
    assert ceilings["source"] == "measured: 128^3 products, 16 MiB copy, medians of 2"
    by_dtype = ceilings["matmul_tflop_per_s_by_dtype"]
    assert set(by_dtype) == {"float32", "bfloat16"} and min(by_dtype.values()) > 0
    assert ceilings["matmul_tflop_per_s"] == max(by_dtype.values()) and ceilings["copy_gb_per_s"] > 0


def test_command_line_for_the_shipped_model_counts_and_times_each_stage(tmp_path, capsys):
    png = tmp_path / "floor.png"
    # a one-chunk clip: each chunk of the default 81 frames is counted too
    result = bench_floor(
        capsys, "--model", "tiny-avatar", "--time", "2", "--clip-frames", "9", "--plot", str(png)
    )
    assert result["counted_on"] == "cpu" and result["target_fps"] == 25
    # counted on a real device: every block of it, not extrapolated
    assert (
        result["blocks_counted"]
        == json.loads((MODELS / "tiny-avatar" / "model.json").read_text())["config"]["num_layers"]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # timed here, so against this machine's ceilings, in every dtype the session computes in
    assert result["ceilings"]["source"].startswith("measured")
    assert "float32" in result["ceilings"]["matmul_tflop_per_s_by_dtype"]
    assert list(result["stages"]) == list(CHUNK_STAGES)
    assert all(s["of_floor"] > 0 for name, s in result["stages"].items() if name != "to_host")
    # one more chunk under the profiler: the operators each stage dispatched (no kernels on a CPU)
    assert "profile_error" not in result, result.get("profile_error")
    assert all(
        s["ops"] > 0 and "kernels" not in s for name, s in result["stages"].items() if name != "to_host"
    )
    assert result["fps_ceiling"] > 0 and set(result["work"]["steady_chunk"]["stages"]) == set(
        CHUNK_STAGES
    ) - {"to_host"}


def test_stage_activity_counts_the_host_operators_and_the_gpu_busy_time_in_each_stage():
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, end, device=cpu, parent=None, annotation=False):
        return SimpleNamespace(
            name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device, cpu_parent=parent,
            is_user_annotation=annotation,
        )  # fmt: skip

    denoise = event(stage_timing.STAGE_RANGE + "denoise", 0, 10_000)
    linear = event("aten::linear", 100, 900, parent=denoise)
    events = [
        denoise,
        linear,
        event("aten::addmm", 200, 800, parent=linear),  # called by linear: not dispatched by the model
        event("aten::add", 1000, 1100, parent=denoise),
        event("triton_fused_kernel", 1200, 4200, cuda),  # kernels overlapping: busy is their union
        event("ampere_bf16_gemm", 4000, 6000, cuda),
        event("Memcpy DtoD", 7000, 8000, cuda),
        event("triton_fused_kernel", 8000, 9000, cuda),
        # CUDA's copy of the range, from its first kernel to its last: neither the range nor a kernel
        event(stage_timing.STAGE_RANGE + "denoise", 1200, 9000, cuda, annotation=True),
        decode := event(stage_timing.STAGE_RANGE + "decode", 10_500, 12_000),
        event("aten::conv2d", 10_600, 10_700, parent=decode),
        event("late_kernel", 11_000, 13_000, cuda),  # ends after the range: not the stage's
    ]
    activity = stage_timing.stage_activity(events, device_kernels=True)
    # the kernels that took longest, summed by name
    top = {"triton_fused_kernel": {"ms": 4.0, "calls": 2}, "ampere_bf16_gemm": {"ms": 2.0, "calls": 1},
           "Memcpy DtoD": {"ms": 1.0, "calls": 1}}  # fmt: skip
    assert activity["denoise"] == {
        "ops": 2,
        "profiled_ms": 10.0,
        "kernels": 4,
        "gpu_busy_ms": 6.8,
        "top_kernels": top,
    }
    assert list(activity["denoise"]["top_kernels"]) == list(top)
    assert activity["decode"] == {
        "ops": 1,
        "profiled_ms": 1.5,
        "kernels": 0,
        "gpu_busy_ms": 0.0,
        "top_kernels": {},
    }
    assert stage_timing.stage_activity(events, device_kernels=False)["denoise"] == {
        "ops": 2,
        "profiled_ms": 10.0,
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--measure"], "--measure needs a real device (--device cuda or cpu), not meta"),
        (["--time", "3"], "--time needs a real device (--device cuda or cpu), not meta"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA"),
        ),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "tiny-avatar-teacher"], "is a bidirectional teacher"),
        (["--model", "tiny-avatar", "--upsample-phases"], "--upsample-phases is about Wan's latents"),
        (["--tiny-decoder", "--upsample-phases"], "a way of the Wan decoder, not of --tiny-decoder"),
        # a ring shorter than a chunk: the cache's ValueError, a traceback
        (["--window", "2"], "--window 2: the ring holds at least a chunk's 3 latent frames"),
        # a streamgen model counts its own ring and text: these were ignored
        (["--model", "tiny-avatar", "--window", "8"], "--window is about Wan's latents"),
        (["--model", "tiny-avatar", "--text-tokens", "8"], "--text-tokens is about Wan's latents"),
        # rates given beside a measure of them: ignored, the JSON's ceilings were the measured ones
        (
            ["--model", "debug", "--time", "1", "--copy-gbps", "100"],
            "--copy-gbps: --time measures this device's ceilings",
        ),
        (["--model", "debug", "--measure", "--matmul-tflops", "9"], "--matmul-tflops: --measure measures"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_code_2(args, message, capsys):
    import logging

    from streamgen.cli import main  # in this process: a fresh one per case took 3 s to import torch

    assert main(["bench", "floor", "--json", *args]) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert out == "" and line.startswith("streamgen bench floor: error: ") and message in line
    # --json turned the warnings off for the benchmark alone: they were left off for every test after
    assert logging.root.manager.disable == logging.NOTSET


@pytest.mark.slow
def test_command_line_for_wan_counts_on_the_meta_device(capsys):
    # the real flavor at a small size, a one-chunk ring, a one-chunk clip and two steps (each
    # forward of a block is seconds of Python on meta), so it runs in seconds
    args = ("--height", "64", "--width", "96", "--window", "3", "--text-tokens", "8", "--clip-frames", "9")
    args += ("--steps", "2")
    decoded = []
    with pytest.MonkeyPatch.context() as mp:
        decode_stream = WanVAE.decode_stream
        mp.setattr(WanVAE, "decode_stream", lambda *a: decoded.append(1) or decode_stream(*a))
        result = bench_floor(capsys, *args)
    # one decode per chunk (a clip's, the ring's fill and a steady chunk): the autoencoder ran in
    # the one-block count alone (in both, it was half of the count's time)
    assert len(decoded) == 3
    assert (result["model"], result["counted_on"], result["dtype"]) == ("wan2.1-1.3b", "meta", "bfloat16")
    assert result["steps"] == 2
    assert result["blocks_counted"] == [1, 2]  # and extrapolated to its 30 (test above)
    assert result["window_frames"] == 3 and result["target_fps"] == floor.TARGET_FPS
    assert result["ceilings"]["matmul_tflop_per_s"] == device_ceilings.H200_MATMUL_TFLOPS
    assert result["floor"]["clip"]["frames"] == 9 and result["floor"]["clip"]["chunks"] == 1
    steady = result["work"]["steady_chunk"]
    assert steady["frames"] == 12 and steady["stages"]["denoise"]["tflop_by_kind"]["attention"] > 0
    assert steady["stages"]["denoise"]["tflop_by_kind"]["fp8_linear"] == 0 and not result["fp8_linears"]
    # a known avatar's first chunk starts from its kept sink: no reference encode, no sink forward
    assert 0 < result["first_chunk_floor_ms_known_avatar"] < result["first_chunk_floor_ms"]
    # the decoder's upsamplers at low resolution: fewer decoder FLOPs, the rest the same
    phases = bench_floor(capsys, *args, "--upsample-phases")
    assert (result["decoder"], phases["decoder"]) == ("wan", "wan, upsample_phases")
    stages, fewer = steady["stages"], phases["work"]["steady_chunk"]["stages"]
    assert fewer["decode"]["tflop"] < 0.97 * stages["decode"]["tflop"]
    assert fewer["denoise"] == stages["denoise"]


def test_command_line_with_fp8_linears_or_attention_counts_their_products_at_their_own_rate(capsys):
    # with the block linears in FP8 most of the linear work moves to the FP8 products, whose rate
    # (Hopper's nominal ratio unless measured) lowers the floor; with QK^T in FP8 (the CPU runs
    # the kernel's numerics, emulated), half the DiT's attention does
    args = ("--model", "debug", "--clip-frames", "9")
    more = ((), ("--fp8",), ("--fp8-attention", "fp8_qk"))
    plain, fp8, fp8_qk = (bench_floor(capsys, *args, *m) for m in more)
    kinds, fp8_kinds, qk_kinds = (
        r["work"]["steady_chunk"]["stages"]["denoise"]["tflop_by_kind"] for r in (plain, fp8, fp8_qk)
    )
    assert kinds["fp8_linear"] == 0 and not plain["fp8_linears"] and fp8["fp8_linears"]
    assert fp8_kinds["fp8_linear"] > 0.5 * kinds["linear"] and fp8_kinds["attention"] == kinds["attention"]
    assert (plain["attention"], fp8_qk["attention"]) == ("sdpa", "fp8_qk") and not fp8_qk["fp8_linears"]
    assert (
        qk_kinds["fp8_attention"] == qk_kinds["attention"] == pytest.approx(kinds["attention"] / 2, rel=1e-3)
    )
    # every chunk's half, the first chunk's too (which is also the clip's first: moved once)
    for part in (fp8_qk["work"]["first_chunk"], *fp8_qk["work"]["clip"]):
        for stage in ("denoise", "reencode"):
            split = part["stages"][stage]["tflop_by_kind"]
            assert split["fp8_attention"] == pytest.approx(split["attention"], rel=1e-3)
    for r in (fp8, fp8_qk):
        assert r["ceilings"]["matmul_tflop_per_s_float8"] == 2 * device_ceilings.H200_MATMUL_TFLOPS
    # (the debug model's attention is too small to move its floor, which its memory bounds)
    assert fp8["fps_ceiling"] > plain["fps_ceiling"]


def test_the_environments_fp8_linears_are_named_and_counted_at_their_rate(capsys):
    # $STREAMGEN_FP8 (exported for a shell) loaded FP8 linears, counted as FP8 products, while the
    # JSON said "fp8_linears": false and its ceilings had no FP8 rate for them
    r = bench_floor(capsys, "--model", "debug", "--clip-frames", "9", env={"STREAMGEN_FP8": "1"})
    assert r["work"]["steady_chunk"]["stages"]["denoise"]["tflop_by_kind"]["fp8_linear"] > 0
    assert r["fp8_linears"] and r["ceilings"]["matmul_tflop_per_s_float8"] > 0


def test_fp8_attention_moves_its_share_of_the_dits_attention_to_the_fp8_rate():
    def stage(attention):
        return {"tflop_by_kind": {"attention": attention, "fp8_attention": 0.0}}

    def chunk():
        return {"stages": {"denoise": stage(8.0), "reencode": stage(2.0), "decode": stage(1.0)}}

    work = {"first_chunk": chunk(), "steady_chunk": chunk(), "clip": [chunk()]}
    floor.attention_in_fp8(work, "fp8_qk")  # QK^T: half the products
    for c in (work["first_chunk"], work["steady_chunk"], work["clip"][0]):
        kinds = {name: s["tflop_by_kind"] for name, s in c["stages"].items()}
        assert kinds["denoise"] == {"attention": 4.0, "fp8_attention": 4.0}
        assert kinds["reencode"] == {"attention": 1.0, "fp8_attention": 1.0}
        assert kinds["decode"] == {"attention": 1.0, "fp8_attention": 0.0}  # the VAE's: not the DiT's
    work = {"first_chunk": chunk(), "steady_chunk": chunk()}
    floor.attention_in_fp8(work, "fp8")  # both products
    assert work["steady_chunk"]["stages"]["denoise"]["tflop_by_kind"] == {
        "attention": 0.0,
        "fp8_attention": 8.0,
    }
    stage_work = {"tflop": 1.0, "weights_gb": 0.0, "kv_gb": 0.0, "tflop_by_kind": {"fp8_attention": 0.6}}
    work = {"start": stage_work, "first_chunk": {"frames": 12, "stages": {}}}
    work["steady_chunk"] = {"frames": 12, "stages": {"denoise": stage_work}}
    assert floor.floor(work, 100.0, 1000.0, fp8_tflops=200.0)["steady_chunk"]["floor_ms"] == pytest.approx(
        7.0
    )


def test_command_line_refuses_an_unknown_fp8_attention(capsys):
    from streamgen.cli import main  # in this process: a fresh one took seconds to import torch

    with pytest.raises(SystemExit) as refused:  # argparse's
        main(["bench", "floor", "--json", "--model", "debug", "--fp8-attention", "fp16"])
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and "invalid choice" in err and out == ""


def test_a_random_wan_vae_is_cast_without_diffusers_warning(capfd):
    # every run of bench floor, gpu and wan-decoder on Wan said on stderr "There are modules in
    # AutoencoderKLWan that should be kept in float32: []. Casting directly with `to()` ..."
    from bench.wan_decoder import build_wan_vae

    model = gpu.build_model("wan2.1-1.3b", 64, 96, "meta", torch.bfloat16, quick=True, backend="sdpa")
    vae = build_wan_vae("meta", torch.bfloat16)
    assert "kept in float32" not in capfd.readouterr().err
    for autoencoder in (model.vae, vae):
        assert {p.dtype for p in autoencoder.parameters()} == {torch.bfloat16}


def test_a_wan_model_larger_than_the_memory_is_refused_in_one_line(monkeypatch, capsys):
    # `bench floor --model wan2.1-14b --device cpu` built its 56 GB float32 DiT until the kernel
    # killed the process
    import streamgen.models
    from streamgen.cli import main

    monkeypatch.setattr(streamgen.models, "free_memory", lambda: 2**30)
    dit = gpu.DiT

    def on_meta_only(cfg):  # counted on meta, never built
        assert torch.empty(0).device.type == "meta", "the DiT was built"
        return dit(cfg)

    monkeypatch.setattr(gpu, "DiT", on_meta_only)
    assert main(["bench", "floor", "--json", "--model", "wan2.1-14b", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "wan2.1-14b: its DiT takes" in captured.err, captured.err


def test_the_profilers_marks_stay_off_the_terminal_and_nothing_else_does(capfd):
    # `bench floor --time` printed libkineto's "USDT:... profiler_start" and "... profiler_stop"
    # on stderr (below Python, whatever KINETO_LOG_LEVEL says)
    from torch.profiler import ProfilerActivity

    with stage_timing.quiet_profile([ProfilerActivity.CPU]) as prof:
        torch.ones(4) + 1
    assert prof.events() and "USDT" not in capfd.readouterr().err
    # what else reaches the file descriptor meanwhile goes on to stderr
    with stage_timing.kineto_marks_dropped():
        mark = "USDT:2026-12-06 13:41:56 22481:22481 SyncActivityProfilerHandler.cpp:52] profiler_start"
        os.write(2, f"{mark}\nW1206 a warning\nUSDT: not a mark\n".encode())
    assert capfd.readouterr().err == "W1206 a warning\nUSDT: not a mark\n"
