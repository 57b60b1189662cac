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

With the cascade on (``--cascade-fraction`` > 0, the engine's default layer round(L / 2) or
``--cascade-layer``) one run gives both frontiers: ``distilled`` ranks by the bulk pass's stage-1
predictions alone (read from its part files, ``_state/distill/bulk``: what the run would give with the cascade
off), ``cascade`` by the final scores (the cascade's rows first, by stage 2, as the engine's refine band
takes them). Each is given with its cost (measured in this run, and estimated at 100,000 rows: 2,000 sample +
200 audit rows) and ``heldout_delta``: the top 10 % of the non-sample rows against exact's top 10 % of the same
rows (the sample's share taken to ~0, as at 2 % of a large corpus).
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
    ap.add_argument("--cascade-layer", type=int, default=None, help="default: the engine's (round(L / 2))")
    ap.add_argument("--cascade-fraction", type=float, default=0.15, help="0: no cascade")
    ap.add_argument(
        "--cascade-eval",
        nargs="*",
        type=float,
        default=[0.1],
        help="also evaluate smaller cascade fractions from the same run (its top rows by stage 1)",
    )
    ap.add_argument("--refine", nargs="*", type=float, default=[0.0, 0.05, 0.1, 0.15, 0.2])
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument(
        "--engine-refine",
        type=float,
        default=0.0,
        help="refine_fraction in the engine itself (its pass measured; the --refine frontier is then moot)",
    )
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
    if args.cascade_fraction > 0:
        run = run.with_name(f"{run.name}-c{args.cascade_layer or 'auto'}x{args.cascade_fraction:g}")
    if args.engine_refine:
        run = run.with_name(f"{run.name}-r{args.engine_refine:g}")
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
        "distill_cascade_layer": args.cascade_layer,
        "distill_cascade_fraction": args.cascade_fraction,
        "refine_fraction": args.engine_refine,
        "gate_fallback": "warn",  # measure the predictions whatever the gate says (its verdict is reported)
        "gate_top_fraction": args.fraction,
    }
    cfg = P2DConfig.model_validate(_merge(base, {"run_dir": str(run), "score": score}))
    t = time.perf_counter()
    run_pipeline(cfg, stages=("score",), report=False)
    timings["distilled_score_s"] = time.perf_counter() - t

    labels_t = pads.dataset(str(data / "corpus"), format="parquet").to_table(columns=["id", LABEL])
    labels = dict(zip(labels_t.column("id").to_pylist(), labels_t.column(LABEL).to_pylist(), strict=True))
    result = analyse(run, exact_dir, labels, args.fraction, args.refine, args.cascade_eval)
    result.update(
        data=str(data),
        sample=args.sample,
        audit=args.audit,
        timings=timings,
        exact_run=str(exact_dir),
        distilled_run=str(run),
        note="refine > 0 rows: the band's exact scores are the exact reference's (same scorer, same heads)",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k2: result[k2] for k2 in ("rows", "exact_precision", "frontier")}, default=float))
    return result


