"""The README and docs/ point at files that exist: benchmark JSON, plots, each other."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown [text](target), anchor dropped


def broken_links(doc: Path) -> list[str]:
    targets = (m.group(1) for m in LINK.finditer(doc.read_text()))
    return [t for t in targets if "://" not in t and not (doc.parent / t).exists()]


def test_relative_links_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = {str(d.relative_to(ROOT)): b for d in docs if (b := broken_links(d))}
    assert broken == {}


# a repository file named in the text (server/speech.py, streamgen/model/wan.py), link or not
REPO_FILE = re.compile(
    r"(?<![\w/.-])((?:streamgen|server|distill|bench|scripts|tests|web|examples)/[\w/.-]*\w"
    r"\.(?:py|sh|txt|json|png|yaml|js|html|css|md|wav))"
)


def test_named_repository_files_exist():
    """A file the README or docs/ names by its path (a module, a script, a benchmark's JSON)
    is there: a module moved or renamed leaves no doc pointing at the old place."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {(d.name, m.group(1)) for d in docs for m in REPO_FILE.finditer(d.read_text())}
    assert len(named) > 50
    assert sorted((doc, path) for doc, path in named if not (ROOT / path).exists()) == []


def test_a_missing_target_is_reported(tmp_path):
    (tmp_path / "here.json").write_text("{}")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](here.json) [anchor](here.json#x) [web](https://example.com) [gone](../bench/nope.json)"
    )
    assert broken_links(doc) == ["../bench/nope.json"]


def test_every_server_metric_is_in_the_api_doc():
    """A metric added to server/metrics.py is listed in docs/api.md's /metrics paragraph."""
    from server.metrics import ServerMetrics

    api = (ROOT / "docs" / "api.md").read_text()
    families = {m.name for m in ServerMetrics().registry.collect()}
    ours = {n for n in families if n.startswith("streamgen_")}
    assert ours, families  # (the registry's names, so the check below checks something)
    # a counter's family is named without the `_total` its samples carry, as the doc writes them
    assert sorted(n for n in ours if n not in api) == []


FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INDENTED = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)
SPAN = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?:^|\s)(?:\.venv/bin/)?streamgen ((?:generate|serve|bench|data|eval|distill)\b.*)")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_.=-]*$|\.\.\.|[|$<>]")  # N, DIR, SECTION.KEY=VALUE, a|b
# a value each placeholder of the docs' commands is checked with (a command that held one was not checked
# at all: `generate --sp N`, `bench resources --dtype bfloat16|float16|float32`, `distill STAGE ...`)
EXAMPLES = {"N": "2", "DIR": "d", "MODEL": "tiny-avatar", "STAGE": "teacher", "YAML": "debug", "NAME": "debug",
            "SECTION.KEY=VALUE": "run.seed=1"}  # fmt: skip


