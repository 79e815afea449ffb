"""Running the `streamgen` command line in a fresh process, for the tests (no third-party imports:
tests/test_gpu_check.py uses it where only the GPU image's packages exist)."""

from __future__ import annotations

import os
import subprocess
import sys


def streamgen(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgen", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def streamgen_without_a_compiler(tmp_path, *args) -> subprocess.CompletedProcess:
    """`streamgen *args` where inductor finds no C++ compiler (and a compile cache of its own, so
    that no earlier compile is found instead)."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    return streamgen(*args, env=env)
