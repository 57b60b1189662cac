"""The stage table: every stage's name, function, config sections and outputs, in pipeline order.

One table, read by ``p2d-ray run`` and ``compare`` (p2d_ray.pipeline), by resume fingerprints
(p2d_ray.rundir) and by the command line (one subcommand per stage). It is plain data (the function is a
``"module:function"`` string, imported only when the stage runs), so the stage functions themselves can
record their fingerprints from it without importing the orchestrator above them.

A stage's fingerprint covers its own sections and every upstream stage's (cumulative), so a changed key
reruns its stage and everything downstream. ``report`` is special: it covers the whole config plus every
upstream stage record (any rerun upstream invalidates it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function", taking the validated P2DConfig, returning a JSON-able dict
    sections: tuple[str, ...]  # config sections its output depends on (its own; upstream ones are added)
    outputs: tuple[str, ...]  # run-dir-relative paths a finished stage leaves behind
    summary: str  # one line for the command line: what it reads and writes
    # The stage's method, where a change of it (not of the config) must redo the stage's output: part of its
    # fingerprint and of every later stage's.
    version: str = ""


STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        "localize",
        "p2d_ray.heads.localize:run_localize",
        ("model", "localize", "seed"),
        ("heads.json",),
        "Stage 1: task heads from the probe set -> heads.json, heads.png",
    ),
    Stage(
        "score",
        "p2d_ray.scoring.pipeline:run_score",
        ("data", "score"),
        ("scores",),
        "Stage 2: per-row scores of the corpus on a Ray Data actor pool -> scores/, quarantine/",
    ),
    Stage(
        "select",
        "p2d_ray.scoring.select:run_select",
        ("select",),
        ("subset",),
        "scores -> the selected rows: subset/, selection.json, histogram.png",
    ),
    Stage(
        "train",
        "p2d_ray.training.trainer:run_train",
        ("train",),
        ("adapter",),
        "Stage 3: Ray Train + DeepSpeed on subset/ -> adapter/, train_summary.json, loss.png, tensorboard/",
    ),
    Stage(
        "evaluate",
        "p2d_ray.eval.evaluate:run_evaluate",
        ("evaluate",),
        ("eval.json",),
        "held-out loss / perplexity / exact match, base vs adapted -> eval.json, eval_samples.parquet",
    ),
    Stage(
        "baseline",
        "p2d_ray.baseline:run_baseline",
        ("report",),
        ("full_baseline.json",),
        "the AER denominator: full fine-tuning, same recipe, all rows (estimated or measured)"
        " -> full_baseline.json",
        # The estimate: the fastest of report.timing_steps full steps timed through the trainer (Session 15;
        # before it, steps timed in-process, without the trainer's per-step costs).
        version="trainer-min",
    ),
    Stage(
        "report",
        "p2d_ray.report.report:run_report",
        (),
        ("report.json",),
        "reads the outputs above -> report.json (stage seconds, AER, eval, precision), aer.png",
    ),
)

REPORT = "report"
STAGE_BY_NAME = {s.name: s for s in STAGE_TABLE}
# The stages `p2d-ray run` runs before the report (its fingerprint covers their records).
STAGES = tuple(s.name for s in STAGE_TABLE if s.name != REPORT)
