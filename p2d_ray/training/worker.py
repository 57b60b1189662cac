"""The Ray Train worker: ``train_func`` builds model, adaptation and DeepSpeed engine inside each worker.

Per worker (Ray's DeepSpeed convention):
1. environment before ``import deepspeed``: ``DS_ACCELERATOR=cpu`` without GPUs, ``TORCH_EXTENSIONS_DIR``
   from the driver so the JIT-built communication op is compiled once and cached;
2. load the base model, make it trainable per ``train.adaptation`` (only trained parameters reach the
   optimizer), wrap it with ``deepspeed.initialize`` on the process group Ray created (gloo on CPU);
3. resume from ``ray.train.get_checkpoint()`` when there is one (a restarted worker group, or a rerun of
   the same run name): DeepSpeed module + optimizer state and our step counter / loss curve;
4. stream micro-batches from ``ray.train.get_dataset_shard("train")``, pass after pass, until the run's
   optimizer-step budget is spent; every ``checkpoint_every`` steps and at the end every rank saves its
   DeepSpeed shard into one directory and reports it (Ray merges the ranks' shards in storage). The last
   checkpoint also carries ``export/``: the trained update in its portable form (head deltas, PEFT adapter
   or full model), written by rank 0, which the driver turns into ``<run_dir>/adapter``.

Data order after a resume is not replayed exactly (Ray Data does not preserve order); the step count,
optimizer state and weights are.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from p2d_ray.config import P2DConfig

STATE_FILE = "train_state.json"
EXPORT_DIR = "export"


def _setup_env(env: dict[str, str], use_gpu: bool) -> None:
    for key, value in env.items():
        os.environ[key] = value
    # Must precede the first `import deepspeed` in this process: it picks its accelerator at import.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")


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
    module = engine.module
    # ZeRO-3 partitions parameters: gather a full state dict on rank 0 (a collective: every rank calls it).
    state = engine._zero3_consolidated_16bit_state_dict() if cfg.train.zero_stage == 3 else None
    if rank != 0:
        return
    if adaptation == "heads":
        specs, values = delta_state(module)
        save_head_deltas(specs, values, heads, out / "heads")
    elif adaptation == "lora":
        module.save_pretrained(str(out / "peft"), state_dict=state)
    else:
        module.save_pretrained(str(out / "model"), state_dict=state, safe_serialization=True)
        load_tokenizer(cfg.model).save_pretrained(str(out / "model"))


def train_func(config: dict) -> None:
    """Ray Train per-worker entry point. ``config``: ``cfg`` (P2DConfig as JSON), ``fmt`` (row format),
    ``n_rows`` (rows in the training data), ``env`` (variables to set before importing DeepSpeed),
    ``fail_at_step`` (tests: raise once at that step, before any restore, to exercise FailureConfig)."""
    cfg = P2DConfig.model_validate(config["cfg"])
    _setup_env(config.get("env", {}), cfg.train.use_gpu)

    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.training.adaptation import prepare_model
    from p2d_ray.training.deltas import count_trainable, trainable_parameters
    from p2d_ray.training.loop import (
        encode_rows,
        forward_loss,
        params_digest,
        peak_memory_bytes,
        steady_step_stats,
        torch_threads,
        total_steps,
    )

    torch.set_num_threads(torch_threads(cfg))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")

    heads = HeadSet.from_json(config["heads"]) if config.get("heads") else None
    model = load_model(cfg.model, device)
    model = prepare_model(model, cfg.train, heads)
    model.train()
    params = trainable_parameters(model)
    n_trainable = count_trainable(model)
    # Only the trained parameters reach the optimizer: its state is proportional to them, and weight
    # decay can never touch a frozen weight.
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world, bf16)
    )

    # first_steps: the first step of every attempt, which also pays for the data pipeline's start-up.
    state = {
        "step": 0,
        "loss_curve": [],
        "step_seconds": [],
        "first_steps": [],
        "skipped": {},
        "rows_seen": 0,
    }
    resumed_from, has_export = None, False
    # Inject a failure only on a fresh start, so the restarted worker group goes past it.
    fail_at = config.get("fail_at_step")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            # Frozen weights were never saved (exclude_frozen_parameters): load the rest, non-strict.
            _, client = engine.load_checkpoint(ckpt_dir, load_module_strict=False)
            has_export = (Path(ckpt_dir) / EXPORT_DIR).is_dir()
        state.update((client or {})["p2d_state"])
        resumed_from, fail_at = state["step"], None

    n_steps = total_steps(config["n_rows"], cfg.train)
    tok = load_tokenizer(cfg.model)
    shard = ray.train.get_dataset_shard("train")
    skipped = Counter(state["skipped"])
    accum = cfg.train.grad_accum

    def save(final: bool) -> None:
        metrics = {
            "step": state["step"],
            "loss": state["loss_curve"][-1] if state["loss_curve"] else float("nan"),
        }
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(
                tmp,
                tag=f"step{state['step']}",
                client_state={"p2d_state": state},
                exclude_frozen_parameters=True,
            )
            if final:
                _export_update(engine, cfg, heads, Path(tmp) / EXPORT_DIR, rank)
            if rank == 0:
                Path(tmp, STATE_FILE).write_text(json.dumps(state))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                # Unique per step; the final one apart, since a shortened rerun may end on a periodic step.
                checkpoint_dir_name=f"checkpoint_{state['step']:07d}" + ("_final" if final else ""),
            )

    def micro_batches():
        """Endless stream over the shard, pass after pass; skips the micro-batches a resumed run has
        already consumed in its current pass (by count: Ray Data does not replay the same order)."""
        consumed = state["step"] * accum
        while True:
            n = 0
            for table in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow"):
                n += 1
                if consumed > 0:
                    consumed -= 1
                    continue
                yield table.to_pylist()
            if n == 0:
                raise RuntimeError(f"rank {rank}: its shard of the training data is empty")

    t_first = time.perf_counter()
    stream = micro_batches()
    while state["step"] < n_steps:
        if fail_at == state["step"]:
            raise RuntimeError(f"injected failure at step {state['step']} (fail_at_step, tests only)")
        t0 = time.perf_counter()
        step_loss, rows = 0.0, 0
        for _ in range(accum):
            rows_list = next(stream)
            batch = encode_rows(rows_list, tok, cfg.data, config["fmt"], skipped)
            if batch is None:
                raise RuntimeError(f"a micro-batch had no trainable row; skipped so far: {dict(skipped)}")
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = forward_loss(engine, batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            step_loss += loss.item() / accum
            rows += len(rows_list)
        # Log the loss averaged over ranks (the gradient already is).
        loss_t = torch.tensor([step_loss, float(rows)], dtype=torch.float64, device=device)  # NCCL: on device
        dist.all_reduce(loss_t)
        state["step"] += 1
        state["loss_curve"].append(loss_t[0].item() / world)
        state["rows_seen"] += int(loss_t[1].item())
        state["step_seconds"].append(time.perf_counter() - t0)
        if state["step"] == (resumed_from or 0) + 1:
            state["first_steps"].append(state["step"])
        state["skipped"] = dict(skipped)
        if state["step"] % cfg.train.checkpoint_every == 0 and state["step"] < n_steps:
            save(final=False)
    train_seconds = time.perf_counter() - t_first

    # Every rank must end with the same weights (ZeRO <= 2 keeps a full copy of each parameter).
    digest = params_digest(params) if cfg.train.zero_stage < 3 else None
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    peak = torch.tensor([peak_memory_bytes(device)], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    state["final"] = {
        "ranks_identical": None if digest is None else len(set(digests)) == 1,
        "param_digests": digests,
        "peak_memory_bytes": int(peak.item()),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
        "trainable_params": n_trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "world_size": world,
        "resumed_from_step": resumed_from,
        "loop_seconds_this_attempt": train_seconds,
        "step_time": steady_step_stats(state),
        "total_steps": n_steps,
    }
    if resumed_from == state["step"] and has_export:
        # A rerun of a finished run: its final checkpoint (with the export) is already the latest.
        ray.train.report({"step": state["step"]})
    else:
        save(final=True)
