"""distill.results, the table of every model scored by `streamgen eval` (docs/results.md)."""

import json

import pytest


def run_results(tmp_path, *argv):
    from distill import results

    paths = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--doc", str(tmp_path / "r.md")]  # fmt: skip
    return results.main([*paths, *argv])


def stored_row(tmp_path, **settings) -> dict:
    from distill import results

    row = {"row": "ground truth (renderer)", "model": "ground-truth", "nfe": None, "fps": None}
    row = {**row, **dict.fromkeys(results.REPORT_KEYS, 0), "clips": 24, "size": 64, **settings}
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "results.json").write_text(json.dumps([row]))
    return row


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--clips", "0"], "--clips"),
        (["--size", "63"], "--size"),
        (["--minutes", "-1"], "--minutes must be 0 (no drift stream) or give a stream"),
        (["--minutes", "nan"], "--minutes must be 0 (no drift stream) or give a stream"),
        ([], "round trip (the students' ceiling)\": no model directory"),  # no models in --runs
    ],
)
def test_the_results_table_refuses_what_it_cannot_make_before_the_first_row(
    tmp_path, monkeypatch, capsys, argv, says
):
    """They were tracebacks at the row that needed them: --clips 0 at the first, a missing model
    or a bad --size after the rows before it, --minutes after the teacher's row (minutes)."""
    from streamgen.eval import report

    def evaluated(*args, **kwargs):
        raise AssertionError("a row was evaluated")

    monkeypatch.setattr(report, "evaluate", evaluated)
    with pytest.raises(SystemExit) as exited:
        run_results(tmp_path, *argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and says in err and "Traceback" not in err, err


def test_its_usage_names_the_command_as_it_is_run(capsys):
    from distill import results

    with pytest.raises(SystemExit):
        results.main(["--clips", "0"])
    assert capsys.readouterr().err.startswith("usage: python -m distill.results ")


def test_missing_only_refuses_rows_made_with_other_settings(tmp_path, monkeypatch, capsys):
    """--missing-only kept the stored rows whatever they were made with: a table of 8-clip rows
    and 24-clip rows, or of another --runs' models, under one note."""
    from distill import results

    monkeypatch.setattr(results, "evaluate_rows", lambda *args: [])
    for settings, says in (({"clips": 8}, "made with --clips 8, this run's is 24"),
                           ({"model": "roundtrip:elsewhere", "row": "autoencoder round trip (the students' "
                             "ceiling)"}, "scored roundtrip:elsewhere"),
                           ({"threads": 2}, "--threads 2")):  # fmt: skip
        stored_row(tmp_path, **settings)
        with pytest.raises(SystemExit) as exited:
            run_results(tmp_path, "--missing-only")
        err = capsys.readouterr().err
        assert exited.value.code == 2 and says in err and "run without --missing-only" in err, err
    stored_row(tmp_path, clips=24, minutes=5.0, size=64, threads=1)  # the same: kept
    assert run_results(tmp_path, "--missing-only") == 0


def test_render_only_notes_what_the_rows_were_made_with(tmp_path):
    """The note under the table named the command line's defaults (24 clips, 5-minute streams),
    whatever the stored rows were made with."""
    stored_row(tmp_path, clips=8, minutes=1.0, size=128, threads=2)
    assert run_results(tmp_path, "--render-only") == 0
    note = (tmp_path / "r.md").read_text()
    assert "8 test clips per row (4 s each, 128x128); drift from a 1.0-minute stream" in note
    assert "2 torch thread(s)" in note


def test_minutes_0_makes_the_table_without_a_drift_stream(tmp_path, monkeypatch):
    """0 is no drift stream (the students' drift from the clips, as the teacher's): a range check
    that took only streams of two frames or more refused it."""
    from distill import results

    monkeypatch.setattr(results, "evaluate_rows", lambda *args: [])  # (the stored row alone)
    stored_row(tmp_path, clips=24, minutes=0.0, size=64, threads=1)
    assert run_results(tmp_path, "--minutes", "0", "--missing-only") == 0
    note = (tmp_path / "r.md").read_text()
    assert "-minute stream" not in note and "and with no stream the students: mean CSIM" in note


def test_an_out_or_doc_it_cannot_write_is_refused_before_the_first_row(tmp_path, monkeypatch, capsys):
    """--out under a file was a traceback at the first row; a --doc in no folder, or a folder, once
    every row was made (a quarter of an hour)."""
    from distill import results
    from streamgen.eval import report

    def evaluated(*args, **kwargs):
        raise AssertionError("a row was evaluated")

    monkeypatch.setattr(report, "evaluate", evaluated)
    (tmp_path / "afile").write_text("")
    for argv, says in (
        (["--out", str(tmp_path / "afile")], "--out " + str(tmp_path / "afile") + " is a file"),
        (["--doc", str(tmp_path / "nowhere" / "r.md")], "not a file in a folder"),
        (["--doc", str(tmp_path)], "not a file in a folder"),
    ):
        with pytest.raises(SystemExit) as exited:
            results.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and says in err, err


def test_a_stopped_results_run_says_where_its_rows_are(tmp_path, monkeypatch, capsys):
    """A Ctrl-C was a traceback, which did not say that the rows made were kept."""
    from distill import results

    def one_row_then_stopped(runs, out, clips, minutes, size, skip, on_row):
        on_row([{"row": "ground truth (renderer)", "model": "ground-truth"}])
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "evaluate_rows", one_row_then_stopped)
    assert run_results(tmp_path) == 130
    err = capsys.readouterr().err
    assert "interrupted: the rows made so far are in" in err and "--missing-only" in err, err
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 1


