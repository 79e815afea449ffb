"""`streamgen bench` with no benchmark named lists the benchmarks (test_cli_bench.py's own tests
are another's to keep fast: this one is apart)."""

import pytest

from streamgen.cli import main
from streamgen.commands.bench import BENCHMARKS


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--json"]])
def test_bench_alone_lists_the_benchmarks(argv, capsys):
    """It said "the following arguments are required: benchmark, options" (then "...: benchmark"),
    and which benchmarks there are only in the usage's braces, without what each measures."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "required" not in err and "streamgen bench NAME" in err
    lines = err.splitlines()
    for name, (_, help_text) in BENCHMARKS.items():
        assert any(line.split() == [name, *help_text.split()] for line in lines), (name, err)
