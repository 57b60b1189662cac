"""The report step: stage timings, the AER with its inputs, the evaluation and selection precision in
``<run_dir>/report.json``, and quality-vs-AER for every variant that was run in ``<run_dir>/aer.png``.

The report only reads what the stages wrote, so it can be rebuilt at any time from files alone, in
seconds: every stage's seconds from the stage records (``RunDir.timings()``), the AER denominator and its
recipe from ``full_baseline.json`` (the ``baseline`` stage), ``eval.json``, ``heads.json``, and the corpus /
subset / scores Parquet for the selection precision.
"""

from __future__ import annotations

import json
from pathlib import Path

from p2d_ray.config import P2DConfig
from p2d_ray.report.aer import MEASURED, aer
from p2d_ray.report.plot import plot_aer, quality_of
from p2d_ray.report.precision import selection_precision
from p2d_ray.rundir import RunDir, stage_fingerprint

BASELINE_JSON = "full_baseline.json"  # written by the baseline stage (p2d_ray.baseline)


def variant_name(cfg: P2DConfig) -> str:
    """``<adaptation> x <selection>``, e.g. ``heads x influence 10%``: one point of the AER plot."""
    sel = cfg.select
    amount = f"top {sel.top_k}" if sel.top_k is not None else f"{sel.fraction:.0%}"
    return f"{cfg.train.adaptation} x {cfg.score.scorer} {amount}"


def report_fingerprint(cfg: P2DConfig) -> str:
    """The whole config plus every upstream stage record: any rerun upstream invalidates the report."""
    return stage_fingerprint(cfg, "report")


# -- variants for the plot ------------------------------------------------------------------------------
def find_variant_reports(cfg: P2DConfig) -> list[Path]:
    """This run's report, every sibling run dir's ``report.json`` and those listed in ``report.variants``
    (a run dir or a report.json path), without duplicates."""
    own = RunDir(cfg.run_dir).path("report.json")
    found = [own, *sorted(Path(cfg.run_dir).resolve().parent.glob("*/report.json"))]
    for v in cfg.report.variants:
        p = Path(v)
        found.append(p if p.suffix == ".json" else p / "report.json")
    out, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen and p.is_file():
            seen.add(key)
            out.append(p)
    return out


def variant_points(reports: list[dict]) -> tuple[list[dict], float | None]:
    """One plot point per report with an AER and an adapted-model quality (+ its measured full baseline),
    and the base model's quality (from the first report that has one)."""
    points, base = [], None
    for r in reports:
        q = quality_of(r.get("eval"), "adapted")
        if q is not None and r.get("aer"):
            points.append(
                {
                    "variant": r["variant"],
                    "aer": r["aer"]["aer"],
                    "aer_label": r["aer"]["label"],
                    "quality": q[0],
                    "quality_name": q[1],
                }
            )
        qf = quality_of(r.get("full_baseline_eval"), "adapted")
        if qf is not None:
            points.append(
                {
                    "variant": "full x all data",
                    "aer": 1.0,
                    "aer_label": MEASURED,
                    "quality": qf[0],
                    "quality_name": qf[1],
                }
            )
        qb = quality_of(r.get("eval"), "base")
        if base is None and qb is not None:
            base = qb[0]
    # Only variants measured like the first report (this run) share its quality axis.
    if points:
        points = [p for p in points if p["quality_name"] == points[0]["quality_name"]]
    return points, base


# -- the step ---------------------------------------------------------------------------------------------
def run_report(cfg: P2DConfig) -> dict:
    """Write ``report.json`` and ``aer.png`` for ``cfg.run_dir``; returns the report.

    Raises:
        ValueError: a stage the AER needs has not run in this run directory.
    """
    if cfg.targets:  # several targets: one row per target (p2d_ray/targets.py), no single-target AER
        from p2d_ray.targets import targets_report

        return targets_report(cfg)
    from p2d_ray.assets.paths import corpus_parquet

    run = RunDir(cfg.run_dir)
    timings = run.timings()
    missing = [s for s in ("localize", "score", "select", "train") if s not in timings]
    if missing:
        raise ValueError(f"report: stages {missing} have not run in {cfg.run_dir} (run `p2d-ray run` first)")
    if not run.path(BASELINE_JSON).is_file():
        raise ValueError(
            f"report: {run.path(BASELINE_JSON)} is missing: the AER denominator comes from the baseline stage "
            "(run `p2d-ray baseline` or `p2d-ray run` first)"
        )
    with run.timed("report", report_fingerprint(cfg)):
        full = json.loads(run.path(BASELINE_JSON).read_text())
        skip = ("key", "label", "full_train_seconds", "baseline_eval")
        inputs = {k: v for k, v in full.items() if k not in skip}
        evaluation = (
            json.loads(run.path("eval.json").read_text()) if run.path("eval.json").is_file() else None
        )
        heads = json.loads(run.heads_json.read_text()) if run.heads_json.is_file() else {}
        selection = run.path("selection.json")
        # the rule the selection applied (relevance_then_quality by default; relevance for other columns)
        rule = json.loads(selection.read_text()).get("rule", {}) if selection.is_file() else {}
        report = {
            "run_dir": str(cfg.run_dir),
            "variant": variant_name(cfg),
            "adaptation": cfg.train.adaptation,
            "scorer": cfg.score.scorer,
            "select_rule": rule.get("name"),
            "heads": heads.get("heads"),
            "stage_seconds": timings,
            "aer": aer(timings, full["full_train_seconds"], full["label"], **inputs),
            "eval": evaluation,
            "full_baseline_eval": full.get("baseline_eval"),
            "selection_precision": selection_precision(
                corpus_parquet(cfg), str(run.subset), str(run.scores), cfg.data.id_column
            ),
        }
        run.path("report.json").write_text(json.dumps(report, indent=1, default=str))
        reports = [json.loads(p.read_text()) for p in find_variant_reports(cfg)]
        points, base = variant_points(reports)
        if points:
            plot_aer(points, run.path("aer.png"), base_quality=base)
            report["plot"] = str(run.path("aer.png"))
        report["variants_plotted"] = [p["variant"] for p in points]
        run.path("report.json").write_text(json.dumps(report, indent=1, default=str))
    return report
