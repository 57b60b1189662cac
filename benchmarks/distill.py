"""score.strategy=distilled against exact on one labelled corpus (SmolLM2): cost, precision and fidelity.

    flock /tmp/smollm2.lock nice -n 5 .venv/bin/python -m benchmarks.distill --data runs/draw-arithmetic-2000 \
        --exact-run runs/exact-arithmetic-2000 --sample 100 --audit 50 --out benchmarks/results/distill/a2000.json

``--data``: a labelled data directory (``corpus/`` + ``probe.parquet``: benchmarks.demo_draw or
benchmarks.unseen_mixture). ``--exact-run``: a finished exact run on that corpus (its heads.json and probe
gradient are reused, its scores are the exact reference); without it the exact run is made here first
(localize + score, the demo's knobs). The distilled run then uses the same heads and probe gradient, with
``refine_fraction=0`` in the engine; the refine frontier is computed from it and the exact reference: the
predicted top r of the corpus takes the exact reference's scores (the numbers the engine's refine pass would
compute for those rows) -- labelled as such in the output. Cost in forward-equivalents per corpus row:
``s_exact`` (the exact scorer, BENCHMARKS.md's cost model) per exactly scored row, and the bulk pass's
measured busy seconds per row over the exact pass's, times ``s_exact``, per predicted row; plus the fit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

S_EXACT = 2.4  # forwards per row of the exact gradient_alignment scorer at l_min = 0 (BENCHMARKS.md)


def _scores(run_dir: Path) -> pa.Table:
    return pads.dataset(str(run_dir / "scores"), format="parquet", ignore_prefixes=["_", "."]).to_table()


def _top_rate(ids: np.ndarray, score: np.ndarray, labels: dict, k: int) -> float:
    order = np.lexsort((ids, -score))[:k]  # highest first, ties by id
    return float(np.mean([labels.get(int(i), False) for i in ids[order]]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--exact-run", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("--audit", type=int, default=50)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--refine", nargs="*", type=float, default=[0.0, 0.05, 0.1, 0.15, 0.2])
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--exact-only", action="store_true", help="make the exact reference run (localize + score) and stop"
    )
    args = ap.parse_args(argv)

    from p2d_ray.config import P2DConfig, _merge
    from p2d_ray.demo import DEMO_KNOBS, DEMO_RAY_CPUS
    from p2d_ray.pipeline import run_pipeline
    from p2d_ray.report.precision import LABEL
    from p2d_ray.runtime import ensure_ray
    from p2d_ray.scoring.gradient import FILENAME

    data = Path(args.data)
    work = Path(args.work or f"runs/distill/{data.name}")
    base = {k: v for k, v in DEMO_KNOBS.items() if k != "run_dir"}
    base = _merge(
        base,
        {
            "model": {"name_or_path": args.model},
            "data": {"corpus_path": str(data / "corpus"), "probe_path": str(data / "probe.parquet")},
        },
    )
    ensure_ray(num_cpus=DEMO_RAY_CPUS)
    timings = {}
    exact_dir = Path(args.exact_run) if args.exact_run else work / "exact"
    if not (exact_dir / "score_summary.json").is_file():
        t = time.perf_counter()
        cfg = P2DConfig.model_validate(
            _merge(base, {"run_dir": str(exact_dir), "score": {"strategy": "exact"}})
        )
        run_pipeline(cfg, stages=("localize", "score"), report=False)
        timings["exact_localize_score_s"] = time.perf_counter() - t
    if args.exact_only:
        print(json.dumps({"exact_run": str(exact_dir), "timings": timings}))
        return {"exact_run": str(exact_dir), "timings": timings}

    run = work / f"distilled-n{args.sample}-a{args.audit}-l{args.layer or 'auto'}"
    run.mkdir(parents=True, exist_ok=True)
    for f in ("heads.json", FILENAME):  # the same heads and probe gradient as the exact reference
        if (exact_dir / f).is_file() and not (run / f).is_file():
            shutil.copy(exact_dir / f, run / f)
    score = {
        **base["score"],
        "strategy": "distilled",
        "distill_sample_min": args.sample,
        "distill_sample_fraction": 1e-9,
        "distill_audit_rows": args.audit,
        "distill_layer": args.layer,
        "refine_fraction": 0.0,
        "gate_fallback": "warn",  # measure the predictions whatever the gate says (its verdict is reported)
        "gate_top_fraction": args.fraction,
    }
    cfg = P2DConfig.model_validate(_merge(base, {"run_dir": str(run), "score": score}))
    t = time.perf_counter()
    run_pipeline(cfg, stages=("score",), report=False)
    timings["distilled_score_s"] = time.perf_counter() - t

    labels_t = pads.dataset(str(data / "corpus"), format="parquet").to_table(columns=["id", LABEL])
    labels = dict(zip(labels_t.column("id").to_pylist(), labels_t.column(LABEL).to_pylist(), strict=True))
    ex, di = _scores(exact_dir), _scores(run)
    ex_score = dict(zip(ex.column("id").to_pylist(), ex.column("score").to_pylist(), strict=True))
    ids = np.array(di.column("id").to_pylist())
    pred = np.array(di.column("score").to_pylist(), dtype=np.float64)
    src = np.array(di.column("score_source").to_pylist())
    n = len(labels)
    k = max(1, round(args.fraction * n))
    ex_ids = np.array(list(ex_score))
    exact_prec = _top_rate(ex_ids, np.array([ex_score[i] for i in ex_ids], dtype=np.float64), labels, k)
    truth = np.array([ex_score.get(int(i), np.nan) for i in ids])
    bulk = src == "distilled"
    from p2d_ray.scoring.distill import spearman, top_recall

    stats = json.loads((run / "score_stats.json").read_text())
    summary = json.loads((run / "score_summary.json").read_text())
    passes = stats["distill"]["passes"]
    ex_stats = json.loads((exact_dir / "score_stats.json").read_text())
    exact_row_s = ex_stats["busy_s"]["score"] / max(ex_stats["rows_scored_this_run"], 1)
    sample_row_s = passes["sample"]["busy_s"] / max(passes["sample"]["rows_this_run"], 1)
    bulk_row_s = passes["bulk"]["busy_s"] / max(passes["bulk"]["rows_this_run"], 1)
    # the sample pass = the exact scorer + the truncated forward per row, so exact alone ~ sample - bulk
    exact_est_s = max(sample_row_s - bulk_row_s, 1e-9)
    n_exact = int((src == "exact").sum())
    frontier = []
    for r in args.refine:  # the predicted top r of the corpus takes the exact reference's scores
        band = np.zeros(len(ids), dtype=bool)
        m = int(round(r * n))
        if m:
            band[np.flatnonzero(bulk)[np.argsort(-pred[bulk], kind="stable")[:m]]] = True
        final = np.where(band, truth, pred)
        fwd = (
            S_EXACT * (n_exact + band.sum()) / n
            + S_EXACT * (bulk_row_s / exact_est_s) * bulk.sum() / n
            + S_EXACT * stats["wall_s"].get("fit", 0.0) / exact_est_s / n
        )
        frontier.append(
            {
                "refine_fraction": r,
                "precision": _top_rate(ids, final, labels, k),
                "forwards_per_row": round(float(fwd), 4),
                "exact_rows": int(n_exact + band.sum()),
            }
        )
    result = {
        "data": str(data),
        "rows": n,
        "k": k,
        "sample": args.sample,
        "audit": args.audit,
        "layer": summary["distilled"]["layer"],
        "exact_precision": exact_prec,
        "base_rate": float(np.mean(list(labels.values()))),
        "frontier": frontier,
        "bulk_spearman_vs_exact": spearman(truth[bulk], pred[bulk]),
        "bulk_top_recall_vs_exact": top_recall(truth[bulk], pred[bulk], args.fraction),
        "fidelity": {k2: summary["distilled"][k2] for k2 in ("kfold", "audit", "gate", "ood_rows")},
        "busy_s_per_row": {"exact_run": exact_row_s, "sample_pass": sample_row_s, "bulk_pass": bulk_row_s},
        "bulk_vs_exact_row_cost": bulk_row_s / exact_est_s,
        "passes": passes,
        "wall_s": stats["wall_s"],
        "timings": timings,
        "exact_run": str(exact_dir),
        "distilled_run": str(run),
        "note": "refine > 0 rows: the band's exact scores are the exact reference's (same scorer, same heads)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(
        json.dumps(
            {k2: result[k2] for k2 in ("rows", "exact_precision", "frontier", "fidelity")}, default=float
        )
    )
    return result


if __name__ == "__main__":
    main()