def documented_commands(text: str) -> list[tuple[str, bool]]:
    """(the arguments after `streamgen`, whole) of each command line in a markdown text: whole
    for a code block's line (continued over `\\` line ends), not whole for an inline code span,
    which may be a command's name and an option or two out of a sentence."""
    found = []
    blocks = [m.group(0).strip("`") for m in FENCE.finditer(text)]
    rest = FENCE.sub("", text)
    blocks += [m.group(0) for m in INDENTED.finditer(rest)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if m := COMMAND.search(line.split(" #")[0]):
                found.append((m.group(1), True))
    for span in SPAN.finditer(INDENTED.sub("", rest)):
        if m := COMMAND.match(span.group(1)):
            found.append((m.group(1), False))
    return found


def filled_in(argv: list[str]) -> list[list[str]] | str:
    """The command lines a documented one with placeholders stands for: each placeholder given its
    example value (EXAMPLES), each of a choice's alternatives (`a|b`, `YAML|NAME`) in turn; or what
    has no example value."""
    import itertools

    def values(arg: str) -> list[str] | str:
        if not PLACEHOLDER.search(arg):
            return [arg]
        if "..." in arg or "$" in arg or "<" in arg:  # (a path or value elided: `configs/...yaml`)
            return ["x"]
        found = [EXAMPLES.get(a, a) for a in arg.split("|")]
        if unknown := [a for a in found if re.fullmatch(r"[A-Z][A-Z0-9_.=-]*", a)]:
            return f"placeholder {unknown[0]!r} has no example value (EXAMPLES in tests/test_docs.py)"
        return found

    each = [values(a) for a in argv]
    if unknown := [v for v in each if isinstance(v, str)]:
        return unknown[0]
    return [list(line) for line in itertools.product(*each)]


def refusal(command: str, whole: bool) -> str | None:
    """What the command line parser says against a documented command, or None. Placeholders
    (`N`, `DIR`, `a|b`) are checked with their example values and each alternative; `[...]` marks
    optional parts, checked too."""
    for end in (" && ", "; ", " | ", " > ", " 2>"):
        command = command.split(end)[0]
    try:
        argv = [a for a in shlex.split(command.replace("[", " ").replace("]", " ")) if a != "..."]
    except ValueError:
        return None
    lines = filled_in(argv)
    if isinstance(lines, str):
        return lines
    return next(filter(None, (parser_refusal(line, whole) for line in lines)), None)


def parser_refusal(argv: list[str], whole: bool) -> str | None:
    """What the command line parser says against one command line, or None."""
    import argparse
    import contextlib
    import importlib
    import io

    from streamgen.cli import build_parser
    from streamgen.commands.bench import BENCHMARKS

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)  # (a parser each: a subparser keeps state)
            if args.command == "bench":
                bench = argparse.ArgumentParser(prog=f"streamgen bench {args.benchmark}")
                bench.add_argument("--json", action="store_true")
                importlib.import_module(BENCHMARKS[args.benchmark][0]).add_arguments(bench)
                bench.parse_args(args.options)
    except SystemExit:
        why = said.getvalue().strip().splitlines()[-1]
        if whole or "required" not in why:  # (a span may leave out what is required)
            return why
    return None


def test_a_documented_commands_placeholders_are_checked_with_example_values():
    """A command with a placeholder was not checked at all: `generate --sp N --bogus` passed. Each
    placeholder is given its example value, each alternative of a choice is checked in turn, and a
    placeholder with no example value is said."""
    assert refusal("generate --sp N", True) is None
    assert "--bogus" in refusal("generate --sp N --bogus", True)
    assert refusal("bench resources --json [--dtype bfloat16|float16|float32]", True) is None
    assert "invalid choice: 'float8'" in refusal("bench resources --json --dtype bfloat16|float8", True)
    assert refusal("distill STAGE --config YAML|NAME [--out DIR] [--set SECTION.KEY=VALUE ...]", True) is None
    assert "'FLAVOR' has no example value" in refusal("generate --model FLAVOR", True)


