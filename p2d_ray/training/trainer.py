"""``p2d-ray train``: Stage 3 on Ray Train + DeepSpeed, then export the trained update.

    run_train(cfg)  ->  TorchTrainer(train_func, datasets={"train": read_parquet(<run_dir>/subset)},
                                     ScalingConfig(...), RunConfig(storage_path, FailureConfig, ...))
                    ->  <run_dir>/adapter (head deltas + PEFT LoRA | PEFT LoRA | -), <run_dir>/merged,
                        <run_dir>/train_summary.json, stage timing for the AER

Resume: the Ray Train run is named after what its weights depend on (model, adaptation, heads, data,
optimizer settings; not the step budget), under ``train.storage_path`` (default ``<run_dir>/train``).
A restarted worker group (``FailureConfig(max_failures)``), a rerun after a failure past ``max_failures``
and a rerun after Ctrl-C / SIGTERM all continue from that run's newest complete checkpoint
(``training.checkpoints``); raising ``train.max_steps`` or ``train.epochs`` extends a finished run.

Also here: :func:`load_adapted_model` (the base model with the exported update applied, for evaluation)
and :func:`time_train_steps` (seconds per optimizer step of an adaptation, timed in-process on a sample
of batches, for ``benchmarks/training.py``); ``fit(..., timing_only=True)`` times steps through the
trainer itself, for the AER's estimate.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import torch

from p2d_ray.config import P2DConfig
from p2d_ray.data.formatting import task_format
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.progress import ray_data_output, stage_summary
from p2d_ray.rundir import RunDir, stage_fingerprint
from p2d_ray.runtime import ensure_ray
from p2d_ray.training.export import export_from_checkpoint, load_adapted_model
from p2d_ray.training.loop import (
    TorchEngine,
    encode_rows,
    global_batch,
    peak_memory_bytes,
    steady_step_stats,
    step_stats,
    torch_threads,
    total_steps,
    train_step,
)
from p2d_ray.training.tracking import LOSS_PNG, check_tracking, plot_loss_curve, tensorboard_dir
from p2d_ray.training.worker import EXPORT_DIR, STATE_FILE, train_func

__all__ = ["run_train", "fit", "time_train_steps", "load_adapted_model", "TrainInputs"]


class TrainInputs:
    """Everything a training run reads, checked before Ray starts: data rows and format, heads, storage."""

    def __init__(self, cfg: P2DConfig, data_path: str | None = None):
        from p2d_ray.models.loading import load_config_checked

        run = RunDir(cfg.run_dir)
        self.data_path = str(data_path or run.subset)
        local = "://" not in self.data_path and not any(c in self.data_path for c in "*?[")
        if local and not Path(self.data_path).exists():
            raise FileNotFoundError(f"training data not found: {self.data_path} (run `p2d-ray select` first)")
        try:
            dataset = pads.dataset(self.data_path, format="parquet")
            self._dataset = dataset
            self.n_rows = dataset.count_rows()
            columns = dataset.schema.names
            # Uncompressed size from the Parquet footers (no data read): decides whether to cache it.
            self.n_bytes = sum(rg.total_byte_size for f in dataset.get_fragments() for rg in f.row_groups)
        except Exception as err:  # pyarrow raises several types for unreadable data
            raise ValueError(f"cannot read training data {self.data_path}: {err}") from None
        t = cfg.train
        if self.n_rows < t.num_workers:
            raise ValueError(
                f"training data {self.data_path} has {self.n_rows} rows, fewer than train.num_workers="
                f"{t.num_workers}"
            )
        self.fmt = task_format(cfg.data, columns)
        geometry = geometry_from_config(load_config_checked(cfg.model))
        self.heads = None
        if t.adaptation == "heads":
            self.heads = HeadSet.load(run.heads_json)
            self.heads.check_fits(geometry)
            if len(self.heads) == 0:
                raise ValueError(f"{run.heads_json} selects no heads: nothing to train with adaptation=heads")
        self.storage_path = t.storage_path or str(run.path("train").resolve())
        check_tracking(cfg)
        self.n_steps = total_steps(self.n_rows, t)

    def data_key(self) -> list:
        """What identifies the training rows themselves, not only their path: a re-selection writes a
        different subset to the same ``subset/`` directory, and resuming the old subset's checkpoints would
        train (or, at its final step, not train at all) on rows no longer selected. Local files: a sha256 of
        their bytes (the subset is about to be read whole by training anyway; Parquet writes no timestamps, so
        an identical re-selection keeps the key and still resumes). Remote files: size and modification time
        from the filesystem (no download)."""
        if getattr(self, "_data_key", None) is None:
            ds = self._dataset
            infos = ds.filesystem.get_file_info(sorted(ds.files))
            local = type(ds.filesystem).__name__ == "LocalFileSystem"
            key = []
            for info in infos:
                if local:
                    h = hashlib.sha256()
                    with open(info.path, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 23), b""):
                            h.update(chunk)
                    key.append([os.path.basename(info.path), h.hexdigest()])
                else:
                    key.append([info.path, info.size, info.mtime_ns])
            self._data_key = key
        return self._data_key

    def run_name(self, cfg: P2DConfig) -> str:
        """Stable name of the Ray Train run: what the trained weights depend on (the training rows' content
        included, ``data_key``), minus the step budget (so a rerun, or a longer run, resumes from the latest
        checkpoint)."""
        from p2d_ray.models.loading import model_fingerprint

        train = cfg.train.model_dump(
            mode="json",
            exclude={
                "epochs",
                "max_steps",
                "max_failures",
                "checkpoint_every",
                "checkpoints_to_keep",
                "export_merged",
                "storage_path",
                "tensorboard",
                "mlflow_tracking_uri",
                "wandb_project",
                "tracking_experiment",
            },
        )
        payload = [
            model_fingerprint(cfg.model),
            cfg.model.model_dump(mode="json"),
            cfg.data.model_dump(mode="json"),
            train,
            self.heads.fingerprint() if self.heads else None,
            os.path.abspath(self.data_path) if "://" not in self.data_path else self.data_path,
            self.data_key(),
        ]
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
        return f"{cfg.train.adaptation}-{key}"


# A training set up to this size (uncompressed Parquet) is read once into Ray's object store before the
# workers start: every epoch then streams from memory instead of re-running the read tasks (measured on the
# SmolLM2 demo: a 30-row subset paid ~15 s per epoch for the re-read on 2 cores, BENCHMARKS.md). Larger sets
# stream from storage every epoch, as Ray Train's docs advise for data that does not fit.
MATERIALIZE_MAX_BYTES = 1 << 30


def _ensure_ray(cfg: P2DConfig) -> None:
    """Enough logical CPUs for the workers plus Ray Data's read tasks (two 1-CPU workers on a 2-CPU node
    would starve the reads)."""
    t = cfg.train
    ensure_ray(int(t.num_workers * t.cpus_per_worker) + 2)


def fit(
    cfg: P2DConfig,
    data_path: str | None = None,
    *,
    fail_at_step: int | None = None,
    fail_kill: bool = False,
    timing_only: bool = False,
):
    """Run the Ray Train job and return ``(ray.train.Result, TrainInputs)``.

    Args:
        data_path: Parquet to train on (default ``<run_dir>/subset``; the AER's full baseline passes the corpus).
        fail_at_step: tests only: every worker raises once at this step, to exercise FailureConfig + resume;
            ``fail_kill``: the last rank's process is killed there instead (a lost worker).
        timing_only: time the steps and nothing else (no restore, no weights saved, no export): the AER's full
            fine-tuning step, timed through this trainer (``p2d_ray.baseline``); ``result.metrics`` holds the
            step times (reported with a checkpoint of the state file only, ``worker.report_timing``).
    Raises:
        ValueError / FileNotFoundError: bad inputs, found before Ray starts.
        RuntimeError: the workers failed more often than ``train.max_failures`` allows; one line that names
            the newest complete checkpoint and says that a rerun resumes from it.
        KeyboardInterrupt: Ctrl-C or SIGTERM (``runtime.Terminated``); a rerun resumes from the newest
            complete checkpoint.
    """
    inputs = TrainInputs(cfg, data_path)
    _ensure_ray(cfg)
    # The dataset copies the DataContext when created: inside ray_data_output, the split coordinator's
    # progress bars and INFO lines go to <run_dir>/logs (our rank-0 progress line says steps, rate, ETA).
    with ray_data_output(cfg.run_dir):
        trainer = _trainer(cfg, inputs, fail_at_step, fail_kill, timing_only)
        try:
            return _fit_interruptible(trainer), inputs
        except Exception as err:
            from ray.train import TrainingFailedError

            if isinstance(err, TrainingFailedError):
                raise RuntimeError(_failure_line(cfg, inputs, err)) from None
            raise


def _fit_interruptible(trainer):
    """``trainer.fit()`` in a helper thread while this (main) thread waits: Ctrl-C and SIGTERM then raise
    here as KeyboardInterrupt, as in every other stage. (In the main thread Ray Train installs its own
    SIGINT handler, which aborts the run and leaves the command with rc 1 and no message.) The interrupted
    run's controller and workers belong to this driver and end with it (the command shuts its Ray down)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread
            box["error"] = err

    thread = threading.Thread(target=target, name="p2d-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: signal handlers run between them
    if "error" in box:
        raise box["error"]
    return box["result"]


def _failure_line(cfg: P2DConfig, inputs: TrainInputs, err: Exception) -> str:
    """One line for a run the workers could not finish: what failed, the newest complete checkpoint, and
    that rerunning the same command resumes from it."""
    from p2d_ray.training.checkpoints import newest_complete_checkpoint

    failures = getattr(err, "worker_failures", None) or {}
    first = next(iter(failures.values()), err)
    what = (str(first).strip().splitlines() or [type(first).__name__])[0][:200]
    allowed = cfg.train.max_failures
    newest = newest_complete_checkpoint(_checkpoint_root(cfg, inputs), cfg.train.num_workers)
    where = (
        f"the newest complete checkpoint is step {newest[0]} ({newest[1]}); rerun the same command to resume "
        "from it"
        if newest
        else "no checkpoint was complete yet; rerun the same command to start again"
    )
    return (
        f"training failed after {allowed} restart(s) allowed by train.max_failures "
        f"({type(first).__name__}: {what}); {where} (or raise train.max_failures)"
    )


def _checkpoint_root(cfg: P2DConfig, inputs: TrainInputs) -> str:
    """Where Ray Train writes this run's checkpoints: ``<storage_path>/<run name>``."""
    return f"{inputs.storage_path.rstrip('/')}/{inputs.run_name(cfg)}"


def _trainer(
    cfg: P2DConfig,
    inputs: TrainInputs,
    fail_at_step: int | None,
    fail_kill: bool = False,
    timing_only: bool = False,
):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from p2d_ray.progress import verbose

    t = cfg.train
    return TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "fmt": inputs.fmt,
            "n_rows": inputs.n_rows,
            "heads": inputs.heads.to_json() if inputs.heads else None,
            "tb_dir": tensorboard_dir(cfg.run_dir) if t.tensorboard else None,
            "checkpoint_root": _checkpoint_root(cfg, inputs),
            "fail_at_step": fail_at_step,
            "fail_kill": fail_kill,
            "timing_only": timing_only,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **t.resources_per_worker},
        ),
        run_config=RunConfig(
            name=inputs.run_name(cfg),
            storage_path=inputs.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            # Ray Train's INFO lines (worker group start, checkpoint reports) stay in Ray's log files; our
            # rank-0 progress line says steps, rate, ETA and loss. --verbose shows them.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets={"train": _train_dataset(inputs)},
    )


