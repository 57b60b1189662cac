"""Ratio benchmarks, run side by side in one process: ``python -m benchmarks.<name>``."""

import json
import os
from pathlib import Path


def uptime() -> str:
    """The machine's load, recorded with every measurement (BENCHMARKS.md cites it)."""
    return os.popen("uptime").read().strip()


def save_result(name: str, out: dict) -> dict:
    """Print ``out`` and write it to ``benchmarks/results/<name>.json``; returns it."""
    text = json.dumps(out, indent=1)
    print(text)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(text)
    return out
