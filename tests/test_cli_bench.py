"""`streamgen bench` from the command line: each benchmark's JSON, and what it refuses before measuring."""

import json

import pytest
from cli_helpers import streamgen, streamgen_without_a_compiler

from streamgen.cli import main


@pytest.fixture(scope="module")
def bench_engine_run(tmp_path_factory):
    """`streamgen bench engine --compile` at a tiny size, in a process of its own: (its JSON, its
    plot). Two tests read it: each in a run of its own spent ~9 CPU s more on the same eager
    stream, batch and imports. (The sweep's size runs after the compiled blocks are undone.)"""
    plot = tmp_path_factory.mktemp("bench_engine") / "sizes.png"
    # (--ratio-chunks 4, not the default floor of 5: every ratio's arms and the sweep size still run;
    # the compiled rounds' streams, 5 chunks, still go past the debug model's full ring (its 4th
    # chunk) into a wrapped one, beyond the warm-up's 3, so graphs_after_warmup checks as much)
    r = streamgen(
        "bench", "engine", "--json", "--model", "debug", "--height", "32", "--width", "32", "--chunks", "2",
        "--context", "4", "--teacher-frames", "2", "--sweep", "48", "--plot", str(plot), "--batch-sessions", "2",
        "--compile", "--ratio-chunks", "4",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), plot


def test_bench_engine_prints_one_json_object(bench_engine_run):
    result, plot = bench_engine_run
    assert result["batch_sessions"] == 2 and result["batched_fps_total"] > 0
    per_size = (
        "fps",
        "first_chunk_ms",
        "first_chunk_ms_known_avatar",
        "chunk_ms_p50",
        "chunk_ms_p95",
        "frames_ms_p50",
        "cache_speedup",
        "teacher_speedup",
    )
    for key in ("flavor", "height", "width", *per_size):
        assert key in result
    assert result["fps"] > 0 and result["cache_max_abs_diff"] <= 1e-4
    (entry,) = result["resolution_sweep"]
    assert entry["height"] == entry["width"] == 48 and all(key in entry for key in per_size)
    assert entry["cache_max_abs_diff"] <= 1e-4
    realtime = [m for m in (result, entry) if m["fps"] >= 25]
    if realtime:  # the largest size that streams in real time, whichever it is on this machine
        assert result["largest_realtime"]["height"] == max(m["height"] for m in realtime)
    else:
        assert result["largest_realtime"] is None
    assert plot.stat().st_size > 0
    for m in (result, entry):  # each chunk's cache from its last step, against the re-encode
        ways = m["cache_from_last_step"]
        assert ways["reencode_fps"] > 0 and ways["last_step_fps"] > 0 and ways["last_step_speedup"] > 0
        assert ways["reencode_dit_ms"] > 0 and ways["last_step_dit_ms"] > 0
    assert result["cpu_threads"] == "auto"
    assert_names_its_cpu(result)
    for m in (result, entry):  # each stage on its threads, against every stage on all of them
        assert m["cpu_threads_all"]["fps"] > 0 and m["cpu_threads_all"]["auto_speedup"] > 0
    if result["decode_dtype"] == "bfloat16":  # auto on a CPU with native bf16: timed against float32 too
        for m in (result, entry):
            assert m["decode_float32"]["fps"] > 0 and m["decode_float32"]["bfloat16_speedup"] > 0
            encode = m["encode_float32"]  # the reference encoder: a new avatar's first chunk
            assert encode["first_chunk_ms"] > 0 and encode["bfloat16_first_chunk_ms"] > 0
    for m in (result, entry):  # 32x32, 48x48: far below the bf16 DiT's threshold
        assert m["dit_dtype"] == "float32" and "dit_float32" not in m


def assert_names_its_cpu(result: dict) -> None:
    """A CPU figure is a figure of its processor (bench/machine.py): the JSON says which."""
    import torch

    cpu = result["cpu"]
    assert cpu["model"] and cpu["cores"] >= cpu["usable_cores"] >= 1 and cpu["torch"] == torch.__version__
    assert isinstance(cpu["amx"], bool) and isinstance(cpu["avx512_bf16"], bool)


@pytest.fixture(scope="module")
def bench_decoder_run(tmp_path_factory):
    """`streamgen bench decoder --compile` at 32x32, in a process of its own: (its JSON, its plot).
    Two tests read it: each in a run of its own spent ~4 CPU s more on the same eager decoders and
    imports. (The compiled decoders are timed beside the others, in the same rounds.)"""
    png = tmp_path_factory.mktemp("bench_decoder") / "decoder.png"
    r = streamgen(
        "bench", "decoder", "--json", "--model", "debug", "--sizes", "32", "--rounds", "1", "--compile",
        "--plot", str(png),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), png


