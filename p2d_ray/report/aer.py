"""Alignment Efficiency Ratio (AER, as in the paper): the cost of P2D relative to full fine-tuning on all data.

    AER = (t_localize + t_score + t_select + t_train on the subset) / t_train(full fine-tuning, all rows)

for the same number of epochs. The denominator is either **measured** (the user asked for the full
baseline: full fine-tuning of all weights on the whole corpus, through the same trainer) or **estimated**
(seconds per full fine-tuning step, timed on a sample of batches, x the steps a pass over all rows would
take). The step time is measured in one process (``training.trainer.time_train_steps``) and the steps
counted with the full global batch (micro-batch x workers x accumulation), i.e. assuming the workers scale
perfectly; and the estimate leaves out the trainer's start-up, which the measured subset training
includes. Both make the estimated denominator small, so an estimated AER errs high (against P2D).
"""

from __future__ import annotations

import math

from p2d_ray.config import TrainConfig
from p2d_ray.training.loop import global_batch

AER_STAGES = ("localize", "score", "select", "train")
MEASURED, ESTIMATED = "measured", "estimated"


def epochs_trained(n_rows: int, steps: int, train: TrainConfig) -> float:
    """Passes over ``n_rows`` that ``steps`` optimizer steps make (fewer than ``train.epochs`` when
    ``max_steps`` stopped the run early)."""
    return steps / math.ceil(n_rows / global_batch(train))


def full_train_steps(n_full_rows: int, n_subset_rows: int, subset_steps: int, train: TrainConfig) -> int:
    """Steps full fine-tuning on all ``n_full_rows`` takes for as many epochs as the subset run made
    (``subset_steps`` steps over ``n_subset_rows``), with the same global batch."""
    epochs = epochs_trained(n_subset_rows, subset_steps, train)
    return math.ceil(epochs * math.ceil(n_full_rows / global_batch(train)))


def estimate_full_seconds(step_seconds: float, n_steps: int) -> float:
    """Full fine-tuning time from a measured per-step time; start-up excluded (see module doc)."""
    if step_seconds <= 0 or n_steps <= 0:
        raise ValueError(f"need step_seconds > 0 and n_steps > 0, got {step_seconds} and {n_steps}")
    return step_seconds * n_steps


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
