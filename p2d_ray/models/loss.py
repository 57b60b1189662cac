"""THE masked next-token loss of the project, without ever materialising ``[B, T, V]`` logits.

Every stage uses it: localisation (per-sample loss under head gates), scoring (per-sample and per-token
losses), training (token-weighted batch mean), evaluation (summed response loss) and demo pre-training
(``loss_mask = attention_mask``: every real token).

A vocabulary of 150k tokens makes full logits the largest tensor of a forward pass (B=16, T=2048 in fp32:
20 GB). We run the model's *base* (decoder stack + final norm) to hidden states ``[B, T, E]``, gather only
the positions whose next token is a target (``loss_mask``), and apply the LM head to at most
``chunk_tokens`` of those positions at a time: peak extra memory is ``[chunk_tokens, V]``. With grad
enabled, each chunk's logits are recomputed in the backward pass (activation checkpointing), so memory
stays ``[chunk, V]`` in training too.

Shift convention (formatting.py): ``loss_mask[b, t] = 1`` means token ``t`` is a target, predicted from
position ``t - 1``. Position 0 is never predicted.

API (all inputs ``[B, T]`` as from ``formatting.collate``):

- ``sample_loss(model, input_ids, attention_mask, loss_mask, chunk_tokens) -> SampleLoss``: ``.mean``
  ``[B]`` per-sample mean, ``.n_tokens`` ``[B]``, ``.loss_sum`` ``[B]``, ``.batch_mean()`` scalar,
  ``.per_token(T)`` ``[B, T]``;
- ``hidden_states(model, input_ids, attention_mask)`` + ``loss_from_hidden(model, hidden, input_ids,
  loss_mask, chunk_tokens)``: the same in two steps, when one forward's hidden states serve several losses;
- ``batch_loss(model, batch, chunk_tokens)``: the token-weighted mean over a collated batch (training);
- ``MaskedLM(model)``: an ``nn.Module`` whose ``forward(input_ids, attention_mask, loss_mask)`` returns that
  scalar, so a wrapper such as DeepSpeed's engine runs the whole loss inside its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class SampleLoss:
    """Losses of one batch. ``N`` = number of target tokens in the batch."""

    token_loss: torch.Tensor  # [N] fp32 cross-entropy of each target token
    sample_index: torch.Tensor  # [N] long: which sample each target token belongs to
    token_position: torch.Tensor  # [N] long: position t of the target token in its sample
    loss_sum: torch.Tensor  # [B] fp32: summed loss over each sample's target tokens
    n_tokens: torch.Tensor  # [B] long: target tokens per sample

    @property
    def mean(self) -> torch.Tensor:
        """``[B]`` per-sample mean loss over target tokens (0 for a sample with no target token)."""
        return self.loss_sum / self.n_tokens.clamp(min=1).to(self.loss_sum.dtype)

    def batch_mean(self) -> torch.Tensor:
        """Scalar token-weighted mean over the whole batch (the usual training loss)."""
        return self.token_loss.sum() / max(int(self.token_loss.numel()), 1)

    def per_token(self, seq_len: int) -> torch.Tensor:
        """``[B, T]`` loss of each target token at its position, 0 elsewhere."""
        B = self.loss_sum.shape[0]
        out = self.token_loss.new_zeros(B, seq_len)
        out[self.sample_index, self.token_position] = self.token_loss
        return out


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT wraps the HF model; its .base_model is the LoRA wrapper, not the decoder stack.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection hidden -> vocab (tied or untied to the input embeddings alike)."""
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    return head


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack including the final norm: ``model.model`` (llama, mistral, qwen),
    ``model.transformer`` (gpt2), ``model.gpt_neox`` -- found through ``base_model_prefix``."""
    inner = _unwrap(model)
    base = getattr(inner, "base_model", None)
    if base is None or base is inner:
        raise ValueError(f"{type(inner).__name__}: cannot find the base model under the LM head")
    return base


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, T, E]`` (after the final norm). No KV cache is built."""
    out = base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def _chunk_ce(head: nn.Module, softcap: float | None, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # [n, V], fp32 for a stable log-softmax (as HF's loss does)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="none")  # [n]


def loss_from_hidden(
    model: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_tokens: int = 1024,
) -> SampleLoss:
    """Apply the LM head in chunks of ``chunk_tokens`` to the positions that predict target tokens.

    Args:
        hidden: ``[B, T, E]`` final hidden states.
        input_ids, loss_mask: ``[B, T]``; ``loss_mask[b, t] = 1`` when token ``t`` is scored.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    B, T, _ = hidden.shape
    assert input_ids.shape == (B, T) and loss_mask.shape == (B, T), "input_ids/loss_mask must be [B, T]"
    # Target token t is predicted by position t-1: select positions [B, T-1] where loss_mask[:, 1:] is set.
    sel = loss_mask[:, 1:].bool()
    sample_index, pred_pos = sel.nonzero(as_tuple=True)  # [N], [N]
    h = hidden[:, :-1][sel]  # [N, E]
    targets = input_ids[:, 1:][sel]  # [N]
    head = lm_head(model)
    softcap = getattr(_unwrap(model).config, "final_logit_softcapping", None)
    # Checkpointing bounds memory when there are several chunks; with one chunk its logits exist at the same
    # peak either way, and recomputing them in backward would only cost another LM-head forward (~0.13 of a
    # SmolLM2 forward per row in the exact gradient scorer, BENCHMARKS.md).
    use_ckpt = torch.is_grad_enabled() and h.requires_grad and h.shape[0] > chunk_tokens
    parts = []
    for start in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if use_ckpt:
            # Recompute the chunk's [n, V] logits in backward instead of keeping every chunk alive.
            parts.append(checkpoint(_chunk_ce, head, softcap, hc, tc, use_reentrant=False))
        else:
            parts.append(_chunk_ce(head, softcap, hc, tc))
    token_loss = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    loss_sum = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(
        0, sample_index, token_loss
    )
    n_tokens = sel.sum(dim=1)
    return SampleLoss(token_loss, sample_index, pred_pos + 1, loss_sum, n_tokens)


def sample_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_tokens: int = 1024,
) -> SampleLoss:
    """Forward pass + chunked loss. Inputs are ``[B, T]`` (as from ``formatting.collate``)."""
    hidden = hidden_states(model, input_ids, attention_mask)
    return loss_from_hidden(model, hidden, input_ids, loss_mask, chunk_tokens)


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024) -> torch.Tensor:
    """Scalar token-weighted mean loss over every target token of a collated batch (the training loss)."""
    return sample_loss(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_tokens
    ).batch_mean()


class MaskedLM(nn.Module):
    """A causal LM with the loss inside its forward: ``forward(input_ids, attention_mask, loss_mask)`` ->
    scalar :func:`batch_loss`. Training wraps the model in it so DeepSpeed's engine (and its ZeRO hooks on
    the root module) sees one forward that returns the loss; ``.model`` is the causal LM itself."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        return sample_loss(self.model, input_ids, attention_mask, loss_mask, self.chunk_tokens).batch_mean()
