"""``p2d-ray run``: every stage of the stage table into one run directory; finished stages are skipped.

The stages, their functions, config sections and outputs are ``p2d_ray.stages.STAGE_TABLE``: localize ->
score -> select -> train -> evaluate -> baseline -> report. A stage is skipped when its record in
``<run_dir>/stages/`` carries the fingerprint of the current config (its own sections and every upstream
one, see ``rundir.stage_fingerprint``) and its outputs are still there. Fingerprints are cumulative, so a
changed key reruns its stage and everything downstream, and a rerun of an unchanged config only resumes
what did not finish. The report comes last: its fingerprint covers the other stages' records.

``COMMANDS`` (every stage plus run / validate / compare / demo) is what the command line offers.
"""

from __future__ import annotations

import importlib
import sys

from p2d_ray.config import P2DConfig
from p2d_ray.rundir import RunDir, stage_fingerprint
from p2d_ray.stages import REPORT, STAGE_BY_NAME, STAGE_TABLE, STAGES

# command -> "module:function"; each function takes the validated P2DConfig and returns a JSON-able dict.
COMMANDS: dict[str, str] = {
    **{s.name: s.function for s in STAGE_TABLE},
    "run": "p2d_ray.pipeline:run_pipeline",
    "validate": "p2d_ray.validate:run_validate",
    "compare": "p2d_ray.compare:run_compare",
    "demo": "p2d_ray.demo:run_demo",
}


def resolve(target: str):
    """``"module:function"`` -> the function (imported only now: the command line stays fast)."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def stage_outputs(run: RunDir, stage: str) -> list:
    """What a finished stage leaves behind (the table's outputs, under ``run``)."""
    return run.outputs(stage)


def is_done(run: RunDir, stage: str, fingerprint: str) -> bool:
    """Recorded with this fingerprint and its outputs still there."""
    return run.is_done(stage, fingerprint)


def run_stage(cfg: P2DConfig, stage: str) -> dict:
    """Run one stage unless it is done with this config; a skipped stage's result is its record plus
    ``"skipped": True``."""
    run = RunDir(cfg.run_dir)
    if run.is_done(stage, stage_fingerprint(cfg, stage)):
        print(f"{stage}: already done with this config (resume), skipped", file=sys.stderr, flush=True)
        return {"skipped": True, **(run.stage_record(stage) or {})}
    # Every stage says what it starts; each ends with its own "<stage>: done in ...; wrote ..." line.
    print(f"{stage}: {STAGE_BY_NAME[stage].summary}", file=sys.stderr, flush=True)
    return resolve(STAGE_BY_NAME[stage].function)(cfg)


def run_pipeline(cfg: P2DConfig, stages: tuple[str, ...] = STAGES, report: bool = True) -> dict:
    """Run ``stages`` in table order, then (``report=True``) the report.

    Returns ``{stage: result}``; a skipped stage's result is its record plus ``"skipped": True``.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; allowed: {list(STAGES)}")
    if cfg.targets:  # several targets: shared stages once, train / evaluate per target (p2d_ray/targets.py)
        from p2d_ray.targets import run_pipeline_targets

        return run_pipeline_targets(cfg, stages, report)
    if "train" in stages:  # a missing or broken tracker fails in one line before anything is read or run
        from p2d_ray.training.tracking import check_tracking

        check_tracking(cfg)
    run = RunDir(cfg.run_dir)
    # Every input of every stage that will run is checked before the first one starts.
    from p2d_ray.validate import preflight

    preflight(cfg, [s for s in stages if not is_done(run, s, stage_fingerprint(cfg, s))])
    cfg.save(run.path("config.yaml"))
    results: dict = {}
    for stage in stages:
        results[stage] = run_stage(cfg, stage)
    if report:
        # After the stages: its fingerprint covers their records, so any stage that reran invalidates it.
        results[REPORT] = run_stage(cfg, REPORT)
    return results
