"""The GPU run's time: what starts within `bench gpu`'s budget and in which order, what a run cut
short leaves on disk, and scripts/gpu_check.sh's worst case against the device call's limit."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from spawn_helpers import signal_once_started

from bench import gpu, gpu_variants

ROOT = Path(__file__).resolve().parents[1]
DEVICE_CALL_S = 590  # the planned call: run(command="bash scripts/gpu_check.sh", timeout_s=590, ...)


def test_a_part_expected_to_end_past_the_budget_is_not_started():
    started = time.perf_counter()
    result = {"variants": {"sdpa+fused_kernels": {"fps_steady": 15.0, "wall_s": 20.0}}}
    ran = []

    def part(name):
        expected = gpu_variants.expected_seconds(name, result["variants"])
        gpu._variant(name, lambda: ran.append(name) or {"fps": 1.0}, 100, started, result, None, expected)

    part("flex+fused_kernels")  # 7 times the stream's 20 s: past the 100 s budget
    part("sdpa+reference_ops")  # 1.25 times: within it
    assert ran == ["sdpa+reference_ops"]
    skipped = result["variants"]["flex+fused_kernels"]["skipped"]
    assert skipped.startswith("time budget of 100 s:") and skipped.endswith("expected to take 140 s")
    assert result["variants"]["sdpa+reference_ops"]["wall_s"] >= 0


def test_the_expected_time_follows_the_streams_this_run_timed():
    assert gpu_variants.expected_seconds("sdpa+fused_kernels", {}) == 0  # the first always starts
    variants = {
        "a": {"fps_steady": 1.0, "wall_s": 10.0},
        "b": {"fps_steady": 1.0, "wall_s": 30.0},
        "c": {"fps_steady": 1.0, "wall_s": 20.0},
        "failed": {"error": "RuntimeError", "wall_s": 500.0},  # no stream timed: not counted
        "stages": {"stages": {}, "wall_s": 90.0},
    }
    assert gpu_variants.expected_seconds("sdpa+fused_kernels, tiny decoder", variants) == 25.0
    assert gpu_variants.expected_seconds("kernels", variants) == 60.0


def _stream_wall_s(figures: dict) -> float:
    """A stream's wall time: its `wall_s`, or for the runs before it (2026-11-30) its warm-up, start
    and timed chunks (less than it took: the session and the known avatar's start are left out)."""
    if "wall_s" in figures:
        return figures["wall_s"]
    return figures["warmup_s"] + (figures["first_chunk_ms"] + sum(figures["chunk_ms"])) / 1000


def _held_against_expected(path: Path) -> list[tuple[str, float, float]]:
    """(name, seconds it took, seconds expected) for each part of the run at `path` that the budget
    held against a factor: expected as `bench gpu` asked before starting it, over the streams it had
    timed by then (its `order`; a run killed before its end has its parts still among the
    variants). Nothing was timed before the first part (the first always starts): it is left out.
    A run without `order` (before 2026-12-05) does not say where its parts ran: those are held
    against all its streams; the parts of a run without their own `parts_wall_s` (2026-11-30)
    together, the run's time beside its streams (which holds the ceilings and the model's build
    too) against their factors' sum, as " + ".join(parts)."""
    run = json.loads(path.read_text())
    walls = {name: _stream_wall_s(v) for name, v in run["variants"].items() if "fps_steady" in v}
    took = {**walls, **run.get("parts_wall_s", {})}
    timed_before, held = {}, []
    for name in run.get("order") or list(run["variants"]):
        seconds = took.pop(name, None)
        if seconds is not None and timed_before:
            held.append((name, seconds, gpu_variants.expected_seconds(name, timed_before)))
        if name in walls:
            timed_before[name] = {"fps_steady": 1.0, "wall_s": walls[name]}
    for name, seconds in took.items():  # not in its order: where it ran is unknown
        if timed_before:
            held.append((name, seconds, gpu_variants.expected_seconds(name, timed_before)))
    parts = [part for part in gpu.PARTS if part in run]
    if parts and "parts_wall_s" not in run and timed_before:
        expected = sum(gpu_variants.expected_seconds(part, timed_before) for part in parts)
        held.append((" + ".join(parts), run["seconds"] - sum(walls.values()), expected))
    return held


def _overruns(path: Path) -> list[str]:
    """What in the run at `path` took longer than the budget expected it to."""
    return [
        f"{path.name}: {name} took {seconds:.1f} s, {expected:.1f} expected"
        for name, seconds, expected in _held_against_expected(path)
        if seconds > expected
    ]


def test_no_part_took_longer_on_the_h200_than_it_was_expected_to():
    """Each part's expected time (`PART_COST`, `STREAM_COST`) against what the committed H200 runs
    took, over the median of the streams timed before it: a factor below what a run measured
    starts a part that overruns the budget."""
    checked = []
    for path in sorted((ROOT / "bench" / "results").glob("h200-*.json")):
        assert _overruns(path) == []
        checked += [name for held in _held_against_expected(path) for name in held[0].split(" + ")]
    assert {"flex+fused_kernels", "triton+fused_kernels", "stages", "kernels", "decoder"} <= set(checked)


def _run_file(tmp_path: Path, order: list[str], took: dict[str, float]) -> Path:
    """A run of `bench gpu` as it lands in bench/results: the parts in `order`, each taking
    `took[name]` seconds (a name in PARTS is a part of its own, any other a stream)."""
    streams = {
        name: {"fps": 1.0, "fps_steady": 1.0, "wall_s": took[name]} for name in order if name not in gpu.PARTS
    }
    parts = {name: {} for name in order if name in gpu.PARTS}
    run = {"variants": streams, **parts, "order": order, "seconds": sum(took.values()),
           "parts_wall_s": {name: took[name] for name in parts}}  # fmt: skip
    path = tmp_path / "h200-run.json"
    path.write_text(json.dumps(run))
    return path


def test_a_part_with_no_stream_timed_before_it_is_not_held_against_a_factor(tmp_path):
    """The run's first stream (here its only one) started with nothing to go by (`expected_seconds`
    0): it was held against 0 s, an overrun of every run with a single stream."""
    path = _run_file(tmp_path, ["sdpa+fused_kernels", "stages"], {"sdpa+fused_kernels": 20.0, "stages": 25.0})
    assert _overruns(path) == []
    assert _held_against_expected(path) == [("stages", 25.0, gpu_variants.PART_COST["stages"] * 20.0)]


def test_a_part_is_held_against_the_streams_timed_before_it(tmp_path):
    """As the budget asked before starting it: `stages` after a 20 s stream was expected to take
    1.5 times 20 s; the 140 s stream after it does not count (over the median of both, 80 s, its
    40 s passed)."""
    took = {"sdpa+fused_kernels": 20.0, "stages": 40.0, "flex+fused_kernels": 140.0}
    path = _run_file(tmp_path, list(took), took)
    expected_stages = gpu_variants.PART_COST["stages"] * 20.0
    assert _overruns(path) == [f"h200-run.json: stages took 40.0 s, {expected_stages:.1f} expected"]


def _measured_on_the_h200() -> set[str]:
    """What the H200 runs of 2026-11-30 timed: their variants with a stream rate, and the parts
    reported beside them."""
    measured = set()
    for path in (ROOT / "bench" / "results").glob("h200-2026-11-30*.json"):
        run = json.loads(path.read_text())
        measured |= {name for name, v in run["variants"].items() if "fps_steady" in v}
        measured |= {part for part in gpu.PARTS if part in run}
    return measured


def test_what_never_ran_on_a_gpu_starts_before_what_the_h200_measured():
    """FP8 (linears and attention), the tiny decoder, the Wan decoder's fused kernels (`decoder`
    and the stream with its fastest way) and the last step's cache start right after the
    default's figures (every variant's reference), ahead of everything the 2026-11-30 runs
    measured: a run the budget cuts loses those first."""
    model = gpu.build_model("wan2.1-1.3b", 64, 96, "cpu", torch.float32, True, "sdpa")
    everything = dict(
        fp8=True, compile_blocks=True, kernel_bench=True, backends=("sdpa", "cudnn", "triton", "flex")
    )
    quick = dict(quick=True, steps=4, chunks=2, warmup_chunks=1, text_tokens=8, clip_frames=33)
    plan = list(gpu.variant_plan(model, {"variants": {}}, "cpu", torch.float32, **quick, **everything))
    never_ran = [
        name
        for name in plan
        if name == "decoder"
        or any(lever in name for lever in ("fp8", "tiny decoder", "last step", "every lever", "decoder way"))
    ]
    measured = _measured_on_the_h200()
    assert {"stages", "kernels", "sdpa+fused_kernels, 2 steps", "flex+fused_kernels"} <= measured
    # the default is every variant's reference; the decoder's ways are new since it ran
    measured_here = [name for name in plan if name in measured - {"sdpa+fused_kernels", "decoder"}]
    assert plan[0] == "sdpa+fused_kernels" and len(never_ran) == 11 and len(measured_here) >= 7
    assert plan[1 : 1 + len(never_ran)] == never_ran
    assert max(map(plan.index, never_ran)) < min(map(plan.index, measured_here))


def test_an_interrupted_run_leaves_valid_json_with_its_parts_beside_the_variants(tmp_path, monkeypatch):
    """SIGINT (gpu_check.sh's timeout) in the middle of a part: the JSON holds what finished, the
    interrupted part marked, the parts where a reader looks for them; the interrupt goes on."""

    def interrupted():
        raise KeyboardInterrupt

    plan = {
        "sdpa+fused_kernels": lambda: {"fps_steady": 2.0, "first_chunk_ms": 9.0},
        "decoder": lambda: {"chunk_per_call": {"ms_p50": 1.0}},
        "sdpa+fused_kernels, fp8 linears": interrupted,
        "never started": lambda: pytest.fail("ran after the interrupt"),
    }
    monkeypatch.setattr(gpu.device_ceilings, "measure_ceilings", lambda *args, **kwargs: {"copy_gb_per_s": 1.0})
    model = SimpleNamespace(cfg=SimpleNamespace(window_frames=6))
    monkeypatch.setattr(gpu, "build_model", lambda *args: model)
    monkeypatch.setattr(gpu, "variant_plan", lambda *args, **kwargs: plan)
    out = tmp_path / "run.json"
    with pytest.raises(KeyboardInterrupt):
        gpu.run("cpu", quick=True, kernel_bench=False, out=str(out), floor_work=str(tmp_path / "none"))
    on_disk = json.loads(out.read_text())
    assert list(on_disk["variants"]) == ["sdpa+fused_kernels", "sdpa+fused_kernels, fp8 linears"]
    assert on_disk["variants"]["sdpa+fused_kernels, fp8 linears"]["interrupted"].endswith("(SIGINT)")
    assert on_disk["decoder"]["chunk_per_call"] == {"ms_p50": 1.0}
    # where the parts ran, for what the budget expected of each (_held_against_expected)
    assert on_disk["order"] == ["sdpa+fused_kernels", "decoder", "sdpa+fused_kernels, fp8 linears"]
    assert on_disk["best_variant"] == "sdpa+fused_kernels"


_SLEEPING_RUN = """
import pathlib, sys, time
from bench import gpu

out, result = sys.argv[1], {"variants": {}}

def sleeping():
    pathlib.Path(out + ".started").touch()
    time.sleep(120)
    return {}

gpu._variant("first", lambda: {"fps": 1.0}, 600, time.perf_counter(), result, out)
gpu._variant("sleeping", sleeping, 600, time.perf_counter(), result, out)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_run_killed_in_a_variant_leaves_valid_json(tmp_path, sig):
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPING_RUN, str(out)], cwd=ROOT, env=env)
    signal_once_started(proc, Path(f"{out}.started"), sig, "its variant started")  # (the imports: seconds)
    on_disk = json.loads(out.read_text())
    assert on_disk["variants"]["first"]["fps"] == 1.0
    state = on_disk["variants"]["sleeping"]
    if sig == signal.SIGKILL:  # no chance to say more than the JSON written before it started
        assert state == {"running": True}
    else:
        assert state["interrupted"].endswith("(SIGINT)")


_FAKE_CLOCK = """#!/usr/bin/env bash
# date +%s reads the fake clock; any other date is the real one
if [[ "${1:-}" == "+%s" ]]; then cat "$CLOCK"; else exec /usr/bin/env -u PATH PATH=/usr/bin:/bin date "$@"; fi
"""
# a command under `timeout` takes its whole limit and the kill's grace: the clock moves on by
# both, and the command never runs
_FAKE_TIMEOUT = """#!/usr/bin/env bash
kill=0
while [[ "$1" == -* ]]; do
  case "$1" in -k) kill=$2; shift 2 ;; -s) shift 2 ;; *) shift ;; esac