def test_bench_decoder_times_every_variant_and_measures_its_distance(bench_decoder_run):
    result, png = bench_decoder_run
    assert_names_its_cpu(result)
    (size,) = result["sizes"]
    assert size["size"] == 32 and size["frames"] == size["latent_frames"] * 4
    for name in ("upsample_then_conv", "phase_conv", "bfloat16", "autocast_bfloat16"):
        assert size[name]["ms_median"] > 0
    assert size["upsample_then_conv"]["speedup"] == 1.0 and size["upsample_then_conv"]["max_levels"] == 0
    assert size["phase_conv"]["max_levels"] < 0.01  # the same function, sums reassociated
    assert 0 < size["bfloat16"]["max_levels"] < 10 and size["bfloat16"]["uint8_changed"] < 0.5
    encode = size["reference_encode"]  # the reference image's encode, float32 against bfloat16
    assert encode["session_threads"] == "one"  # 4 x 32 x 32 pixels: far below two threads' threshold
    assert encode["float32_ms_one_thread"] > 0 and encode["bfloat16_ms_all_threads"] > 0
    assert encode["bfloat16_speedup"] > 0 and 0 < encode["latent_relative_difference"] < 0.02
    assert png.stat().st_size > 0


def test_bench_decoder_times_a_narrower_decoder_against_the_models_own_on_a_batch(tmp_path, capsys):
    import torch

    from bench.decoder import chunk_latents
    from distill.tiny_decoder import narrower_decoder
    from streamgen.model_export import save_model
    from streamgen.models import load_model

    model = load_model("debug")
    model.vae = narrower_decoder(model.vae, [16, 48, 96, 128]).eval()  # the model's: [32, 64, 96, 128]
    save_model(model, tmp_path / "narrow")
    # (in this process: the test above runs `bench decoder` in a fresh one, whose imports are ~3 CPU s)
    capsys.readouterr()
    code = main(["bench", "decoder", "--json", "--model", "debug", "--against", str(tmp_path / "narrow"),
                 "--sizes", "32", "--rounds", "1", "--batch", "3"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["against"] == str(tmp_path / "narrow")
    (size,) = result["sizes"]
    assert size["batch"] == 3
    z = chunk_latents(model.vae, 32, 2, batch=3)  # what the batch decodes: 3 streams, each its own frames
    assert z.shape[0] == 3 and not torch.equal(z[0], z[1])
    for name in ("against", "against_bfloat16"):
        assert size[name]["ms_median"] > 0
    # pruned, not distilled: its frames are not the model's
    assert size["against"]["max_levels"] > size["phase_conv"]["max_levels"] + 1
    assert set(size["against_speedup"]) == {"float32", "bfloat16"}
    assert all(v > 0 for v in size["against_speedup"].values())


def test_bench_decoder_refuses_a_decoder_for_other_latents(tmp_path, capfd):
    from streamgen.model.vae import TinyCausalVAE
    from streamgen.model_export import save_model
    from streamgen.models import load_model

    model = load_model("debug")
    model.vae = TinyCausalVAE(latent_channels=model.vae.latent_channels + 4, temporal_factor=4)
    save_model(model, tmp_path / "other")
    capfd.readouterr()
    code = main(["bench", "decoder", "--json", "--model", "debug", "--against", str(tmp_path / "other"),
                 "--sizes", "32", "--rounds", "1"])  # fmt: skip
    err = capfd.readouterr().err
    assert code != 0 and "latent channels" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_bench_decoder_compile_times_both_compiled_decoders(bench_decoder_run):
    (size,) = bench_decoder_run[0]["sizes"]
    assert set(size["compile_seconds"]) == {"compiled", "compiled_bfloat16"}
    assert size["compiled"]["max_levels"] < 0.01  # the fp32 decoder, fused by inductor
    assert 0 < size["compiled_bfloat16"]["max_levels"] < 10


@pytest.mark.slow
def test_bench_decoder_says_a_compile_that_fails_and_times_the_rest(tmp_path):
    # without a C++ compiler for inductor: a traceback, nothing timed
    r = streamgen_without_a_compiler(
        tmp_path, "bench", "decoder", "--json", "--model", "debug", "--sizes", "32", "--rounds", "1", "--compile"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (size,) = json.loads(r.stdout.strip().splitlines()[-1])["sizes"]
    for name in ("compiled", "compiled_bfloat16"):
        assert "C++ compiler" in size[name]["error"] and "\n" not in size[name]["error"]
    assert size["compile_seconds"] == {} and size["phase_conv"]["ms_median"] > 0


@pytest.mark.slow
def test_bench_engine_compile_times_compiled_against_eager(bench_engine_run):
    result, _ = bench_engine_run
    compiled = result["compile"]
    assert compiled["compile_seconds"] > 0 and compiled["rounds"] == 4 == len(compiled["speedup_rounds"]["ratios"])
    assert compiled["eager_fps"] > 0 and compiled["compiled_fps"] > 0
    assert compiled["graphs"] > 0 and compiled["graphs_after_warmup"] == 0  # the warm-up compiled them all


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["bench", "engine", "--plot", "no/such/folder/x.png"],
            "--plot: the folder no/such/folder does not exist",
        ),
        (["bench", "fp8", "--plot", "."], "--plot . is a directory"),
        # (an unset variable: the benchmark ran, and wrote no plot without a word)
        (["bench", "engine", "--plot", ""], "--plot '' names no file: give the file to write, e.g. plot.png"),
        (["bench", "gpu", "--device", "cpu", "--quick", "--out", ""], "--out '' names no file"),
        (["bench", "engine", "--model", "nonexistent"], "unknown model 'nonexistent'"),
        (["bench", "decoder", "--against", "nonexistent"], "unknown model 'nonexistent'"),
        # (a folder there in which no file can be made: os.access said yes to root)
        (["bench", "engine", "--plot", "/proc/x.png"], "--plot: cannot write /proc/x.png"),
        (["bench", "decoder", "--plot", "/proc/x.png"], "--plot: cannot write /proc/x.png"),
        # matplotlib's ValueError, after the whole benchmark: its JSON lost
        (
            ["bench", "floor", "--plot", "floor.txt"],
            "--plot floor.txt: no plot is written as .txt; give a .png",
        ),
        (["bench", "server", "--against", "nonexistent"], "unknown model 'nonexistent'"),
        (["bench", "server", "--model", "nonexistent"], "unknown model 'nonexistent'"),
        # bench gpu's --out failed after the device's ceilings were measured; an unknown device
        # was torch's RuntimeError
        (["bench", "gpu", "--device", "cpu", "--quick", "--out", "no/such/x.json"], "--out: the folder no"),
        (["bench", "gpu", "--device", "cpu", "--quick", "--out", "."], "--out . is a directory"),
        (["bench", "gpu", "--device", "bogus"], "unknown device 'bogus'"),
        # an unknown case ran nothing and reported {}; an unknown device was torch's RuntimeError
        (["bench", "kernels", "--only", "gelu_tanh", "nosuch"], "--only: unknown case(s) nosuch; the cases"),
        (["bench", "kernels", "--device", "bogus"], "unknown device 'bogus'"),
        # Wan-size shapes on the CPU: minutes each, and the attention case tens of GB
        (["bench", "kernels", "--device", "cpu"], "add --quick for small shapes"),
        # a chromium that is not there: the browser figures were left out without a word
        (["bench", "server", "--browser", "/no/such/chromium"], "--browser /no/such/chromium: no such file"),
        # the second server served it, and the JSON named the first's model as the one against
        (["bench", "server", "--against-args=--model debug"], "--against-args: give the second server"),
    ],
)
def test_a_benchmark_refuses_what_would_fail_it_before_measuring(argv, says, capsys, monkeypatch):
    """A --plot that cannot be written failed after the whole benchmark, its JSON lost; an unknown
    model was a traceback."""
    import bench.decoder
    import bench.engine
    import bench.floor
    import bench.fp8
    import bench.gpu
    import bench.kernels
    import bench.server

    def measured(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    for module in (bench.engine, bench.decoder, bench.fp8, bench.gpu, bench.kernels):
        monkeypatch.setattr(module, "run", measured)
    monkeypatch.setattr(bench.server, "_bench", measured)
    monkeypatch.setattr(bench.floor, "chunk_work", measured)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_bench_json_before_the_benchmarks_name_is_taken_as_after_it(monkeypatch, capsys):
    """`streamgen bench --json floor` said "streamgen: error: unrecognized arguments: --json"."""
    import bench.floor

    monkeypatch.setattr(bench.floor, "main", lambda opts: {"json": opts.json})
    assert main(["bench", "--json", "floor"]) == 0
    assert json.loads(capsys.readouterr().out) == {"json": True}
