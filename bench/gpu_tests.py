"""A pytest plugin for the GPU run's tests (scripts/gpu_check.sh: `-p bench.gpu_tests`).

The tests' step has a time limit it may run past (Triton builds its attention's every tile for
each new key, which no CPU can time), and the files' own order is no order of importance. So:

- the tests run in order of what a cut would cost: those marked `gpu_first` (paths no GPU has
  run, the quick benchmark's every variant) first, those marked `gpu_last` (the attention
  kernel's builds of every tile, checked on GPUs before) last, the rest between; within each, the
  files in the order given on the command line (tests/conftest.py's order by CPU seconds means
  nothing on a GPU), each file's tests as defined;
- `--gpu-tests-json PATH` writes what ran and what did not, rewritten as each test starts and
  ends (a step killed by SIGKILL keeps it): `planned` (the order), `outcomes` and `durations_s`
  of those that ended, `running` (the test in progress: the one a cut stopped), `not_run` (the
  ones never started), `interrupted` (SIGINT, the step's timeout) and `exit_status` (null until
  pytest ends: a SIGKILL leaves it null).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIRST, MIDDLE, LAST = 0, 1, 2


def pytest_addoption(parser):
    parser.addoption("--gpu-tests-json", default=None, help="write what ran and what did not here")


def pytest_configure(config):  # (the markers are registered in pyproject.toml)
    path = config.getoption("--gpu-tests-json")
    if path:
        config.pluginmanager.register(Report(Path(path)), "gpu_tests_report")


def _tier(item) -> int:
    if item.get_closest_marker("gpu_first"):
        return FIRST
    return LAST if item.get_closest_marker("gpu_last") else MIDDLE


@pytest.hookimpl(trylast=True)  # after tests/conftest.py's order by file seconds, which it replaces
def pytest_collection_modifyitems(session, config, items):
    given = [Path(arg.split("::")[0]).resolve() for arg in config.args]

    def file_index(item) -> int:
        path = Path(str(item.path)).resolve()
        return next((i for i, arg in enumerate(given) if path == arg or arg in path.parents), len(given))

    defined = {item.nodeid: i for i, item in enumerate(items)}  # (a file's tests stay together in it)
    items.sort(key=lambda item: (_tier(item), file_index(item), defined[item.nodeid]))


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.state = {
            "planned": [],
            "outcomes": {},
            "durations_s": {},
            "running": None,
            "not_run": [],
            "collection_errors": [],
            "interrupted": False,
            "exit_status": None,
        }
        self._write()  # a step cut before its collection ends still says so

    def _write(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)

    def pytest_collectreport(self, report):
        if report.failed:
            self.state["collection_errors"].append(report.nodeid)

    def pytest_collection_finish(self, session):
        self.state["planned"] = [item.nodeid for item in session.items]
        self.state["not_run"] = list(self.state["planned"])
        self._write()

    def pytest_runtest_logstart(self, nodeid, location):
        self.state["running"] = nodeid
        if nodeid in self.state["not_run"]:
            self.state["not_run"].remove(nodeid)
        self._write()

    def pytest_runtest_logreport(self, report):
        outcomes = self.state["outcomes"]
        if report.when == "call" or report.failed or report.skipped:
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            if outcomes.get(report.nodeid) in (None, "passed"):  # a teardown's error after a pass
                outcomes[report.nodeid] = outcome
        durations = self.state["durations_s"]
        durations[report.nodeid] = round(durations.get(report.nodeid, 0.0) + report.duration, 3)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.state["running"] = None
        self._write()

    def pytest_keyboard_interrupt(self, excinfo):
        self.state["interrupted"] = True
        self._write()

    def pytest_sessionfinish(self, session, exitstatus):
        self.state["exit_status"] = int(exitstatus)
        self._write()
