"""Distilled scoring measured offline on an exact run's scores (SmolLM2): fidelity, precision frontier, cost.

    .venv/bin/python -m benchmarks.distill_offline --exact-run runs/h24/arith1000/exact \
        --corpus runs/h24/draw-arithmetic-1000/corpus --out benchmarks/results/distill/offline-arith.json

For the rows the exact run scored (all, or the shards it finished), the truncated forward of scoring/distill.py
(the same functions the bulk pass runs) gives each row's pooled layer-l_f features; then, per seeded sample
of the rows: ridge fitted on the sample's exact scores (fit_regressor), the rest predicted, and the top 10 %
selected from exact (sample) + predicted (rest) scores, with the predicted top r of the corpus taking its exact
scores (the refine pass). Cost: the exact scorer and the truncated forward timed on the same micro-batches,
alternating, in this one process (same load), as seconds per row and as a ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exact-run", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--layers", nargs="+", type=int, default=[3])
    ap.add_argument("--sample-fractions", nargs="+", type=float, default=[0.1, 0.2, 1 / 3])
    ap.add_argument("--refine", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.15])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--timing-batches", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import yaml

    from p2d_ray.config import P2DConfig
    from p2d_ray.data.formatting import collate, encode_row
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.report.precision import LABEL
    from p2d_ray.scoring.distill import fit_regressor, pool_features, spearman, top_recall, truncated_hidden
    from p2d_ray.scoring.gradient import FILENAME, ProbeGradient
    from p2d_ray.scoring.scorers import build_scorer

    run = Path(args.exact_run)
    cfg = P2DConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    scores = pads.dataset(str(run / "scores"), format="parquet", ignore_prefixes=["_", "."]).to_table()
    exact = dict(zip(scores.column("id").to_pylist(), scores.column("score").to_pylist(), strict=True))
    corpus = pads.dataset(args.corpus, format="parquet").to_table().to_pylist()
    rows = [r for r in corpus if r["id"] in exact]
    torch.set_num_threads(1)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model).eval()
    enc = [encode_row(r, tok, cfg.data, cfg.data.format) for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = np.argsort([-len(e.input_ids) for e in enc], kind="stable")
    bs = cfg.score.batch_size
    feats = {layer: np.zeros((len(rows), 0)) for layer in args.layers}
    for layer in args.layers:
        out = [None] * len(rows)
        with torch.no_grad():
            for s in range(0, len(order), bs):
                idx = order[s : s + bs]
                b = collate([enc[i] for i in idx], pad)
                f = pool_features(
                    truncated_hidden(model, b["input_ids"], b["attention_mask"], layer), b["attention_mask"]
                )
                for j, i in enumerate(idx):
                    out[i] = f[j].numpy()
        feats[layer] = np.stack(out).astype(np.float64)

    # cost: the exact scorer vs the truncated forward on the same micro-batches, alternating
    heads = HeadSet.load(run / "heads.json")
    pg = ProbeGradient.load(run / FILENAME)
    s = cfg.score
    exact_fn = build_scorer(
        s.scorer,
        model,
        heads,
        s.gate_mode,
        s.loss_chunk_tokens,
        probe_gradient=pg,
        alignment_eps=s.alignment_eps,
        alignment_method=s.alignment_method,
        alignment_normalize=s.alignment_normalize,
    )
    t_exact, t_trunc, t_full, n_timed = 0.0, {layer: 0.0 for layer in args.layers}, 0.0, 0
    rng = np.random.default_rng(0)
    for _ in range(args.timing_batches):
        idx = rng.choice(len(rows), size=min(bs, len(rows)), replace=False)
        b = collate([enc[i] for i in idx], pad)
        t = time.perf_counter()
        exact_fn(b)
        t_exact += time.perf_counter() - t
        with torch.no_grad():
            t = time.perf_counter()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            t_full += time.perf_counter() - t
            for layer in args.layers:
                t = time.perf_counter()
                truncated_hidden(model, b["input_ids"], b["attention_mask"], layer)
                t_trunc[layer] += time.perf_counter() - t
        n_timed += len(idx)

    ids = np.array([r["id"] for r in rows])
    y = np.array([exact[i] for i in ids], dtype=np.float64)
    label = np.array([bool(r[LABEL]) for r in rows])
    n = len(rows)
    k = max(1, round(0.1 * n))

    def top_rate(score):
        return float(label[np.lexsort((ids, -score))[:k]].mean())

    result = {
        "rows": n,
        "k": k,
        "exact_precision": top_rate(y),
        "base_rate": float(label.mean()),
        "cost": {
            "rows_timed": n_timed,
            "exact_s_per_row": t_exact / n_timed,
            "plain_forward_s_per_row": t_full / n_timed,
            "exact_forwards_per_row": t_exact / t_full,
            "truncated": {
                str(layer): {
                    "s_per_row": t_trunc[layer] / n_timed,
                    "forwards_per_row": t_trunc[layer] / t_full,
                    "vs_exact": t_trunc[layer] / t_exact,
                }
                for layer in args.layers
            },
        },
        "runs": [],
    }
    for layer in args.layers:
        X = feats[layer]
        for frac in args.sample_fractions:
            m = max(5, int(round(frac * n)))
            for seed in range(args.seeds):
                perm = np.random.default_rng(seed).permutation(n)
                S, R = perm[:m], perm[m:]
                reg, cv = fit_regressor(X[S], y[S], 5, seed, 0.1, 1.5)
                pred = reg.predict(X[R])[0]
                row = {
                    "layer": layer,
                    "sample_fraction": frac,
                    "sample": m,
                    "seed": seed,
                    "kfold": cv,
                    "heldout_spearman": spearman(y[R], pred),
                    "heldout_top_recall": top_recall(y[R], pred, 0.1),
                }
                for r in args.refine:
                    final = y.copy()
                    final[R] = pred
                    band = R[np.argsort(-pred, kind="stable")[: int(round(r * n))]]
                    final[band] = y[band]
                    exact_rows = m + len(band)
                    ratio = result["cost"]["truncated"][str(layer)]["vs_exact"]
                    row[f"precision_refine_{r}"] = top_rate(final)
                    row[f"exact_rows_share_refine_{r}"] = exact_rows / n
                    row[f"cost_vs_exact_refine_{r}"] = exact_rows / n + ratio * (n - m) / n
                result["runs"].append(row)
    summary = []
    for layer in args.layers:
        for frac in args.sample_fractions:
            rs = [r for r in result["runs"] if r["layer"] == layer and r["sample_fraction"] == frac]
            entry = {
                "layer": layer,
                "sample_fraction": frac,
                "sample": rs[0]["sample"],
                "kfold_spearman": float(np.mean([r["kfold"]["spearman"] for r in rs])),
                "heldout_spearman": float(np.mean([r["heldout_spearman"] for r in rs])),
                "heldout_top_recall": float(np.mean([r["heldout_top_recall"] for r in rs])),
            }
            for r in args.refine:
                entry[f"precision_refine_{r}"] = float(np.mean([x[f"precision_refine_{r}"] for x in rs]))
                entry[f"precision_sd_refine_{r}"] = float(np.std([x[f"precision_refine_{r}"] for x in rs]))
                entry[f"cost_vs_exact_refine_{r}"] = float(
                    np.mean([x[f"cost_vs_exact_refine_{r}"] for x in rs])
                )
            summary.append(entry)
    result["summary"] = summary
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {
                "rows": n,
                "exact_precision": result["exact_precision"],
                "cost": result["cost"],
                "summary": summary,
            },
            indent=1,
        )
    )
    return result


if __name__ == "__main__":
    main()
