"""What a command says: its --help, the forms the docs give an option; its last line, in words."""

import argparse

from test_docs import ROOT, documented_commands

from streamgen.cli import build_parser, main


def eval_model_forms() -> set[str]:
    """The values of `eval --model` in the README's and docs' commands that name no model but a form
    eval takes: `ground-truth`, and `roundtrip:` (what comes before a MODEL)."""
    forms = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for command, _ in documented_commands(doc.read_text()):
            argv = command.split()
            if argv[0] == "eval" and "--model" in argv[:-1]:
                value = argv[argv.index("--model") + 1]
                if value == "ground-truth" or ":" in value:
                    forms.add(value if ":" not in value else value.split(":")[0] + ":")
    return forms


def test_evals_help_and_its_missing_model_line_name_every_form_the_docs_give_model(tmp_path, capsys):
    """`eval --help` said '--model: model name or path, or 'ground-truth' for the renderer itself', and
    an eval without --model the same: `roundtrip:MODEL`, the autoencoder's ceiling that the README's
    Commands and docs/eval.md run, was in neither."""
    forms = eval_model_forms()
    assert forms == {"ground-truth", "roundtrip:"}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    help_text = next(a.help for a in sub.choices["eval"]._actions if "--model" in a.option_strings)
    assert sorted(f for f in forms if f not in help_text) == []
    assert main(["eval", "--out", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err
    assert sorted(f for f in forms if f not in said) == []


def test_train_evaluators_says_what_it_trained_in_words(tmp_path, monkeypatch, capsys):
    """Its last line ended in a Python dict, "({'clips': 400, 'seed': 0, 'seconds': 612.3})"."""
    from streamgen.eval import train

    monkeypatch.setattr(train, "check_training_data", lambda data, clips: None)
    monkeypatch.setattr(train, "train_evaluators", lambda out, *args: {"clips": 400, "seed": 0, "seconds": 612.3})
    out = tmp_path / "ev"
    assert main(["eval", "train-evaluators", "--out", str(out)]) == 0
    written = f"{out / 'syncnet.safetensors'} and {out / 'identity.safetensors'}"
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {written} (400 clips, seed 0, in 612.3 s)"
    monkeypatch.setattr(train, "train_evaluators", lambda out, *args: {"clips": 4, "seed": 1, "seconds": 2.0,
                                                                        "resumed_from": 250})  # fmt: skip
    assert main(["eval", "train-evaluators", "--out", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    assert said == f"wrote {written} (4 clips, seed 1, in 2 s, resumed from step 250)"


def test_data_makes_out_may_hold_the_same_dataset_as_its_help_says(tmp_path, capsys):
    """`data make --help` said '--out: output folder (must not hold a dataset)', while the same make
    run again into it has nothing to do (exit 0), and an unfinished one goes on (docs/data.md)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    data = next(a for a in sub.choices["data"]._actions if isinstance(a, argparse._SubParsersAction))
    said = next(a.help for a in data.choices["make"]._actions if "--out" in a.option_strings)
    out = tmp_path / "world"
    argv = ["data", "make", "--out", str(out), "--clips", "1", "--seconds", "0.2", "--size", "16", "--workers", "1"]
    assert main(argv) == 0 and main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert "must not hold" not in said and "the same settings" in said and "unfinished" in said
    assert main([*argv[:5], "2", *argv[6:]]) == 2  # (another dataset: refused)


def test_every_frame_size_option_says_what_sizes_it_takes():
    """generate's --height/--width, serve's, eval's and data preview's --size took a multiple of 16 up to
    4096 (`streamgen.cli.frame_size`) and their help said neither: a user learnt it from a refusal."""
    from streamgen.cli import MAX_FRAME_SIZE, frame_size

    def options(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from options(sub, [*path, name])
            elif action.type is frame_size:
                yield " ".join([*path, action.option_strings[0]]), action.help

    found = dict(options(build_parser(), []))
    assert {"generate --height", "generate --width", "serve --size", "eval --size", "data preview --size"} <= set(found)
    assert [name for name, text in found.items() if f"multiple of 16 up to {MAX_FRAME_SIZE}" not in text] == []
