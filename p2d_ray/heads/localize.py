"""Stage 1: localise the task-sensitive attention heads on a small probe set (``p2d-ray localize``).

Each method gives every query head a score ``[L, H]``; the top fraction globally becomes the ``HeadSet``.

- ``gradient``: mean over probe samples of ``|dL_i / dg_h|`` (Michel et al. 2019, "Are sixteen heads really
  better than one?"), with ``g`` the head gates (all ones) of p2d_ray.heads.gates.
- ``fisher``: mean of ``(dL_i / dg_h)^2``, the empirical Fisher information of the gates.
- ``alps``: a short proxy fine-tune of the attention projections (q/k/v/o) on the probe set, then per head
  the Wasserstein-1 distance between the base and tuned weight entries of its operator (ALPS, ACL
  Findings 2025). Under GQA a query head's operator includes its key/value group's k/v slices.

Per-sample gradients cost one backward pass: the gates are per sample ``[B, L, H]``, and sample ``i``'s loss
depends only on ``gates[i]``, so ``d(sum_i L_i)/d gates[i] = dL_i/d gates[i]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from p2d_ray.config import P2DConfig
from p2d_ray.data.formatting import encode_probe, encode_reference, probe_batches, resolve_format
from p2d_ray.heads.gates import HeadGates
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import AttentionMap, attention_map, slice_weight
from p2d_ray.models.loss import sample_loss

METHODS = ("gradient", "fisher", "alps")


# -- loss ------------------------------------------------------------------------------------------
def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over each sample's target tokens: ``[B]`` (the one loss, models/loss.py)."""
    loss = sample_loss(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert bool((loss.n_tokens > 0).all()), "every probe sample needs at least one target token"
    return loss.mean


@contextmanager
def _frozen(model: nn.Module, trainable: Sequence[nn.Parameter] = ()):
    """Eval mode (no dropout) with every weight frozen except ``trainable``; restores both on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    keep = {id(p) for p in trainable}
    for p, _ in flags:
        p.requires_grad_(id(p) in keep)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


# -- gradient / fisher -----------------------------------------------------------------------------
def gate_gradients(model: nn.Module, attention: AttentionMap, batches: Iterable[dict]) -> torch.Tensor:
    """Per-sample gradients of the loss w.r.t. all-ones head gates: ``[N, L, H]`` over all batches."""
    geo = attention.geometry
    device = next(model.parameters()).device
    grads = []
    with _frozen(model), torch.enable_grad():  # also under a caller's no_grad()
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            B = batch["input_ids"].shape[0]
            gates = torch.ones(B, geo.n_layers, geo.n_heads, device=device, requires_grad=True)
            with HeadGates(model, gates, mode="zero", attention=attention):
                loss = per_sample_loss(model, batch)  # [B]
            (grad,) = torch.autograd.grad(loss.sum(), gates)  # [B, L, H]; row i = dL_i / d gates[i]
            grads.append(grad.float().cpu())
    return torch.cat(grads)


# -- alps ------------------------------------------------------------------------------------------
def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between the empirical distributions of two equal-size samples: ``mean |sort(a) - sort(b)|``."""
    assert a.numel() == b.numel(), f"W1 needs equal-size samples, got {a.numel()} and {b.numel()}"
    return float((a.flatten().float().sort().values - b.flatten().float().sort().values).abs().mean())


def head_operator(
    attention: AttentionMap, layer: int, head: int, weights: dict | None = None
) -> torch.Tensor:
    """Flat weight entries of query head ``head``'s operator: its q rows, its GQA group's k/v rows and its
    o columns. ``weights`` maps module -> a stored weight (e.g. the base snapshot); default: current."""
    hp = attention.layers[layer].heads[head]
    parts = []
    for ws in (hp.q, hp.k, hp.v, hp.o):
        w = None if weights is None else weights[ws.module]
        parts.append(slice_weight(ws, w).detach().flatten())
    return torch.cat(parts)


def alps_distances(
    attention: AttentionMap, base_weights: dict[nn.Module, torch.Tensor], tuned_weights: dict | None = None
) -> torch.Tensor:
    """Per head W1 between the base and the tuned operator (default: the model's current weights): ``[L, H]``."""
    geo = attention.geometry
    scores = torch.zeros(geo.n_layers, geo.n_heads)
    for layer in range(geo.n_layers):
        for head in range(geo.n_heads):
            scores[layer, head] = wasserstein1(
                head_operator(attention, layer, head, base_weights),
                head_operator(attention, layer, head, tuned_weights),
            )
    return scores


def alps_scores(
    model: nn.Module, attention: AttentionMap, batches: Sequence[dict], steps: int, lr: float
) -> torch.Tensor:
    """Proxy fine-tune q/k/v/o weights for ``steps`` minibatches, score heads by W1, restore the weights.

    Optimiser: plain SGD, deliberately. Adam divides each step by a running RMS of the gradient, so every
    parameter with a consistent gradient sign moves ~lr per step whatever its loss sensitivity: after a
    short run all heads move alike and W1 measures noise. With SGD a weight moves in proportion to
    dL/dw accumulated over the probe set, so a head's movement reflects how much the task loss depends on it.
    The steps accumulate in fp32 master copies: in a bf16 model (GPU default) an update of lr * grad is
    often below bf16's resolution and would vanish, leaving W1 = 0.
    """
    modules = list(attention.projections)
    params = [m.weight for m in modules]
    base = {m: m.weight.detach().float().clone() for m in modules}  # also restores the caller's weights
    tuned = {m: w.clone() for m, w in base.items()}  # fp32 masters
    grads = [p.grad for p in params]  # whatever .grad the caller had on them, given back below
    device = params[0].device
    try:
        with _frozen(model, trainable=params), torch.enable_grad():
            for step in range(steps):
                batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
                for p in params:
                    p.grad = None
                per_sample_loss(model, batch).mean().backward()
                with torch.no_grad():
                    for m in modules:
                        tuned[m].add_(m.weight.grad.float(), alpha=-lr)  # SGD step on the master
                        m.weight.copy_(tuned[m])  # the next forward sees the (rounded) tuned weights
        return alps_distances(attention, base, tuned)
    finally:
        with torch.no_grad():
            for m, w in base.items():
                m.weight.copy_(w)
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def head_importance(
    model: nn.Module,
    batches: Sequence[dict],
    method: str,
    *,
    alps_steps: int = 20,
    alps_lr: float = 1e-2,
    attention: AttentionMap | None = None,
) -> torch.Tensor:
    """Score every query head: ``[L, H]`` float32 on CPU, higher = more task-sensitive.

    ``batches``: dicts of ``input_ids`` / ``attention_mask`` / ``loss_mask`` ``[B, T]`` (``collate``).
    ``attention``: the model's map, when the caller holds one. The model's weights and ``requires_grad``
    flags are left exactly as they were.
    """
    if method not in METHODS:
        raise ValueError(f"localize.method={method!r} is not one of {', '.join(METHODS)}")
    attention = attention or attention_map(model)
    if method == "alps":
        scores = alps_scores(model, attention, batches, alps_steps, alps_lr)
    else:
        grads = gate_gradients(model, attention, batches)  # [N, L, H]
        scores = grads.abs().mean(0) if method == "gradient" else grads.pow(2).mean(0)
    if not bool(torch.isfinite(scores).all()):
        raise RuntimeError(f"{method} head scores are not finite (the probe loss diverged?)")
    return scores.float().cpu()


# -- selection -------------------------------------------------------------------------------------
def n_selected(total: int, top_fraction: float, top_k: int | None = None) -> int:
    """How many heads to keep: ``top_k`` if set, else round(top_fraction * total); at least 1."""
    if top_k is not None:
        if top_k > total:
            raise ValueError(f"localize.top_k={top_k} exceeds the model's {total} heads (allowed 1..{total})")
        return top_k
    return max(1, math.floor(top_fraction * total + 0.5))


def top_heads(scores: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The ``count`` highest-scoring (layer, head) pairs; ties go to the lower (layer, head)."""
    L, H = scores.shape
    flat = scores.flatten().tolist()
    order = sorted(range(L * H), key=lambda i: (-flat[i], i))
    return [(i // H, i % H) for i in order[:count]]


def localize_heads(
    model: nn.Module,
    probe_rows: Sequence[dict],
    tokenizer,
    cfg: P2DConfig,
    reference_rows: Sequence[dict] | None = None,
) -> HeadSet:
    """Score all heads with ``cfg.localize.method`` on ``probe_rows`` and keep the top ones globally.

    ``reference_rows`` (general corpus rows): rank by importance on the probe ÷ importance on them.
    ``localize.control=random_heads``: return the falsification control instead, random heads with the
    same count per layer as the task heads (seeded by ``cfg.seed``); the task heads stay in the metadata.
    """
    from p2d_ray.data.io import rows_hash
    from p2d_ray.models.loading import model_fingerprint

    loc = cfg.localize
    t0 = time.perf_counter()
    # Data first (fails on bad rows before any backward), then the model's heads, found once.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = probe_batches(encode_probe(probe_rows, tokenizer, cfg.data), loc.batch_size, pad_id)
    ref = encode_reference(reference_rows, tokenizer, cfg.data) if reference_rows else []  # encodable rows
    attention = attention_map(model)
    geo = attention.geometry
    count = n_selected(geo.total_heads, loc.top_fraction, loc.top_k)
    importance = dict(alps_steps=loc.alps_steps, alps_lr=loc.alps_lr, attention=attention)
    torch.manual_seed(cfg.seed)
    scores = head_importance(model, batches, loc.method, **importance)
    if ref:
        # Contrastive: heads that matter for the task MORE than for general corpus text. Plain importance
        # favours heads every input needs (measured on the demo: layer-0 heads, used by dialogue even more
        # than by arithmetic); dividing by the same method's importance on reference rows removes them.
        torch.manual_seed(cfg.seed)
        contrast = head_importance(
            model, probe_batches(ref, loc.batch_size, pad_id), loc.method, **importance
        )
        scores = scores / contrast.clamp(min=1e-6 * float(contrast.max()) + 1e-12)  # [L, H]
    meta = {
        "method": loc.method,
        "contrast": "corpus" if reference_rows else None,
        "n_reference": len(ref),
        "scores": scores.tolist(),  # [L][H]
        "model": cfg.model.name_or_path,
        "model_fingerprint": model_fingerprint(cfg.model),
        "rows_hash": rows_hash(list(probe_rows)),
        "n_probe": len(probe_rows),
        "top_fraction": loc.top_fraction,
        "top_k": loc.top_k,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    task = HeadSet(tuple(top_heads(scores, count)), geo, meta)
    if loc.control == "random_heads":
        control = task.random_like(cfg.seed)
        control.meta.update(meta, method="random", control="random_heads", seed=cfg.seed)
        control.meta["task_heads"] = [list(h) for h in task.heads]
        return control
    return task


# -- stage -----------------------------------------------------------------------------------------
def run_localize(cfg: P2DConfig) -> dict:
    """``p2d-ray localize``: write ``<run_dir>/heads.json`` and ``heads.png``; returns a summary."""
    if cfg.targets:  # several targets: one model load, targets/<name>/heads.json each (p2d_ray/targets.py)
        from p2d_ray.targets import run_localize_targets

        return run_localize_targets(cfg)
    from p2d_ray.assets.paths import corpus_parquet, probe_path
    from p2d_ray.data.columns import warn_unread
    from p2d_ray.data.io import read_rows, read_table
    from p2d_ray.heads.heatmap import save_heatmap
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.progress import stage_summary
    from p2d_ray.rundir import RunDir, stage_fingerprint
    from p2d_ray.runtime import available_cpus

    run = RunDir(cfg.run_dir)
    path = probe_path(cfg)
    pmap = cfg.data.probe_column_map
    names = read_table(path, "data.probe_path", cfg.data, pmap).column_names
    fmt = resolve_format(cfg.data, names)  # bad columns fail before any model loads
    warn_unread(cfg.data, fmt, names, f"probe set {path}")
    cfg.save(run.path("config.yaml"))
    # The driver may inherit OMP_NUM_THREADS=1 from Ray; Stage 1 runs in one process, so by default use
    # every core this process may run on. On an oversubscribed machine fewer threads can be far faster
    # (OpenMP threads spin waiting for each other): localize.torch_threads. The previous setting is given
    # back to whatever runs next in this process.
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.localize.torch_threads or available_cpus())
    try:
        with run.timed("localize", stage_fingerprint(cfg, "localize")):
            rows = read_rows(path, cfg.localize.max_probe_samples, "data.probe_path", cfg.data, pmap)
            reference = None
            if cfg.localize.contrast == "corpus":
                reference = read_rows(corpus_parquet(cfg), limit=cfg.localize.contrast_samples)
            tokenizer = load_tokenizer(cfg.model)
            model = load_model(cfg.model)
            heads = localize_heads(model, rows, tokenizer, cfg, reference)
            heads.meta["probe_path"] = path
            heads.save(run.heads_json)
            png = save_heatmap(
                torch.tensor(heads.meta["scores"]),
                heads.heads,
                run.path("heads.png"),
                f"{cfg.localize.method} head importance ({len(heads)} of {heads.geometry.total_heads} kept)",
                model=cfg.model.name_or_path,
                probe=path,
            )
    finally:
        torch.set_num_threads(threads)
    stage_summary("localize", heads.meta["seconds"], f"{run.heads_json} ({len(heads)} heads), {png}")
    return {
        "method": heads.meta["method"],
        "contrast": cfg.localize.contrast,
        "control": cfg.localize.control,
        "heads": [list(h) for h in heads.heads],
        "n_heads": len(heads),
        "total_heads": heads.geometry.total_heads,
        "n_probe": heads.meta["n_probe"],
        "seconds": heads.meta["seconds"],
        "heads_json": str(run.heads_json),
        "heatmap": str(png),
    }
