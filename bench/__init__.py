"""Benchmarks: each `bench/bench_*.py` prints figures and asserts nothing (`python -m bench` runs them all)."""
