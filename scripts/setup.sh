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
echo "setting up $VENV (log: $VENV/setup.log)" >&2
log="$VENV/setup.log"
: > "$log"
pip_install() {
  # pip's chatter goes to the log; on failure its tail is shown
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup failed: pip install $*" >&2
    exit 1
  fi
}
pip_install -U pip wheel setuptools
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch==$TORCH_VERSION"  # PyPI's default Linux build is the CUDA one
  elif "$VENV/bin/python" -m pip -q install --no-index --no-deps "torch==$TORCH_VERSION" >>"$log" 2>&1; then
    :  # the CPU wheel from a local wheelhouse (find-links), as on this project's machines; its deps come below
  else
    # elsewhere: PyTorch's CPU index, so no multi-GB CUDA build is pulled
    pip_install --timeout 60 "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# The installed torch satisfies the project's range, so pip keeps it.
pip_install -e ".[dev,text]"
echo "$want" > "$stamp"
