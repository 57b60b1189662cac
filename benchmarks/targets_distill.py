"""K targets in ONE distilled pass vs one target's distilled pass, measured side by side (issue 27), and the
shared refine budget replayed offline from the K-target run's own scores.

    flock /tmp/smollm2.lock nice -n 5 .venv/bin/python -m benchmarks.targets_distill run --rows 2000 \\
        --sample 300 --audit 100 --refine 0.15 --out runs/s14/k4dist --json benchmarks/results/targets/k4-distilled.json
    .venv/bin/python -m benchmarks.targets_distill replay --out runs/s14/k4dist \\
        --json benchmarks/results/targets/k4-distilled-replay.json

``run``: the corpus is ``benchmarks/targets_corpus.py`` (arithmetic, units, capitals, letters from two
generators, one label per target), written under ``<out>/data``. With the demo's SmolLM2 knobs (2 actors of
0.5 CPU) and ``score.strategy=distilled`` forced, every knob of the strategy set explicitly
(``distill_sample_min`` S, ``distill_audit_rows`` A, ``refine_fraction`` R, ``distill_cascade_fraction`` 0.1,
``gate_fallback`` warn: a failed gate is reported, never turned into a full exact pass): one localize of all
targets (one model load), then in ``--order`` (default ``one,k4``) the single-target distilled run of the
first target (``target_config``, the heads localize found) and the K-target pass. Per run: each distilled
pass's rows, actors' busy seconds and wall seconds, forwards per corpus row (busy seconds + fit over the
single run's exact row busy seconds), the K / 1 ratios; per target and rule (``relevance``,
``relevance_then_quality``, fraction 0.10) its top-10 % clean on-task precision.

``--order k4`` runs the K-target pass alone (its precision and the replay's frontier, no cost ratios).

``replay`` (no model; ``--run-json a.json,b.json`` averages several runs' per-pass costs): from the K-target run's files -- the bulk and cascade passes' predicted scores
(``_state/distill/``), the final exact scores and ``loss_full`` of the sample and refined rows -- each
target's ranking is rebuilt as the engine builds it (its cascade band first, by stage 2; then stage 1) and
the refine pass is replayed under a SHARED budget of B rows: the union of the targets' bands taken
round-robin from their rankings until B distinct rows (the OOD rows, refined in any case, on top). A row
outside the cap keeps its predicted score and has no ``loss_full``. Every row refined under a cap was refined
in the uncapped run, so its exact score is known: the replay is exact. Checked against the run itself: the
uncapped replay gives the K-target run's selections, the first target's solo replay (its band alone) the
single-target run's. Cost per B: the K-target run's measured busy seconds of its sample, bulk and cascade
passes and fit + B x its measured busy seconds per refined row, over the single-target run's busy seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks import uptime
from benchmarks.targets_pass import _base, _copy_heads, _pass
from benchmarks.targets_unseen import RULES, _with_rule, gate_figures

NAMES = ("arithmetic", "units", "capitals", "letters")


def _knobs(cfg, args):
    knobs = {
        "strategy": "distilled",
        "distill_sample_min": args.sample,
        "distill_audit_rows": args.audit,
        "refine_fraction": args.refine,
        "distill_cascade_fraction": 0.1,
        "gate_fallback": "warn",
    }
    return cfg.model_copy(update={"score": cfg.score.model_copy(update=knobs)})


def _costs(cfg, n_rows: int) -> dict:
    """Per distilled pass: rows, busy seconds (the actors'), wall seconds; the fit; each target's figures."""
    stats = json.loads(Path(cfg.run_dir, "score_stats.json").read_text())
    fid = json.loads(Path(cfg.run_dir, "score_summary.json").read_text())["distilled"]
    passes = stats["distill"]["passes"]
    wall = stats["wall_s"]
    blocks = fid.get("targets") or {"(single)": fid}
    return {
        "passes": {
            k: {"rows": v.get("rows", 0), "busy_s": v.get("busy_s", 0.0), "wall_s": wall.get(f"{k}_pass")}
            for k, v in passes.items()
        },
        "wall_s": wall,
        "fit_s": stats["distill"]["fit_s"],
        "busy_s_total": sum(v.get("busy_s", 0.0) for v in passes.values()),
        "exact_row_busy_s": passes["sample"]["busy_s"] / max(passes["sample"]["rows_this_run"], 1),
        "score_source": fid["score_source"],
        "ood_rows": fid.get("ood_rows"),
        "targets": {
            n: {
                **gate_figures(b),
                "cascade_band_rows": b.get("cascade_band_rows"),
                "refine_band_rows": b.get("refine_band_rows"),
            }
            for n, b in blocks.items()
        },
    }


def run(args) -> dict:
    from benchmarks import targets_corpus
    from p2d_ray.demo import DEMO_RAY_CPUS
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.heads.localize import run_localize
    from p2d_ray.report.precision import selection_precision
    from p2d_ray.runtime import ensure_ray
    from p2d_ray.scoring.select import run_select
    from p2d_ray.targets import target_config, target_precision

    out = Path(args.out)
    data = out / "data"
    meta = targets_corpus.main(["--rows", str(args.rows), "--out", str(data)])
    if args.fresh:
        for d in out.iterdir():
            if d.name != "data":
                shutil.rmtree(d)
    targets = [
        {
            "name": n,
            "probe_path": str(data / n / "probe.parquet"),
            "heldout_path": str(data / n / "heldout.parquet"),
        }
        for n in NAMES
    ]
    k4 = _knobs(_base(str(out / "k4"), targets, str(data / "corpus"), args.model), args)
    result: dict = {
        "corpus": meta,
        "rows": args.rows,
        "model": args.model,
        "knobs": k4.score.model_dump(
            include={
                "strategy",
                "distill_sample_min",
                "distill_audit_rows",
                "refine_fraction",
                "distill_cascade_fraction",
                "gate_fallback",
                "distill_layer",
                "distill_cascade_layer",
            }
        ),
    }
    result["uptime_start"] = uptime()
    ensure_ray(DEMO_RAY_CPUS)
    t = time.perf_counter()
    if args.heads_from:
        _copy_heads(Path(args.heads_from, "k4"), k4.run_dir, list(NAMES))
    else:
        run_localize(k4)  # one model load, every target
    result["localize_s"] = time.perf_counter() - t
    first = k4.targets[0]
    one = target_config(k4, first).model_copy(update={"run_dir": str(out / f"one-{first.name}")})
    one = _knobs(one, args)
    HeadSet.load(Path(k4.run_dir, "targets", first.name, "heads.json")).save(Path(one.run_dir, "heads.json"))
    result["heads"] = {n: len(HeadSet.load(Path(k4.run_dir, "targets", n, "heads.json"))) for n in NAMES}
    result["union_heads"] = len(HeadSet.load(Path(k4.run_dir, "heads.json")))
    result["passes"] = []
    seen: set = set()
    for name in args.order.split(","):
        cfg = {"one": one, "k4": k4}[name]
        if name in seen:  # again, from scratch in its own run dir (the machine's noise)
            cfg = cfg.model_copy(update={"run_dir": cfg.run_dir + "-again"})
            _copy_heads(Path(k4.run_dir), cfg.run_dir, list(NAMES)) if name == "k4" else HeadSet.load(
                Path(one.run_dir, "heads.json")
            ).save(Path(cfg.run_dir, "heads.json"))
        seen.add(name)
        entry = {"pass": name, **_pass(cfg), "uptime": uptime()}
        entry["distill"] = _costs(cfg, args.rows)
        result["passes"].append(entry)
        print(json.dumps(entry, default=str), flush=True)
    has_one = any(p["pass"] == "one" for p in result["passes"])
    if has_one:  # the ratios (a K-target-only run: its precision frontier only)
        c1 = next(p for p in result["passes"] if p["pass"] == "one")["distill"]
        ck = next(p for p in result["passes"] if p["pass"] == "k4")["distill"]
        e1 = c1["exact_row_busy_s"]
        for p in result["passes"]:
            c = p["distill"]
            c["forwards_per_row"] = (c["busy_s_total"] + c["fit_s"]) / e1 / args.rows
        ones = [
            p["distill"]["busy_s_total"] + p["distill"]["fit_s"]
            for p in result["passes"]
            if p["pass"] == "one"
        ]
        result["k4_over_mean_one_busy_s"] = (ck["busy_s_total"] + ck["fit_s"]) / float(np.mean(ones))
        result["k4_over_one"] = {
            "busy_s": (ck["busy_s_total"] + ck["fit_s"]) / (c1["busy_s_total"] + c1["fit_s"]),
            "score_pass_wall_s": ck["wall_s"]["score_pass"] / c1["wall_s"]["score_pass"]
            if "score_pass" in c1["wall_s"]
            else None,
            "exact_row_busy_s": ck["exact_row_busy_s"] / e1,
            "per_pass_busy_s": {
                k: (ck["passes"][k]["busy_s"] / c1["passes"][k]["busy_s"])
                if c1["passes"][k]["busy_s"]
                else None
                for k in c1["passes"]
            },
        }
    result["precision"] = {}
    subsets: dict = {}
    for rule in RULES:
        kr = _with_rule(k4, rule)
        run_select(kr)
        prec = target_precision(kr)
        if has_one:
            run_select(_with_rule(one, rule))
            ref = selection_precision(
                str(data / "corpus"),
                str(Path(one.run_dir, "subset")),
                str(Path(one.run_dir, "scores")),
                label=f"is_clean_on_task_{first.name}",
            )
        subsets.setdefault(rule, {})["k4"] = {
            n: sorted(
                pq.read_table(Path(k4.run_dir, "targets", n, "subset"), columns=["id"])["id"].to_pylist()
            )
            for n in NAMES
        }
        result["precision"][rule] = {
            "k4": {n: prec[n]["selected"] for n in NAMES},
            "base_rate": {n: prec[n]["base_rate"] for n in NAMES},
        }
        if has_one:
            subsets[rule]["one"] = sorted(
                pq.read_table(Path(one.run_dir, "subset"), columns=["id"])["id"].to_pylist()
            )
            result["precision"][rule][f"one_{first.name}"] = ref["selected"]
    result["uptime_end"] = uptime()
    (out / "subsets.json").write_text(json.dumps(subsets))  # the selected ids per rule (for replay's checks)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "passes"}, indent=1, default=str))
    return result


# -- the offline replay ------------------------------------------------------------------------------
def _read_pass(run_dir: Path, name: str, columns: list[str]):
    import pyarrow as pa

    files = sorted((run_dir / "_state" / "distill" / name).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else None


def _rankings(run_dir: Path, cols: list[str], n_rows: int, cascade_fraction: float) -> dict:
    """The engine's refine ranking per score column over the predicted rows (ids, best first; its cascade
    band first by stage 2, then stage 1: scoring/distill.py), every predicted row's cascaded predicted score,
    and the OOD rows' ids."""
    bulk = _read_pass(run_dir, "bulk", ["id", "reason", "ood", *cols]).sort_by("id")
    ids = bulk.column("id").to_numpy()
    ok = bulk.column("reason").is_null().to_numpy(zero_copy_only=False)
    ood = bulk.column("ood").to_numpy(zero_copy_only=False).astype(bool)
    n_c = min(int(round(cascade_fraction * n_rows)), int(ok.sum()))
    pred, own = {}, {}
    for c in cols:
        pred[c] = np.where(ok, bulk.column(c).to_numpy(zero_copy_only=False).astype(float), -np.inf)
        own[c] = np.zeros(len(ids), dtype=bool)
        own[c][np.argsort(-pred[c], kind="stable")[:n_c]] = True
    cas = _read_pass(run_dir, "cascade", ["id", "ood", *cols])
    if cas is not None:
        at = np.searchsorted(ids, cas.column("id").to_numpy())
        assert np.array_equal(ids[at], cas.column("id").to_numpy())
        ood[at] |= cas.column("ood").to_numpy(zero_copy_only=False).astype(bool)
        for c in cols:
            mine = own[c][at]
            pred[c][at[mine]] = cas.column(c).to_numpy(zero_copy_only=False).astype(float)[mine]
    ranking = {c: ids[np.lexsort((-pred[c], ~own[c]))] for c in cols}
    return {"ids": ids, "pred": pred, "ranking": ranking, "ood": ids[ood]}


