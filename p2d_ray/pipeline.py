"""``p2d-ray run``: every stage into one run directory; a stage whose outputs match the config is skipped."""

from __future__ import annotations

import importlib

from p2d_ray.cli import COMMANDS
from p2d_ray.config import P2DConfig
from p2d_ray.rundir import STAGES, RunDir, stage_fingerprint


def run_pipeline(cfg: P2DConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run ``stages`` in order. Each stage function records its own timing and fingerprint in
    ``<run_dir>/stages/``; a stage already recorded with the same fingerprint is skipped (resume)."""
    run = RunDir(cfg.run_dir)
    cfg.save(run.path("config.yaml"))
    results: dict = {}
    for stage in stages:
        if run.stage_done(stage, stage_fingerprint(cfg, stage)):
            results[stage] = {"skipped": True, **(run.stage_record(stage) or {})}
            continue
        module, func = COMMANDS[stage].split(":")
        results[stage] = getattr(importlib.import_module(module), func)(cfg)
    return results
