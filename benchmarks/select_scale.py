"""Selection at scale: exact top 10% of a synthetic scored corpus, wall time and the driver's peak memory.

    .venv/bin/python -m benchmarks.select_scale                    # 10,000,000 rows (20 shards) + 20,000 rows
    .venv/bin/python -m benchmarks.select_scale --rows 1000000     # smaller

The scored corpus (ids, a task column, a short text; scores with many ties) is written by a child process,
so the driver's peak RSS (``ru_maxrss``) is that of ``run_select`` alone (plus Ray's client). Ray starts
before the clock. CPU seconds (the driver; the local Ray's processes) say what the work costs on a quiet
machine. Both sizes run the real ``run_select``: 20,000 rows on the driver (pyarrow), 10M as one
Ray task per shard with the exact running merge on the driver. The result is checked against a sort.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import save_result, uptime


def write_scored(root: Path, n_rows: int, n_shards: int) -> None:
    """A corpus of ``n_shards`` row groups and its (complete) scores directory, written as scoring would."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import write_scores

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = -(-n_rows // n_shards)
    with pq.ParquetWriter(
        corpus / "part-0.parquet",
        pa.schema([("id", pa.int64()), ("task", pa.string()), ("text", pa.string())]),
    ) as w:
        for s in range(n_shards):
            ids = pa.array(rng.permutation(np.arange(s * per, min(n_rows, (s + 1) * per))))
            text = pc.binary_join_element_wise("row ", pc.cast(ids, pa.string()), "")
            task = pa.DictionaryArray.from_arrays(
                pa.array(rng.integers(0, 4, len(ids)), pa.int8()), ["a", "b", "c", "d"]
            ).cast(pa.string())
            w.write_table(pa.table({"id": ids, "task": task, "text": text}), row_group_size=per)

    def columns(ids) -> dict:
        n = len(ids)
        return {
            "score": np.round(rng.normal(size=n), 3),  # 3 decimals: many ties, also at the threshold
            "loss_full": rng.random(n),
            "loss_gated": rng.random(n),
            "n_tokens": np.full(n, 5, np.int64),
        }

    write_scores(root / "run", corpus, columns)


def check(root: Path, out: dict) -> bool:
    """The subset equals a full sort's first k rows (value descending, id ascending)."""
    import pyarrow.dataset as pads

    scores = pads.dataset(str(root / "run" / "scores"), format="parquet").to_table(columns=["id", "score"])
    top = scores.sort_by([("score", "descending"), ("id", "ascending")]).slice(0, out["n_selected"])
    got = pads.dataset(str(root / "run" / "subset"), format="parquet").to_table(columns=["id"])
    return sorted(top.column("id").to_pylist()) == sorted(got.column("id").to_pylist())


def _in_child(fn, *args):
    """``fn(*args)`` in a child process: its memory does not count in the driver's peak RSS."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def cpu_seconds() -> tuple[float, float]:
    """(this driver's CPU seconds, its child processes' = the local Ray's workers, raylet, GCS)."""
    import psutil

    me = psutil.Process()
    kids = 0.0
    for p in me.children(recursive=True):
        try:
            t = p.cpu_times()
            kids += t.user + t.system
        except psutil.Error:
            pass
    t = me.cpu_times()
    return t.user + t.system, kids


def one(root: Path, n_rows: int, n_shards: int, stratify: bool, repeat: int = 1) -> dict:
    from p2d_ray.config import build_config
    from p2d_ray.scoring.select import run_select

    p = mp.get_context("spawn").Process(target=write_scored, args=(root, n_rows, n_shards))
    p.start()
    p.join()
    assert p.exitcode == 0, "writing the synthetic scored corpus failed"
    sel = {"fraction": 0.1, **({"stratify_by": "task"} if stratify else {})}
    cfg = build_config({"run_dir": str(root / "run"), "select": sel})
    for _ in range(repeat):  # the last run counts (a first one pays imports, e.g. matplotlib)
        (d0, w0), t = cpu_seconds(), time.perf_counter()
        out = run_select(cfg)
        seconds, (d1, w1) = time.perf_counter() - t, cpu_seconds()
    return {
        "driver_cpu_s": d1 - d0,
        "ray_cpu_s": w1 - w0,
        "rows": n_rows,
        "shards": n_shards,
        "stratified": stratify,
        "seconds": seconds,
        "n_selected": out["n_selected"],
        "exact": None if stratify else _in_child(check, root, out),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--stratified", action="store_true", help="also a per-task stratified run at --rows")
    args = p.parse_args(argv)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="p2d-bench-select-"))
    runs = [one(work / "small", 20_000, 4, False, repeat=2)]
    rss_small = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runs.append(one(work / "big", args.rows, args.shards, False))
    if args.stratified:
        runs.append(one(work / "big-strat", args.rows, args.shards, True))
    ray.shutdown()
    out = {
        "runs": runs,
        "driver_peak_rss_mb_after_small": rss_small,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "uptime": uptime(),
    }
    return save_result("select_scale", out)


if __name__ == "__main__":
    main()
