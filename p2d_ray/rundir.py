"""The run directory: one place every stage reads from and writes to.

Layout (every stage reads only what the stage before it wrote, so any stage can be rerun or resumed)::

    <run_dir>/config.yaml          resolved config of the last command
    <run_dir>/heads.json, heads.png                 Stage 1 (localize)
    <run_dir>/scores/*.parquet                       Stage 2 (score), one file per input shard
    <run_dir>/_state/scores/                         its resume markers and manifest (beside, not inside)
    <run_dir>/quarantine/*.parquet                   rows that could not be scored, with a `reason`
    <run_dir>/score_summary.json, score_stats.json
    <run_dir>/subset/*.parquet, selection.json, histogram.png   (select)
    <run_dir>/train/ (checkpoints), adapter/, merged/            Stage 3 (train)
    <run_dir>/eval.json, report.json, aer.png
    <run_dir>/stages/<stage>.json  {"seconds": ..., "fingerprint": ...}: timings for the AER, and the
                                   marker that lets `p2d-ray run` skip a finished stage
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

STAGES = ("localize", "score", "select", "train", "evaluate")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def heads_json(self) -> Path:
        return self.path("heads.json")

    @property
    def scores(self) -> Path:
        return self.path("scores")

    @property
    def quarantine(self) -> Path:
        return self.path("quarantine")

    @property
    def subset(self) -> Path:
        return self.path("subset")

    @property
    def adapter(self) -> Path:
        return self.path("adapter")

    # -- stage records ----------------------------------------------------------------------------
    def stage_record(self, stage: str) -> dict | None:
        p = self.path("stages", f"{stage}.json")
        return json.loads(p.read_text()) if p.is_file() else None

    def stage_done(self, stage: str, fingerprint: str) -> bool:
        rec = self.stage_record(stage)
        return rec is not None and rec.get("fingerprint") == fingerprint

    def record_stage(self, stage: str, seconds: float, fingerprint: str, **extra) -> None:
        p = self.path("stages", f"{stage}.json")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"stage": stage, "seconds": seconds, "fingerprint": fingerprint, **extra}))

    @contextmanager
    def timed(self, stage: str, fingerprint: str, **extra):
        """Time a stage and record it only if it finishes (a crashed stage leaves no marker)."""
        t0 = time.perf_counter()
        yield
        self.record_stage(stage, time.perf_counter() - t0, fingerprint, **extra)

    def timings(self) -> dict[str, float]:
        out = {}
        for stage in STAGES:
            rec = self.stage_record(stage)
            if rec is not None:
                out[stage] = rec["seconds"]
        return out


# Config sections each stage depends on, cumulatively: a change upstream invalidates everything below.
_STAGE_SECTIONS = {
    "localize": ("model", "localize", "seed"),
    "score": ("data", "score"),
    "select": ("select",),
    "train": ("train",),
    "evaluate": ("evaluate",),
}


def stage_fingerprint(cfg, stage: str) -> str:
    """Fingerprint of everything ``stage``'s output depends on (its sections and all upstream ones).

    ``data`` sits with score (not localize) except for the probe path, which localize needs.
    """
    sections: list[str] = []
    for name in STAGES:
        sections.extend(_STAGE_SECTIONS[name])
        if name == stage:
            break
    extra = cfg.data.probe_path or ""
    if cfg.localize.contrast == "corpus":  # contrastive localisation also reads the corpus
        extra += "|" + (cfg.data.corpus_path or "")
    return cfg.fingerprint(*sections) + ":" + extra
