"""The Ray Train worker: ``train_func`` builds model, adaptation and DeepSpeed engine inside each worker.

``train_func`` reads top to bottom as its named steps (Ray's DeepSpeed convention):

1. :func:`setup`: ``DS_ACCELERATOR=cpu`` without GPUs before ``import deepspeed`` (the other variables,
   e.g. ``TORCH_EXTENSIONS_DIR`` for the cached communication op, arrive through the runtime_env); load the
   base model, make it trainable per ``train.adaptation`` (only trained parameters reach the optimizer),
   wrap it in ``models.loss.MaskedLM`` (forward = THE masked loss, no ``[B, T, V]`` logits) and in
   ``deepspeed.initialize`` on the process group Ray created (gloo on CPU);
2. :func:`restore`: resume from ``ray.train.get_checkpoint()`` when there is one (a restarted worker group,
   or a rerun of the same run name): DeepSpeed module + optimizer state and our step counter / curves;
3. :func:`step`: ``loop.train_step`` (the one training step, also timed by ``trainer.time_train_steps``)
   on micro-batches streamed from ``ray.train.get_dataset_shard("train")``, pass after pass, until the
   run's optimizer-step budget is spent; rank 0 tracks every step (``tracking.Tracker``: TensorBoard,
   MLflow / W&B, a periodic progress line);
4. :func:`save`: every ``checkpoint_every`` steps and at the end every rank saves its DeepSpeed shard into
   one directory and reports it (Ray merges the ranks' shards in storage). The last checkpoint also
   carries ``export/``: the trained update in its portable form (head deltas, PEFT adapter or full model),
   written by rank 0, which the driver turns into ``<run_dir>/adapter``. A timing run (``timing_only``,
   the AER's full-step estimate) saves no weights and reports its step times (:func:`report_timing`).

Data order after a resume is not replayed exactly (Ray Data does not preserve order); the step count,
optimizer state and weights are.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2d_ray.config import P2DConfig

STATE_FILE = "train_state.json"
EXPORT_DIR = "export"


def _setup_env(use_gpu: bool) -> None:
    # Everything else (caches, offline switches) arrives through the job's runtime_env (p2d_ray.runtime).
    # Must precede the first `import deepspeed` in this process: it picks its accelerator at import.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    from p2d_ray.assets.cache import use_this_environments_ninja

    use_this_environments_ninja()  # the op is built once, not again by whichever ninja PATH finds first


def deepspeed_config(cfg: P2DConfig, world_size: int, bf16: bool) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # Our optimizer is torch AdamW over the trained parameters only (DeepSpeed's fused/CPU Adam need
        # extra compiled ops); DeepSpeed supports client optimizers under ZeRO with this flag.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _export_update(engine, cfg: P2DConfig, heads, out: Path, rank: int) -> None:
    """Write the trained update in portable form into ``out`` (rank 0 writes; all ranks join gathers)."""
    from p2d_ray.models.loading import load_tokenizer
    from p2d_ray.training.deltas import delta_state
    from p2d_ray.training.export import save_head_deltas

    adaptation = cfg.train.adaptation
    module = engine.module.model  # engine.module is the MaskedLM wrapper (models/loss.py)
    # ZeRO-3 partitions parameters: gather a full state dict on rank 0 (a collective: every rank calls it).
    state = engine._zero3_consolidated_16bit_state_dict() if cfg.train.zero_stage == 3 else None
    if state is not None:  # keys of the MaskedLM wrapper: "model.<name>" -> "<name>"
        state = {k.removeprefix("model."): v for k, v in state.items()}
    if rank != 0:
        return
    if adaptation == "heads":
        specs, values = delta_state(module)
        save_head_deltas(specs, values, heads, out / "heads")
    elif adaptation == "lora":
        module.save_pretrained(
            str(out / "peft"), state_dict=state, save_embedding_layers=False
        )  # never adapted
    else:
        module.save_pretrained(str(out / "model"), state_dict=state, safe_serialization=True)
        load_tokenizer(cfg.model).save_pretrained(str(out / "model"))


@dataclass
class Session:
    """Everything one worker builds in :func:`setup` and the later steps use."""

    cfg: P2DConfig
    config: dict
    engine: object  # deepspeed.DeepSpeedEngine over models.loss.MaskedLM(model)
    model: torch.nn.Module  # the causal LM being trained (engine.module.model)
    params: list  # the trained parameters
    n_trainable: int
    heads: object  # HeadSet | None
    tokenizer: object
    device: torch.device
    rank: int
    world: int
    n_steps: int
    state: dict = field(
        default_factory=lambda: {
            "step": 0,
            "loss_curve": [],
            "lr_curve": [],
            "grad_norm_curve": [],
            "tokens_per_s_curve": [],
            "step_seconds": [],
            "first_steps": [],  # the first step of every attempt, which also pays for the data start-up
            "skipped": {},
            "rows_seen": 0,
            "resumes": [],  # one entry per restart or rerun: the step and checkpoint it continued from
        }
    )
    resumed_from: int | None = None
    has_export: bool = False
    fail_at: int | None = None


# -- 1. setup ---------------------------------------------------------------------------------------------
def setup(config: dict) -> Session:
    """Build the model, its adaptation and the DeepSpeed engine on the process group Ray created."""
    cfg = P2DConfig.model_validate(config["cfg"])
    _setup_env(cfg.train.use_gpu)

    import deepspeed
    import ray.train
    import ray.train.torch

    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.models.loss import MaskedLM
    from p2d_ray.training.adaptation import prepare_model
    from p2d_ray.training.deltas import count_trainable, trainable_parameters
    from p2d_ray.training.loop import torch_threads, total_steps

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO banner per rank is noise here
    torch.set_num_threads(torch_threads(cfg))
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    heads = HeadSet.from_json(config["heads"]) if config.get("heads") else None
    model = prepare_model(load_model(cfg.model, device), cfg.train, heads)
    model.train()
    params = trainable_parameters(model)
    n_trainable = count_trainable(model)  # before ZeRO-3 partitions the parameters (numel 0 on each rank)
    # Only the trained parameters reach the optimizer: its state is proportional to them, and weight
    # decay can never touch a frozen weight.
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    world = ctx.get_world_size()
    engine, _, _, _ = deepspeed.initialize(
        model=MaskedLM(model, cfg.score.loss_chunk_tokens),  # forward returns THE loss (no [B, T, V] logits)
        optimizer=optimizer,
        config=deepspeed_config(cfg, world, bf16),
    )
    return Session(
        cfg=cfg,
        config=config,
        engine=engine,
        model=model,
        params=params,
        n_trainable=n_trainable,
        heads=heads,
        tokenizer=load_tokenizer(cfg.model),
        device=device,
        rank=ctx.get_world_rank(),
        world=world,
        n_steps=total_steps(config["n_rows"], cfg.train),
        # Inject a failure only on a fresh start (restore clears it), so the restarted group goes past it.
        fail_at=config.get("fail_at_step"),
    )


# -- 2. restore -------------------------------------------------------------------------------------------
def restore(s: Session) -> None:
    """Resume from the newest complete checkpoint of this run: Ray's latest registered one
    (``ray.train.get_checkpoint()``: a restarted worker group, or a rerun of the same run name) or a newer
    complete one in the run's storage that Ray had not registered yet (a worker lost while the controller was
    behind, a rerun after a failure or Ctrl-C / SIGTERM). Loads the DeepSpeed module + optimizer state and our
    step counter / curves. Rank 0 chooses and every rank loads the same checkpoint."""
    import ray.train
    import torch.distributed as dist

    from p2d_ray.training.checkpoints import checkpoint_step, newest_complete_checkpoint

    given = ray.train.get_checkpoint()
    choice = [None]
    if s.rank == 0:
        candidates = []
        if given is not None:
            candidates.append((checkpoint_step(given.path), given.path, "ray"))
        found = newest_complete_checkpoint(s.config.get("checkpoint_root"), s.world)
        if found is not None:
            candidates.append((*found, "storage"))
        # Ray's own on a tie: same checkpoint, already resolved on its filesystem.
        choice = [max(candidates, key=lambda c: (c[0], c[2] == "ray")) if candidates else None]
    if s.world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return
    _, path, via = choice[0]
    checkpoint = given if via == "ray" and given is not None else ray.train.Checkpoint(path)
    with checkpoint.as_directory() as ckpt_dir:
        # Frozen weights were never saved (exclude_frozen_parameters): load the rest, non-strict.
        _, client = s.engine.load_checkpoint(ckpt_dir, load_module_strict=False)
        s.has_export = (Path(ckpt_dir) / EXPORT_DIR).is_dir()
    for key, value in (client or {})["p2d_state"].items():
        s.state[key] = value
    s.state.setdefault("resumes", []).append({"from_step": s.state["step"], "checkpoint": path, "via": via})
    if s.rank == 0:
        print(f"[p2d-ray] train: resumed from the checkpoint at step {s.state['step']} ({path})", flush=True)
    s.resumed_from, s.fail_at = s.state["step"], None


# -- 3. step ----------------------------------------------------------------------------------------------
# Rows each rank shuffles at a time (``train.seed`` and the pass number seed it). Without it the order is
# whatever Ray Data streams, the seed changes nothing, and "5 seeds" of compare can be bitwise one run (two of
# five were, Session 11). A training row is text, a few KB at most: this bounds the buffer to tens of MB.
SHUFFLE_BUFFER_ROWS = 4096


def _shuffle_seed(seed: int, n_pass: int, rank: int) -> int:
    """One 32-bit seed per (train.seed, pass, rank), without collisions between neighbouring values."""
    import numpy as np

    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, n_pass, rank]).generate_state(1)[0])


def seeded_passes(shard, batch_size: int, seed: int, rank: int, skip: int = 0):
    """Endless stream of pyarrow tables of ``batch_size`` rows over ``shard`` (this rank's Ray Data
    DataIterator), pass after pass, each pass shuffled on this rank (seeded by ``seed``, the pass and the rank);
    the first ``skip`` micro-batches are consumed unseen (a resumed run replays the same seeded passes)."""
    for n_pass in itertools.count():
        n = 0
        batches = shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
            local_shuffle_seed=_shuffle_seed(seed, n_pass, rank),
        )
        for table in batches:
            n += 1
            if skip > 0:
                skip -= 1
                continue
            yield table
        if n == 0:
            raise RuntimeError(f"rank {rank}: its shard of the training data is empty")


def micro_batches(s: Session):
    """Row lists of this rank's shard (``seeded_passes``), skipping what a resumed run already consumed (by
    count; which rows reach which rank is Ray Data's split)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    consumed = s.state["step"] * s.cfg.train.grad_accum
    for table in seeded_passes(shard, s.cfg.train.batch_size, s.cfg.train.seed, s.rank, consumed):
        yield table.to_pylist()


