"""The refine band's frontier, replayed from two distilled runs of one corpus (issue 24, Session 14).

``--predicted`` is a run with a small refine band (its other rows keep their predicted scores); ``--exact`` the
same corpus, sample and regressor with a band at least as large as any replayed (its band's rows exact). The
refine pass scores exactly the predicted top f of the corpus, and a row's exact score and loss do not depend
on which pass computed them, so a band of f between the two is the first run's scores with the top f of its
predicted ranking taken from the second run: the selection (select.rule with its defaults) that band would give.
Also replayed: the same bands plus the loss alone (no exact relevance) on the rest of the larger band, i.e.
what a forward-only loss pass over those rows would add for the quality rule.

    .venv/bin/python -m benchmarks.refine_frontier --predicted runs/s13/aer10k --exact runs/s13/aer10k_r15 \\
        --corpus runs/s12/draw-arithmetic-10000/corpus --json benchmarks/results/refine_frontier/aer10k.json

Valid for f at or above the first run's own band (its refined rows have no predicted score left to replay), and
for --exact's band taken from the same ranking (checked: every row of the widest replayed band must be exact).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.dataset as ds

from p2d_ray.config import SelectConfig
from p2d_ray.scoring.quality import select_ids

COLUMNS = ["id", "score", "loss_full", "score_source", "predicted_layer"]


def _scores(run: str):
    return ds.dataset(f"{run}/scores").to_table(columns=COLUMNS).to_pandas().set_index("id")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predicted", required=True)
    ap.add_argument("--exact", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--label", default="is_clean_on_task")
    ap.add_argument("--bands", default="0.05,0.075,0.1,0.125,0.15")
    ap.add_argument("--json")
    a = ap.parse_args()
    pred, exact = _scores(a.predicted), _scores(a.exact)
    labels = ds.dataset(a.corpus).to_table(columns=["id", "task", a.label]).to_pandas().set_index("id")
    sel = SelectConfig()
    n = len(pred)
    k = round(sel.fraction * n)
    # The refine pass's own order: the rows it refined first, then the cascade's band (the higher predicted
    # layer) by its prediction, then the rest by stage 1's (scoring/distill.py).
    rest_rows = pred[pred.score_source != "exact"].assign(
        first=lambda d: d.score_source == "refined", layer=lambda d: d.predicted_layer.fillna(0)
    )
    ranking = rest_rows.sort_values(["first", "layer", "score"], ascending=False).index
    bands = [float(f) for f in a.bands.split(",")]
    widest = max(bands)
    missing = set(ranking[: round(widest * n)]) - set(exact.index[exact.score_source != "distilled"])
    if missing:
        raise SystemExit(f"--exact lacks exact scores for {len(missing)} rows of the widest band")

    def precision(df, rule):
        run = {"id": df.index.values, "score": df.score.values, "loss_full": df.loss_full.values}
        ids, info = select_ids(
            run, k, rule, band_factor=sel.band_factor, guard=sel.band_guard, quality_weight=sel.quality_weight
        )
        got = labels.loc[ids]
        return {
            "clean": round(float(got[a.label].mean()), 4),
            "on_task": round(float((got.task == a.task).mean()), 4),
            "band_rows_without_loss": info.get("band_rows_without_quality"),
        }

    rows = []
    for f in bands:
        top, rest = ranking[: round(f * n)], ranking[round(f * n) : round(widest * n)]
        df = pred.copy()
        df.loc[top, ["score", "loss_full"]] = exact.loc[top, ["score", "loss_full"]]
        plus_loss = df.copy()
        plus_loss.loc[rest, "loss_full"] = exact.loc[rest, "loss_full"]
        rows.append(
            {
                "refine_fraction": f,
                "refined_rows": len(top),
                "rule": precision(df, sel.rule),
                "relevance": precision(df, "relevance"),
                f"rule_with_loss_to_{widest}": precision(plus_loss, sel.rule),
            }
        )
        r = rows[-1]
        print(
            f"refine {f:.3f} ({len(top):,} rows): {sel.rule} clean {r['rule']['clean']:.3f} on-task "
            f"{r['rule']['on_task']:.3f} | relevance {r['relevance']['clean']:.3f} | + loss alone to {widest}: "
            f"{r[f'rule_with_loss_to_{widest}']['clean']:.3f}"
        )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        out = {
            "predicted": a.predicted,
            "exact": a.exact,
            "corpus": a.corpus,
            "k": k,
            "rows": n,
            "bands": rows,
        }
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