def _shared_set(ranking: dict, cols: list[str], band: int, budget: int | None) -> np.ndarray:
    """The shared refine set: the targets' top-``band`` rows taken round-robin (rank 1 of each target, then
    rank 2, ...) until ``budget`` distinct rows (None: the union of the bands, what the engine refines)."""
    if budget is None:
        return np.unique(np.concatenate([ranking[c][:band] for c in cols]))
    taken: list = []
    seen: set = set()
    for i in range(band):
        for c in cols:
            r = int(ranking[c][i])
            if r not in seen:
                if len(taken) >= budget:
                    return np.array(sorted(taken), dtype=np.int64)
                seen.add(r)
                taken.append(r)
    return np.array(sorted(taken), dtype=np.int64)


def _select(score, loss, ids, k: int, rule: str, sel) -> np.ndarray:
    """The ids ``rule`` selects (scoring/select.py's order: relevance, ties by id; scoring/quality.py)."""
    from p2d_ray.scoring.quality import pick_in_band

    if rule == "relevance":
        return ids[np.lexsort((ids, -score))[:k]]
    pick, _ = pick_in_band(score, loss, ids, k, sel.band_factor, sel.band_guard, False, sel.quality_weight)
    return ids[pick]


class _Replay:
    """One distilled run's scores with the refine pass replayed for a given refine set."""

    def __init__(self, run_dir: Path, cols: list[str], cascade_fraction: float):
        self.final = pq.read_table(run_dir / "scores", columns=["id", "score_source", "loss_full", *cols])
        self.final = self.final.sort_by("id")
        self.ids = self.final.column("id").to_numpy()
        self.src = self.final.column("score_source").to_numpy(zero_copy_only=False)
        self.loss = self.final.column("loss_full").to_numpy(zero_copy_only=False).astype(float)
        self.exact = {c: self.final.column(c).to_numpy(zero_copy_only=False).astype(float) for c in cols}
        self.rk = _rankings(run_dir, cols, len(self.ids), cascade_fraction)
        at = np.searchsorted(self.ids, self.rk["ids"])
        self.pred = {}
        for c in cols:
            p = self.exact[c].copy()  # the sample's rows keep their exact scores
            p[at] = self.rk["pred"][c]
            self.pred[c] = p

    def scores(self, col: str, refined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, loss_full) of every row when exactly ``refined`` (ids) were refined."""
        exact = self.src == "exact"
        exact[np.searchsorted(self.ids, refined)] = True
        if not set(refined.tolist()) <= set(self.ids[self.src == "refined"].tolist()):
            raise ValueError("a replayed refine set holds a row the run did not refine")
        return np.where(exact, self.exact[col], self.pred[col]), np.where(exact, self.loss, np.nan)


def replay(args) -> dict:
    import yaml

    from p2d_ray.config import P2DConfig

    out = Path(args.out)
    res = [json.loads(Path(f).read_text()) for f in args.run_json.split(",")]
    k4 = out / "k4"
    cfg = P2DConfig.model_validate(yaml.safe_load((k4 / "config.yaml").read_text()))
    names = [t.name for t in cfg.targets]
    cols = [f"score__{n}" for n in names]
    corpus = pq.read_table(out / "data" / "corpus").sort_by("id")
    n_rows = corpus.num_rows
    lab = {n: corpus.column(f"is_clean_on_task_{n}").to_numpy(zero_copy_only=False) for n in names}
    k = int(round(cfg.select.fraction * n_rows))
    try:  # the engine's own band size (its default: the selection's band)
        from p2d_ray.scoring.distill import refine_rows

        band = refine_rows(cfg.score, cfg.select, n_rows)
    except ImportError:  # an engine from before refine_rows (a255724): always a share of the corpus
        band = int(round(cfg.score.refine_fraction * n_rows))
    rp = _Replay(k4, cols, cfg.score.distill_cascade_fraction)
    assert np.array_equal(rp.ids, corpus.column("id").to_numpy())
    ood = rp.rk["ood"] if cfg.score.distill_ood_exact else np.zeros(0, dtype=np.int64)

    def precision(col, name, refined, rule):
        score, loss = rp.scores(col, np.union1d(refined, ood))
        picked = _select(score, loss, rp.ids, k, rule, cfg.select)
        return float(lab[name][np.searchsorted(rp.ids, picked)].mean()), picked

    # checks against the run itself: the uncapped replay = the K-target run's subsets; the first target's
    # band alone = its single-target run's subset
    checks = {}
    union = _shared_set(rp.rk["ranking"], cols, band, None)
    refined_run = rp.ids[rp.src == "refined"]
    checks["uncapped_union_equals_run_refined"] = bool(np.array_equal(np.union1d(union, ood), refined_run))
    first = names[0]
    subsets = json.loads((out / "subsets.json").read_text())
    for rule in RULES:
        for n, c in zip(names, cols, strict=True):
            p, picked = precision(c, n, union, rule)
            run_ids = set(subsets[rule]["k4"][n])
            checks[f"{n}/{rule}/uncapped"] = {
                "precision": p,
                "same_ids_as_run": len(run_ids & set(picked.tolist())),
            }
        p, picked = precision(cols[0], first, rp.rk["ranking"][cols[0]][:band], rule)
        same = len(set(subsets[rule]["one"]) & set(picked.tolist())) if "one" in subsets[rule] else None
        checks[f"{first}/{rule}/solo_vs_single_run"] = {"precision": p, "same_ids_as_single_run": same}
    # the frontier: a shared budget of B rows
    n_exact = int((rp.src == "exact").sum())
    # cost: every run JSON's passes of a kind averaged (busy seconds and rows per distilled pass, the fit)
    all_passes = [p for r in res for p in r["passes"]]

    def mean_run(kind: str) -> dict:
        got = [p["distill"] for p in all_passes if p["pass"] == kind]
        names_ = got[0]["passes"]
        return {
            "n": len(got),
            "passes": {
                k: {
                    "rows": float(np.mean([g["passes"][k]["rows"] for g in got])),
                    "busy_s": float(np.mean([g["passes"][k]["busy_s"] for g in got])),
                }
                for k in names_
            },
            "fit_s": float(np.mean([g["fit_s"] for g in got])),
            "busy_s_total": float(np.mean([g["busy_s_total"] for g in got])),
        }

    has_one = any(p["pass"] == "one" for p in all_passes)
    runs = {"one": mean_run("one") if has_one else None, "k4": mean_run("k4")}
    one_busy = runs["one"]["busy_s_total"] + runs["one"]["fit_s"] if has_one else float("nan")
    ck = runs["k4"]
    refine_row_busy = ck["passes"]["refine"]["busy_s"] / max(ck["passes"]["refine"]["rows"], 1)
    fixed_k4 = ck["busy_s_total"] - ck["passes"]["refine"]["busy_s"] + ck["fit_s"]
    budgets = {"solo_bands": None}
    for m in args.budgets.split(","):
        budgets[f"{m}x_band"] = int(round(float(m) * band))
    frontier = {}
    for label, b in budgets.items():
        refined = _shared_set(rp.rk["ranking"], cols, band, b) if label != "solo_bands" else None
        entry = {"budget_rows": b, "targets": {}}
        for n, c in zip(names, cols, strict=True):
            entry["targets"][n] = {}
            for rule in RULES:
                r = refined if refined is not None else rp.rk["ranking"][c][:band]
                entry["targets"][n][rule] = precision(c, n, r, rule)[0]
        if refined is not None:
            rows = len(np.union1d(refined, ood))
            entry["refined_rows"] = rows
            entry["busy_s"] = fixed_k4 + rows * refine_row_busy
            entry["over_one"] = entry["busy_s"] / one_busy
        frontier[label] = entry

    # a projection (NOT a measurement) to a larger corpus from this run's measured per-row busy seconds
    def per_row(c, name):
        ps = c["passes"].get(name) or {}
        return ps.get("busy_s", 0.0) / ps["rows"] if ps.get("rows") else 0.0

    projection = {}
    big = args.project_rows
    exact_big = min(max(round(0.02 * big), 1000), 100_000) + 200  # the product's default sample + audit
    for label, entry in frontier.items():
        if entry.get("refined_rows") is None or not has_one:
            continue
        one_run = runs["one"]

        def cost(c, cascade_share, refine_share):
            return (
                exact_big * per_row(c, "sample")
                + (big - exact_big) * per_row(c, "bulk")
                + cascade_share * big * per_row(c, "cascade")
                + refine_share * big * per_row(c, "refine")
            )

        c_one = cost(
            one_run,
            one_run["passes"].get("cascade", {}).get("rows", 0) / n_rows,
            one_run["passes"]["refine"]["rows"] / n_rows,
        )
        c_k4 = cost(
            ck, ck["passes"].get("cascade", {}).get("rows", 0) / n_rows, entry["refined_rows"] / n_rows
        )
        projection[label] = {"over_one": c_k4 / c_one}
    result = {
        "projection_rows": big,
        "projection_over_one": projection,
        "n_rows": n_rows,
        "k": k,
        "band_rows": band,
        "exact_rows_sample_audit": n_exact,
        "ood_rows": int(len(ood)),
        "union_rows_uncapped": int(len(union)),
        "runs_averaged": {k: (v or {}).get("n", 0) for k, v in runs.items()},
        "one_busy_s_mean": one_busy,
        "one_per_pass_busy_s_mean": {k: v["busy_s"] for k, v in runs["one"]["passes"].items()}
        if has_one
        else None,
        "k4_per_pass_busy_s_mean": {k: v["busy_s"] for k, v in ck["passes"].items()},
        "k4_fixed_busy_s": fixed_k4,
        "k4_refine_busy_s_per_row": refine_row_busy,
        "checks": checks,
        "frontier": frontier,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rows", type=int, default=2000)
    r.add_argument("--out", default="runs/s14/k4dist")
    r.add_argument("--json", default="benchmarks/results/targets/k4-distilled.json")
    r.add_argument("--model", default="smollm2-135m", help="p2d-demo: a fast smoke run of this script")
    r.add_argument("--sample", type=int, default=300)
    r.add_argument("--audit", type=int, default=100)
    r.add_argument("--refine", type=float, default=0.15, help="score.refine_fraction (set explicitly)")
    r.add_argument("--order", default="one,k4")
    r.add_argument("--heads-from", default=None, help="an earlier --out: its k4 run's heads, no localize")
    r.add_argument("--fresh", action="store_true", help="delete --out's run dirs first (the data stays)")
    q = sub.add_parser("replay")
    q.add_argument("--out", default="runs/s14/k4dist")
    q.add_argument("--json", default="benchmarks/results/targets/k4-distilled-replay.json")
    q.add_argument(
        "--run-json",
        default="benchmarks/results/targets/k4-distilled.json",
        help="the run's JSON (a,b: several runs' costs averaged)",
    )
    q.add_argument("--project-rows", type=int, default=100_000, help="the cost projection's corpus size")
    q.add_argument(
        "--budgets", default="0,0.5,1,1.5,2,3,4", help="shared budgets B, in multiples of one band"
    )
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else replay(args)


if __name__ == "__main__":
    main()