def step(s: Session, stream, skipped: Counter) -> dict:
    """One optimizer step (``loop.train_step``), its numbers averaged / summed over ranks, into the state."""
    import torch.distributed as dist

    from p2d_ray.training.loop import encode_rows, train_step

    t0 = time.perf_counter()
    accum = s.cfg.train.grad_accum
    batches = [next(stream) for _ in range(accum)]

    def encode(rows):
        return encode_rows(rows, s.tokenizer, s.cfg.data, s.config["fmt"], skipped)

    r = train_step(s.engine, batches, encode, s.device, skipped)
    # Log the loss averaged over ranks (the gradient already is); rows and tokens summed.
    t = torch.tensor([r.loss, float(r.rows), float(r.tokens)], dtype=torch.float64, device=s.device)
    dist.all_reduce(t)  # NCCL needs the tensor on the device
    seconds = time.perf_counter() - t0
    st = s.state
    st["step"] += 1
    metrics = {
        "loss": t[0].item() / s.world,
        "lr": r.lr,
        "grad_norm": r.grad_norm,
        "tokens_per_s": t[2].item() / seconds,
    }
    st["loss_curve"].append(metrics["loss"])
    st["lr_curve"].append(r.lr)
    st["grad_norm_curve"].append(r.grad_norm)
    st["tokens_per_s_curve"].append(metrics["tokens_per_s"])
    st["rows_seen"] += int(t[1].item())
    st["step_seconds"].append(seconds)
    if st["step"] == (s.resumed_from or 0) + 1:
        st["first_steps"].append(st["step"])
    st["skipped"] = dict(skipped)
    return metrics


