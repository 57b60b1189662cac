"""Plain-torch pieces of a training step, shared by the Ray Train worker and the in-process step timer:
row encoding into micro-batches, THE training step (:func:`train_step`, over DeepSpeed's engine in the
worker or :class:`TorchEngine` in the timer), step counting, memory and identity probes.
"""

from __future__ import annotations

import hashlib
import math
import resource
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from p2d_ray.config import DataConfig, P2DConfig, TrainConfig
from p2d_ray.data.formatting import collate, encode_row
from p2d_ray.models.loss import batch_loss


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


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of a plain (unwrapped) causal LM on a collated batch: ``models.loss.batch_loss``."""
    return batch_loss(model, batch)


class TorchEngine:
    """DeepSpeed's engine interface over a plain torch model and optimizer, for one process without Ray.

    Same semantics as ``deepspeed.DeepSpeedEngine``: ``engine(**batch)`` is the module's forward,
    ``backward(loss)`` scales the loss by ``1 / grad_accum``, ``step()`` clips and steps the optimizer at the
    accumulation boundary only. Lets :func:`train_step` be the one training step of the worker and of
    ``trainer.time_train_steps``.
    """

    def __init__(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int, grad_clip: float
    ):
        self.module, self.optimizer = module, optimizer
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.micro_steps = 0
        self._grad_norm: float | None = None

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.grad_clip > 0:
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


@dataclass
class StepResult:
    """One optimizer step on one process: mean micro-batch loss, rows and real (unpadded) tokens."""

    loss: float
    rows: int
    tokens: int
    grad_norm: float | None
    lr: float


def train_step(
    engine,
    micro_batches: Sequence[list[dict]],
    encode: Callable[[list[dict]], dict[str, torch.Tensor] | None],
    device: torch.device,
    skipped: Counter | None = None,
) -> StepResult:
    """THE training step: ``grad_accum`` micro-batches of rows -> forward (``engine`` wraps
    ``models.loss.MaskedLM``, whose forward returns the loss) -> backward -> ``engine.step()``, which
    updates the weights at the accumulation boundary.

    Raises:
        RuntimeError: a micro-batch had no trainable row (``encode`` returned None).
    """
    loss_sum, rows, tokens = 0.0, 0, 0
    for rows_list in micro_batches:
        batch = encode(rows_list)
        if batch is None:
            raise RuntimeError(f"a micro-batch had no trainable row; skipped so far: {dict(skipped or {})}")
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = engine(**batch)  # scalar: token-weighted mean over the micro-batch's target tokens
        engine.backward(loss)
        engine.step()  # steps the optimizer at the accumulation boundary only
        loss_sum += loss.item()
        rows += len(rows_list)
        tokens += int(batch["attention_mask"].sum())
    norm = engine.get_global_grad_norm()
    return StepResult(
        loss=loss_sum / max(len(micro_batches), 1),
        rows=rows,
        tokens=tokens,
        grad_norm=None if norm is None else float(norm),
        lr=float(engine.get_lr()[0]),
    )


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
