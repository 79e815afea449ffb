#!/usr/bin/env bash
# Download, here, the wheels the GPU run carries to the device machine (which
# reaches no registry): each distribution in scripts/gpu_wheels.txt at the
# version installed in .venv, so the GPU runs the versions CI tests. They are
# pure Python; the platform options only let pip pick wheels for the image's
# Python 3.12. Then: run(command="bash scripts/gpu_check.sh", kind="nvidia-h200", timeout_s=590,
# carry=[".whl"]) (docs/kernels.md, "The GPU run").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${STREAMGEN_VENV:-.venv}
rm -rf .whl && mkdir -p .whl
pins=()
while read -r name; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  version=$("$VENV/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done < scripts/gpu_wheels.txt
"$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}" 2>&1 | grep -v "^WARNING: Location" || true
ls .whl/*.whl >/dev/null
echo "carry .whl: ${pins[*]} ($(du -sh .whl | cut -f1))"