def test_documented_commands_parse():
    """Every `streamgen ...` command line in the README and docs/ is one the command line takes:
    its options exist, their values are of the kinds and choices the parser accepts."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    commands = [(doc, *c) for doc in docs for c in documented_commands(doc.read_text())]
    refused = {f"{doc.name}: streamgen {c}": why for doc, c, whole in commands if (why := refusal(c, whole))}
    assert len(commands) > 50
    assert refused == {}


def test_serving_synopsis_names_every_serve_option_with_its_default():
    """docs/serving.md's synopsis lists every `streamgen serve` option, and the value it shows
    is the default (or, as `a|b`, the choices, the default among them) where there is one."""
    import argparse

    from streamgen.cli import build_parser

    synopsis = FENCE.search((ROOT / "docs" / "serving.md").read_text()).group(0)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    options = {
        a.option_strings[-1]: a for a in serve._actions if a.help != argparse.SUPPRESS and a.dest != "help"
    }
    assert sorted(o for o in options if not re.search(re.escape(o) + r"\b", synopsis)) == []
    shown = dict(re.findall(r"\[(--[a-z-]+) ([^\s\]]+)", synopsis))
    wrong = {}
    for flag, value in shown.items():
        default = options[flag].default
        if default in (None, "") or PLACEHOLDER.search(value) and "|" not in value:  # no default; N, PEM
            continue
        spelt = f"{default:g}" if isinstance(default, float) else str(default)
        if spelt not in value.split("|"):
            wrong[flag] = f"shown {value}, default {spelt}"
    assert wrong == {}


def test_the_close_code_table_is_the_servers():
    """docs/api.md's WebSocket close codes are the server's (server/protocol.py's CloseCode, and
    the WebSocket layer's, BROKEN_FRAME_CLOSES: its 1002 was left out): none missing, none the server
    never sends."""
    from server.protocol import BROKEN_FRAME_CLOSES, CloseCode

    api = (ROOT / "docs" / "api.md").read_text()
    table = api.split("### Close codes", 1)[1].split("\n\n")[1]
    documented = {int(c) for row in re.findall(r"^\| ([0-9 /]+) \|", table, re.M) for c in row.split("/")}
    assert documented == {int(c) for c in CloseCode} | set(BROKEN_FRAME_CLOSES)


def test_the_control_message_table_is_the_protocols():
    """docs/api.md's client -> server control messages, with their fields, are those
    server/protocol.py takes: a field added or renamed there is added or renamed here."""
    from server.protocol import _FIELDS

    api = (ROOT / "docs" / "api.md").read_text()
    table = api.split("### Control messages", 1)[1].split("Server -> client", 1)[0]
    documented = {}
    for row in re.findall(r"^\| `(\{.*?\})`(?: / `(\{.*?\})`)? \|", table, re.M):
        for message in filter(None, row):
            fields = re.findall(r'"(\w+)":', message)
            documented[re.search(r'"type": "(\w+)"', message).group(1)] = set(fields) - {"type"}
    assert documented == {kind: set(fields) for kind, fields in _FIELDS.items()}


def test_run_answers_an_unknown_command_with_its_usage_before_any_setup(tmp_path):
    """`./run` with no command or an unknown one prints its usage and exits 2 at once: it set up
    a whole virtual environment first (minutes on a fresh checkout) to say so."""
    import os
    import subprocess

    venv = tmp_path / "venv"  # (a venv that does not exist, and a Python that cannot make one)
    env = {**os.environ, "STREAMGEN_VENV": str(venv), "PYTHON": "false"}
    for argv in ([], ["bogus"]):
        done = subprocess.run(
            ["bash", str(ROOT / "run"), *argv], env=env, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stderr) == (2, "usage: ./run generate|test [options]\n")
    assert not venv.exists()


# a test command with its time: `python -m pytest tests/test_x*.py -q   # ... ~N min in one process ...`
TEST_COMMAND = re.compile(r"-m pytest ((?:tests/\S+\s+)+)-q\s*#[^~\n]*~([\d.]+) min")


def test_documented_test_times_are_those_of_the_files():
    """A doc's `pytest tests/...` line that says how long it takes says about what the files took
    (tests/file_seconds.json, one process: the command as written has no -n): the server's said
    ~1.5 min where its files took 9, as if on 2 cores, which the command does not use."""
    import glob
    import json

    seconds = json.loads((ROOT / "tests" / "file_seconds.json").read_text())["seconds"]
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    claims = [(d.name, *m.groups()) for d in docs for m in TEST_COMMAND.finditer(d.read_text())]
    assert len(claims) >= 2
    wrong = {}
    for doc, patterns, said in claims:
        files = {f for p in patterns.split() for f in glob.glob(p, root_dir=ROOT)}
        took = sum(seconds.get(f, 0.0) for f in files) / 60
        if not 0.75 <= float(said) / took <= 1.33:
            wrong[f"{doc}: {patterns.strip()}"] = f"says ~{said} min, its files took {took:.1f}"
    assert wrong == {}


def test_the_compile_warm_up_is_quoted_from_one_measurement():
    """`serve --compile`'s warm-up was quoted three ways from runs of different days (its help:
    13 s longer warm, 63 s cold; performance.md: 18 / 68 s; the README: 41 s): the docs that give
    it quote one JSON's figures beside its link, and the help, which no reader checks against
    them, quotes no seconds of its own but points at docs/serving.md."""
    import argparse
    import json

    from streamgen.cli import build_parser

    source = "bench/results/cpu-2026-12-07-serve-compile-warmup.json"
    ready_s = json.loads((ROOT / source).read_text())["summary"]["ready_s"]
    cold = [f"{s:.0f}" for s in ready_s["cold"]]  # ("325 and 418 s")
    figures = [*cold, f"{ready_s['warm']:.0f} s", f"{ready_s['eager']:.0f} s"]
    unquoted = {}
    for doc in (ROOT / "README.md", ROOT / "docs" / "serving.md", ROOT / "docs" / "performance.md"):
        text = doc.read_text()
        at = text.find(source.split("/")[-1])
        near = text[max(0, at - 500) : at]  # (the sentence the link ends)
        if at < 0 or (missing := [f for f in figures if f not in near]):
            unquoted[doc.name] = "no link to the JSON" if at < 0 else f"lacks {missing}"
    assert unquoted == {}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    compile_help = next(a.help for a in sub.choices["serve"]._actions if "--compile" in a.option_strings)
    assert "docs/serving.md" in compile_help
    assert re.findall(r"\d+ s\b", compile_help) == []


# `python -m MODULE ...` of ours in a doc, its options up to a comment or the code span's end (a span
# may go on over an indented line break)
PYTHON_M = re.compile(r"python -m ((?:bench|distill|streamgen)\.[\w.]+)((?:[^`#\n]|\n(?= ))*)")


def test_documented_python_m_commands_are_their_modules_usage():
    """A `python -m MODULE` command the README or docs/ show is the one its usage names (bench.gpu's
    said 'usage: gpu.py', bench.kept_kv's 'kept_kv.py', make_assets' 'make_assets.py': files no one
    types, run as modules), and each --option the docs give it is one it lists."""
    import contextlib
    import io
    import runpy
    import sys

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    shown = {}
    for doc in docs:
        for m in PYTHON_M.finditer(doc.read_text()):
            shown.setdefault(m.group(1), set()).update(re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2)))
    shown.pop("streamgen.parallel.torchrun")  # (it takes torchrun's options: torchrun's usage)
    assert len(shown) >= 4, shown
    wrong = {}
    for module, options in shown.items():
        said = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(said), pytest.raises(SystemExit):
            mp.setattr(sys, "argv", [module, "--help"])
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # (as `python -m` runs it)
        usage = said.getvalue()
        if not usage.startswith(f"usage: python -m {module} "):
            wrong[module] = usage.splitlines()[:1]
        elif missing := sorted(o for o in options if not re.search(re.escape(o) + r"\b", usage)):
            wrong[module] = f"lists no {missing}"
    assert wrong == {}


def test_the_readmes_layout_names_every_module_of_streamgen_and_its_model():
    """The README's Layout names each module of streamgen/ and streamgen/model/ (it named 12 of the
    streamgen package's 19 and 6 of the model's 13: where threads per stage, batching, the teacher's
    session, FP8 and --compile live were nowhere to be read)."""
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    modules = [p for d in ("streamgen", "streamgen/model") for p in sorted((ROOT / d).glob("*.py"))]
    assert len(modules) > 30
    unnamed = [
        str(p.relative_to(ROOT)) for p in modules if not p.name.startswith("__") and p.name not in layout
    ]
    assert unnamed == []


def test_generates_help_says_each_default():
    """`streamgen generate --help` hid what a bare `generate` does (the bundled sample speech and face
    into out.mp4 with tiny-avatar, seed 0, on the CPU): an option with a default says it."""
    import argparse

    from streamgen.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    unsaid = [
        a.option_strings[-1]
        for a in sub.choices["generate"]._actions
        if a.option_strings
        and a.default not in (None, False, argparse.SUPPRESS)
        and not ("default" in (a.help or "") or str(a.default) in (a.help or ""))
    ]
    assert unsaid == []


def each_option(parsers: dict):
    """(command line, action) of each option `--help` lists of these parsers (by command line), their
    subcommands' too."""
    import argparse

    parsers = dict(parsers)
    while parsers:
        command, parser = parsers.popitem()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.update({f"{command} {n}": p for n, p in action.choices.items()})
            elif action.help != argparse.SUPPRESS:
                yield command, action


