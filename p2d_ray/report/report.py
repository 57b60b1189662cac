"""The report step: stage timings, the AER with its inputs, the evaluation and selection precision in
``<run_dir>/report.json``, and quality-vs-AER for every variant that was run in ``<run_dir>/aer.png``.

Every stage's seconds come from the run directory's stage records (``RunDir.timings()``), so the report
can be rebuilt at any time from files alone. The one expensive input, full fine-tuning time, is cached in
``<run_dir>/full_baseline.json`` keyed by everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow.dataset as pads

from p2d_ray.config import P2DConfig
from p2d_ray.report.aer import ESTIMATED, MEASURED, aer, estimate_full_seconds, full_train_steps
from p2d_ray.report.plot import plot_aer, quality_of
from p2d_ray.report.precision import selection_precision
from p2d_ray.rundir import STAGES, RunDir
from p2d_ray.training.loop import global_batch, total_steps

BASELINE_DIR = "full_baseline"  # <run_dir>/full_baseline: the measured full fine-tuning run


def count_rows(path: Path | str) -> int:
    """Rows of a Parquet dataset from file metadata (no data read)."""
    return pads.dataset(str(path), format="parquet").count_rows()


def variant_name(cfg: P2DConfig) -> str:
    """``<adaptation> x <selection>``, e.g. ``heads x influence 10%``: one point of the AER plot."""
    sel = cfg.select
    amount = f"top {sel.top_k}" if sel.top_k is not None else f"{sel.fraction:.0%}"
    return f"{cfg.train.adaptation} x {cfg.score.scorer} {amount}"


def report_fingerprint(cfg: P2DConfig) -> str:
    """The whole config plus every upstream stage record: any rerun upstream invalidates the report."""
    run = RunDir(cfg.run_dir)
    records = {s: run.stage_record(s) for s in STAGES}
    payload = json.dumps([cfg.fingerprint(), records], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- the AER denominator --------------------------------------------------------------------------------
def _baseline_key(cfg: P2DConfig, n_full_rows: int, n_steps: int, mode: str) -> str:
    # Full fine-tuning time depends on the model, the data format, the trainer shape and the step count,
    # not on localisation, scoring or selection.
    train = cfg.train.model_dump(
        mode="json", exclude={"adaptation", "lora_r", "lora_alpha", "train_o_proj", "storage_path"}
    )
    payload = [cfg.fingerprint("model", "data"), train, n_full_rows, n_steps, mode, cfg.report.timing_steps]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def baseline_config(cfg: P2DConfig, n_steps: int, n_full_rows: int) -> P2DConfig:
    """The full fine-tuning baseline: same model, data and trainer, all weights, ``n_steps`` optimizer steps
    over the whole corpus (the subset run's epochs), in ``<run_dir>/full_baseline``."""
    from p2d_ray.data.ingest import corpus_parquet as corpus_path  # any corpus a user has, as Parquet

    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(Path(cfg.run_dir) / BASELINE_DIR)
    data["data"]["corpus_path"] = corpus_path(cfg)
    data["report"]["full_baseline"] = False
    per_epoch = math.ceil(n_full_rows / global_batch(cfg.train))
    data["train"].update(
        adaptation="full", storage_path=None, max_steps=n_steps, epochs=max(1, math.ceil(n_steps / per_epoch))
    )
    return P2DConfig.model_validate(data)


def measure_full_baseline(cfg: P2DConfig, n_steps: int, n_full_rows: int) -> dict:
    """Full fine-tuning on the whole corpus through the same trainer, then evaluated like the subset run."""
    from p2d_ray.eval.evaluate import run_evaluate
    from p2d_ray.training.trainer import run_train

    base_cfg = baseline_config(cfg, n_steps, n_full_rows)
    run_train(base_cfg, data_path=base_cfg.data.corpus_path)
    seconds = RunDir(base_cfg.run_dir).timings()["train"]
    evaluation = run_evaluate(base_cfg)
    return {"full_train_seconds": seconds, "baseline_run_dir": base_cfg.run_dir, "baseline_eval": evaluation}


def full_baseline(cfg: P2DConfig, n_full_rows: int, n_subset_rows: int, subset_steps: int) -> dict:
    """Full fine-tuning time on all rows for the subset run's epochs: measured (``report.full_baseline``)
    or estimated from timed steps. Cached in ``<run_dir>/full_baseline.json`` under a key of its inputs."""
    run = RunDir(cfg.run_dir)
    mode = MEASURED if cfg.report.full_baseline else ESTIMATED
    n_steps = full_train_steps(n_full_rows, n_subset_rows, subset_steps, cfg.train)
    key = _baseline_key(cfg, n_full_rows, n_steps, mode)
    cache = run.path("full_baseline.json")
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    out = {"key": key, "label": mode, "n_full_rows": n_full_rows, "full_train_steps": n_steps}
    if mode == MEASURED:
        out.update(measure_full_baseline(cfg, n_steps, n_full_rows))
    else:
        from p2d_ray.training.trainer import time_train_steps

        timed = time_train_steps(cfg, "full", cfg.report.timing_steps)
        out.update(
            full_step_seconds=timed["step_seconds"],
            timing_steps=timed["n_steps"],
            full_trainable_params=timed["trainable_params"],
            full_train_seconds=estimate_full_seconds(timed["step_seconds"], n_steps),
        )
    cache.write_text(json.dumps(out, indent=1))
    return out


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
    from p2d_ray.data.ingest import corpus_parquet as corpus_path  # any corpus a user has, as Parquet

    run = RunDir(cfg.run_dir)
    timings = run.timings()
    missing = [s for s in ("localize", "score", "select", "train") if s not in timings]
    if missing:
        raise ValueError(f"report: stages {missing} have not run in {cfg.run_dir} (run `p2d-ray run` first)")
    with run.timed("report", report_fingerprint(cfg)):
        n_full, n_subset = count_rows(run.scores), count_rows(run.subset)
        summary_path = run.path("train_summary.json")
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        subset_steps = summary.get("steps") or total_steps(n_subset, cfg.train)  # steps the trainer made
        full = full_baseline(cfg, n_full, n_subset, subset_steps)
        skip = ("key", "label", "full_train_seconds", "baseline_eval")
        inputs = {k: v for k, v in full.items() if k not in skip}
        inputs.update(n_subset_rows=n_subset, subset_train_steps=subset_steps)
        evaluation = (
            json.loads(run.path("eval.json").read_text()) if run.path("eval.json").is_file() else None
        )
        heads = json.loads(run.heads_json.read_text()) if run.heads_json.is_file() else {}
        report = {
            "run_dir": str(cfg.run_dir),
            "variant": variant_name(cfg),
            "adaptation": cfg.train.adaptation,
            "scorer": cfg.score.scorer,
            "heads": heads.get("heads"),
            "stage_seconds": timings,
            "aer": aer(timings, full["full_train_seconds"], full["label"], **inputs),
            "eval": evaluation,
            "full_baseline_eval": full.get("baseline_eval"),
            "selection_precision": selection_precision(
                corpus_path(cfg), str(run.subset), str(run.scores), cfg.data.id_column
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
