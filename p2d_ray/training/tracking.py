"""Tracked training: metrics per optimizer step to TensorBoard (always) and MLflow / W&B (when configured),
a plain progress line, and the loss-curve PNG.

Rank 0 of the Ray Train worker group owns one :class:`Tracker`:

- TensorBoard event files under ``<run_dir>/tensorboard/train`` (tensorboardX, a core dependency):
  ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s`` per optimizer step. A resumed
  run purges the steps after its checkpoint, so the curves never fold back on themselves.
- MLflow (``train.mlflow_tracking_uri``) and W&B (``train.wandb_project``) through Ray Train's own
  integrations (``ray.air.integrations.mlflow.setup_mlflow`` / ``...wandb.setup_wandb``), which log from the
  worker; the packages are optional: configured but not installed is a clear error before Ray starts.
- A progress line, not every step but every ~10 % of the steps or ~15 s, whichever comes first, plus the
  last step: ``train: 40/125 steps (32%) 1.9 steps/s ETA 45s loss 1.234``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

from p2d_ray.config import P2DConfig
from p2d_ray.progress import Progress

TB_SUBDIR = ("tensorboard", "train")  # under the run dir
LOSS_PNG = "loss.png"


def tensorboard_dir(run_dir: str | Path) -> str:
    """Absolute path of the training event files (workers may run with another working directory)."""
    return str(Path(run_dir, *TB_SUBDIR).resolve())


# MLflow tracking URIs current MLflow serves: a database (sqlite:////abs/mlflow.db, postgresql://...) or a
# tracking server. Its filesystem backend (file:///..., a bare path) is in maintenance mode and refused.
MLFLOW_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking(cfg: P2DConfig) -> None:
    """Configured trackers must be usable from here (the driver) before any stage or Ray work starts: the
    ``run`` / ``train`` pre-flight (validate.preflight) and the job entrypoints call this first.

    Raises:
        ValueError (one line): an MLflow URI current MLflow refuses (``file://``, a bare path); a configured
        tracker whose package is not installed; an MLflow store that cannot be reached (when mlflow is
        installed).
    """
    t = cfg.train
    uri = t.mlflow_tracking_uri
    if uri and uri.split("://", 1)[0].split("+", 1)[0] not in MLFLOW_SCHEMES:
        raise ValueError(
            f"train.mlflow_tracking_uri={uri!r}: MLflow's filesystem store is in maintenance mode and refused by "
            "current MLflow; use a database, e.g. sqlite:////abs/path/mlflow.db, or a server, http://host:5000"
        )
    for key, value, package in (
        ("mlflow_tracking_uri", t.mlflow_tracking_uri, "mlflow"),
        ("wandb_project", t.wandb_project, "wandb"),
    ):
        if value and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"train.{key}={value!r} needs the optional package {package!r}, which is not installed: "
                f"`pip install {package}` (on every node), or unset train.{key}"
            )
    if uri:
        _check_mlflow_store(uri, t.tracking_experiment)


def _check_mlflow_store(uri: str, experiment: str) -> None:
    """One quick call to the store (a sqlite file is created, a server must answer within seconds)."""
    import os

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception as err:  # any store error: one line naming the URI, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"train.mlflow_tracking_uri={uri!r} does not work: {first[:300]}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tracker_failure(name: str, where: str):
    """A tracker that fails on the training worker (after the pre-flight passed: a server gone, a database
    locked) raises one short RuntimeError naming it, which the driver reports as the training's failure line."""
    try:
        yield
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise RuntimeError(f"tracking: {name} ({where}) failed on the training worker: {first}") from None


class Tracker:
    """Rank 0's metric sinks. Other ranks get a tracker that does nothing (``enabled=False``)."""

    def __init__(
        self,
        cfg: P2DConfig,
        tb_dir: str | None,
        total_steps: int,
        start_step: int,
        enabled: bool,
        label: str = "train",  # the progress line's stage ("baseline" for the AER's timing run)
    ):
        self.enabled = enabled
        self.writer = None
        self.sinks = []  # (name, log(metrics, step)) of MLflow / W&B
        self.closers = []  # their end-of-run calls
        self.progress = None
        if not enabled:
            return
        # To the process's own stderr: Ray forwards it to the driver's stderr and to `ray job logs`; the
        # driver's stdout is the command's JSON result. (sys.__stderr__, not sys.stderr: Ray Train wraps the
        # latter in its workers and re-routes what is written to it.)
        self.progress = Progress(
            label,
            total_steps,
            unit="steps",
            every_s=15.0,
            stream=sys.__stderr__,
            start=start_step,
            every_fraction=0.1,
        )
        t = cfg.train
        if tb_dir:
            from tensorboardX import SummaryWriter

            # purge_step: a resumed run drops the events written after its checkpoint by the failed attempt.
            self.writer = SummaryWriter(tb_dir, purge_step=start_step + 1 if start_step else None)
        run_config = {"adaptation": t.adaptation, "lr": t.lr, "batch_size": t.batch_size, "epochs": t.epochs}
        if t.mlflow_tracking_uri:
            from ray.air.integrations.mlflow import setup_mlflow

            with tracker_failure("MLflow", t.mlflow_tracking_uri):
                mlflow = setup_mlflow(
                    run_config,
                    tracking_uri=t.mlflow_tracking_uri,
                    experiment_name=t.tracking_experiment,
                    create_experiment_if_not_exists=True,
                    rank_zero_only=False,  # this object only exists on rank 0 already
                )
            self.sinks.append(("mlflow", lambda m, s: mlflow.log_metrics(m, step=s)))
            self.closers.append(mlflow.end_run)
        if t.wandb_project:
            from ray.air.integrations.wandb import setup_wandb

            with tracker_failure("W&B", t.wandb_project):
                run = setup_wandb(
                    run_config, project=t.wandb_project, group=t.tracking_experiment, rank_zero_only=False
                )
            self.sinks.append(("wandb", lambda m, s: run.log(m, step=s)))
            self.closers.append(run.finish)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """Write one optimizer step's metrics (None values are left out) and print the progress line if due."""
        if not self.enabled:
            return
        kept = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.writer is not None:
            for key, value in kept.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        for _, log in self.sinks:
            log(kept, step)
        self.progress.set(step, f"loss {kept['loss']:.3f}" if "loss" in kept else "")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for close in self.closers:
            close()


def plot_loss_curve(loss_curve: list[float], path: str | Path, title: str) -> Path:
    """The training loss per optimizer step as a PNG (written by the driver after training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = list(range(1, len(loss_curve) + 1))
    ax.plot(steps, loss_curve, marker="." if len(loss_curve) < 50 else None, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
