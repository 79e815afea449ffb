"""Benchmarks: each module prints one JSON object (see `streamgen bench --help`)."""

# streamgen sets its OpenMP wait policy before torch loads (streamgen/__init__.py): a benchmark
# run as `python -m bench.NAME` measures the threads `streamgen bench NAME` and the server run
import streamgen  # noqa: F401
