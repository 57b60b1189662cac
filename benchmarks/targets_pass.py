"""K targets in one scoring pass vs one target's pass, side by side in one process (issue 27).

    flock /tmp/smollm2.lock nice -n 5 .venv/bin/python -m benchmarks.targets_pass \\
        --out runs/s11/targets --json benchmarks/results/targets/demo-k4.json

On the 300-row demo corpus (draw 0; the multi-target copy with one ``is_clean_on_task_<target>`` label per
target, same rows and order) with the demo's SmolLM2 knobs (exact gradient_alignment, 2 actors of 0.5 CPU,
batch 16, max_batch_tokens 512): one localize of K = 4 targets (arithmetic and units from the demo generator,
capitals and letters from ``benchmarks/unseen_mixture.py``'s probe sets: their rows are absent from this
corpus, so they count for cost only), then the scoring passes, in this order, each in its own run dir with the
heads that localize found: one target (arithmetic, the ordinary single-target pass), K = 2 (arithmetic,
units), K = 4, and (``--repeat``) the single-target pass again, for the noise of the machine. Reported per pass:
the pass's seconds (``score_stats.json`` wall_s.score_pass: the Ray Data pass itself), the probe-gradient
seconds (one Ray task per target), and rows/s; per target of the K = 2 pass: its top-10 % precision
(select.rule=relevance) and, against the single-target exact references of demo draw 0
(``runs/m29/d0/<target>/gradient_alignment/task``, same knobs), whether the heads are equal, the largest
per-row score difference and the reference's precision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet

REFERENCE = "runs/m29/d0/{target}/gradient_alignment/task"


def _base(run_dir: str, targets: list[dict], corpus: str, model: str, fraction: float = 0.10):
    from p2d_ray.demo import DEMO_KNOBS

    knobs = json.loads(json.dumps(DEMO_KNOBS))
    knobs["run_dir"] = run_dir
    knobs["model"]["name_or_path"] = model
    knobs["data"]["corpus_path"] = corpus
    knobs["score"]["scorer"] = "gradient_alignment"
    knobs["score"]["strategy"] = "exact"
    knobs["select"] = {"fraction": fraction, "rule": "relevance"}
    return build_config({**knobs, "targets": targets})


def _copy_heads(src, dst, names):
    """The heads localize found (``src/targets/<name>``) into the run dir ``dst``, with their union."""
    dst = Path(dst)
    found = []
    for n in names:
        hs = HeadSet.load(Path(src, "targets", n, "heads.json"))
        hs.save(dst / "targets" / n / "heads.json")
        found.append(hs)
    union = HeadSet(tuple(h for hs in found for h in hs.heads), found[0].geometry, dict(found[0].meta))
    union.save(dst / "heads.json")


def _pass(cfg) -> dict:
    from p2d_ray.scoring.pipeline import run_score

    t = time.perf_counter()
    out = run_score(cfg)
    stats = json.loads(Path(cfg.run_dir, "score_stats.json").read_text())
    return {
        "run_dir": cfg.run_dir,
        "targets": [t.name for t in cfg.targets] or ["(single)"],
        "stage_s": time.perf_counter() - t,
        "score_pass_s": stats["wall_s"].get("score_pass"),
        "probe_gradient_s": stats["wall_s"].get("probe_gradient"),
        "first_result_s": stats["wall_s"].get("first_result"),
        "busy_score_s": stats["busy_s"]["score"],
        "rows_per_s": out["rows_per_s"],
        "rows_scored": out["rows_scored"],
        "max_peak_rss_gb": (stats["actors"]["max_peak_rss_bytes"] or 0) / 1e9,
    }


def _reference(cfg, name: str) -> dict:
    """The shared pass's target ``name`` against the single-target exact reference run, when there."""
    from p2d_ray.report.precision import selection_precision
    from p2d_ray.targets import target_dir

    ref = Path(REFERENCE.format(target=name))
    if not (ref / "scores").is_dir():
        return {"reference": None}
    mine = target_dir(cfg.run_dir, name)
    same_heads = HeadSet.load(mine / "heads.json").heads == HeadSet.load(ref / "heads.json").heads
    a = pq.read_table(mine / "scores").sort_by("id")
    b = pq.read_table(ref / "scores").sort_by("id")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    diff = np.abs(a.column("score").to_numpy() - b.column("score").to_numpy())
    from p2d_ray.assets import demo_data

    prec = selection_precision(str(demo_data(name).corpus_dir), str(ref / "subset"), str(ref / "scores"))
    overlap = len(
        set(pq.read_table(mine / "subset").column("id").to_pylist())
        & set(pq.read_table(ref / "subset").column("id").to_pylist())
    )
    return {
        "reference": str(ref),
        "same_heads": same_heads,
        "max_abs_score_diff": float(diff.max()),
        "reference_precision": prec["selected"],
        "selected_overlap": overlap,
    }