def options_without_help(parsers: dict) -> tuple[list[str], list[str]]:
    """Each option `--help` lists of these parsers, and those of them it lists with no help."""
    options, unsaid = [], []
    for command, action in each_option(parsers):
        options.append(option := f"{command} {(action.option_strings or [action.dest])[-1]}")
        if not (action.help or "").strip():
            unsaid.append(option)
    return options, sorted(unsaid)


def options_without_their_default(parsers: dict) -> list[str]:
    """The options of these parsers with a default their help does not say (a switch, on or off as its
    name says, and "" or None, none, aside; "auto: ..." says what the default `auto` means)."""
    import argparse

    return sorted(
        f"{command} {a.option_strings[-1]} ({a.default!r})"
        for command, a in each_option(parsers)
        if a.option_strings
        and a.default not in (None, "", argparse.SUPPRESS, (), [])
        and not isinstance(a.default, bool)
        and "default" not in (a.help or "")
        and f"{a.default}:" not in (a.help or "")
    )


def commands_and_benchmarks() -> dict:
    """The parser of `streamgen` and those of its benchmarks (a benchmark's options are parsed apart:
    streamgen/commands/bench.py), by command line."""
    import argparse
    import importlib

    from streamgen.cli import build_parser
    from streamgen.commands.bench import BENCHMARKS

    parsers = {"streamgen": build_parser()}
    for name, (module, _) in BENCHMARKS.items():
        parsers[f"streamgen bench {name}"] = bench = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(bench)
    return parsers


