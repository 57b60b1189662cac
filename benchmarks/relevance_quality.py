"""Relevance, then quality: evaluate selection rules offline on runs that are already scored (issue 29).

    .venv/bin/python -m benchmarks.relevance_quality --runs runs/s10/arithmetic/gradient_alignment/task ... \
        --out benchmarks/results/relevance_quality

Each run directory is a finished ``score`` stage of the exact ``gradient_alignment`` scorer (its
``scores/`` hold ``score`` = the cosine, ``loss_full`` = the row's mean response loss given the prompt,
``grad_norm``, ``n_tokens``). Every rule below is applied to those written columns, never re-scored, with the
product's own function (``p2d_ray.scoring.quality.rank_values``), and judged on the corpus's hidden labels
(read here only): the top-10 % share of clean rows of the target task (``is_clean_on_task``) and of rows of
the target task whatever their quality (``task == target``: on-task precision, which must not fall).

Rules: ``cosine`` (relevance alone, the default before issue 29), and ``band`` variants: the relevance band
(``band_factor`` x k rows by relevance, trimmed by the data-derived guard) re-ranked by a quality column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads


def load_run(run_dir: str) -> dict:
    """The run's scores joined with its corpus's task / quality / label columns (numpy arrays by name)."""
    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.config import load_config
    from p2d_ray.report.precision import LABEL

    cfg = load_config(Path(run_dir, "config.yaml"))
    scores = pads.dataset(str(Path(run_dir, "scores")), format="parquet", ignore_prefixes=["_", "."])
    scores = scores.to_table()
    corpus = pads.dataset(corpus_path(cfg), format="parquet").to_table(columns=["id", "task", LABEL])
    idx = pc.index_in(scores.column("id"), value_set=corpus.column("id"))
    on = corpus.column(LABEL).to_numpy(zero_copy_only=False)
    task = np.array(corpus.column("task").to_pylist(), dtype=object)
    if not on.any():
        raise ValueError(f"{run_dir}: corpus has no clean on-task rows")
    # The target task: the task of the clean on-task rows (demo_target is not set for --data corpora).
    target = task[on][0]
    rows = idx.to_numpy(zero_copy_only=False)
    out = {c: scores.column(c).to_numpy(zero_copy_only=False).astype(float) for c in _numeric(scores)}
    out.update(
        id=scores.column("id").to_numpy(zero_copy_only=False),
        clean=on[rows],
        on_task=(task[rows] == target),
        target=target,
        run=run_dir,
    )
    return out


def _numeric(t: pa.Table) -> list[str]:
    return [f.name for f in t.schema if pa.types.is_floating(f.type) or f.name == "n_tokens"]


def evaluate(run: dict, rules: dict[str, dict], fraction: float = 0.10) -> dict[str, dict]:
    """Per rule: clean and on-task precision of the top ``fraction`` (ties by id, as the product)."""
    from p2d_ray.scoring.quality import select_ids

    n = len(run["id"])
    k = max(1, int(np.floor(fraction * n + 0.5)))
    res = {}
    for name, rule in rules.items():
        picked, info = select_ids(run, k, **rule)
        mask = np.isin(run["id"], picked)
        res[name] = {
            "clean": float(run["clean"][mask].mean()),
            "on_task": float(run["on_task"][mask].mean()),
            "band": info.get("band"),
        }
    return res


def grid_rules() -> dict[str, dict]:
    """``--grid``: relevance alone and the rule over band factor x quality weight (guard 0.5), to re-check the
    defaults on a choice set of runs (the demo's draws) before looking at any other corpus."""
    out = {"relevance": {"rule": "relevance"}}
    for bf in (1.1, 1.25, 1.5, 2.0):
        for w in (0.25, 0.5, 1.0):
            out[f"band {bf}x, weight {w}"] = {
                "rule": "relevance_then_quality",
                "band_factor": bf,
                "guard": 0.5,
                "quality_column": "loss_full",
                "quality_weight": w,
            }
    return out


def summarize(table: dict) -> None:
    """Per variant over the runs: mean / worst clean precision, worst and summed on-task change vs relevance."""
    runs = list(table)
    for name in table[runs[0]]:
        if name == "target":
            continue
        clean = [table[r][name]["clean"] for r in runs]
        d = [table[r][name]["on_task"] - table[r]["relevance"]["on_task"] for r in runs]
        print(
            f"{name:26s} clean mean {np.mean(clean):.3f} worst {np.min(clean):.3f} | on-task vs relevance "
            f"worst {np.min(d):+.3f} sum {np.sum(d):+.3f} | " + " ".join(f"{c:.2f}" for c in clean)
        )


def rules() -> dict[str, dict]:
    """The variants compared: relevance alone, the product's defaults, and the band without its guard."""
    from p2d_ray.config import SelectConfig

    d = SelectConfig()
    default = {
        "band_factor": d.band_factor,
        "guard": d.band_guard,
        "quality_column": d.quality_column,
        "quality_weight": d.quality_weight,
    }
    out = {
        "relevance": {"rule": "relevance"},
        "default": {"rule": "relevance_then_quality", **default},
    }
    for m in (1.5, 2.0, 3.0):
        out[f"band {m}x, no guard"] = {**out["default"], "band_factor": m, "guard": None}
        out[f"band {m}x, guard"] = {**out["default"], "band_factor": m}
        out[f"band {m}x, guard, quality alone"] = {**out["default"], "band_factor": m, "quality_weight": None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--grid", action="store_true", help="band factor x quality weight instead of the variants"
    )
    args = ap.parse_args()
    table, variants = {}, grid_rules() if args.grid else rules()
    for r in args.runs:
        run = load_run(r)
        table[r] = {"target": run["target"], **evaluate(run, variants)}
        print(r, run["target"], {k: (v["clean"], v["on_task"]) for k, v in table[r].items() if k != "target"})
    summarize(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "results.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
