"""The server that `spawn` forks test processes from has imported what they need, whichever test
file started it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from spawn_helpers import spawn

TESTS = Path(__file__).resolve().parent
# the test files whose processes `spawn` forks from its server, and the names of their preloads:
# what their processes import (a worker's module when it is unpickled, the rest as the worker runs:
# test_parallel's imports diffusers' Wan VAE only when it builds one)
SPAWNING_FILES = {"test_parallel": "WORKER_IMPORTS", "test_distill_distributed": "RANK_IMPORTS",
                  "test_server_sp": "RANK_IMPORTS"}  # fmt: skip


def _imported_here(rank: int, out: str) -> None:
    import importlib

    import spawn_helpers

    for name, preload in SPAWNING_FILES.items():
        for module in getattr(importlib.import_module(name), preload):
            importlib.import_module(module)
    own = sorted(set(sys.modules) - spawn_helpers.MODULES_BEFORE)
    files = {name: getattr(sys.modules[name], "__file__", None) for name in own}
    Path(out).write_text(json.dumps(files))


def test_spawned_processes_import_only_test_modules_themselves(tmp_path):
    # A preload of this file's own (that names none of the libraries): where this spawn starts the
    # server, as test_server_sp's can before test_parallel's, it has only the shared preload.
    out = tmp_path / "imported.json"
    spawn(_imported_here, (str(out),), nprocs=1, preload=(__name__,))
    files = json.loads(out.read_text())
    assert "test_parallel" in files  # (the check saw the files' imports)
    # the test files' own modules and the standard library's (wave: hundredths of a second) aside;
    # a namespace package, such as `tests` of tests.server_helpers, has no file
    libraries = {
        name: f for name, f in files.items()
        if f is not None and not f.startswith(str(TESTS)) and name.partition(".")[0] not in sys.stdlib_module_names
    }  # fmt: skip
    packages = sorted({name.partition(".")[0] for name in libraries})
    assert not libraries, f"spawned processes imported {len(libraries)} modules of {packages} themselves (spawn_helpers.PRELOAD)"