done
echo "$(($(cat "$CLOCK") + $1 + kill))" > "$CLOCK"
echo "$1 $kill ${*:2}" >> "$LOG"
exit 124
"""
# what runs outside any timeout: nothing bounds it
_UNBOUNDED = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$UNBOUNDED"
exit 1
"""


def _gpu_check_on_a_fake_clock(tmp_path, **env_vars) -> tuple[subprocess.CompletedProcess, int]:
    """scripts/gpu_check.sh with every command under `timeout` taking its limit (logged to
    tmp_path/timeouts.log) and the others logged to tmp_path/unbounded.log: (its run, its seconds)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("date", _FAKE_CLOCK), ("timeout", _FAKE_TIMEOUT), ("nvidia-smi", _UNBOUNDED),
                       ("python", _UNBOUNDED)):  # fmt: skip
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    clock, log, unbounded = tmp_path / "clock", tmp_path / "timeouts.log", tmp_path / "unbounded.log"
    clock.write_text("1000000\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "OUT": str(tmp_path / "out"),
        "CLOCK": str(clock),
        "LOG": str(log),
        "UNBOUNDED": str(unbounded),
        **env_vars,
    }
    repo = tmp_path / "repo"  # the script, carried wheels, a file of GPU tests
    for path, text in (("scripts/gpu_check.sh", (ROOT / "scripts" / "gpu_check.sh").read_text()),
                       (".whl/diffusers-0-py3-none-any.whl", ""), ("tests/test_x.py", "pytest.mark.gpu")):  # fmt: skip
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    return r, int(clock.read_text()) - 1000000


def test_gpu_check_ends_within_its_deadline_when_every_step_takes_its_limit(tmp_path):
    """The worst case of scripts/gpu_check.sh, every step cut at its limit, on a fake clock: within
    540 s, a real margin inside the device call's 590, with every command bounded (the floors'
    count by the tests' limit) and the benchmark's budget inside its timeout."""
    r, worst_s = _gpu_check_on_a_fake_clock(tmp_path)
    log, unbounded = tmp_path / "timeouts.log", tmp_path / "unbounded.log"
    # the one command outside a timeout: the floors' count beside the tests, stopped at their limit
    (beside,) = unbounded.read_text().splitlines()
    assert beside.startswith("python -m bench.variant_floor --out "), beside
    assert worst_s <= DEVICE_CALL_S - 50, (worst_s, log.read_text())
    assert f"gpu_check: {worst_s} s" in r.stdout
    assert "-m pip install" in log.read_text() and "-m pytest" in log.read_text()
    (bench,) = [line.split() for line in log.read_text().splitlines() if "-m bench.gpu" in line]
    limit_s, budget_s = int(bench[0]), int(bench[bench.index("--budget") + 1])
    assert limit_s >= 150 and 0 < budget_s <= limit_s - 20, bench  # time for the new levers
    # a test step cut before pytest wrote its report still leaves one in $OUT, saying none ran
    report = json.loads((tmp_path / "out" / "gpu-tests.json").read_text())
    assert report == {"error": "no test ran: pytest ended with exit code 124 (gpu-tests.log)"}
    (bench_json,) = (tmp_path / "out").glob("gpu-????-??-??.json")  # and the benchmark's, cut before any
    error = json.loads(bench_json.read_text())["error"]
    assert error == f"bench gpu: exit code 124 (timeout {limit_s} s): no variant ran"


def test_a_benchmark_with_no_time_left_still_leaves_its_json(tmp_path):
    """A deadline the steps before it use up (GPU_CHECK_DEADLINE under 356 s) runs no benchmark: its
    JSON said nothing, there was none, and the plot and the summary read a missing file."""
    r, _ = _gpu_check_on_a_fake_clock(tmp_path, GPU_CHECK_DEADLINE="300")
    assert "-m bench.gpu " not in (tmp_path / "timeouts.log").read_text()
    (bench_json,) = (tmp_path / "out").glob("gpu-????-??-??.json")
    error = json.loads(bench_json.read_text())["error"]
    assert re.fullmatch(r"bench gpu: not run, -?\d+ s left before the deadline: no variant ran", error), error
    assert error in r.stdout  # the summary's tail of it


def test_a_longer_plot_limit_given_with_its_deadline_leaves_the_benchmark_its_time(tmp_path):
    """The plot (~2.5 CPU s: matplotlib's import, layout and PNG) ran past its 20 s limit in the CPU
    rehearsal on a loaded 2-core machine, and the rehearsal failed for a missing PNG. A longer
    GPU_CHECK_PLOT_TIMEOUT, with GPU_CHECK_DEADLINE longer by as much, bounds the plot by it and
    leaves the benchmark the limit and budget it has by default."""
    (tmp_path / "default").mkdir()
    (tmp_path / "longer").mkdir()
    _, default_s = _gpu_check_on_a_fake_clock(tmp_path / "default")
    _, longer_s = _gpu_check_on_a_fake_clock(
        tmp_path / "longer", GPU_CHECK_PLOT_TIMEOUT="120", GPU_CHECK_DEADLINE="630"
    )
    assert longer_s == default_s + 100

    def limits(run) -> tuple[list[str], list[str]]:
        lines = [line.split() for line in (tmp_path / run / "timeouts.log").read_text().splitlines()]
        (bench,) = [line for line in lines if "bench.gpu" in line]
        (plot,) = [line for line in lines if "bench.gpu_plot" in " ".join(line)]
        return bench[:2] + bench[bench.index("--budget") : bench.index("--budget") + 2], plot[:2]

    (default_bench, default_plot), (longer_bench, longer_plot) = limits("default"), limits("longer")
    assert default_plot == ["20", "5"] and longer_plot == ["120", "5"]
    assert longer_bench == default_bench


@pytest.mark.parametrize("steps", [["--steps", "2"], ["--steps=2"]], ids=["separate", "joined"])
def test_the_floors_are_counted_at_the_benchmarks_steps(tmp_path, steps):
    """`bench gpu --floor-work` takes counts of its own model and steps alone: with `--steps 2` in
    GPU_CHECK_BENCH_ARGS the floors counted beside the tests at the default 4 were refused
    ("none: ... steps=4"), every variant that does other work than the default without its floor."""
    bench_args = " ".join(["--quick", *steps])
    _gpu_check_on_a_fake_clock(tmp_path, GPU_CHECK_BENCH_ARGS=bench_args)
    (counting,) = (tmp_path / "unbounded.log").read_text().splitlines()
    assert counting.split()[-1 - len(steps) :] == ["--quick", *steps], counting


# a `timeout` that runs its command at once; an nvidia-smi that names $GPU_NAME
_PASSING_TIMEOUT = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do
  case "$1" in -k | -s) shift 2 ;; *) shift ;; esac
done
exec "${@:2}"
"""
_NVIDIA_SMI = """#!/usr/bin/env bash
echo "name, driver_version, memory.total [MiB]"
echo "$GPU_NAME, 580.159.04, 81559 MiB"
"""


@pytest.mark.parametrize(
    "gpu_name, prefix", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("", "gpu")]
)
def test_the_benchmarks_files_are_named_after_the_gpu_that_ran_them(tmp_path, gpu_name, prefix):
    """The device tool's first call gets an H100 unless it names nvidia-h200: its run was written as
    h200-DATE.json, to be committed beside the H200's runs as one of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("timeout", _PASSING_TIMEOUT), ("nvidia-smi", _NVIDIA_SMI), ("python", _UNBOUNDED)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "gpu_check.sh").write_text((ROOT / "scripts" / "gpu_check.sh").read_text())
    unbounded = tmp_path / "unbounded.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "OUT": str(tmp_path / "out"),
        "UNBOUNDED": str(unbounded),
        "GPU_NAME": gpu_name,
        "GPU_CHECK_TESTS": "none.py",
    }
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (bench,) = [line.split() for line in unbounded.read_text().splitlines() if "-m bench.gpu" in line]
    out = Path(bench[bench.index("--out") + 1])
    assert out.parent == tmp_path / "out" and re.fullmatch(rf"{prefix}-\d{{4}}-\d\d-\d\d\.json", out.name)
    (plot,) = [line.split() for line in unbounded.read_text().splitlines() if "bench.gpu_plot import plot" in line]
    assert plot[-2:] == [str(out), str(out.with_suffix(".png"))]