def test_every_option_in_each_commands_and_benchmarks_help_says_what_it_does():
    """`--help` of each streamgen command and benchmark gives every option a line of its own: 24
    gave a bare name (`serve --host`, `--port`, `--device`, `data make --seed`, `bench floor
    --matmul-tflops`, `bench fp8 --variants`...), what they did and their default for the source to say."""
    options, unsaid = options_without_help(commands_and_benchmarks())
    assert len(options) > 200  # (every command's and benchmark's, subcommands' too)
    assert unsaid == []


def test_every_option_in_each_commands_and_benchmarks_help_says_its_default():
    """An option with a default says it, as `generate`'s do: 33 did not (`serve --max-sessions`,
    `--idle-timeout`, `--sp`, `data make --size`, `--workers`, `bench engine --chunks`...)."""
    assert options_without_their_default(commands_and_benchmarks()) == []


def script_parsers() -> dict:
    """The parser of each program run on its own (`python -m bench.kept_kv`, `python -m distill.results`,
    `python examples/ws_client.py`...), by its file, caught as it parses: nothing of the program runs."""
    import argparse
    import runpy
    import sys

    class Parsed(Exception):
        pass

    def parse_args(parser, *args, **kwargs):
        raise Parsed(parser)

    scripts = [
        p
        for d in ("bench", "distill", "streamgen", "examples")
        for p in sorted((ROOT / d).rglob("*.py"))
        if "ArgumentParser(" in (text := p.read_text())
        and 'if __name__ == "__main__"' in text
        and p != ROOT / "streamgen" / "cli.py"  # (`streamgen`'s: the tests above)
    ]
    assert len(scripts) >= 10
    parsers = {}
    for script in scripts:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Parsed) as parsed:
            mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
            mp.setattr(sys, "argv", [str(script)])
            runpy.run_path(str(script), run_name="__main__")
        parsers[str(script.relative_to(ROOT))] = parsed.value.args[0]
    return parsers


def test_every_option_in_each_scripts_help_says_what_it_does():
    """So too for each program run on its own (`python -m bench.kept_kv`, `python -m distill.results`,
    `python -m streamgen.data.make_assets`, `python examples/ws_client.py`...): 16 options were bare."""
    options, unsaid = options_without_help(script_parsers())
    assert len(options) > 100
    assert unsaid == []


def test_every_option_in_each_scripts_help_says_its_default():
    """So too their defaults: `distill.results --minutes` (5), `bench.kept_kv --chunks` (8), `ws_client --wait`
    (30) said none."""
    assert options_without_their_default(script_parsers()) == []


# `make TARGET [VAR=VALUE ...]`: a code block's line or a code span
MAKE_COMMAND = re.compile(r"^make ([a-z][\w-]*(?: [A-Z]+=\S+)*)(?=\s|$)")


def documented_make_commands(text: str) -> set[str]:
    """The arguments after `make` of each make command in a markdown text."""
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
    lines += [span.group(1) for span in SPAN.finditer(FENCE.sub("", text))]
    return {m.group(1) for line in lines if (m := MAKE_COMMAND.match(line.strip()))}


