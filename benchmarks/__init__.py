"""Microbenchmarks of topojax; run each module with ``python -m benchmarks.NAME``."""
