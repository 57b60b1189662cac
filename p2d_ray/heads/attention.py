"""Attention probabilities of a few heads, for a few query rows, reduced to spans: without eager attention.

P2D's selection reads the attention of the task heads H_T only. Switching a model to eager attention to get
``output_attentions`` materialises ``[B, H, T, T]`` in every layer; here the model keeps SDPA for its own
output and, in the layers that hold task heads, we recompute the softmax for those heads and the requested
query rows only, ``[B, h, R, T]``, and reduce it at once to per-span sums ``[B, h, R, S]``.

How: ``register()`` adds an attention function ``p2d_sdpa`` to transformers' ``AttentionInterface`` (and
``sdpa_mask`` to ``AttentionMaskInterface`` under the same name: without it the model builds no padding mask
for an unknown implementation and padding would be silently ignored). The function is
``sdpa_attention_forward`` (output unchanged) plus, when the forward is called with the keyword
``p2d_probe=AttentionProbe(...)``, the restricted softmax. Per-call state travels in that kwarg (the model
passes unknown kwargs down to the attention function), never in a global, so concurrent calls cannot mix.

``AttentionProbe.stop_after_last``: raise :class:`StopForward` once the highest task-head layer is done, so a
caller that needs attention only skips the remaining layers and the LM head (:func:`probe_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

NAME = "p2d_sdpa"
_registered = False


class StopForward(Exception):
    """Raised inside the forward after the last probed layer (attention-only callers)."""


@dataclass
class AttentionProbe:
    """What to record in one forward, and where the results go.

    heads: ``{layer: [query head, ...]}``.
    rows: ``[B, R]`` long: query positions to read (pad with any valid index and mark it in ``row_valid``).
    spans: ``[B, T, S]`` float one-hot (or weights): column ``s`` marks the key positions of span ``s``.
    result: filled per layer: ``[B, h, R, S]`` fp32 attention mass of each (head, row) on each span.
    """

    heads: dict[int, list[int]]
    rows: torch.Tensor
    spans: torch.Tensor
    stop_after_last: bool = False
    result: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def last_layer(self) -> int:
        return max(self.heads)


def _probe(module: nn.Module, query, key, attention_mask, scaling, probe: AttentionProbe) -> None:
    layer = module.layer_idx
    hs = torch.tensor(probe.heads[layer], device=query.device)  # [h]
    groups = getattr(module, "num_key_value_groups", 1)
    B, _, T, D = query.shape
    rows = probe.rows.to(query.device)  # [B, R]
    R = rows.shape[1]
    # q: [B, h, R, D] (task heads, requested rows); k: [B, h, T, D] (each head's kv head, after RoPE).
    q = query[:, hs].gather(2, rows[:, None, :, None].expand(B, len(hs), R, D))
    k = key[:, hs // groups]
    scale = scaling if scaling is not None else D**-0.5
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, h, R, T]
    if attention_mask is None:  # SDPA's is_causal path: causal, no padding
        allowed = torch.arange(T, device=query.device)[None, None, :] <= rows[:, :, None]  # [B, R, T]
        allowed = allowed[:, None]
    else:  # [B or 1, 1, T, T]: bool (True = attend) or additive float
        m = attention_mask[..., :T].expand(B, -1, -1, -1)
        m = m.gather(2, rows[:, None, :, None].expand(B, m.shape[1], R, T))  # [B, 1, R, T]
        allowed = m if m.dtype == torch.bool else None
        if allowed is None:
            logits = logits + m.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(logits, dim=-1)  # [B, h, R, T]
    probe.result[layer] = attn @ probe.spans.to(attn.device, torch.float32)[:, None]  # [B, h, R, S]


def p2d_sdpa_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """``sdpa_attention_forward`` + the task heads' attention when ``p2d_probe`` is passed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    probe: AttentionProbe | None = kwargs.pop("p2d_probe", None)
    out = sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )
    if probe is not None and module.layer_idx in probe.heads:
        _probe(module, query, key, attention_mask, scaling, probe)
        if probe.stop_after_last and module.layer_idx == probe.last_layer:
            raise StopForward
    return out


def register() -> str:
    """Register ``p2d_sdpa`` once per process; returns its name (for ``model.set_attn_implementation``)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, p2d_sdpa_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def use_probe_attention(model: nn.Module) -> None:
    """Switch ``model`` to ``p2d_sdpa`` (same outputs as SDPA; probes only when asked)."""
    model.set_attn_implementation(register())


def probe_attention(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, probe: AttentionProbe
) -> torch.Tensor | None:
    """Run the decoder on ``[B, T]`` and fill ``probe.result``. Returns the final hidden states ``[B, T, E]``,
    or None when ``probe.stop_after_last`` stopped the forward early. ``model`` must use ``p2d_sdpa``."""
    from p2d_ray.models.loss import base_model

    if model.config._attn_implementation != NAME:
        raise ValueError(f"probe_attention needs attn implementation {NAME!r} (use_probe_attention(model))")
    try:
        out = base_model(model)(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, p2d_probe=probe
        )
    except StopForward:
        return None
    return out.last_hidden_state
