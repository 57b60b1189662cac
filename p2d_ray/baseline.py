"""``p2d-ray baseline``: the AER's denominator, full fine-tuning of all weights on all rows.

The full fine-tuning run uses **the same training recipe as the P2D training run**: the same trainer
(Ray Train + DeepSpeed), micro-batch, workers, gradient accumulation, learning rate, weight decay and
clipping, and as many epochs as the subset run made (``train_summary.json``: its steps over its rows, so a
``max_steps`` cap shortens both alike); only ``adaptation=full`` and the data (the whole scored corpus)
differ. ``<run_dir>/full_baseline.json`` states that recipe, and whether the time was

- **estimated** (default): seconds per full fine-tuning step x the steps. The step is timed through the
  trainer itself: a short Ray Train + DeepSpeed run of ``adaptation=full`` with the same workers, on rows
  drawn from the corpus (``report.timing_steps`` steps after one warm-up step; no weights saved; in
  ``<run_dir>/full_baseline_timing``), so the denominator pays whatever the trainer adds per step, as the
  P2D training it is divided into does. The fastest timed step is used, and the trainer's start-up (which
  the P2D training time includes) is left out: the estimate errs against P2D;
- **measured** (``report.full_baseline: true``): that full fine-tuning run itself, in
  ``<run_dir>/full_baseline/``, evaluated like the subset run.

The result is cached in ``full_baseline.json`` under a key of everything it depends on, so rebuilding a
run whose recipe did not change costs nothing; the timed step has a key of its own (model, data, trainer
shape), so another selection fraction (other steps) reuses it. The report only reads this file. A stage
of its own at the top level (like ``compare``), since the measured baseline both trains and evaluates.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow.dataset as pads

from p2d_ray.config import P2DConfig, TrainConfig
from p2d_ray.report.aer import ESTIMATED, MEASURED
from p2d_ray.rundir import RunDir, stage_fingerprint
from p2d_ray.stages import STAGE_BY_NAME
from p2d_ray.training.loop import global_batch, total_steps

BASELINE_DIR = "full_baseline"  # <run_dir>/full_baseline: the measured full fine-tuning run
TIMING_DIR = "full_baseline_timing"  # <run_dir>/full_baseline_timing: the estimate's short timing run
BASELINE_JSON = "full_baseline.json"
# How the estimate's step is timed (the fastest timed step through the trainer): the baseline stage's version
# (stages.py), in the cache keys too, so an estimate made another way is re-timed.
TIMED_BY = STAGE_BY_NAME["baseline"].version


# -- arithmetic --------------------------------------------------------------------------------------------
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


def count_rows(path: Path | str) -> int:
    """Rows of a Parquet dataset from file metadata (no data read)."""
    return pads.dataset(str(path), format="parquet").count_rows()


def recipe(train: TrainConfig, n_full_rows: int, n_subset_rows: int, subset_steps: int) -> dict:
    """The full fine-tuning recipe, as report.json states it: the P2D run's, with adaptation=full."""
    n_steps = full_train_steps(n_full_rows, n_subset_rows, subset_steps, train)
    return {
        "adaptation": "full",
        "same_as": train.adaptation,  # the P2D training run whose recipe this is
        "epochs": round(epochs_trained(n_subset_rows, subset_steps, train), 4),
        "configured_epochs": train.epochs,
        "max_steps": train.max_steps,
        "batch_size": train.batch_size,
        "grad_accum": train.grad_accum,
        "num_workers": train.num_workers,
        "global_batch": global_batch(train),
        "lr": train.lr,
        "weight_decay": train.weight_decay,
        "grad_clip": train.grad_clip,
        "zero_stage": train.zero_stage,
        "steps": n_steps,
    }


# -- the baseline ------------------------------------------------------------------------------------------
def _baseline_key(cfg: P2DConfig, n_full_rows: int, n_steps: int, mode: str) -> str:
    # Full fine-tuning time depends on the model, the data format, the trainer shape and the step count,
    # not on localisation, scoring or selection.
    train = cfg.train.model_dump(
        mode="json", exclude={"adaptation", "lora_r", "lora_alpha", "train_o_proj", "storage_path"}
    )
    payload = [cfg.fingerprint("model", "data"), train, n_full_rows, n_steps, mode, cfg.report.timing_steps]
    if mode == ESTIMATED:  # an estimate cached before the step was timed through the trainer is redone
        payload.append(TIMED_BY)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Train settings a full step's time does not depend on: what is trained besides "full", the step budget,
# where checkpoints go and how often, tracking sinks.
_NOT_STEP_TIME = {
    *("adaptation", "lora_r", "lora_alpha", "train_o_proj", "epochs", "max_steps", "storage_path"),
    *("checkpoint_every", "checkpoints_to_keep", "max_failures", "export_merged"),
    *("tensorboard", "mlflow_tracking_uri", "wandb_project", "tracking_experiment"),
}


