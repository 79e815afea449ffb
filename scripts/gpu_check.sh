#!/usr/bin/env bash
# The one prepared GPU run (device tool): GPU-marked tests, then the GPU and
# kernel benchmarks, JSON and logs into $OUT. Installs nothing from a
# registry: it uses the machine's own python3 with PyTorch and Triton, plus the
# pure-Python packages its image lacks (scripts/gpu_wheels.txt), carried as
# wheels in .whl/ that scripts/gpu_wheels.sh downloads beforehand:
#   bash scripts/gpu_wheels.sh            # here, once
#   run(command="bash scripts/gpu_check.sh", kind="nvidia-h200", timeout_s=590, carry=[".whl"])
# tests/test_gpu_check.py rehearses this script on the CPU with only the
# image's packages importable (GPU_CHECK_BENCH_ARGS gives the CPU options).
# A session's 15 device minutes hold one such run and the machine's start, not two (a fresh
# machine needs 4 minutes left to start). A shorter run, for a later session's questions:
#   GPU_CHECK_TESTS="tests/test_gpu_check.py" GPU_CHECK_TEST_TIMEOUT=90 GPU_CHECK_BENCH_TIMEOUT=200 \
#   GPU_CHECK_BENCH_ARGS="--no-kernels --only sdpa+fused_kernels stages decoder" bash scripts/gpu_check.sh
# The timeouts interrupt (SIGINT) rather than terminate: pytest still prints which tests failed
# and why, and the benchmark writes its JSON and headline on the way out.
# Worst case, every step at its limit (tests/test_gpu_check_budget.py adds them up): the wheels
# 30 + 5 s, the diffusers check 10 + 5, nvidia-smi 10 + 5, the tests 210 + 10 (the floors'
# count beside them, stopped at their limit); the benchmark
# what is left of GPU_CHECK_DEADLINE (530 s) less its kill's 10 s, the plot's 20 + 5 and 5 for
# the rest, and `--budget` 25 s less than its timeout (its imports; no part starts that is
# expected to end past it); the plot 20 + 5: 530 s in all, 60 s inside the call's 590. Tests
# that end sooner leave their time to the benchmark (~300 s when they take 2:30, as on 2026-11-30).
# GPU_CHECK_DEADLINE is for a call whose limit is under 590 s: the device tool cuts a call's
# limit to the device time its session has left (status's budget_left_s, the reply's limit_s), and
# a call cut at its limit kills the benchmark mid-variant, before the plot and the summary. Set it
# to that limit less 60 s, e.g.
#   GPU_CHECK_DEADLINE=$((limit_s - 60)) bash scripts/gpu_check.sh
# It shortens the benchmark alone: the steps before it take 285 s at worst, so under 356 s the
# benchmark does not run and the script still takes up to 310 s (shorten GPU_CHECK_TEST_TIMEOUT
# too, or make the shorter run above).
# (GPU_CHECK_BENCH_ARGS is split as the shell splits words: quote a name with spaces in it.)
set -uo pipefail
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-530}  # seconds from here to the script's end, at worst
KILL=10  # after a timeout's SIGINT, the seconds to its SIGKILL
# the plot's limit: ~2.5 CPU s (matplotlib's import, layout, the PNG; its font cache is 0.5 s more
# when built) ran past 20 s in the CPU rehearsal on a loaded 2-core machine; give a longer one
# with GPU_CHECK_DEADLINE longer by as much, and the benchmark keeps its time
PLOT_S=${GPU_CHECK_PLOT_TIMEOUT:-20}
began=$(date +%s)
elapsed() { echo $(($(date +%s) - began)); }
mkdir -p "$OUT"
site=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout -k 5 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || echo "gpu_check: installing the carried wheels failed" >&2
fi
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# found, not imported (that takes seconds)
if ! timeout -k 5 10 "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('diffusers') is None)" 2>/dev/null; then
  echo "gpu_check: diffusers is missing (run scripts/gpu_wheels.sh and carry .whl): the stream variants will fail" >&2
