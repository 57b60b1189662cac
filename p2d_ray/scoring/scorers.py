"""Scorers: pure torch on one collated batch (no Ray), chosen by name in ``score.scorer``.

A batch is ``formatting.collate``'s dict: ``input_ids``, ``attention_mask``, ``loss_mask``, all ``[B, T]``.
Every scorer returns :class:`ScoreOutput` with per-sample ``[B]`` tensors; ``loss_full`` / ``loss_gated``
are None where a scorer does not compute them.

- ``influence`` (P2D's default; AttentionInfluence's score restricted to the task heads):
  ``(L_gated - L_full) / L_full`` where ``L_gated`` is the loss with the task heads gated off
  (``HeadSet.gates_off()``, mode ``zero`` or ``uniform``). High = the sample needs the task heads.
- ``activation``: how strongly the task heads fire: mean L2 norm of their outputs ``[D]`` over the
  positions that predict scored tokens, averaged over task heads. One forward pass.
- ``perplexity``: the ungated per-sample loss (the classic baseline; rank ascending to keep low loss).
- ``ifd``: Instruction-Following Difficulty (Cherry-LLM, Li et al. 2024): loss of the response given the
  prompt ÷ loss of the response alone. High = the prompt helps little, the sample is hard to follow.
  Cherry-LLM drops samples with IFD >= 1 (the prompt does not help at all: misaligned pairs); their score is
  set to 0 so they rank below every kept sample, while ``loss_full`` / ``loss_gated`` keep both raw losses.
- ``icl_attention`` (P2D's own Stage 2 scorer): task-head attention from probe queries to corpus rows placed
  as ICL demonstrations; scores contexts, not batches: see ``scoring/icl.py`` (built by the actor).
- ``noop``: zeros, no model call: measures the pipeline's ceiling.
- ``gradient_alignment`` (p2d_ray.scoring.gradient): the cosine between the row's loss gradient and the
  probe's, both in the task heads' parameter subspace (or ``<g_i, G> / L_i`` with finite differences). High =
  training on the row lowers the probe loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from p2d_ray.heads.gates import GateMode, HeadGates
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.loss import hidden_states, loss_from_hidden, sample_loss
from p2d_ray.models.shared_lower import SharedLowerLayers

SCORERS = ("influence", "activation", "perplexity", "ifd", "noop", "gradient_alignment")  # batch scorers
USES_HEADS = {"influence": True, "activation": True, "perplexity": False, "ifd": False, "noop": False}
USES_HEADS["gradient_alignment"] = True
USES_HEADS["icl_attention"] = True  # a context scorer: scoring/icl.py (built by the actor)
# Per scorer, the [B] components written as score columns beside score / loss_full / loss_gated.
COMPONENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "gradient_alignment": (
        "directional_derivative",
        "grad_norm",
        "loss_plus",
        "loss_minus",
    ),  # scoring/gradient.py
    "icl_attention": ("icl_weight", "icl_metric", "icl_contexts"),
}
EPS = 1e-8


@dataclass
class ScoreOutput:
    score: torch.Tensor  # [B] fp32
    n_tokens: torch.Tensor  # [B] long: scored (target) tokens
    loss_full: torch.Tensor | None = None  # [B] mean loss, all heads on
    loss_gated: torch.Tensor | None = None  # [B] mean loss, task heads gated off (ifd: response alone)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # scorer-specific [B] component columns


def relative_increase(loss_gated: torch.Tensor, loss_full: torch.Tensor) -> torch.Tensor:
    """``(L_gated - L_full) / L_full`` per sample; ``L_full`` is clamped away from 0."""
    return (loss_gated - loss_full) / loss_full.clamp(min=EPS)


def influence_score(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    heads: HeadSet,
    mode: GateMode = "zero",
    chunk_tokens: int = 1024,
    fused: bool = False,
) -> ScoreOutput:
    """Relative loss increase when the task heads are gated off.

    ``fused=True`` runs both passes in ONE forward: the batch is stacked twice ``[2B, T]`` with
    per-sample gates ``[2B, L, H]`` (ones for the first B rows, ``gates_off`` for the last B); otherwise two
    forwards of ``[B, T]``. Both give the same numbers (tested); which is faster depends on the hardware.
    The two-forward path runs the layers below the lowest gated layer once (models.shared_lower): the gated
    pass costs ``(L - l_min) / L`` of a forward.
    """
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    B = ids.shape[0]
    off = heads.gates_off().to(ids.device)  # [L, H]
    if fused:
        gates = torch.cat([torch.ones_like(off).expand(B, -1, -1), off.expand(B, -1, -1)])  # [2B, L, H]
        with HeadGates(model, gates, mode) as hg:
            hg.attention_mask = torch.cat([am, am])
            both = sample_loss(
                model, torch.cat([ids, ids]), hg.attention_mask, torch.cat([lm, lm]), chunk_tokens
            )
        loss_full, loss_gated = both.mean[:B], both.mean[B:]
        n_tokens = both.n_tokens[:B]
    else:
        shared = SharedLowerLayers(model, min(layer for layer, _ in heads))
        full = loss_from_hidden(model, shared.full(ids, am), ids, lm, chunk_tokens)
        with HeadGates(model, off, mode) as hg:
            hg.attention_mask = am
            gated = loss_from_hidden(model, shared.rerun(), ids, lm, chunk_tokens)
        loss_full, loss_gated, n_tokens = full.mean, gated.mean, full.n_tokens
    return ScoreOutput(relative_increase(loss_gated, loss_full), n_tokens, loss_full, loss_gated)


def activation_score(
    model: nn.Module, batch: dict[str, torch.Tensor], heads: HeadSet, chunk_tokens: int = 1024
) -> ScoreOutput:
    """Mean L2 norm of the task heads' outputs over the positions that predict scored tokens.

    Position ``t`` predicts token ``t+1``, so the positions are ``loss_mask[:, 1:]`` placed at ``[:, :-1]``.
    The same forward also gives ``loss_full`` (the LM head on scored positions only).
    """
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    with HeadGates(model, None, capture=True) as hg:
        hidden = hidden_states(model, ids, am)  # [B, T, E]
        pred = torch.zeros_like(lm, dtype=torch.float32)
        pred[:, :-1] = lm[:, 1:].float()  # [B, T]: 1 where the position predicts a scored token
        total = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
        for layer, hs in heads.by_layer().items():
            out = hg.captured[layer][:, :, hs, :].float()  # [B, T, h, D] pre-gate outputs of task heads
            total += (out.norm(dim=-1) * pred[:, :, None]).sum(dim=(1, 2))  # [B]
    loss = loss_from_hidden(model, hidden, ids, lm, chunk_tokens)
    n = loss.n_tokens
    score = total / (n.clamp(min=1) * len(heads)).float()
    return ScoreOutput(score, n, loss_full=loss.mean)


def perplexity_score(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024
) -> ScoreOutput:
    """The ungated model's mean loss over scored tokens (log-perplexity)."""
    loss = sample_loss(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_tokens)
    return ScoreOutput(loss.mean, loss.n_tokens, loss_full=loss.mean)