# -- 4. save ----------------------------------------------------------------------------------------------
def save(s: Session, final: bool) -> None:
    """Every rank saves its DeepSpeed shard into one directory and reports it (Ray merges the ranks'
    shards in storage); the final checkpoint also carries ``export/`` and the state file."""
    import ray.train

    from p2d_ray.training.checkpoints import write_rank_marker

    st = s.state
    metrics = {"step": st["step"], "loss": st["loss_curve"][-1] if st["loss_curve"] else float("nan")}
    with tempfile.TemporaryDirectory() as tmp:
        s.engine.save_checkpoint(
            tmp, tag=f"step{st['step']}", client_state={"p2d_state": st}, exclude_frozen_parameters=True
        )
        if final:
            _export_update(s.engine, s.cfg, s.heads, Path(tmp) / EXPORT_DIR, s.rank)
        if s.rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(st))
        write_rank_marker(Path(tmp), s.rank)  # last: what this rank wrote, for the completeness check
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            # Unique per step; the final one apart, since a shortened rerun may end on a periodic step.
            checkpoint_dir_name=f"checkpoint_{st['step']:07d}" + ("_final" if final else ""),
        )


def report_timing(s: Session) -> None:
    """A timing run's result: the step times and :func:`final_stats` as ``result.metrics``. Ray Train 2.60
    keeps only metrics that come with a checkpoint, so rank 0 reports a checkpoint holding just the state
    file (no weights, no optimizer state)."""
    import ray.train

    metrics = {"step": s.state["step"], "step_seconds": s.state["step_seconds"], **s.state["final"]}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, STATE_FILE).write_text(json.dumps(s.state))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if s.rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="timing")


