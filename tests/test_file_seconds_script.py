"""scripts/test_file_seconds.py, which the README's Tests section names, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "test_file_seconds.py"
RUN_XML = '<testsuites><testsuite><testcase classname="tests.test_a" name="x" time="2.5"/></testsuite></testsuites>'


def script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)


def test_a_path_that_is_no_run_leaves_the_file_it_would_write_as_it_was(tmp_path):
    """A mistyped XML path was a FileNotFoundError's traceback, and the command its docstring gave
    (`... /tmp/run.xml > tests/file_seconds.json`) had emptied tests/file_seconds.json first, which
    test_docs reads. --out writes the file once the XML is read; a path that is no run is one line,
    exit 2, the file as it was."""
    out = tmp_path / "file_seconds.json"
    out.write_text('{"seconds": {}}')
    (tmp_path / "not.xml").write_text("<unclosed")
    (tmp_path / "empty.xml").write_text("<testsuites/>")
    for xml in ("missing.xml", "not.xml", "empty.xml"):
        done = script(str(tmp_path / xml), "--out", str(out))
        assert done.returncode == 2 and done.stdout == ""
        line = done.stderr.splitlines()[-1]
        assert line.startswith("python scripts/test_file_seconds.py: error: ") and str(tmp_path / xml) in line
        assert "Traceback" not in done.stderr
        assert out.read_text() == '{"seconds": {}}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.xml", "file_seconds.json", "not.xml"]


def test_a_run_is_written_to_out_or_printed(tmp_path):
    (tmp_path / "run.xml").write_text(RUN_XML)
    out = tmp_path / "file_seconds.json"
    assert script(str(tmp_path / "run.xml"), "--out", str(out)).returncode == 0
    assert json.loads(out.read_text()) == {"total_s": 2.5, "seconds": {"tests/test_a.py": 2.5}}
    printed = script(str(tmp_path / "run.xml"))
    assert printed.returncode == 0 and printed.stdout == out.read_text()
    assert script("--help").stdout.startswith("usage: python scripts/test_file_seconds.py ")
