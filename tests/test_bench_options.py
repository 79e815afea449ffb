"""`streamgen bench` options that a benchmark would otherwise ignore without a word: refused in one
line, exit 2, before anything is counted or timed."""

import pytest


def refused(capsys, *argv) -> str:
    from streamgen.cli import main

    assert main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert out == "" and line.startswith(f"streamgen bench {argv[0]}: error: "), line
    return line


def test_a_benchmarks_errors_name_it_whether_its_parser_or_its_checks_refuse(capsys):
    """A bad option was "streamgen bench decoder: error: ...", argparse's, but what the benchmark
    refused after parsing "streamgen bench: error: ...": two names for one program."""
    from streamgen.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "decoder", "--sizes", "0"])
    parse_error = capsys.readouterr().err.strip().splitlines()[-1]
    assert parse_error.startswith("streamgen bench decoder: error: "), parse_error
    line = refused(capsys, "decoder", "--json", "--plot", "/no-such-folder/decoder.png")
    assert "--plot: the folder /no-such-folder does not exist" in line


def test_floor_refuses_an_fp8_rate_with_no_fp8_product(capsys):
    # the JSON's ceilings had no FP8 rate and nothing was counted at it: the option did nothing
    line = refused(capsys, "floor", "--json", "--model", "debug", "--fp8-tflops", "500")
    assert "--fp8-tflops is the FP8 products' rate: give --fp8 or --fp8-attention too" in line


@pytest.mark.parametrize("fp8", [["--fp8"], ["--fp8-attention", "fp8_qk"]])
def test_floor_sets_fp8_products_against_the_fp8_rate_given(capsys, fp8):
    import json

    from streamgen.cli import main

    assert main(["bench", "floor", "--json", "--model", "debug", "--clip-frames", "9", "--fp8-tflops", "500",
                 *fp8]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["ceilings"]["matmul_tflop_per_s_float8"] == 500


def test_engine_sweep_says_that_no_size_streams_in_real_time(monkeypatch):
    # the docstring promises `largest_realtime` with a sweep; where no size reached 25 frames/s
    # the key was left out, and a reader's lookup failed
    from bench import engine

    def measured(model, height, width, *args, **kwargs):
        return {"height": height, "width": width, "fps": 24.0 if height == 64 else 10.0, "first_chunk_ms": 1.0,
                "cache_speedup": 2.0, "teacher_speedup": 3.0}  # fmt: skip

    monkeypatch.setattr(engine, "measure_size", measured)
    monkeypatch.setattr(engine, "batch_throughput", lambda *args, **kwargs: {})
    result = engine.run("debug", height=32, width=32, sweep=(64,))
    assert result["largest_realtime"] is None and len(result["resolution_sweep"]) == 1
    monkeypatch.setattr(engine, "REALTIME_FPS", 20.0)
    best = engine.run("debug", height=32, width=32, sweep=(64,))["largest_realtime"]
    assert (best["height"], best["fps"]) == (64, 24.0)