def final_stats(s: Session, loop_seconds: float, with_digest: bool = True) -> dict:
    """Identity of the ranks' weights (``with_digest``), peak memory and sizes (collectives: every rank
    calls it)."""
    import torch.distributed as dist

    from p2d_ray.training.loop import params_digest, peak_memory_bytes, steady_step_stats

    # Every rank must end with the same weights (ZeRO <= 2 keeps a full copy of each parameter).
    digest = params_digest(s.params) if with_digest and s.cfg.train.zero_stage < 3 else None
    digests = [None] * s.world
    dist.all_gather_object(digests, digest)
    peak = torch.tensor([peak_memory_bytes(s.device)], dtype=torch.float64, device=s.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {
        "ranks_identical": None if digest is None else len(set(digests)) == 1,
        "param_digests": digests,
        "peak_memory_bytes": int(peak.item()),
        "peak_memory_kind": "cuda_max_allocated" if s.device.type == "cuda" else "cpu_max_rss",
        "trainable_params": s.n_trainable,
        "total_params": sum(p.numel() for p in s.model.parameters()),
        "world_size": s.world,
        "resumed_from_step": s.resumed_from,
        "loop_seconds_this_attempt": loop_seconds,
        "step_time": steady_step_stats(s.state),
        "total_steps": s.n_steps,
    }


def train_func(config: dict) -> None:
    """Ray Train per-worker entry point: setup -> restore -> step ... (save every ``checkpoint_every``) ->
    save the final checkpoint with the export.

    ``config``: ``cfg`` (P2DConfig as JSON), ``fmt`` (row format), ``n_rows`` (rows in the training data),
    ``heads`` (HeadSet JSON or None), ``tb_dir`` (TensorBoard directory or None), ``checkpoint_root`` (the
    run's checkpoint directory, read by :func:`restore`), ``fail_at_step`` (tests: raise once at that step,
    before any restore, to exercise FailureConfig; with ``fail_kill`` the last rank is SIGKILLed instead),
    ``timing_only`` (the AER's full-step timing: no restore, no weights saved, no export; the step times
    and :func:`final_stats` reported as the result's metrics, :func:`report_timing`).
    """
    import ray.train

    from p2d_ray.training.tracking import Tracker

    s = setup(config)
    timing_only = bool(config.get("timing_only"))
    if not timing_only:
        restore(s)
    tracker = Tracker(
        s.cfg,
        config.get("tb_dir"),
        s.n_steps,
        s.state["step"],
        enabled=s.rank == 0,
        label="baseline" if timing_only else "train",
    )
    skipped = Counter(s.state["skipped"])
    stream = micro_batches(s)
    t_first = time.perf_counter()
    try:
        while s.state["step"] < s.n_steps:
            if s.fail_at == s.state["step"]:
                if config.get("fail_kill"):  # a lost worker (a spot node gone): the last rank dies outright
                    if s.rank == s.world - 1:
                        os.kill(os.getpid(), signal.SIGKILL)
                else:
                    raise RuntimeError(
                        f"injected failure at step {s.state['step']} (fail_at_step, tests only)"
                    )
            tracker.log(s.state["step"] + 1, step(s, stream, skipped))
            periodic = s.state["step"] % s.cfg.train.checkpoint_every == 0 and s.state["step"] < s.n_steps
            if periodic and not timing_only:
                save(s, final=False)
    finally:
        tracker.close()
    # A timing run's weights are thrown away: no digest of them (a pass over every weight on every rank).
    s.state["final"] = final_stats(s, time.perf_counter() - t_first, with_digest=not timing_only)
    if timing_only:  # the AER's full-step timing (p2d_ray.baseline): step times, no weights saved
        report_timing(s)
    elif s.resumed_from == s.state["step"] and s.has_export:
        # A rerun of a finished run: its final checkpoint (with the export) is already the latest.
        ray.train.report({"step": s.state["step"]})
    else:
        save(s, final=True)
