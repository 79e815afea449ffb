"""What a command's --help says an option takes is what the docs give it."""

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
