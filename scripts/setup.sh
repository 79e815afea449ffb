#!/usr/bin/env bash
# Create or refresh the local virtual environment in .venv.
# On a machine without an NVIDIA GPU we install the CPU build of torch first,
# so that no requirement below can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${STREAMGEN_VENV:-.venv}
TORCH_VERSION=${STREAMGEN_TORCH:-2.13.0}
stamp="$VENV/.streamgen-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
$pip install -U pip wheel setuptools >/dev/null
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # On this project's machines the CPU wheel of this exact version lies on disk
  # (pip's find-links); naming the version keeps pip from resolving a CUDA build.
  $pip install "torch==$TORCH_VERSION"
fi
# The installed torch satisfies the project's range, so pip keeps it.
$pip install -e ".[dev,text]"
echo "$want" > "$stamp"