def _late(out: Path, k4, corpus: str, args) -> dict:
    """arithmetic scored in a shared pass (which stores the features), then units added later: the late
    target's seconds (its exact sample pass, reading the features, the fit) and its top-10 % precision."""
    from p2d_ray.heads.localize import run_localize
    from p2d_ray.scoring.select import run_select
    from p2d_ray.targets import target_precision

    run_dir = out / "late"
    shutil.rmtree(run_dir, ignore_errors=True)
    first = _base(str(run_dir), [{"name": "arithmetic"}], corpus, args.model)
    # localize itself (deterministic: the heads of k4's localize): copying k4's union of two targets here made
    # the shared pass's union differ from what localize writes once units is added later (a refused resume)
    run_localize(first)
    shared = _pass(first)
    cfg = _base(str(run_dir), [{"name": "arithmetic"}, {"name": "units", "later": True}], corpus, args.model)
    cfg = cfg.model_copy(
        update={
            "score": cfg.score.model_copy(
                update={"distill_sample_fraction": args.late, "distill_sample_min": 2}
            )
        }
    )
    run_localize(cfg)
    from p2d_ray.scoring.pipeline import run_score

    t = time.perf_counter()
    run_score(cfg)
    late_s = time.perf_counter() - t
    late = json.loads(Path(cfg.run_dir, "late_targets.json").read_text())
    run_select(cfg)
    prec = target_precision(cfg)
    return {
        "shared_pass_one_target": shared,
        "late_target_stage_s": late_s,
        "late": late,
        "units_precision_top10": (prec["units"] or {}).get("selected"),
        "arithmetic_precision_top10": (prec["arithmetic"] or {}).get("selected"),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/s11/targets")
    p.add_argument("--json", default="benchmarks/results/targets/demo-k4.json")
    p.add_argument("--unseen", default="runs/unseen", help="benchmarks.unseen_mixture's data dirs (probes)")
    p.add_argument("--repeat", action="store_true", help="the single-target pass again at the end")
    p.add_argument(
        "--order",
        default=None,
        help="the passes, e.g. one,k4,k2,one,k4,k2 (alternating, so a changing machine load hits each alike); "
        "every pass rescored from scratch; heads and probe gradients of an earlier run in --out are reused",
    )
    p.add_argument("--model", default="smollm2-135m", help="p2d-demo: a fast smoke run of this script")
    p.add_argument(
        "--late",
        type=float,
        default=None,
        help="also: arithmetic in the shared pass, units added later (later: true) with this sample fraction: "
        "its cost (exact sample pass + fit + reading the features) and precision vs its exact run",
    )
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)

    from p2d_ray.assets.synthetic import demo_targets_corpus
    from p2d_ray.demo import DEMO_RAY_CPUS
    from p2d_ray.heads.localize import run_localize
    from p2d_ray.runtime import ensure_ray
    from p2d_ray.scoring.select import run_select
    from p2d_ray.targets import target_config, target_precision

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    corpus = str(demo_targets_corpus(["arithmetic", "units"]))
    demo = [{"name": "arithmetic"}, {"name": "units"}]
    unseen = [
        {
            "name": n,
            "probe_path": f"{args.unseen}/{n}/probe.parquet",
            "heldout_path": f"{args.unseen}/{n}/heldout.parquet",
        }
        for n in ("capitals", "letters")
    ]
    k4 = _base(str(out / "k4"), demo + unseen, corpus, args.model)
    k2 = _base(str(out / "k2"), demo, corpus, args.model)
    result: dict = {"corpus": corpus, "model": k4.model.name_or_path, "passes": []}
    ensure_ray(DEMO_RAY_CPUS)
    t = time.perf_counter()
    if not (args.order and Path(k4.run_dir, "heads.json").is_file()):
        run_localize(k4)  # one model load, four targets
        result["localize_k4_s"] = time.perf_counter() - t
    _copy_heads(k4.run_dir, k2.run_dir, ["arithmetic", "units"])
    one = target_config(k4, k4.targets[0]).model_copy(update={"run_dir": str(out / "one-arithmetic")})
    HeadSet.load(Path(k4.run_dir, "targets", "arithmetic", "heads.json")).save(
        Path(one.run_dir, "heads.json")
    )

    if args.late:
        result["late"] = _late(out, k4, corpus, args)
    if args.order:
        by_name = {"one": one, "k2": k2, "k4": k4}
        for name in args.order.split(","):
            cfg = by_name[name]
            for d in ("scores", "quarantine", "_state"):
                shutil.rmtree(Path(cfg.run_dir, d), ignore_errors=True)
            result["passes"].append({"pass": name, **_pass(cfg)})
            print(json.dumps(result["passes"][-1]), flush=True)
        for name in ("k2", "k4"):
            mine = [p["score_pass_s"] for p in result["passes"] if p["pass"] == name]
            base = [p["score_pass_s"] for p in result["passes"] if p["pass"] == "one"]
            busy = [p["busy_score_s"] for p in result["passes"] if p["pass"] == name]
            busy1 = [p["busy_score_s"] for p in result["passes"] if p["pass"] == "one"]
            if mine and base:
                result[f"{name}_vs_one"] = {
                    "score_pass_s_ratio_of_medians": float(np.median(mine) / np.median(base)),
                    "busy_score_s_ratio_of_medians": float(np.median(busy) / np.median(busy1)),
                }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "passes"}, indent=1, default=str))
        return result

    order = [one, k2, k4] + (
        [one.model_copy(update={"run_dir": str(out / "one-arithmetic-again")})] if args.repeat else []
    )
    for cfg in order:
        if cfg.run_dir.endswith("again"):
            HeadSet.load(Path(one.run_dir, "heads.json")).save(Path(cfg.run_dir, "heads.json"))
        result["passes"].append(_pass(cfg))
        print(json.dumps(result["passes"][-1]), flush=True)

    base = result["passes"][0]["score_pass_s"]
    for ps in result["passes"]:
        ps["score_pass_vs_one_target"] = ps["score_pass_s"] / base
    run_select(k2)
    run_select(k4)
    prec = target_precision(k2)
    result["k2_targets"] = {
        n: {"precision_top10": (prec[n] or {}).get("selected"), **_reference(k2, n)}
        for n in ("arithmetic", "units")
    }
    run_select(one)
    from p2d_ray.report.precision import selection_precision

    sp = selection_precision(
        corpus,
        str(Path(one.run_dir, "subset")),
        str(Path(one.run_dir, "scores")),
        label="is_clean_on_task_arithmetic",
    )
    result["one_target_arithmetic_precision_top10"] = sp["selected"]
    result["heads"] = {
        n: len(HeadSet.load(Path(k4.run_dir, "targets", n, "heads.json")))
        for n in [t.name for t in k4.targets]
    }
    result["union_heads"] = {
        "k2": len(HeadSet.load(Path(k2.run_dir, "heads.json"))),
        "k4": len(HeadSet.load(Path(k4.run_dir, "heads.json"))),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
