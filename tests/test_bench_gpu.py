"""`streamgen bench gpu`'s command line (the run itself: tests/test_gpu_check.py)."""

import argparse


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
