"""Each target's top-10 % precision from ONE shared pass vs its single-target run, on the unseen mixture (issue 27).

    flock /tmp/smollm2.lock nice -n 5 .venv/bin/python -m benchmarks.targets_unseen --rows 300 \\
        --out runs/s12/targets/unseen300 --json benchmarks/results/targets/unseen-300.json

The corpus is ``benchmarks/unseen_mixture.py --targets capitals,letters --rows N`` (the capitals draw, which
holds the letters task at the same shares: one label ``is_clean_on_task_<target>`` per target, a probe and a
held-out set per target; at 300 rows its rows are those of ``--target capitals``, Session 10's corpus), written
under ``<out>/data`` once. With the demo's SmolLM2 knobs (exact gradient_alignment, 2 actors of 0.5 CPU):
one localize of both targets (one model load), then the passes, each its own run dir: the shared two-target
pass, then each target's ordinary single-target pass on the same corpus with the heads that localize found
(``target_config`` of the shared config: its probe, its selection size). Per target and per selection rule
(``relevance``, ``relevance_then_quality``; fraction 0.10): top-10 % clean on-task precision of the shared
pass's view and of the single-target run, their selected-id overlap, and the largest per-row score
difference. Where Session 10's single-target capitals run on the same 300 rows is there
(``runs/m29/u/capitals/gradient_alignment/task``), its heads and scores are compared too.

``--strategy distilled --sample S --audit A`` runs the shared pass and the single-target runs with the distilled
strategy (the same seeded sample of S + A exact rows each; the defaults' cascade and refine band), and adds per
run the distilled passes' rows and busy seconds, forwards per corpus row (all passes' busy seconds and the fits
over the exact row's, from the run's own sample pass) and each target's fidelity figures; ``--heads-from DIR``
reuses the heads of an earlier run's ``DIR/shared`` (no localize), ``--exact-ref DIR`` compares each target's
exactly scored rows with that exact shared run's (read only)::

    flock /tmp/smollm2.lock nice -n 5 .venv/bin/python -m benchmarks.targets_unseen --rows 800 \
        --strategy distilled --sample 200 --audit 50 --heads-from runs/s12/targets/unseen800 \
        --exact-ref runs/s12/targets/unseen800 --out runs/s13/h27distill/unseen800 \
        --json benchmarks/results/targets/unseen-800-distilled.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.targets_pass import _base, _pass
from p2d_ray.heads.headset import HeadSet

RULES = ("relevance", "relevance_then_quality")
SESSION10 = "runs/m29/u/{target}/gradient_alignment/task"


def _with_rule(cfg, rule: str):
    return cfg.model_copy(update={"select": cfg.select.model_copy(update={"rule": rule})})


def _ids(path) -> set:
    return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def _same_corpus_and_model(ref: Path, corpus: str, model: str) -> bool:
    """The reference run scored these very rows (prompt and response per id) with this model."""
    import yaml

    if not (ref / "scores").is_dir() or not (ref / "config.yaml").is_file():
        return False
    cfg = yaml.safe_load((ref / "config.yaml").read_text())
    if cfg["model"]["name_or_path"] != model or not Path(cfg["data"]["corpus_path"]).is_dir():
        return False
    cols = ["id", "prompt", "response"]
    a = pq.read_table(cfg["data"]["corpus_path"], columns=cols).sort_by("id")
    return a.equals(pq.read_table(corpus, columns=cols).sort_by("id"))


def _strategy(cfg, args):
    """The run's score.strategy (distilled: the sample's size S + audit A, the rest the defaults)."""
    if args.strategy == "exact":
        return cfg
    knobs = {"strategy": "distilled", "distill_sample_min": args.sample, "distill_audit_rows": args.audit}
    knobs["gate_fallback"] = args.gate_fallback
    return cfg.model_copy(update={"score": cfg.score.model_copy(update=knobs)})


def gate_figures(b: dict) -> dict:
    """One target's fidelity figures from its distilled fidelity block (k-fold and audit Spearman / recall,
    the gate's verdict), as the target benchmarks report them."""
    return {
        "kfold_spearman": b["kfold"]["spearman"],
        "kfold_top_recall": b["kfold"]["top_recall"],
        "audit_spearman": b["audit"].get("spearman"),
        "audit_top_recall": b["audit"].get("top_recall"),
        "gate_passed": b["gate"]["passed"],
    }


