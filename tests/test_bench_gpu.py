"""`streamgen bench gpu`'s command line (the run itself: tests/test_gpu_check.py)."""

import argparse

import pytest
from cli_helpers import refused

QUICK_ON_CPU = ("bench", "gpu", "--json", "--device", "cpu", "--quick")


def test_a_plot_with_nothing_to_plot_is_said_not_silently_left_out(monkeypatch, tmp_path, capsys):
    # `--only decoder --plot gpu.png`: no stream variant to plot, and no PNG, without a word
    from bench import gpu

    monkeypatch.setattr(gpu, "run", lambda *args, **kwargs: {"variants": {}, "decoder": {}})
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    png = tmp_path / "gpu.png"
    result = gpu.main(parser.parse_args(["--device", "cpu", "--quick", "--only", "decoder", "--plot", str(png)]))
    assert result == {"variants": {}, "decoder": {}} and not png.exists()
    err = capsys.readouterr().err
    assert f"--plot {png} not written: no stream variant was timed" in err, err


def test_options_that_would_run_nothing_or_fail_every_variant_are_refused(capsys):
    for options, said in ((["--budget", "0"], "argument --budget"), (["--budget", "-5"], "argument --budget"),
                          (["--backends", "sdpa", "trtion"], "argument --backends: invalid choice: 'trtion'")):  # fmt: skip
        err = refused(capsys, *QUICK_ON_CPU, *options)
        assert said in err, err


def test_only_without_a_part_is_refused(capsys):
    err = refused(capsys, *QUICK_ON_CPU, "--only")
    assert "argument --only: expected at least one argument" in err, err


def test_backends_without_a_backend_is_refused(capsys):
    # `--backends` and no name took zero values: no fused variant was timed, with exit 0
    err = refused(capsys, *QUICK_ON_CPU, "--backends")
    assert "argument --backends: expected at least one argument" in err, err


def test_floor_work_not_there_or_of_another_run_is_refused_before_it(monkeypatch, tmp_path, capsys):
    # a --floor-work file not there, or counted at other steps, was said in the JSON after the run
    # ("of_floor": none), minutes of a GPU's time later, with exit 0
    import json

    import pytest

    from bench import gpu
    from streamgen.cli import main

    monkeypatch.setattr(gpu, "run", lambda *args, **kwargs: pytest.fail("the run started"))
    other_steps = tmp_path / "steps-2.json"
    other_steps.write_text(json.dumps({"quick": True, "steps": 2, "counts": {"default": {}}}))
    for path, said in ((tmp_path / "none.json", f"--floor-work {tmp_path / 'none.json'} unreadable"),
                       (other_steps, f"--floor-work {other_steps} counts quick=True, steps=2")):  # fmt: skip
        assert main([*QUICK_ON_CPU, "--floor-work", str(path)]) == 2
        captured = capsys.readouterr()
        assert said in captured.err and "python -m bench.variant_floor --out FILE" in captured.err, captured.err
        assert captured.out == "", captured.out


