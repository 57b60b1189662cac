"""Alignment Efficiency Ratio (AER, as in the paper): the cost of P2D relative to full fine-tuning on all data.

    AER = (t_localize + t_score + t_select + t_train on the subset) / t_train(full fine-tuning, all rows)

for the same training recipe and epochs. The denominator comes from ``<run_dir>/full_baseline.json``,
written by the ``baseline`` stage (p2d_ray.baseline): either **measured** (full fine-tuning of all weights
on the whole corpus, through the same trainer) or **estimated** (seconds per full fine-tuning step, timed
through the same trainer on a few steps, x the steps its epochs over all rows take). The estimate leaves
out the trainer's start-up, which the measured subset training includes: that makes the estimated
denominator small, so an estimated AER errs high (against P2D).
"""

from __future__ import annotations

AER_STAGES = ("localize", "score", "select", "train")
MEASURED, ESTIMATED = "measured", "estimated"  # the labels p2d_ray.baseline writes


def aer(stage_seconds: dict[str, float], full_seconds: float, label: str, **inputs) -> dict:
    """The AER with every input behind it.

    Args:
        stage_seconds: seconds per stage (``RunDir.timings()``); must hold localize/score/select/train.
        full_seconds: full fine-tuning time on all data, measured or estimated.
        label: ``"measured"`` or ``"estimated"``.
        inputs: how the denominator was obtained (steps, step time, rows ...), recorded as given.

    Raises:
        ValueError: a stage timing is missing, the label is unknown, or ``full_seconds`` is not positive.
    """
    missing = [s for s in AER_STAGES if s not in stage_seconds]
    if missing:
        raise ValueError(
            f"AER needs the timings of stages {missing}: run them first (found {sorted(stage_seconds)})"
        )
    if label not in (MEASURED, ESTIMATED):
        raise ValueError(f"AER label must be {MEASURED!r} or {ESTIMATED!r}, got {label!r}")
    if not full_seconds > 0:
        raise ValueError(f"full fine-tuning time must be > 0, got {full_seconds}")
    parts = {s: float(stage_seconds[s]) for s in AER_STAGES}
    p2d_seconds = sum(parts.values())
    return {
        "aer": p2d_seconds / full_seconds,
        "label": label,
        "p2d_seconds": p2d_seconds,
        "p2d_stage_seconds": parts,
        "full_train_seconds": full_seconds,
        **inputs,
    }