def _train_dataset(inputs: TrainInputs):
    import ray.data

    # Ray 2.60's Parquet reader (datasource v2) first reads the footers with a pool of 32 actors spread
    # over the cluster, each placed on a free CPU. Behind a CPU-less head with small nodes (the fleet
    # rehearsal's 1-CPU nodes, tests/test_fleet.py) the pool never formed: training waited forever while the
    # autoscaler removed the idle nodes. A training set is a few files: the v1 reader lists them in the driver
    # (metadata only) and reads the rows in tasks as before.
    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(inputs.data_path)  # the dataset keeps a copy of the context
    finally:
        ctx.use_datasource_v2 = previous
    return ds.materialize() if inputs.n_bytes <= MATERIALIZE_MAX_BYTES else ds


def run_train(cfg: P2DConfig, data_path: str | None = None) -> dict:
    """Stage 3: train (Ray Train + DeepSpeed), export to ``<run_dir>/adapter``, write
    ``<run_dir>/train_summary.json``; timed for the AER. Returns the summary."""
    run = RunDir(cfg.run_dir)
    cfg.save(run.path("config.yaml"))
    with run.timed("train", stage_fingerprint(cfg, "train")):
        t0 = time.perf_counter()
        result, inputs = fit(cfg, data_path)
        fit_seconds = time.perf_counter() - t0
        checkpoint = _final_checkpoint(cfg, inputs, result)
        with checkpoint.as_directory() as ckpt:
            state = json.loads(Path(ckpt, STATE_FILE).read_text())
            manifest = export_from_checkpoint(cfg, Path(ckpt) / EXPORT_DIR)
        final = state.get("final", {})
        for r in state.get("resumes", []):
            print(
                f"train: resumed from the checkpoint at step {r['from_step']} ({r['checkpoint']})", flush=True
            )
        summary = {
            "adaptation": cfg.train.adaptation,
            "data_path": inputs.data_path,
            "rows": inputs.n_rows,
            "format": inputs.fmt,
            "steps": state["step"],
            "total_steps": inputs.n_steps,
            "rows_per_step": global_batch(cfg.train),
            "rows_seen": state["rows_seen"],
            "skipped_rows": state["skipped"],
            "loss_curve": state["loss_curve"],
            "lr_curve": state.get("lr_curve"),
            "grad_norm_curve": state.get("grad_norm_curve"),
            "tokens_per_s_curve": state.get("tokens_per_s_curve"),
            "tensorboard_dir": tensorboard_dir(cfg.run_dir) if cfg.train.tensorboard else None,
            "loss_png": str(run.path(LOSS_PNG)) if state["loss_curve"] else None,
            "step_seconds": state["step_seconds"],
            "step_time": steady_step_stats(state),
            "fit_seconds": fit_seconds,  # includes Ray Train worker start-up and DeepSpeed init
            "heads": [list(h) for h in inputs.heads] if inputs.heads else None,
            "checkpoint": checkpoint.path,
            "storage_path": inputs.storage_path,
            "run_name": inputs.run_name(cfg),
            # Every restart (FailureConfig) or rerun that continued from a checkpoint: step and checkpoint.
            "resumes": state.get("resumes", []),
            "adapter": manifest,
            **{k: v for k, v in final.items() if k != "step_time"},
        }
        if state["loss_curve"]:
            title = f"{cfg.train.adaptation} on {inputs.n_rows} rows, {cfg.model.name_or_path}"
            plot_loss_curve(state["loss_curve"], run.path(LOSS_PNG), title)
        run.path("train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        from p2d_ray.training.model_card import write_model_card

        write_model_card(cfg)  # now with the steps and the last loss
    stage_summary(
        "train",
        time.perf_counter() - t0,
        f"{run.adapter} ({state['step']} steps), train_summary.json",
    )
    return summary


def _final_checkpoint(cfg: P2DConfig, inputs: TrainInputs, result):
    """The run's final checkpoint (the one with ``export/``): Ray's result, unless a newer complete one is in
    storage (seen in the fleet rehearsal: after a lost node, Ray's result named the step-7 checkpoint while
    the restarted group had saved the final one at step 8)."""
    from ray.train import Checkpoint

    from p2d_ray.training.checkpoints import checkpoint_step, newest_complete_checkpoint

    given = result.checkpoint
    newest = newest_complete_checkpoint(_checkpoint_root(cfg, inputs), cfg.train.num_workers)
    if newest is None:
        return given
    if given is None or (newest[0], newest[1].endswith("_final")) > (
        checkpoint_step(given.path),
        str(given.path).endswith("_final"),
    ):
        return Checkpoint(newest[1])
    return given


def _timing_rows(cfg: P2DConfig, path: str, n: int) -> tuple[list[dict], str]:
    """The first ``n`` rows of the Parquet data at ``path`` and their prompt format."""
    dataset = pads.dataset(path, format="parquet")
    rows = dataset.head(n).to_pylist()
    if not rows:
        raise ValueError(f"time_train_steps: no rows in {path}")
    return rows, task_format(cfg.data, dataset.schema.names)


def time_train_steps(cfg: P2DConfig, adaptation: str, n_steps: int, data_path: str | None = None) -> dict:
    """Seconds per optimizer step of ``adaptation`` ("heads" | "lora" | "full"), timed in this process.

    Same model, micro-batch, gradient accumulation, loss and trainable parameters as the trainer, on the
    first ``n_steps`` optimizer steps' rows of ``data_path`` (default: the whole corpus, which is what full
    fine-tuning would train on), with torch AdamW and no Ray/DeepSpeed: the per-step compute, without
    start-up or the trainer's own per-step costs. The first step is a warm-up and not counted. For
    ``benchmarks/training.py``'s side by side; the AER's estimate times its steps through the trainer
    itself (``p2d_ray.baseline.time_full_steps``): on SmolLM2 on this CPU a full step there cost 1.8-2.8x this.

    Returns:
        ``step_seconds`` (median of timed steps), ``step_times``, ``rows_per_step`` (one process),
        ``tokens_per_step`` (mean), ``trainable_params``, ``state_bytes`` (trained params + grads + AdamW
        moments), ``peak_memory_bytes`` (process peak; CPU: max RSS so far), ``n_steps``, ``mode``.
    Raises:
        ValueError: unknown adaptation, n_steps < 1, or no trainable rows.
    """
    from p2d_ray.assets.paths import corpus_parquet
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.models.loss import MaskedLM
    from p2d_ray.training.adaptation import ADAPTATIONS, prepare_model
    from p2d_ray.training.deltas import count_trainable, trainable_parameters

    if adaptation not in ADAPTATIONS:
        raise ValueError(f"adaptation={adaptation!r}; allowed: {', '.join(ADAPTATIONS)}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    t = cfg.train.model_copy(update={"adaptation": adaptation})
    per_step = t.batch_size * t.grad_accum
    rows, fmt = _timing_rows(cfg, data_path or corpus_parquet(cfg), (n_steps + 1) * per_step)
    heads = HeadSet.load(RunDir(cfg.run_dir).heads_json) if adaptation == "heads" else None

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads(cfg))
    try:
        torch.manual_seed(t.seed)
        model = prepare_model(load_model(cfg.model), t, heads)
        model.train()
        device = next(model.parameters()).device
        params = trainable_parameters(model)
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        # The worker's step on plain torch: same MaskedLM loss, accumulation and clipping, no DeepSpeed.
        engine = TorchEngine(MaskedLM(model, cfg.score.loss_chunk_tokens), opt, t.grad_accum, t.grad_clip)
        tok = load_tokenizer(cfg.model)
        skipped: Counter = Counter()

        def encode(chunk):
            return encode_rows(chunk, tok, cfg.data, fmt, skipped)

        times, tokens = [], []
        for step in range(n_steps + 1):
            chunk = [rows[(i % len(rows))] for i in range(step * per_step, (step + 1) * per_step)]
            micro = [chunk[m * t.batch_size : (m + 1) * t.batch_size] for m in range(t.grad_accum)]
            t0 = time.perf_counter()
            try:
                result = train_step(engine, micro, encode, device, skipped)
            except RuntimeError as err:
                raise ValueError(f"time_train_steps: {err}") from None
            if step > 0:  # step 0 warms up allocator and kernels
                times.append(time.perf_counter() - t0)
                tokens.append(result.tokens)
        n_train = count_trainable(model)
        elem = params[0].element_size()
        return {
            "adaptation": adaptation,
            "step_seconds": step_stats(times)["median"],
            "step_times": times,
            "rows_per_step": per_step,
            "tokens_per_step": sum(tokens) / len(tokens),
            "trainable_params": n_train,
            # param + grad in the model dtype, two fp32 AdamW moments
            "state_bytes": n_train * (2 * elem + 8),
            "peak_memory_bytes": peak_memory_bytes(device),
            "n_steps": n_steps,
            "skipped_rows": dict(skipped),
            "mode": "in_process",
        }
    finally:
        torch.set_num_threads(prev_threads)
