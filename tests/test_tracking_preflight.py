"""Tracking is checked before any work (issue 26, item 4): a tracker that is missing or refused fails ``run`` /
``train`` in one line before any stage (or Ray) starts; the config's example MLflow URI is one current MLflow
serves; the ``tensorboard --logdir`` the README shows is installed with the dev extras."""

from __future__ import annotations

import importlib.util
import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from p2d_ray.cli import main as cli_main
from p2d_ray.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; fails if the command started Ray (a session Ray of other tests may be up)."""
    out, err = io.StringIO(), io.StringIO()
    ray_before = _ray_up()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(list(argv))
    assert ray_before or not _ray_up(), "the command started Ray before failing"
    return rc, out.getvalue(), err.getvalue()


def _nothing_ran(run_dir: Path) -> None:
    assert not (run_dir / "stages").exists() and not (run_dir / "heads.json").exists()


@pytest.mark.parametrize("command", ["run", "train"])
def test_filesystem_mlflow_uri_is_refused_in_one_line_before_any_stage(command, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, err = cli(command, f"run_dir={run_dir}", f"train.mlflow_tracking_uri=file://{tmp_path}/mlruns")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "sqlite:///" in err and "maintenance mode" in err, err
    _nothing_ran(run_dir)


@pytest.mark.parametrize(("key", "package"), [("wandb_project", "wandb"), ("mlflow_tracking_uri", "mlflow")])
def test_missing_tracker_package_fails_in_one_line_before_any_stage(key, package, tmp_path):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the store check below it is what runs")
    run_dir = tmp_path / "run"
    value = f"sqlite:///{tmp_path}/mlflow.db" if package == "mlflow" else "p2d"
    rc, _, err = cli("run", f"run_dir={run_dir}", f"train.{key}={value}")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"needs the optional package {package!r}" in err and f"pip install {package}" in err
    _nothing_ran(run_dir)


def test_the_config_documents_a_uri_current_mlflow_serves():
    from p2d_ray.training.tracking import MLFLOW_SCHEMES

    doc = (REPO / "p2d_ray" / "config.py").read_text()
    # the field's declaration and its comment, however the formatter wraps them (up to the next field)
    start = doc.index("mlflow_tracking_uri:")
    decl = doc[start : doc.index("wandb_project:", start)]
    assert "sqlite:////" in decl and "e.g. file://" not in decl
    assert TrainConfig().mlflow_tracking_uri is None and "sqlite" in MLFLOW_SCHEMES


def test_tensorboard_comes_with_the_dev_extras_and_reads_our_event_files(tmp_path):
    """The README's `tensorboard --logdir <run_dir>/tensorboard`: the package is in the dev extras, pinned in
    constraints.txt, and its reader loads the event files the training tracker writes."""
    dev = next(x for x in (REPO / "pyproject.toml").read_text().splitlines() if x.startswith("dev = ["))
    assert '"tensorboard>=' in dev
    assert any(x.startswith("tensorboard==") for x in (REPO / "constraints.txt").read_text().splitlines())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))  # what training.tracking.Tracker writes with
    for step in (1, 2, 3):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