def _distill_cost(cfg, n_rows: int) -> dict:
    """A distilled run's passes (rows, busy seconds), fit seconds, forwards per corpus row (everything over
    the exact row's busy seconds from the run's own sample pass) and each target's fidelity figures."""
    stats = json.loads(Path(cfg.run_dir, "score_stats.json").read_text())
    fid = json.loads(Path(cfg.run_dir, "score_summary.json").read_text())["distilled"]
    if "distill" not in stats:  # finished before (a rerun): nothing was measured (--fresh)
        return {"measured": False}
    passes = stats["distill"]["passes"]
    exact_row_s = passes["sample"]["busy_s"] / max(passes["sample"]["rows_this_run"], 1)
    busy = sum(p.get("busy_s", 0.0) for p in passes.values())  # a pass with no rows has no stats
    blocks = fid.get("targets") or {"(single)": fid}
    return {
        "passes": {k: {"rows": v.get("rows", 0), "busy_s": v.get("busy_s", 0.0)} for k, v in passes.items()},
        "wall_s": {k: v for k, v in stats["wall_s"].items() if k.endswith("_pass") or k in ("fit", "total")},
        "busy_s_total": busy,
        "exact_row_busy_s": exact_row_s,
        "forwards_per_row": (busy + stats["distill"]["fit_s"]) / exact_row_s / n_rows,
        "score_source": fid["score_source"],
        "fidelity": {
            n: {
                **gate_figures(b),
                "cascade_gate_passed": (b.get("cascade") or {}).get("gate", {}).get("passed"),
            }
            for n, b in blocks.items()
        },
    }


