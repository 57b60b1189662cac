"""Ratio benchmarks, run side by side in one process: ``python -m benchmarks.<name>``."""
