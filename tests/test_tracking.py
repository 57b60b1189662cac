"""Tracked training: the progress line, and a clear error for a configured tracker whose package is missing.
The TensorBoard event files and loss.png a real Ray Train + DeepSpeed run writes are checked on the LoRA run of
tests/test_trainer.py (one Ray Train start fewer: each costs ~30-60 s here)."""

from __future__ import annotations

import importlib.util
import io
import re

import pytest

from p2d_ray.config import build_config
from p2d_ray.progress import Progress
from p2d_ray.training.tracking import check_tracking


def test_training_progress_lines_are_periodic_and_plain():
    """The training line is the one Progress of every stage: at the start, every ~10 % of the steps (12 of
    125 here) or ``every_s``, and at the last step (a stepped stage has no close), with the loss at the end."""
    out = io.StringIO()
    p = Progress("train", 125, unit="steps", every_s=3600, stream=out, start=0, every_fraction=0.1)
    for step in range(1, 126):
        p.set(step, f"loss {1 / step:.3f}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: 0/125 steps ..."
    assert re.fullmatch(r"train: 12/125 steps \(10%\) [\d.e+-]+ steps/s ETA \S+ loss 0\.083", lines[1]), (
        lines[1]
    )
    assert re.fullmatch(r"train: 125/125 steps \(100%\) [\d.e+-]+ steps/s loss 0\.008", lines[-1]), lines[-1]
    assert len(lines) == 1 + 125 // 12 + 1  # not every step
    resumed = io.StringIO()
    Progress("train", 10, unit="steps", stream=resumed, start=4, every_fraction=0.1)
    assert resumed.getvalue() == "train: 4/10 steps ...\n"


def test_configured_tracker_without_its_package_is_a_clear_error(tmp_path):
    for override, package in (
        (f"train.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow"),
        ("train.wandb_project=p2d", "wandb"),
    ):
        cfg = build_config({}, [f"run_dir={tmp_path}", override])
        if importlib.util.find_spec(package) is None:
            key = override.split("=")[0]
            with pytest.raises(
                ValueError, match=rf"{key}=.* needs the optional package '{package}'.*pip install"
            ):
                check_tracking(cfg)
        else:
            check_tracking(cfg)  # installed: configured tracking is fine
    check_tracking(build_config({}, [f"run_dir={tmp_path}"]))  # TensorBoard alone needs nothing extra
