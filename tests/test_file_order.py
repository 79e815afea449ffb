"""The order `./run test` hands test files to its workers: the longest recorded first."""

from __future__ import annotations

import json
import runpy
import types
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parents[1]


def file_seconds(junit_xml: str) -> dict:
    return runpy.run_path(str(ROOT / "scripts" / "test_file_seconds.py"))["file_seconds"](junit_xml)


def test_a_runs_seconds_are_summed_per_file_longest_first(tmp_path):
    xml = tmp_path / "run.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="one" time="1.5"/>'
        '<testcase classname="tests.test_b.TestThing" name="two" time="4.0"/>'
        '<testcase classname="tests.test_a" name="three" time="2.0"/>'
        '<testcase classname="tests.test_b" name="four" time=""/>'
        "</testsuite></testsuites>"
    )
    assert list(file_seconds(str(xml)).items()) == [("tests/test_b.py", 4.0), ("tests/test_a.py", 3.5)]


def test_the_files_recorded_longest_go_first_each_in_its_own_order(tmp_path, monkeypatch):
    (tmp_path / "seconds.json").write_text(json.dumps({"seconds": {"tests/test_b.py": 9.0, "tests/test_c.py": 3.0}}))
    monkeypatch.setattr(conftest, "FILE_SECONDS", str(tmp_path / "seconds.json"))
    names = ["tests/test_a.py::x", "tests/test_c.py::y", "tests/test_b.py::z", "tests/test_b.py::w", "tests/test_d.py::v"]
    items = [types.SimpleNamespace(nodeid=n) for n in names]
    conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == [
        "tests/test_b.py::z", "tests/test_b.py::w", "tests/test_c.py::y", "tests/test_a.py::x", "tests/test_d.py::v",
    ]  # fmt: skip
    monkeypatch.setattr(conftest, "FILE_SECONDS", str(tmp_path / "none.json"))  # none recorded: as collected
    items = [types.SimpleNamespace(nodeid=n) for n in names]
    conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == names