def response_alone(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, bos_id: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """``[B, T]`` batch -> ``[B, 1 + R]`` batch of ``bos_id`` + each sample's target (response) tokens only.

    The response is what ``loss_mask`` marks, so this works for every prompt format without re-tokenising
    (Cherry-LLM tokenises the answer alone; a tokenizer merge across the prompt/response boundary is
    the only difference, and encode_row tokenises the two parts separately anyway).
    """
    keep = loss_mask.bool()  # [B, T]
    n = keep.sum(dim=1)  # [B]
    B, R = input_ids.shape[0], int(n.max()) if n.numel() else 0
    ids = torch.full((B, 1 + R), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    am = torch.zeros_like(ids)
    ids[:, 0], am[:, 0] = bos_id, 1
    pos = torch.arange(R, device=ids.device)[None, :] < n[:, None]  # [B, R]: left-aligned response slots
    ids[:, 1:][pos] = input_ids[keep]
    am[:, 1:][pos] = 1
    lm = am.clone()
    lm[:, 0] = 0  # the BOS is context, not a target
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}


def ifd_score(
    model: nn.Module, batch: dict[str, torch.Tensor], bos_id: int, pad_id: int, chunk_tokens: int = 1024
) -> ScoreOutput:
    """``L(response | prompt) / L(response)``; 0 where the ratio is >= 1 (Cherry-LLM's filter)."""
    cond = sample_loss(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_tokens)
    alone_batch = response_alone(batch["input_ids"], batch["loss_mask"], bos_id, pad_id)
    alone = sample_loss(model, **alone_batch, chunk_tokens=chunk_tokens)
    ratio = cond.mean / alone.mean.clamp(min=EPS)
    score = torch.where(ratio < 1, ratio, torch.zeros_like(ratio))
    return ScoreOutput(score, cond.n_tokens, loss_full=cond.mean, loss_gated=alone.mean)


def alignment_score(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    compass,
    first_layer: int,
    eps: float = 0.05,
    method: str = "exact",
    chunk_tokens: int = 1024,
    normalize: str = "cosine",
):
    """``score = d_i / |g_i|`` (cosine), ``d_i / L_i`` (loss) or ``d_i`` (none), ``d_i = <g_i, G>``.

    ``compass`` is a :class:`RowGradients` for ``method="exact"``, a :class:`HeadShift` for the finite
    differences. Returns a ScoreOutput with ``loss_full`` = the plain loss and the components in ``extra``:
    ``d_i``, ``|g_i|`` (exact) or the shifted losses (finite differences).
    """
    from p2d_ray.scoring.gradient import (
        DERIVATIVE_COL,
        GRAD_NORM_COL,
        check_alignment,
        finite_difference,
    )

    check_alignment(method, normalize)
    if method == "exact":
        loss, n_tokens, deriv, sq = compass(batch, chunk_tokens)
        extra = {GRAD_NORM_COL: sq.sqrt()}
    else:
        loss, n_tokens, deriv, extra = finite_difference(
            model, batch, compass, first_layer, eps, method, chunk_tokens
        )
    if normalize == "cosine":
        score = deriv / extra[GRAD_NORM_COL].clamp(min=EPS)
    elif normalize == "loss":
        score = deriv / loss.clamp(min=EPS)
    else:
        score = deriv
    return ScoreOutput(score, n_tokens, loss_full=loss, extra={DERIVATIVE_COL: deriv, **extra})


def noop_score(batch: dict[str, torch.Tensor]) -> ScoreOutput:
    """No model call: the scorer for the pipeline-ceiling benchmark."""
    n = batch["loss_mask"][:, 1:].sum(dim=1)
    return ScoreOutput(torch.zeros(n.shape[0]), n)


def build_scorer(
    name: str,
    model: nn.Module | None,
    heads: HeadSet | None = None,
    gate_mode: GateMode = "zero",
    chunk_tokens: int = 1024,
    fused: bool = False,
    bos_id: int = 0,
    pad_id: int = 0,
    probe_gradient=None,
    alignment_eps: float = 0.05,
    alignment_method: str = "exact",
    alignment_normalize: str = "cosine",
) -> Callable[[dict[str, torch.Tensor]], ScoreOutput]:
    """A function ``batch -> ScoreOutput`` for scorer ``name`` running under ``torch.inference_mode`` (the
    exact gradient alignment runs its own forward + backward with autograd instead)."""
    if name not in SCORERS:
        raise ValueError(f"score.scorer={name!r} is not one of {SCORERS}")
    if USES_HEADS[name] and heads is None:
        raise ValueError(f"scorer {name!r} needs the task heads (heads.json)")
    needs_grad = False
    if name == "gradient_alignment":
        from p2d_ray.scoring.gradient import HeadShift, RowGradients, check_alignment

        if probe_gradient is None:
            raise ValueError(
                "scorer 'gradient_alignment' needs the probe gradient (probe_gradient.safetensors)"
            )
        if probe_gradient.meta.get("heads_fingerprint") != heads.fingerprint():
            raise ValueError("the probe gradient was computed for other heads than heads.json")
        check_alignment(alignment_method, alignment_normalize)
        needs_grad = alignment_method == "exact"
        compass = RowGradients(model, probe_gradient) if needs_grad else HeadShift(model, probe_gradient)
        first = probe_gradient.first_layer
        fn = lambda b: alignment_score(  # noqa: E731
            model, b, compass, first, alignment_eps, alignment_method, chunk_tokens, alignment_normalize
        )
    elif name == "influence":
        fn = lambda b: influence_score(model, b, heads, gate_mode, chunk_tokens, fused)  # noqa: E731
    elif name == "activation":
        fn = lambda b: activation_score(model, b, heads, chunk_tokens)  # noqa: E731
    elif name == "perplexity":
        fn = lambda b: perplexity_score(model, b, chunk_tokens)  # noqa: E731
    elif name == "ifd":
        fn = lambda b: ifd_score(model, b, bos_id, pad_id, chunk_tokens)  # noqa: E731
    else:
        fn = noop_score

    def run(batch: dict[str, torch.Tensor]) -> ScoreOutput:
        if needs_grad:  # tensors made under inference_mode can never enter autograd
            return fn(batch)
        with torch.inference_mode():
            return fn(batch)

    return run
