"""`streamgen bench fp8` on the debug model: each variant's frames against float32's."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import streamgen

from bench import fp8


def test_each_variant_is_compared_with_float32_chunk_by_chunk(tmp_path):
    variants = ("bfloat16", "float32+fp8_qk_attention", "float32+fp8_attention", "float32+fp8_linears")
    result = fp8.run("debug", chunks=2, variants=variants)
    assert list(result["variants"]) == ["float32", *variants]
    assert "psnr_db" not in result["variants"]["float32"]  # the reference
    for name in variants:
        entry = result["variants"][name]
        assert entry["attention"] == fp8.VARIANTS[name][2] and len(entry["mean_levels_by_chunk"]) == 2
        assert 0 < entry["mean_levels"] <= entry["max_levels"] and entry["psnr_db"] > 20, (name, entry)
    assert result["variants"]["float32+fp8_linears"]["fp8_layers"] > 0
    assert result["variants"]["float32+fp8_qk_attention"]["fp8_layers"] == 0
    # with PV in FP8 the cache's kept e4m3 values: the share of channels a read quantized again
    assert 0 < result["variants"]["float32+fp8_attention"]["value_channels_requantized_per_read"] <= 1
    assert all(
        "value_channels_requantized_per_read" not in result["variants"][v]
        for v in variants
        if "fp8_attention" not in v
    )
    fp8.plot(result, tmp_path / "fp8.png")
    assert (tmp_path / "fp8.png").stat().st_size > 10_000


def test_the_environments_fp8_leaves_the_variants_as_they_are_named(monkeypatch):
    # $STREAMGEN_FP8 (exported for a shell, `use_precision`) put the float32 reference's linears in
    # FP8 too: every FP8 variant then differed from it by about nothing
    from streamgen.models import FP8_ENV

    monkeypatch.setenv(FP8_ENV, "1")
    result = fp8.run("debug", chunks=1, variants=("float32+fp8_linears",))
    assert result["variants"]["float32"]["fp8_layers"] == 0
    assert result["variants"]["float32+fp8_linears"]["mean_levels"] > 0
    assert os.environ[FP8_ENV] == "1"


def test_command_line_refuses_no_chunks_and_unknown_variants(capsys):
    from streamgen.cli import main  # in this process (the JSON below comes from a fresh one)

    for bad, says in (
        (["--chunks", "0"], "'0' is not a positive whole"),
        (["--variants", "float16"], "invalid choice"),
    ):
        with pytest.raises(SystemExit) as exited:  # argparse's own refusal
            main(["bench", "fp8", "--json", "--model", "debug", *bad])
        out, err = capsys.readouterr()
        assert exited.value.code == 2 and says in err and out == ""


def test_command_line_prints_json():
    r = streamgen("bench", "fp8", "--json", "--model", "debug", "--chunks", "1", "--variants", "float32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["variants"]["float32"]["chunk_ms_p50"] > 0


def test_a_plot_of_the_reference_alone_is_refused_before_it_runs(tmp_path, capsys):
    # `--variants float32 --plot p.png`: the stream generated, then an empty plot and matplotlib's
    # "No artists with labels found" warning on stderr, under --json too
    from streamgen.cli import main

    png = tmp_path / "p.png"
    assert main(["bench", "fp8", "--json", "--model", "debug", "--variants", "float32", "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "give --variants another than float32 too" in captured.err, captured.err
    assert not png.exists()
