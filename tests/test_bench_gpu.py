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


def test_options_that_would_run_nothing_or_fail_every_variant_are_refused(capsys):
    import pytest

    from streamgen.cli import main

    for options, said in ((["--budget", "0"], "argument --budget"), (["--budget", "-5"], "argument --budget"),
                          (["--backends", "sdpa", "trtion"], "argument --backends: invalid choice: 'trtion'")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "gpu", "--json", "--device", "cpu", "--quick", *options])
        assert exit_.value.code == 2
        captured = capsys.readouterr()
        assert said in captured.err and captured.out == "", captured.err


def test_only_without_a_part_is_refused(capsys):
    import pytest

    from streamgen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "gpu", "--json", "--device", "cpu", "--quick", "--only"])
    assert exit_.value.code == 2 and "argument --only: expected at least one argument" in capsys.readouterr().err