# What full_baseline.json keeps of a timing run, reused while its timing_key holds.
_TIMING_FIELDS = (
    *("timed_by", "full_step_seconds", "full_step_median_seconds", "full_step_times", "timing_steps"),
    "timing_fit_seconds",
    *("full_trainable_params", "full_peak_memory_bytes"),
)


def _timing_key(cfg: P2DConfig) -> str:
    """The estimate's timed step depends on the model, the data and the trainer's shape, not on the step
    count: a new selection fraction (another subset, so other epochs and steps) reuses it."""
    train = cfg.train.model_dump(mode="json", exclude=_NOT_STEP_TIME)
    # score.loss_chunk_tokens: the trainer's loss (models.loss.MaskedLM) computes the LM head in chunks.
    payload = [cfg.fingerprint("model", "data"), train, cfg.score.loss_chunk_tokens, cfg.report.timing_steps]
    payload.append(TIMED_BY)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def baseline_config(cfg: P2DConfig, n_steps: int, n_full_rows: int, subdir: str = BASELINE_DIR) -> P2DConfig:
    """The full fine-tuning baseline: same model, data and trainer, all weights, ``n_steps`` optimizer steps
    over the whole corpus (the subset run's epochs), in ``<run_dir>/<subdir>``; its checkpoints under
    ``<train.storage_path>/<subdir>`` when the P2D run has one (a cluster's shared storage), else in there."""
    from p2d_ray.assets.paths import corpus_parquet

    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(Path(cfg.run_dir) / subdir)
    data["data"]["corpus_path"] = corpus_parquet(cfg)
    data["report"]["full_baseline"] = False
    per_epoch = math.ceil(n_full_rows / global_batch(cfg.train))
    storage = cfg.train.storage_path
    data["train"].update(
        adaptation="full",
        storage_path=f"{storage.rstrip('/')}/{subdir}" if storage else None,
        max_steps=n_steps,
        epochs=max(1, math.ceil(n_steps / per_epoch)),
    )
    return P2DConfig.model_validate(data)


def _timing_rows(cfg: P2DConfig, out: Path, n: int) -> int:
    """``n`` corpus rows drawn at random (``train.seed``) into ``out``: what the timing run trains on. A
    seeded draw, so a corpus sorted by length times typical rows; a slice, so the timing run's data start-up
    does not grow with the corpus. Returns the rows written (all rows of a smaller corpus)."""
    import random

    import pyarrow.parquet as pq

    from p2d_ray.assets.paths import corpus_parquet

    dataset = pads.dataset(corpus_parquet(cfg), format="parquet")
    n_rows = dataset.count_rows()
    picks = sorted(random.Random(cfg.train.seed).sample(range(n_rows), min(n, n_rows)))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(dataset.take(picks), out / "part-00000.parquet")
    return len(picks)