def _exact_rows_check(a, b, name: str, exact_ref: str | None) -> dict:
    """Distilled: the shared run's and the single-target run's scores on the rows both scored exactly (the
    same sample), and the shared run's exactly scored rows against an exact shared run's scores."""
    out = {}
    sa = np.array(a.column("score_source").to_pylist())
    sb = np.array(b.column("score_source").to_pylist())
    both = (sa != "distilled") & (sb != "distilled")
    out["rows_exact_in_both"] = int(both.sum())
    out["max_abs_diff_exact_rows_vs_single"] = float(
        np.abs(a.column("score").to_numpy()[both] - b.column("score").to_numpy()[both]).max()
    )
    out["exact_rows_shared"] = int((sa != "distilled").sum())
    out["exact_rows_single"] = int((sb != "distilled").sum())
    if exact_ref:
        r = pq.read_table(Path(exact_ref, "shared", "targets", name, "scores")).sort_by("id")
        assert r.column("id").to_pylist() == a.column("id").to_pylist()
        mine = sa != "distilled"
        out["max_abs_diff_exact_rows_vs_exact_run"] = float(
            np.abs(a.column("score").to_numpy()[mine] - r.column("score").to_numpy()[mine]).max()
        )
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="capitals,letters")
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--out", default="runs/s12/targets/unseen300")
    p.add_argument("--json", default="benchmarks/results/targets/unseen-300.json")
    p.add_argument("--model", default="smollm2-135m", help="p2d-demo: a fast smoke run of this script")
    p.add_argument("--fresh", action="store_true", help="delete --out's run dirs first (the data stays)")
    p.add_argument("--strategy", choices=("exact", "distilled"), default="exact")
    p.add_argument("--sample", type=int, default=1000, help="distilled: score.distill_sample_min")
    p.add_argument("--audit", type=int, default=200, help="distilled: score.distill_audit_rows")
    p.add_argument("--gate-fallback", choices=("exact", "warn"), default="exact", help="distilled")
    p.add_argument("--heads-from", default=None, help="an earlier --out: its shared run's heads, no localize")
    p.add_argument("--exact-ref", default=None, help="an earlier exact --out: its shared run's target views")
    args = p.parse_args(argv)

    from benchmarks import unseen_mixture
    from p2d_ray.demo import DEMO_RAY_CPUS
    from p2d_ray.heads.localize import run_localize
    from p2d_ray.report.precision import selection_precision
    from p2d_ray.runtime import ensure_ray
    from p2d_ray.scoring.select import run_select
    from p2d_ray.targets import target_config, target_precision

    names = args.targets.split(",")
    out = Path(args.out)
    data = out / "data"
    unseen_mixture.main(["--targets", args.targets, "--rows", str(args.rows), "--out", str(data)])
    if args.fresh:
        for d in out.iterdir():
            if d.name != "data":
                shutil.rmtree(d)
    corpus = str(data / "corpus")
    targets = [
        {
            "name": n,
            "probe_path": str(data / n / "probe.parquet"),
            "heldout_path": str(data / n / "heldout.parquet"),
        }
        for n in names
    ]
    shared = _strategy(_base(str(out / "shared"), targets, corpus, args.model), args)
    result: dict = {"corpus": corpus, "rows": args.rows, "model": shared.model.name_or_path, "passes": []}
    result["strategy"] = args.strategy
    ensure_ray(DEMO_RAY_CPUS)
    t = time.perf_counter()
    if args.heads_from:  # the very heads of an earlier run (its localize), so its exact scores compare
        from benchmarks.targets_pass import _copy_heads

        _copy_heads(Path(args.heads_from, "shared"), shared.run_dir, names)
    else:
        run_localize(shared)  # one model load, every target
    result["localize_s"] = time.perf_counter() - t
    singles = {}
    for tc in shared.targets:
        one = target_config(shared, tc).model_copy(update={"run_dir": str(out / f"one-{tc.name}")})
        one = _strategy(one, args)  # target_config sets exact
        HeadSet.load(Path(shared.run_dir, "targets", tc.name, "heads.json")).save(
            Path(one.run_dir, "heads.json")
        )
        singles[tc.name] = one
    for cfg in [shared, *singles.values()]:
        result["passes"].append(_pass(cfg))
        if args.strategy == "distilled":
            result["passes"][-1]["distill"] = _distill_cost(cfg, args.rows)
        print(json.dumps(result["passes"][-1], default=str), flush=True)

    result["targets"] = {}
    for n, one in singles.items():
        a = pq.read_table(Path(shared.run_dir, "targets", n, "scores")).sort_by("id")
        b = pq.read_table(Path(one.run_dir, "scores")).sort_by("id")
        assert a.column("id").to_pylist() == b.column("id").to_pylist()
        diff = np.abs(a.column("score").to_numpy() - b.column("score").to_numpy())
        entry = {
            "heads": len(HeadSet.load(Path(one.run_dir, "heads.json"))),
            "max_abs_score_diff": float(diff.max()),
            "rules": {},
        }
        ref = Path(SESSION10.format(target=n))
        if _same_corpus_and_model(ref, corpus, shared.model.name_or_path):
            r = pq.read_table(ref / "scores").sort_by("id")
            if r.column("id").to_pylist() == b.column("id").to_pylist():
                entry["session10"] = {
                    "run": str(ref),
                    "same_heads": HeadSet.load(ref / "heads.json").heads
                    == HeadSet.load(Path(one.run_dir, "heads.json")).heads,
                    "max_abs_score_diff_vs_shared": float(
                        np.abs(a.column("score").to_numpy() - r.column("score").to_numpy()).max()
                    ),
                }
        if args.strategy == "distilled":
            entry.update(_exact_rows_check(a, b, n, args.exact_ref))
        result["targets"][n] = entry
    for rule in RULES:
        sh = _with_rule(shared, rule)
        run_select(sh)
        prec = target_precision(sh)
        for n, one in singles.items():
            one_r = _with_rule(one, rule)
            run_select(one_r)
            ref = selection_precision(
                corpus,
                str(Path(one.run_dir, "subset")),
                str(Path(one.run_dir, "scores")),
                label=f"is_clean_on_task_{n}",
            )
            mine = _ids(Path(shared.run_dir, "targets", n, "subset"))
            theirs = _ids(Path(one.run_dir, "subset"))
            result["targets"][n]["rules"][rule] = {
                "k": len(mine),
                "shared_precision": prec[n]["selected"],
                "single_precision": ref["selected"],
                "base_rate": ref["base_rate"],
                "selected_overlap": len(mine & theirs),
            }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "passes"}, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