def make_commands_refused(make_argv: list[str]) -> dict[str, str]:
    """What is wrong with each command `make -n` prints for a make command line: a target or
    variable the Makefile lacks, or a printed command our parsers refuse (a stage's config with
    its --set values loaded as the stage loads it)."""
    import subprocess
    import sys

    from distill.config import ConfigError, find_config, load_config

    dry = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), *make_argv, f"PY={sys.executable}"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    if dry.returncode != 0:
        return {" ".join(make_argv): dry.stderr.strip()}
    wrong = {}
    for line in dry.stdout.replace("\\\n", " ").splitlines():
        argv = shlex.split(line)[1:]  # (after the python)
        if argv[:2] == ["-m", "streamgen"]:
            if why := parser_refusal(argv[2:], whole=True):
                wrong[line] = why
            elif argv[2] == "distill":
                stage, config = argv[3], argv[argv.index("--config") + 1]
                sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
                try:
                    load_config(find_config(config, stage), stage, sets)
                except ConfigError as e:
                    wrong[line] = str(e)
        elif argv[:1] == ["-m"] and argv[1].startswith("distill."):
            if usage_problem := module_usage_problem(argv[1], [a for a in argv[2:] if a.startswith("--")]):
                wrong[line] = usage_problem
        else:
            wrong[line] = "not a command of ours: extend make_commands_refused"
    return wrong


def module_usage_problem(module: str, options: list[str]) -> str | None:
    """What is wrong with `python -m MODULE` taking these options: its --help does not list one."""
    import contextlib
    import io
    import runpy
    import sys

    said = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(said), pytest.raises(SystemExit):
        mp.setattr(sys, "argv", [module, "--help"])
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    missing = [o for o in options if not re.search(re.escape(o) + r"\b", said.getvalue())]
    return f"its --help lists no {missing}" if missing else None


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_documented_make_commands_run_commands_that_parse():
    """The README's and docs' `make model`, `make ship`, `make results` (the way to reproduce the
    shipped models) were checked by nothing: a target renamed, or a stage's --set key or option
    changed, would be found hours into a `make model`. Each documented make command's targets
    exist, and every command it runs parses, each stage's config loading with its --set values."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    documented = set().union(*(documented_make_commands(doc.read_text()) for doc in docs))
    expected = {"model", "train", "ship", "results", "model RUNS=/big/runs DATA=/big/world"}
    assert expected <= documented, documented
    wrong = {}
    for command in sorted(documented):
        wrong.update(make_commands_refused(command.split()))
    assert wrong == {}


def test_a_make_command_with_a_missing_target_or_a_bad_key_is_refused():
    """The check above can fail: a target the Makefile lacks, an option no parser takes."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    assert "No rule to make target" in make_commands_refused(["no-such-target"])["no-such-target"]
    assert parser_refusal(["distill", "teacher", "--config", "x", "--bogus"], whole=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_every_make_output_follows_runs_and_data():
    """`make results RUNS=/x` wrote its reports to ./runs/results, whatever RUNS said: each folder a
    make command writes (--out, run.out=, data.root=) lies under the RUNS or DATA it was given."""
    import subprocess
    import sys

    argv = ["model", "data", "results", "RUNS=/elsewhere/runs", "DATA=/elsewhere/world"]
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), *argv, f"PY={sys.executable}"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    words = shlex.split(dry.stdout.replace("\\\n", " "))
    outputs = [words[i + 1] for i, w in enumerate(words) if w == "--out"]
    outputs += [w.split("=", 1)[1] for w in words if w.startswith(("run.out=", "data.root="))]
    assert len(outputs) > 5 and [o for o in outputs if not o.startswith("/elsewhere/")] == [], outputs


def test_the_readmes_layout_names_every_pytest_marker():
    """Each marker pyproject.toml declares is one the README's layout names: a marker added for
    the GPU run (gpu_first, gpu_last) is one a reader selecting tests with -m can find."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    names = {m.split(":")[0].strip() for m in declared["markers"]}
    layout = re.search(r"^tests/ +pytest \(markers: ([^)]*)\)", (ROOT / "README.md").read_text(), re.M)
    assert layout, "the README's layout has no 'tests/  pytest (markers: ...)' line"
    listed = {m.split("=")[0].strip() for m in layout.group(1).split(",")}
    assert sorted(names - listed) == []
