"""Write a draw of the demo mixture of any size (same generator and shares as the demo's 300 rows):

    .venv/bin/python -m benchmarks.demo_draw --rows 1200 --target arithmetic --out runs/draw-arithmetic-1200

Writes ``<out>/corpus/part-*.parquet``, ``<out>/probe.parquet`` and ``<out>/heldout.parquet`` (the probe and
held-out sets are the demo's sizes, disjoint from the corpus prompts). A config points at them with
``data.corpus_path``, ``data.probe_path`` and ``evaluate.heldout_path`` (benchmarks/configs/compare_smollm2_1200.yaml).
"""

from __future__ import annotations

import argparse

from benchmarks import write_data_once


def main(argv=None) -> dict:
    from p2d_ray.assets.synthetic import DEFAULT_TARGET, TARGETS, write_demo_data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--target", choices=TARGETS, default=DEFAULT_TARGET)
    p.add_argument("--seed", type=int, default=0, help="seed offset of the draw (0: the demo's seeds)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return write_data_once(
        args.out, lambda tmp: write_demo_data(tmp, args.target, seed_offset=args.seed, n_rows=args.rows)
    )


if __name__ == "__main__":
    main()
