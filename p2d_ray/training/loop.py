"""Plain-torch pieces of a training step, shared by the Ray Train worker and the in-process step timer:
row encoding into micro-batches, the response-only loss, step counting, memory and identity probes.
"""

from __future__ import annotations

import hashlib
import math
import resource
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from p2d_ray.config import DataConfig, P2DConfig, TrainConfig
from p2d_ray.data.formatting import collate, encode_row, resolve_format


def train_format(data: DataConfig, columns) -> str:
    """The format rows are trained in. ``icl`` is a *scoring* prompt (probe demonstrations before each row);
    training uses the row itself, so icl trains as prompt_response (or plain without those columns)."""
    fmt = resolve_format(data, columns)
    if fmt == "icl":
        has_pr = data.prompt_column in set(columns) and data.response_column in set(columns)
        fmt = "prompt_response" if has_pr else "plain"
    return fmt


def encode_rows(
    rows: Iterable[dict], tokenizer, data: DataConfig, fmt: str, skipped: Counter
) -> dict[str, torch.Tensor] | None:
    """Rows -> a right-padded micro-batch (``[B, T]`` input_ids / attention_mask / loss_mask).

    Rows that cannot be trained on (empty, no target tokens ...) are counted in ``skipped`` by reason,
    never dropped silently. Returns None when no row of the batch survived.
    """
    encoded = []
    for row in rows:
        try:
            encoded.append(encode_row(row, tokenizer, data, fmt))
        except ValueError as err:
            skipped[str(err)] += 1
    if not encoded:
        return None
    return collate(encoded, tokenizer.pad_token_id)


def masked_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over response tokens only.

    logits ``[B, T, V]`` predict token ``t+1`` at position ``t``; ``loss_mask[t] = 1`` marks target tokens.
    The full ``[B, T, V]`` logits are materialised: fine for the demo's small vocabulary; for a 150k
    vocabulary at long context prefer small micro-batches (``train.batch_size``) with ``grad_accum``.
    """
    target = input_ids[:, 1:]  # [B, T-1]
    mask = loss_mask[:, 1:].to(logits.dtype)  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), reduction="none")
    return (nll * mask.flatten().float()).sum() / mask.sum().clamp_min(1.0)


def forward_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return masked_lm_loss(out.logits, batch["input_ids"], batch["loss_mask"])


def global_batch(train: TrainConfig) -> int:
    """Rows consumed by one optimizer step: micro-batch x workers x gradient accumulation."""
    return train.batch_size * train.num_workers * train.grad_accum


def total_steps(n_rows: int, train: TrainConfig) -> int:
    """Optimizer steps of a run: ``epochs`` passes of ``ceil(n_rows / global_batch)`` steps, capped by
    ``max_steps`` (same arithmetic as p2d_ray.report.aer.train_steps)."""
    steps = train.epochs * math.ceil(n_rows / global_batch(train))
    return min(steps, train.max_steps) if train.max_steps is not None else steps


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: peak allocated by torch. CPU: the process's peak resident set size (Linux reports KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def params_digest(params: Iterable[torch.Tensor]) -> str:
    """Bitwise fingerprint of tensors (order matters): equal digests on every rank = identical weights."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def step_stats(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    s = sorted(seconds)
    return {
        "n": len(s),
        "mean": sum(s) / len(s),
        "median": s[len(s) // 2],
        "min": s[0],
        "max": s[-1],
    }


def steady_step_stats(state: dict) -> dict:
    """Step-time stats without each attempt's first step (data pipeline and kernel warm-up)."""
    warm = set(state.get("first_steps", []))
    steady = [t for i, t in enumerate(state["step_seconds"], start=1) if i not in warm]
    return {**step_stats(steady), "excluded_first_steps": sorted(warm)}


def torch_threads(cfg: P2DConfig) -> int:
    """Ray sets OMP_NUM_THREADS from the worker's CPUs; choose the thread count deliberately."""
    return cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker))
