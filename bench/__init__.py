"""Benchmarks: each module prints one JSON object (see `streamgen bench --help`)."""
