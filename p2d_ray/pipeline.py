"""``p2d-ray run``: every stage into one run directory, then the report; finished stages are skipped.

A stage is skipped when its record in ``<run_dir>/stages/`` carries the fingerprint of the current config
(its own sections and every upstream one, see ``rundir.stage_fingerprint``) and its outputs are still
there. Fingerprints are cumulative, so a changed key reruns its stage and everything downstream, and a
rerun of an unchanged config only resumes what did not finish.
"""

from __future__ import annotations

import importlib

from p2d_ray.cli import COMMANDS
from p2d_ray.config import P2DConfig
from p2d_ray.rundir import STAGES, RunDir, stage_fingerprint

REPORT = "report"


def stage_outputs(run: RunDir, stage: str) -> list:
    """What a finished stage leaves behind; a record without its outputs (deleted by hand) is not done."""
    return {
        "localize": [run.heads_json],
        "score": [run.scores],
        "select": [run.subset],
        "train": [run.adapter],
        "evaluate": [run.path("eval.json")],
        REPORT: [run.path("report.json")],
    }[stage]


def is_done(run: RunDir, stage: str, fingerprint: str) -> bool:
    return run.stage_done(stage, fingerprint) and all(p.exists() for p in stage_outputs(run, stage))


def _stage_function(stage: str):
    module, func = COMMANDS[stage].split(":")
    return getattr(importlib.import_module(module), func)


def run_pipeline(cfg: P2DConfig, stages: tuple[str, ...] = STAGES, report: bool = True) -> dict:
    """Run ``stages`` in order, then (``report=True``) the report step.

    Returns ``{stage: result}``; a skipped stage's result is its record plus ``"skipped": True``.
    """
    from p2d_ray.report.report import report_fingerprint, run_report

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; allowed: {list(STAGES)}")
    run = RunDir(cfg.run_dir)
    # Every input of every stage that will run is checked before the first one starts.
    from p2d_ray.validate import preflight

    preflight(cfg, [s for s in stages if not is_done(run, s, stage_fingerprint(cfg, s))])
    cfg.save(run.path("config.yaml"))
    results: dict = {}
    for stage in stages:
        if is_done(run, stage, stage_fingerprint(cfg, stage)):
            results[stage] = {"skipped": True, **(run.stage_record(stage) or {})}
            continue
        results[stage] = _stage_function(stage)(cfg)
    if report:
        # After the stages: its fingerprint covers their records, so any stage that reran invalidates it.
        if is_done(run, REPORT, report_fingerprint(cfg)):
            results[REPORT] = {"skipped": True, **(run.stage_record(REPORT) or {})}
        else:
            results[REPORT] = run_report(cfg)
    return results
