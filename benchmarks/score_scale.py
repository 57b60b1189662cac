"""Corpus scale: a synthetic corpus through the whole score -> select path with the ``noop`` scorer.

    .venv/bin/python -m benchmarks.score_scale                     # 1,000,000 rows, SmolLM2's tokenizer
    .venv/bin/python -m benchmarks.score_scale --rows 100000

``noop`` makes no model call, so this measures the engine itself: Parquet read, tokenisation tasks, the
actor's Arrow -> tensor batching, the driver's collection and writes, and selection. Reported: rows per
CPU-second (every worker's CPU from Ray Data's own stats + the driver's process CPU), wall seconds per
stage (``score_stats.json``), select seconds, and the driver's peak RSS (``ru_maxrss``; the corpus is
written by a child process so it does not count).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

from benchmarks import remote_cpu_seconds, save_result, uptime

SMOLLM2 = "smollm2-135m"


def write_corpus(path: Path, n_rows: int, row_group: int) -> None:
    """Short prompt/response rows (arithmetic questions and answers, 15-40 tokens), built with pyarrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(
        path / "part-0.parquet",
        pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("response", pa.string())]),
    ) as w:
        for start in range(0, n_rows, row_group):
            n = min(row_group, n_rows - start)
            a, b = (pa.array(rng.integers(0, 1000, n)).cast(pa.string()) for _ in range(2))
            pad = pa.array(
                np.array(["", " Show your steps.", " Answer briefly, please."])[rng.integers(0, 3, n)]
            )
            prompt = pc.binary_join_element_wise("What is ", a, " plus ", b, "?", pad, "")
            response = pc.binary_join_element_wise("It is the sum of ", a, " and ", b, ". #### ", a, "")
            w.write_table(
                pa.table({"id": np.arange(start, start + n), "prompt": prompt, "response": response})
            )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--row-group", type=int, default=50_000, help="rows per corpus row group (= shard)")
    p.add_argument("--model", default=SMOLLM2, help="only its tokenizer is used")
    p.add_argument("--set", nargs="*", default=[], help="extra score.* overrides, key=value")
    args = p.parse_args(argv)
    import ray

    from p2d_ray.config import build_config
    from p2d_ray.scoring.pipeline import run_score
    from p2d_ray.scoring.select import run_select

    work = Path(tempfile.mkdtemp(prefix="p2d-bench-score-scale-"))
    child = mp.get_context("spawn").Process(
        target=write_corpus, args=(work / "corpus", args.rows, args.row_group)
    )
    child.start()
    child.join()
    assert child.exitcode == 0
    score = {"scorer": "noop", "min_actors": 2, "max_actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 32}
    score.update({k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    cfg = build_config(
        {
            "run_dir": str(work / "run"),
            "model": {"name_or_path": args.model},
            "data": {"corpus_path": str(work / "corpus")},
            "score": score,
        }
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    load_before = uptime()
    t, c = time.perf_counter(), time.process_time()
    out = run_score(cfg)
    score_wall, driver_cpu = time.perf_counter() - t, time.process_time() - c
    st = json.loads((work / "run" / "score_stats.json").read_text())
    workers_cpu = remote_cpu_seconds(st["ray_data_stats"] or "")
    t = time.perf_counter()
    sel = run_select(cfg)
    select_s = time.perf_counter() - t
    ray.shutdown()
    result = {
        "rows": args.rows,
        "rows_scored": out["rows_scored"],
        "score_overrides": score,
        "score_wall_s": score_wall,
        "score_stages_s": st["wall_s"],
        "busy_s": st["busy_s"],
        "driver_cpu_s": driver_cpu,
        "workers_cpu_s": workers_cpu,
        "rows_per_cpu_s": args.rows / (driver_cpu + workers_cpu),
        "rows_per_worker_cpu_s": args.rows / workers_cpu if workers_cpu else None,
        "rows_per_wall_s": args.rows / score_wall,
        "select_s": select_s,
        "n_selected": sel["n_selected"],
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "uptime_before": load_before,
        "uptime_after": uptime(),
    }
    return save_result(f"score_scale_{args.rows}", result)


if __name__ == "__main__":
    main()
