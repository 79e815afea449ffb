"""Running the `streamgen` command line in a fresh process, for the tests (no third-party imports:
tests/test_gpu_check.py uses it where only the GPU image's packages exist)."""

from __future__ import annotations

import subprocess
import sys


def streamgen(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgen", *args], capture_output=True, text=True, timeout=timeout
    )