def _clear_storage(uri: str) -> None:
    """Empty a timing run's checkpoint storage (local or remote): every timing run starts fresh, since Ray
    Train would otherwise reload the last one's checkpoint list under the same run name (a third re-time
    in one run dir then failed: "the run snapshot contains a reference to a checkpoint that does not exist
    anymore")."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))
    fs.delete_dir_contents(path, missing_dir_ok=True)


def time_full_steps(cfg: P2DConfig) -> dict:
    """Seconds per full fine-tuning step through the trainer (Ray Train + DeepSpeed, the P2D run's workers
    and recipe, ``adaptation=full``, rows drawn from the corpus): ``report.timing_steps`` steps after one
    warm-up step, which pays for the data pipeline's start and is left out. No weights are saved; the run
    starts fresh in ``<run_dir>/full_baseline_timing`` each time.

    Returns:
        ``step_seconds`` (the fastest timed step, rank 0's clock: as ``timeit`` takes the minimum, since
        a shared machine's noise only adds time; on SmolLM2 the first ~6 full steps still speed up, so a
        median of a few would overstate the step and flatter P2D, while the minimum errs against it),
        ``step_median_seconds``, ``step_times``, ``n_steps``,
        ``trainable_params``, ``peak_memory_bytes``, ``fit_seconds`` (the timing run's wall time, start-up
        included: what the estimate leaves out).
    """
    import shutil
    import time

    from p2d_ray.training.trainer import fit

    timed = cfg.report.timing_steps
    timing_dir = Path(cfg.run_dir) / TIMING_DIR
    shutil.rmtree(timing_dir, ignore_errors=True)
    # Every worker needs timed + 1 steps of micro-batches: (timed + 1) global batches of rows.
    n_rows = _timing_rows(cfg, timing_dir / "rows", (timed + 1) * global_batch(cfg.train))
    timing_cfg = baseline_config(cfg, timed + 1, n_rows, TIMING_DIR)
    # A timing run: no tracking sinks; with timing_only the worker saves no weights (report_timing).
    timing_cfg = timing_cfg.model_copy(
        update={
            "train": timing_cfg.train.model_copy(
                update={"tensorboard": False, "mlflow_tracking_uri": None, "wandb_project": None}
            )
        }
    )
    if timing_cfg.train.storage_path:
        _clear_storage(timing_cfg.train.storage_path)
    t0 = time.perf_counter()
    try:
        result, _ = fit(timing_cfg, str(timing_dir / "rows"), timing_only=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"baseline: the full-step timing run failed (rerun to time again): {err}"
        ) from None
    m = result.metrics
    steady = m["step_time"]  # worker.final_stats: the steps after each attempt's first
    if not steady.get("n"):
        raise RuntimeError(f"baseline: the timing run made {m.get('step')} steps, none after the warm-up")
    return {
        "step_seconds": steady["min"],
        "step_median_seconds": steady["median"],
        "step_times": m["step_seconds"],
        "n_steps": steady["n"],
        "trainable_params": m["trainable_params"],
        "peak_memory_bytes": m["peak_memory_bytes"],
        "fit_seconds": time.perf_counter() - t0,
    }


def measure_full_baseline(cfg: P2DConfig, n_steps: int, n_full_rows: int) -> dict:
    """Full fine-tuning on the whole corpus through the same trainer, then evaluated like the subset run."""
    from p2d_ray.eval.evaluate import run_evaluate
    from p2d_ray.training.trainer import run_train

    base_cfg = baseline_config(cfg, n_steps, n_full_rows)
    run_train(base_cfg, data_path=base_cfg.data.corpus_path)
    seconds = RunDir(base_cfg.run_dir).timings()["train"]
    evaluation = run_evaluate(base_cfg)
    return {"full_train_seconds": seconds, "baseline_run_dir": base_cfg.run_dir, "baseline_eval": evaluation}


def full_baseline(cfg: P2DConfig, n_full_rows: int, n_subset_rows: int, subset_steps: int) -> dict:
    """Full fine-tuning time on all rows for the subset run's epochs: measured (``report.full_baseline``)
    or estimated from timed steps. Cached in ``<run_dir>/full_baseline.json`` under a key of its inputs."""
    run = RunDir(cfg.run_dir)
    mode = MEASURED if cfg.report.full_baseline else ESTIMATED
    n_steps = full_train_steps(n_full_rows, n_subset_rows, subset_steps, cfg.train)
    key = _baseline_key(cfg, n_full_rows, n_steps, mode)
    cache = run.path(BASELINE_JSON)
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key and "recipe" in cached:
        return cached
    out = {
        "key": key,
        "label": mode,
        "n_full_rows": n_full_rows,
        "full_train_steps": n_steps,
        "n_subset_rows": n_subset_rows,
        "subset_train_steps": subset_steps,
        "recipe": recipe(cfg.train, n_full_rows, n_subset_rows, subset_steps),
    }
    if mode == MEASURED:
        out.update(measure_full_baseline(cfg, n_steps, n_full_rows))
    else:
        timing_key = _timing_key(cfg)
        timing = {k: cached[k] for k in _TIMING_FIELDS if k in cached}
        if cached.get("timing_key") != timing_key or len(timing) != len(_TIMING_FIELDS):
            # Full fine-tuning steps of the whole model on the trainer's own workers (their GPUs with
            # train.use_gpu), never in the driver (a cluster's small head).
            timed = time_full_steps(cfg)
            timing = {
                "timed_by": TIMED_BY,
                "full_step_seconds": timed["step_seconds"],
                "full_step_median_seconds": timed["step_median_seconds"],
                "full_step_times": timed["step_times"],
                "timing_steps": timed["n_steps"],
                "timing_fit_seconds": timed["fit_seconds"],
                "full_trainable_params": timed["trainable_params"],
                "full_peak_memory_bytes": timed["peak_memory_bytes"],
            }
        out.update(
            timing_key=timing_key,
            **timing,
            full_train_seconds=estimate_full_seconds(timing["full_step_seconds"], n_steps),
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def run_baseline(cfg: P2DConfig) -> dict:
    """``p2d-ray baseline``: write ``<run_dir>/full_baseline.json`` for this run's scores, subset and
    training run (see module doc); returns it.

    Raises:
        ValueError: score, select or train has not run in this run directory.
    """
    run = RunDir(cfg.run_dir)
    missing = [s for s in ("score", "select", "train") if run.stage_record(s) is None]
    if missing:
        raise ValueError(
            f"baseline: stages {missing} have not run in {cfg.run_dir} (run `p2d-ray run` first)"
        )
    with run.timed("baseline", stage_fingerprint(cfg, "baseline")):
        n_full, n_subset = count_rows(run.scores), count_rows(run.subset)
        summary_path = run.path("train_summary.json")
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        subset_steps = summary.get("steps") or total_steps(n_subset, cfg.train)  # steps the trainer made
        return full_baseline(cfg, n_full, n_subset, subset_steps)