fi
timeout -k 5 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
# the benchmark's files are named after the GPU that ran them, as in bench/results (h200-DATE.json,
# h100-DATE.json: the device tool's first call gets an H100 unless it names nvidia-h200); gpu-DATE
# where nvidia-smi named none
gpu=$(sed -n 2p "$OUT/gpu.txt" | grep -oE '\b[A-Z]+[0-9]+[A-Z]?\b' | head -n 1 | tr '[:upper:]' '[:lower:]')
results=$OUT/${gpu:-gpu}-$(date +%Y-%m-%d)
eval "bench_args=(${GPU_CHECK_BENCH_ARGS:-})"  # a list of options, quoted as on a command line
# beside the tests (on the CPU, meta tensors): the work of each configuration the variants' levers
# make, for each variant's own floor (bench/variant_floor.py); given the tests' time at most
test_s=${GPU_CHECK_TEST_TIMEOUT:-210}
floor_work=$site/floor-work.json
floor_args=()  # the benchmark's model and steps: bench gpu refuses counts of others
for i in "${!bench_args[@]}"; do
  case ${bench_args[i]} in
    --quick | --steps=*) floor_args+=("${bench_args[i]}") ;;
    --steps) floor_args+=(--steps "${bench_args[i + 1]:-}") ;;
  esac
done
"$PY" -m bench.variant_floor --out "$floor_work" "${floor_args[@]}" > "$OUT/floor-work.log" 2>&1 &
counting=$!
count_until=$(($(elapsed) + test_s))
# only the files that hold GPU tests (the server's import packages the image lacks); bench/gpu_tests.py
# runs the tests of paths no GPU has run first (gpu_first), the attention's builds of every tile
# last (gpu_last), and writes gpu-tests.json as each test starts and ends: a cut step names the
# test it stopped ("running") and those never started ("not_run")
tests_json=$OUT/gpu-tests.json
# shellcheck disable=SC2046  # one word per file
timeout -s INT -k $KILL "$test_s" "$PY" -m pytest -m gpu -q -rfEsw -p no:cacheprovider --continue-on-collection-errors \
  -p bench.gpu_tests --gpu-tests-json "$tests_json" \
  ${GPU_CHECK_TESTS:-$(grep -l "mark.gpu" tests/test_*.py | sort -r)} > "$OUT/gpu-tests.log" 2>&1
tests_rc=$?
rm -f "$tests_json.tmp"  # (a SIGKILL in its rewrite: $OUT's files are counted, 8 come back)
echo "gpu tests: exit code $tests_rc" >> "$OUT/gpu-tests.log"
if [[ ! -s "$tests_json" ]]; then  # pytest stopped before the plugin started: none ran
  echo "{\"error\": \"no test ran: pytest ended with exit code $tests_rc (gpu-tests.log)\"}" > "$tests_json"
fi
while kill -0 "$counting" 2>/dev/null && (($(elapsed) < count_until)); do sleep 1; done
kill "$counting" 2>/dev/null && echo "bench.variant_floor: stopped at the tests' limit" >> "$OUT/floor-work.log"
wait "$counting" 2>/dev/null
[[ -s "$floor_work" ]] && bench_args=(--floor-work "$floor_work" "${bench_args[@]}")
# the benchmark gets what is left; --out rewrites the JSON after each variant, so the timeout
# loses only the variant it cut short, and --budget starts none expected to end past it
bench_s=$((DEADLINE - $(elapsed) - KILL - PLOT_S - 5 - 5))
bench_s=$((bench_s < ${GPU_CHECK_BENCH_TIMEOUT:-$bench_s} ? bench_s : ${GPU_CHECK_BENCH_TIMEOUT:-$bench_s}))
if ((bench_s > 30)); then
  timeout -s INT -k $KILL "$bench_s" "$PY" -m bench.gpu --budget $((bench_s - 25)) --out "$results.json" \
    "${bench_args[@]}" > /dev/null 2> "$OUT/bench-gpu.log"
  echo "bench gpu: exit code $? (timeout ${bench_s} s)" >> "$OUT/bench-gpu.log"
else
  echo "bench gpu: not run, ${bench_s} s left before the deadline" >> "$OUT/bench-gpu.log"
fi
if [[ ! -s "$results.json" ]]; then  # not run, or cut before its first write (the ceilings)
  echo "{\"error\": \"$(tail -n 1 "$OUT/bench-gpu.log"): no variant ran\", \"variants\": {}}" > "$results.json"
fi
# the plot from whatever the JSON holds, so a run cut short still gets one
timeout -k 5 $PLOT_S "$PY" -c "import json, sys; from bench.gpu_plot import plot; plot(json.load(open(sys.argv[1])), sys.argv[2])" \
  "$results.json" "$results.png" 2> "$OUT/plot.log" || echo "plot: failed (plot.log)" >> "$OUT/bench-gpu.log"
rm -rf "$site"
tail -c 3000 "$results.json"
echo
grep -E "passed|failed|error|skipped" "$OUT/gpu-tests.log" | tail -n 5
tail -n 2 "$OUT/bench-gpu.log"
echo "gpu_check: $(elapsed) s"
