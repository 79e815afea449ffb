"""`python -m bench.variant_floor`'s mistakes: one line and exit 2, before a minute of counting."""

import pytest

from bench import variant_floor


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--steps", "0"], "argument --steps: "),  # (the session's ValueError, a traceback)
        (["--out", "no/such/folder/work.json"], "--out no/such/folder/work.json: its folder does not exist"),
        (["--out", "."], "--out .: a directory"),
    ],
)
def test_a_mistake_is_refused_before_counting(argv, says, capsys, monkeypatch):
    def counted(*args, **kwargs):
        raise AssertionError("counted")

    monkeypatch.setattr(variant_floor, "count_configurations", counted)
    with pytest.raises(SystemExit) as exit_:
        variant_floor.main(["--out", "work.json", "--quick", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err.strip().splitlines()[-1], err
