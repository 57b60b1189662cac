"""The run directory: one place every stage reads from and writes to.

Layout (every stage reads only what the stage before it wrote, so any stage can be rerun or resumed)::

    <run_dir>/config.yaml          resolved config of the last command
    <run_dir>/heads.json, heads.png                 Stage 1 (localize)
    <run_dir>/scores/*.parquet                       Stage 2 (score), one file per input shard
    <run_dir>/_state/scores/                         its resume markers and manifest (beside, not inside)
    <run_dir>/quarantine/*.parquet                   rows that could not be scored, with a `reason`
    <run_dir>/score_summary.json, score_stats.json
    <run_dir>/subset/*.parquet, selection.json, histogram.png   (select)
    <run_dir>/train/ (checkpoints), adapter/, merged/, train_summary.json, loss.png   Stage 3 (train)
    <run_dir>/tensorboard/train/   TensorBoard event files of the training run
    <run_dir>/eval.json, full_baseline.json (+ full_baseline/ when measured), report.json, aer.png
    <run_dir>/stages/<stage>.json  {"seconds": ..., "fingerprint": ...}: timings for the AER, and the
                                   marker that lets `p2d-ray run` skip a finished stage
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

from p2d_ray.stages import REPORT, STAGE_BY_NAME, STAGE_TABLE, STAGES

__all__ = ["RunDir", "STAGES", "stage_fingerprint"]


def _entry(name: str) -> property:
    """A read-only ``RunDir`` attribute: the path of ``name`` in the layout above."""
    return property(lambda self: self.path(name), doc=f"<run_dir>/{name}")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    heads_json = _entry("heads.json")
    scores = _entry("scores")
    quarantine = _entry("quarantine")
    subset = _entry("subset")
    adapter = _entry("adapter")

    # -- stage records ----------------------------------------------------------------------------
    def _record_path(self, stage: str) -> Path:
        return self.path("stages", f"{stage}.json")

    def stage_record(self, stage: str) -> dict | None:
        p = self._record_path(stage)
        return json.loads(p.read_text()) if p.is_file() else None

    def stage_done(self, stage: str, fingerprint: str) -> bool:
        rec = self.stage_record(stage)
        return rec is not None and rec.get("fingerprint") == fingerprint

    def record_stage(self, stage: str, seconds: float, fingerprint: str, **extra) -> None:
        p = self._record_path(stage)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"stage": stage, "seconds": seconds, "fingerprint": fingerprint, **extra}))

    @contextmanager
    def timed(self, stage: str, fingerprint: str, **extra):
        """Time a stage and record it only if it finishes (a crashed stage leaves no marker)."""
        t0 = time.perf_counter()
        yield
        self.record_stage(stage, time.perf_counter() - t0, fingerprint, **extra)

    def outputs(self, stage: str) -> list[Path]:
        """What a finished stage leaves behind (``stages.STAGE_TABLE``)."""
        return [self.path(p) for p in STAGE_BY_NAME[stage].outputs]

    def is_done(self, stage: str, fingerprint: str) -> bool:
        """Recorded with this fingerprint and its outputs still there (a record whose outputs were deleted
        by hand is not done)."""
        return self.stage_done(stage, fingerprint) and all(p.exists() for p in self.outputs(stage))

    def timings(self) -> dict[str, float]:
        """Seconds of every stage recorded here (not the report's), in pipeline order."""
        out = {}
        for stage in STAGES:
            rec = self.stage_record(stage)
            if rec is not None:
                out[stage] = rec["seconds"]
        return out


def stage_fingerprint(cfg, stage: str) -> str:
    """Fingerprint of everything ``stage``'s output depends on: its config sections and all upstream ones
    (``stages.STAGE_TABLE``); for ``report``, the whole config plus every upstream stage record.

    ``data`` sits with score (not localize) except for the probe path, which localize needs.
    """
    if stage == REPORT:
        run = RunDir(cfg.run_dir)
        records = {s: run.stage_record(s) for s in STAGES}
        payload = json.dumps([cfg.fingerprint(), records], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
    if stage not in STAGE_BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; allowed: {list(STAGE_BY_NAME)}")
    sections: list[str] = []
    versions: list[str] = []
    for entry in STAGE_TABLE:
        sections.extend(entry.sections)
        versions.extend([f"{entry.name}={entry.version}"] if entry.version else [])
        if entry.name == stage:
            break
    extra = cfg.data.probe_path or ""
    if versions:
        extra += "|" + ",".join(versions)
    if cfg.localize.contrast == "corpus":  # contrastive localisation also reads the corpus
        extra += "|" + (cfg.data.corpus_path or "")
    if cfg.targets:  # several targets: every stage from localize on depends on the target set
        extra += (
            "|targets="
            + hashlib.sha256(
                json.dumps([t.model_dump(mode="json") for t in cfg.targets], sort_keys=True).encode()
            ).hexdigest()[:16]
        )
    return cfg.fingerprint(*sections) + ":" + extra
