"""Each environment variable of ours that a user may set is in the README or docs/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\bSTREAMGEN_[A-Z0-9_]*[A-Z0-9]\b")
# set by the --sp launcher for its ranks (its process id), never by a user
INTERNAL = {"STREAMGEN_LAUNCHER"}


def variables_read() -> dict[str, str]:
    """Each STREAMGEN_ variable named in the code, scripts and Makefile, with a file that names it."""
    sources = [ROOT / "run", ROOT / "Makefile", *sorted((ROOT / "scripts").glob("*.sh"))]
    sources += [p for d in ("streamgen", "server", "distill", "bench", "examples") for p in sorted((ROOT / d).rglob("*.py"))]
    found = {}
    for source in sources:
        for name in VARIABLE.findall(source.read_text()):
            found.setdefault(name, str(source.relative_to(ROOT)))
    return found


def test_every_environment_variable_a_user_may_set_is_documented():
    """STREAMGEN_MODELS, the folders a model's name is looked for in before the shipped ones, was in
    no doc (a new user could not serve a trained model by name without reading streamgen/models.py),
    nor STREAMGEN_VENV and STREAMGEN_TORCH of ./run's setup, nor STREAMGEN_FP8, STREAMGEN_CACHE_FROM
    and STREAMGEN_COMPILE, which, exported, change every model a command loads."""
    read = variables_read()
    assert {"STREAMGEN_MODELS", "STREAMGEN_TOKEN", "STREAMGEN_VENV"} <= set(read), read
    docs = "\n".join(d.read_text() for d in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    undocumented = {name: where for name, where in read.items() if name not in INTERNAL and name not in docs}
    assert undocumented == {}


def test_a_variable_no_doc_names_is_found():
    """The check above can fail: a name in the code that no doc has is reported, with its file."""
    assert VARIABLE.findall('os.environ.get("STREAMGEN_NOWHERE_2", "") or $STREAMGEN_X') == [
        "STREAMGEN_NOWHERE_2",
        "STREAMGEN_X",
    ]