def _stage1(run: Path) -> dict:
    """id -> the bulk pass's (stage-1) prediction, from its part files."""
    files = sorted(str(p) for p in (run / "_state" / "distill" / "bulk").glob("*.parquet"))
    t = pads.dataset(files, format="parquet").to_table(columns=["id", "reason", "score"])
    ok = t.column("reason").is_null().to_numpy(zero_copy_only=False)
    s = np.asarray(t.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
    return dict(zip(t.column("id").to_pylist(), np.where(ok, s, -np.inf).tolist(), strict=True))


def analyse(run: Path, exact_dir: Path, labels: dict, fraction: float, refines, cascade_eval=()) -> dict:
    """Precision, fidelity and cost of a distilled run against its exact reference (module docstring)."""
    from p2d_ray.scoring.regressor import spearman, top_recall

    ex, di = _scores(exact_dir), _scores(run)
    ex_score = dict(zip(ex.column("id").to_pylist(), ex.column("score").to_pylist(), strict=True))
    ids = np.array(di.column("id").to_pylist())
    final = np.array(di.column("score").to_pylist(), dtype=np.float64)
    src = np.array(di.column("score_source").to_pylist())
    layer = np.array([x if x is not None else 0 for x in di.column("predicted_layer").to_pylist()])
    n = len(labels)
    k = max(1, round(fraction * n))
    ex_ids = np.array(list(ex_score))
    exact_prec = _top_rate(ex_ids, np.array([ex_score[i] for i in ex_ids], dtype=np.float64), labels, k)
    truth = np.array([ex_score.get(int(i), np.nan) for i in ids])
    bulk = src == "distilled"
    s1 = _stage1(run)
    stage1 = np.where(bulk, [s1.get(int(i), -np.inf) for i in ids], final)  # the cascade off

    stats = json.loads((run / "score_stats.json").read_text())
    summary = json.loads((run / "score_summary.json").read_text())["distilled"]
    cas = summary.get("cascade") or {}
    in_cascade = bulk & (layer == cas["layer"]) if cas.get("used") else np.zeros(len(ids), dtype=bool)
    passes = stats["distill"]["passes"]
    ex_stats = json.loads((exact_dir / "score_stats.json").read_text())
    exact_row_s = ex_stats["busy_s"]["score"] / max(ex_stats["rows_scored_this_run"], 1)

    def per_row(name):
        p = passes.get(name, {})
        return p.get("busy_s", 0.0) / max(p.get("rows_this_run", 0), 1)

    sample_row_s, bulk_row_s, cascade_row_s = per_row("sample"), per_row("bulk"), per_row("cascade")
    # the sample pass = the exact scorer + ONE truncated forward to the highest feature layer per row
    feat_row_s = cascade_row_s if "cascade" in passes else bulk_row_s
    exact_est_s = max(sample_row_s - feat_row_s, 1e-9)
    t_b, t_c = S_EXACT * bulk_row_s / exact_est_s, S_EXACT * cascade_row_s / exact_est_s
    fit_fwd = S_EXACT * stats["wall_s"].get("fit", 0.0) / exact_est_s / n
    n_exact = int((src == "exact").sum())
    held = src != "exact"  # the rows outside S + A
    kr = max(1, round(fraction * held.sum()))
    exact_held = _top_rate(ids[held], truth[held], labels, kr)
    fs, fa = 2000 / 100_000, 200 / 100_000
    variants = {"distilled": (stage1, np.zeros(len(ids), dtype=bool), 0.0, t_b)}
    if in_cascade.any():
        variants[f"cascade@{cas['fraction']:g}"] = (final, in_cascade, in_cascade.sum() / n, t_c)
        rows = np.flatnonzero(in_cascade)
        for c in sorted(set(cascade_eval)):
            m = int(round(c * n))
            if 0 < m < len(rows):  # a smaller cascade: the top m of its rows by stage 1 (the same picks)
                first = np.zeros(len(ids), dtype=bool)
                first[rows[np.argsort(-stage1[rows], kind="stable")[:m]]] = True
                variants[f"cascade@{c:g}"] = (np.where(first, final, stage1), first, m / n, t_c)
    frontier = []
    for name, (pred, first, c, t_feat) in variants.items():
        for r in (
            refines
        ):  # the top r of the ranking (the cascade's rows first) takes the exact reference's scores
            band = np.zeros(len(ids), dtype=bool)
            m = int(round(r * n))
            cand = np.flatnonzero(bulk)
            if m:
                band[cand[np.lexsort((-pred[cand], ~first[cand]))[:m]]] = True
            scored = np.where(band, truth, pred)
            fwd = (
                (S_EXACT + t_feat) * n_exact / n
                + S_EXACT * (band.sum() + (src == "refined").sum()) / n
                + t_b * bulk.sum() / n
                + t_c * first.sum() / n
                + fit_fwd
            )
            frontier.append(
                {
                    "variant": name,
                    "refine_fraction": r,
                    "precision": _top_rate(ids, scored, labels, k),
                    "heldout_delta": _top_rate(ids[held], scored[held], labels, kr) - exact_held,
                    "forwards_per_row": round(float(fwd), 4),
                    "forwards_per_row_100k": round(
                        float((S_EXACT + t_feat) * (fs + fa) + S_EXACT * r + t_b * (1 - fs - fa) + t_c * c), 4
                    ),
                    "exact_rows": int(n_exact + band.sum() + (src == "refined").sum()),
                }
            )
    fidelity = {k2: summary[k2] for k2 in ("kfold", "audit", "gate", "ood_rows")}
    fidelity["bulk_vs_exact"] = {
        "spearman": spearman(truth[bulk], stage1[bulk]),
        "top_recall": top_recall(truth[bulk], stage1[bulk], fraction),
    }
    if cas:
        fidelity["cascade"] = {k2: cas[k2] for k2 in ("layer", "fraction", "kfold", "audit", "gate", "used")}
        if in_cascade.any():  # on the cascade's rows: stage 2 against stage 1, both against exact
            fidelity["cascade"]["rows_vs_exact"] = {
                "rows": int(in_cascade.sum()),
                "spearman_stage2": spearman(truth[in_cascade], final[in_cascade]),
                "spearman_stage1": spearman(truth[in_cascade], stage1[in_cascade]),
            }
    # everything this run did, in forwards per corpus row: every pass's busy seconds over the exact row's (from
    # the same run's sample pass), plus the fits
    busy = sum(p.get("busy_s", 0.0) for p in passes.values())
    measured_total = S_EXACT * busy / exact_est_s / n + fit_fwd
    return {
        "rows": n,
        "k": k,
        "measured_forwards_per_row": measured_total,
        "final_precision": _top_rate(ids, final, labels, k),
        "layer": summary["layer"],
        "cascade_layer": (summary.get("cascade") or {}).get("layer"),
        "exact_precision": exact_prec,
        "exact_precision_heldout": exact_held,
        "base_rate": float(np.mean(list(labels.values()))),
        "frontier": frontier,
        "fidelity": fidelity,
        "busy_s_per_row": {
            "exact_run": exact_row_s,
            "sample_pass": sample_row_s,
            "bulk_pass": bulk_row_s,
            "cascade_pass": cascade_row_s,
        },
        "forwards": {"s_exact": S_EXACT, "bulk_row": t_b, "cascade_row": t_c, "fit_per_row": fit_fwd},
        "passes": passes,
        "wall_s": stats["wall_s"],
    }


if __name__ == "__main__":
    main()
