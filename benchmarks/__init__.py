"""Ratio benchmarks, run side by side in one process: ``python -m benchmarks.<name>``."""

import json
import os
import re
import shutil
from collections.abc import Callable
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


_CPU = re.compile(r"Remote cpu time: .*?, ([\d.]+)(us|ms|s) total")


def remote_cpu_seconds(ray_data_stats: str) -> float:
    """Sum of every operator's "Remote cpu time ... total" in Ray Data's own stats report."""
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    return sum(float(v) * scale[u] for v, u in _CPU.findall(ray_data_stats))


def write_data_once(out: str | Path, write: Callable[[Path], dict]) -> dict:
    """Write a data directory (corpus/, probe.parquet, heldout.parquet) once: ``write(tmp)`` fills a
    temporary sibling that is renamed into place, so an interrupted run never leaves half a directory."""
    out = Path(out)
    if (out / "heldout.parquet").is_file():
        print(f"{out}: already written")
        return {}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = write(tmp)
    tmp.rename(out)
    print(json.dumps(meta))
    return meta
