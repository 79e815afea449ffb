"""`streamgen bench ... --plot FILE`: the file written is the one named."""


def test_a_plot_named_without_its_format_is_refused_before_measuring(tmp_path, capsys):
    # matplotlib wrote `--plot run1` to run1.png, over a run1.png already there, and said nothing
    from streamgen.cli import main

    earlier = tmp_path / "run1.png"
    earlier.write_bytes(b"an earlier run's plot")
    name = tmp_path / "run1"
    assert main(["bench", "decoder", "--json", "--model", "debug", "--sizes", "32", "--rounds", "1",
                 "--plot", str(name)]) == 2  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == "" and f"--plot {name}: give the file's format in its name, e.g. {name}.png" in captured.err
    assert earlier.read_bytes() == b"an earlier run's plot" and not name.exists()