def test_the_results_are_kept_under_the_runs_they_score(tmp_path, capsys):
    # --out was runs/results in the current folder, whatever --runs said: `make results RUNS=/x`
    # wrote there, and `--render-only --runs /x` read another run's table
    from distill import results

    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_:
        results.main(["--runs", str(runs), "--doc", str(tmp_path / "r.md"), "--render-only"])
    assert exit_.value.code == 2
    assert f"{runs / 'results' / 'results.json'} does not exist yet" in capsys.readouterr().err


def test_a_missing_model_is_said_alike_for_every_row_with_the_stage_that_makes_it(tmp_path, monkeypatch, capsys):
    # a relative --runs: the autoencoder's row said "unknown model 'runs/autoencoder/model': not a
    # model directory and not one of tiny-avatar, ...", the others "no model directory ...: there
    # is no such folder", and none said which stage makes the model
    from distill import results

    monkeypatch.chdir(tmp_path)
    for made, says in (([], "no model directory runs/autoencoder/model: there is no such folder; "
                            "the autoencoder stage makes it: `make autoencoder RUNS=runs`"),
                       (["autoencoder"], "no model directory runs/teacher/model: there is no such folder; "
                                         "the teacher stage makes it: `make teacher RUNS=runs`")):  # fmt: skip
        if made:
            (tmp_path / "runs" / "autoencoder" / "model").mkdir(parents=True)
            (tmp_path / "runs" / "autoencoder" / "model" / "vae_config.json").write_text("{}")
        with pytest.raises(SystemExit) as exited:
            results.main(["--runs", "runs", "--doc", "r.md"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and says in err, err


def test_the_results_table_keeps_each_row_as_it_is_made(tmp_path, monkeypatch, capsys):
    """results.json was written once every row was evaluated: a failure on a late row (hours in)
    lost the others, and --missing-only had nothing to go on from; --render-only without it was
    a traceback."""
    from distill import results

    def one_row_then_fail(runs, out, clips, minutes, size, skip, on_row):
        on_row([{"row": "ground truth (renderer)", "model": "ground-truth"}])
        raise RuntimeError("the next row's model is missing")

    monkeypatch.setattr(results, "evaluate_rows", one_row_then_fail)
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--doc", str(tmp_path / "r.md")]
    with pytest.raises(RuntimeError):
        results.main(argv)
    assert [r["row"] for r in json.loads((tmp_path / "out" / "results.json").read_text())] == [
        "ground truth (renderer)"
    ]
    with pytest.raises(SystemExit) as exited:
        results.main(["--render-only", "--out", str(tmp_path / "none"), "--doc", str(tmp_path / "r.md")])
    assert exited.value.code == 2 and "run without --render-only first" in capsys.readouterr().err


def test_the_results_table_goes_into_a_document_without_its_markers_keeping_the_text(tmp_path):
    """A --doc without the table's markers (another document, or results.md from elsewhere) was
    replaced whole by the table: its text lost. The table is added at its end; a second run
    replaces that table only."""
    from distill import results

    row = {k: 0.0 for k in results.REPORT_KEYS} | {"row": "ground truth (renderer)", "nfe": None}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps([row]))
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nhours of writing\n")
    argv = ["--render-only", "--out", str(tmp_path / "out"), "--doc", str(doc)]
    for _ in range(2):
        assert results.main(argv) == 0
        text = doc.read_text()
        assert text.startswith("# Notes\n\nhours of writing\n")
        assert text.count("<!-- results:begin -->") == 1 and text.count("| ground truth (renderer) |") == 1


def test_render_only_with_its_defaults_works_from_any_folder(tmp_path, monkeypatch):
    """Its defaults (runs/tiny-avatar, docs/results.md) were the current folder's: run outside the
    repository's root, `python -m distill.results --render-only` found no results.json, nor docs/
    to write in. They are the repository's (here a stand-in of one)."""
    from distill import results

    repository = tmp_path / "repository"
    stored = repository / "runs" / "tiny-avatar" / "results"
    stored.mkdir(parents=True)
    (stored / "results.json").write_text(json.dumps([stored_row(tmp_path, clips=8)]))
    (repository / "docs").mkdir()
    monkeypatch.setattr(results, "REPOSITORY", repository)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert results.main(["--render-only"]) == 0
    assert "8 test clips per row" in (repository / "docs" / "results.md").read_text()
    assert list(elsewhere.iterdir()) == []


def test_the_results_table_names_the_machine_its_rows_were_made_on(tmp_path, monkeypatch):
    """The table's frames/s column said "(this CPU)" and its note "a shared 2-core CPU", whatever
    machine made the rows. Each row made now keeps its machine (CPU model and core count) in
    results.json and the note names it; rows kept before that say "machine not recorded"."""
    from distill import results

    monkeypatch.setattr(results, "evaluate_rows", lambda *a, **k: [stored_row(tmp_path) | {"fps": 3.0}])
    assert run_results(tmp_path) == 0
    machine = results.this_machine()
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["machine"] == machine
    text = (tmp_path / "r.md").read_text()
    assert f"on {machine}" in text and "this CPU" not in text and "2-core" not in text

    stored_row(tmp_path)  # (one kept before the machine was)
    assert run_results(tmp_path, "--render-only") == 0
    assert "machine not recorded" in (tmp_path / "r.md").read_text()
