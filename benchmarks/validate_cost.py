"""What ``p2d-ray validate`` costs to decode every corpus page (vs footers only), side by side in one run.

    .venv/bin/python -m benchmarks.validate_cost --rows 20000 --rounds 5

Writes a corpus of ``--rows`` prompt/response rows (~60 tokens each, 10k-row row groups), then times the
corpus check of validate with ``deep=True`` (every row group of the id and text columns decoded, UTF-8
checked) and ``deep=False`` (listing + footers: the pre-flight), interleaved, median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from p2d_ray.config import build_config
from p2d_ray.validate import _corpus_findings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    rows = [
        {
            "id": i,
            "prompt": f"Question {i}: what is {i} plus {i % 97}? ",
            "response": f"It is {i + i % 97}. " * 4,
        }
        for i in range(args.rows)
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "corpus.parquet", row_group_size=10_000)
    cfg = build_config({"run_dir": str(root / "run"), "data": {"corpus_path": str(root / "corpus.parquet")}})
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for deep in (False, True):
            t0 = time.perf_counter()
            (finding,) = _corpus_findings(cfg, deep)
            times[deep].append(time.perf_counter() - t0)
            assert finding["status"] == "ok", finding
    footers, decode = statistics.median(times[False]), statistics.median(times[True])
    mb = (root / "corpus.parquet").stat().st_size / 1e6
    print(
        f"{args.rows} rows, {mb:.1f} MB Parquet: footers only {footers * 1e3:.1f} ms, "
        f"every page decoded {decode * 1e3:.1f} ms, ratio {decode / footers:.2f}"
    )


if __name__ == "__main__":
    main()
