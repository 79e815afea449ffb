#!/usr/bin/env bash
# The one prepared GPU run (device tool): GPU-marked tests, then the GPU and
# kernel benchmarks, JSON and logs into $OUT. Installs nothing: it uses the
# machine's own python3 with PyTorch and Triton, plus the pure-Python packages
# the project needs, carried as wheels in .whl/ if present.
#   run(command="bash scripts/gpu_check.sh", timeout_s=590, carry=[".whl"])
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
stamp=$(date +%Y-%m-%d)
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -n 40 > "$OUT/gpu-tests.log"
timeout 400 python3 -m bench.gpu --budget 300 > "$OUT/h200-$stamp.json" 2> "$OUT/bench-gpu.log"
tail -c 3000 "$OUT/h200-$stamp.json"
tail -n 5 "$OUT/gpu-tests.log"
