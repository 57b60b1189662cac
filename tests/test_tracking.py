"""Tracked training: TensorBoard event files from the Ray Train + DeepSpeed worker, loss.png, the progress
line, and a clear error for a configured tracker whose package is missing."""

from __future__ import annotations

import importlib.util
import io
import re
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2d_ray.config import build_config
from p2d_ray.progress import Progress
from p2d_ray.training.tracking import check_tracking


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every TensorBoard event file under ``log_dir`` (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc; payload = an ``Event`` proto)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    for path in files:
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


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


@pytest.mark.ray
def test_training_writes_tensorboard_events_and_loss_png(tmp_path, tiny_llama, ray_local):
    from p2d_ray.training.trainer import run_train

    run = tmp_path / "run"
    (run / "subset").mkdir(parents=True)
    rows = [
        {"id": i, "prompt": f"Q: {i % 3} + {i % 3}?\nA:", "response": f" {2 * (i % 3)}"} for i in range(12)
    ]
    pq.write_table(pa.Table.from_pylist(rows), run / "subset" / "part-0.parquet")
    cfg = build_config(
        {"run_dir": str(run), "model": {"name_or_path": tiny_llama}},
        [
            "train.adaptation=lora",
            "train.lora_r=2",
            "train.num_workers=1",
            "train.batch_size=4",
            "train.zero_stage=1",
            "train.lr=0.01",
        ],
    )
    summary = run_train(cfg)
    assert summary["steps"] == 3

    scalars = read_scalars(run / "tensorboard" / "train")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(summary["loss_curve"])
    assert all(v == pytest.approx(0.01) for _, v in scalars["train/lr"])
    assert all(v > 0 for _, v in scalars["train/tokens_per_s"] + scalars["train/grad_norm"])
    assert summary["tensorboard_dir"] == str((run / "tensorboard" / "train").resolve())
    assert Path(summary["loss_png"]).read_bytes()[:4] == b"\x89PNG"