def test_only_naming_no_part_of_the_run_is_refused_before_it(monkeypatch, capsys):
    # `--only sdpa+fused_kernel` (a typo) ran every part's setup and then none, and said so after
    # the run, with exit code 0 and an empty JSON

    from bench import gpu
    from streamgen.cli import main

    monkeypatch.setattr(gpu.device_ceilings, "measure_ceilings", lambda *a, **k: {"matmul_tflop_per_s": 1.0})

    def never(*args, **kwargs):
        raise AssertionError("a part ran")

    monkeypatch.setattr(gpu, "_variant", never)
    assert main([*QUICK_ON_CPU, "--no-kernels", "--only", "nope"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert captured.out == "" and line.startswith("streamgen bench gpu: error: --only nope: no part of this run")
    # (the parts each quoted: a name holds ", ", and joined by ", " they read as one name over and over)
    assert "its parts are 'sdpa+fused_kernels', 'sdpa+fused_kernels, fp8 linears', " in line, line
    assert "stages" in line  # the parts it has
    # a name beside a part it has is said at once, and the run goes on
    ran = []
    monkeypatch.setattr(gpu, "_variant", lambda name, *args: ran.append(name))
    result = gpu.run("cpu", True, 4, 2, kernel_bench=False, only={"nope", "stages"})
    assert ran == ["stages"] and result["only_unknown"] == ["nope"]
    assert "--only names no part of this run: ['nope']" in capsys.readouterr().err


def test_out_replaces_an_earlier_json_and_refuses_a_file_that_is_not_json(monkeypatch, tmp_path, capsys):
    # `--out notes.txt` (or a system file, run as root) was written over whatever it held
    from bench import gpu
    from streamgen.cli import main

    monkeypatch.setattr(gpu, "run", lambda *args, **kwargs: {"variants": {}})
    notes = tmp_path / "notes.txt"
    notes.write_text("not a result\n")
    assert main([*QUICK_ON_CPU, "--out", str(notes)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--out {notes} is a file that is not JSON" in line and notes.read_text() == "not a result\n"
    for earlier in (tmp_path / "result.json", tmp_path / "empty"):
        earlier.write_text('{"variants": {"old": 1}}\n' if earlier.suffix else "")
        assert main([*QUICK_ON_CPU, "--out", str(earlier)]) == 0


def test_every_option_says_what_it_does_and_its_default():
    # --no-compile, --backends, --device, --steps and --chunks had no help: which variants
    # --no-compile skips and which backends run by default were for the source to say
    from bench import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    unsaid = [a.option_strings[-1] for a in parser._actions if a.option_strings and not a.help]
    assert unsaid == []
    backends = next(a for a in parser._actions if "--backends" in a.option_strings)
    assert "default: " + " ".join(backends.default) in backends.help


def test_the_floor_counter_s_only_without_a_configuration_is_refused(tmp_path, capsys):
    # `python -m bench.variant_floor --only` and no name took zero values: every configuration was
    # counted, as if --only were not given. (Run in this process: a fresh one spent ~3 CPU s on
    # its imports; scripts/gpu_check.sh's rehearsal, tests/test_gpu_check.py, runs the module.)
    from bench import variant_floor

    out = tmp_path / "floor-work.json"
    with pytest.raises(SystemExit) as exit_:  # (argparse's exit)
        variant_floor.main(["--out", str(out), "--quick", "--only"])
    assert exit_.value.code == 2 and "argument --only: expected at least one argument" in capsys.readouterr().err
    assert not out.exists()


def test_the_timers_wait_for_the_device_they_time(monkeypatch):
    # torch.cuda.synchronize() with no device waits for the current device's work only (cuda:0
    # unless set): `--device cuda:1` timed its products, chunks and stages as they were queued
    import torch

    from bench.ceilings import synchronize

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    synchronize("cuda:1")()
    synchronize(torch.device("cuda", 2))()
    synchronize("cpu")()
    assert waited == [torch.device("cuda:1"), torch.device("cuda:2")]


def test_fps_steady_times_only_chunks_that_attend_to_a_full_ring(monkeypatch):
    # fps_steady took the second half of the timed chunks, which holds ring-filling chunks (they
    # attend to fewer frames, so they are quicker) when fewer chunks are timed than twice the
    # ring's. A stubbed clock: a chunk costs 1 while the ring fills, 2 once it is full
    import types

    import numpy as np
    import torch

    from bench import gpu

    clock = [0.0]

    class Session:
        chunks_to_full_ring = 5  # the 5th chunk of a stream (index 4) is the first on a full ring

        def __init__(self, *args, **kwargs):
            self.index = 0

        def next_chunk(self):
            clock[0] += 2.0 if self.index >= self.chunks_to_full_ring - 1 else 1.0
            self.index += 1
            return np.zeros((12, 1, 1, 3), np.uint8), 0.0

        def close(self):
            pass

    def start_stream(session, context=None, known_avatar=False, **kwargs):
        session.index = 0

    monkeypatch.setattr(gpu, "StreamSession", Session)
    monkeypatch.setattr(gpu, "start_stream", start_stream)
    monkeypatch.setattr(gpu, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(text_dim=4))
    got = gpu.stream_speed(model, 4, 4, 5, "cpu", torch.float32, 2)
    # the first chunk aside, chunks 1-3 fill the ring and chunk 4 attends to it full: 12 frames in 2
    assert got["fps_steady"] == 6.0
    assert got["fps"] == 48 / 5


def test_quick_says_it_times_at_most_4_chunks_in_its_help_and_json():
    # --quick cut --chunks to 4 without a word: --chunks 12 --quick timed 4 each
    import torch

    from bench import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    chunks = next(a for a in parser._actions if "--chunks" in a.option_strings)
    assert "--quick: at most 4" in chunks.help
    torch.manual_seed(0)
    result = gpu.run("cpu", quick=True, chunks=12, kernel_bench=False, only={"reference_encode"})
    assert (result["chunks"], result["chunks_asked"]) == (4, 12)
    assert gpu.run("cpu", quick=True, chunks=3, kernel_bench=False, only={"reference_encode"})["chunks"] == 3
