"""The distilled strategy's features (scoring/distill.py): which layers, a forward that stops there, and how the
residual stream is pooled into one vector per row.

l_f (``distill_layer``, stage 1) and l_c (``cascade_layer``, stage 2) are resolved from the config and the
model's depth. The truncated forward raises from a hook on the highest layer needed, so no upper layer, LM head
or backward runs: at layer 3 of SmolLM2's 30 it costs ~0.1 of an exact row (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn


def _n_layers(hf_config) -> int:
    return int(getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer", 1))


def distill_layer(s, hf_config) -> int:
    """l_f: score.distill_layer, else round(L / 10) (at least 1; below the last layer)."""
    n_layers = _n_layers(hf_config)
    layer = s.distill_layer if s.distill_layer is not None else max(1, round(n_layers / 10))
    if not 1 <= layer < max(n_layers, 2):
        raise ValueError(f"score.distill_layer={layer} must be in [1, {n_layers - 1}] for this model")
    return layer


def cascade_layer(s, hf_config) -> int | None:
    """l_c, the cascade's layer: score.distill_cascade_layer, else round(L / 2); None (no cascade) when
    score.distill_cascade_fraction is 0 or the default is not above l_f (a model too shallow for two stages).
    An explicit layer must lie above l_f and below the last layer."""
    if s.distill_cascade_fraction <= 0:
        return None
    n_layers, l_f = _n_layers(hf_config), distill_layer(s, hf_config)
    if s.distill_cascade_layer is None:
        layer = round(n_layers / 2)
        return layer if l_f < layer < n_layers else None
    if not l_f < s.distill_cascade_layer < n_layers:
        raise ValueError(
            f"score.distill_cascade_layer={s.distill_cascade_layer} must be in [{l_f + 1}, {n_layers - 1}] "
            f"for this model (above distill_layer={l_f}, below the last layer)"
        )
    return s.distill_cascade_layer


# -- features: the truncated forward --------------------------------------------------------------
class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def truncated_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """The residual stream after decoder layer ``layer - 1`` (= ``output_hidden_states[layer]``), ``[B, T, E]``,
    from a forward that stops there: a hook on that layer raises, so no upper layer, LM head or backward runs."""
    return truncated_hiddens(model, input_ids, attention_mask, [layer])[0]


def truncated_hiddens(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]
) -> list[torch.Tensor]:
    """:func:`truncated_hidden` at several layers from ONE forward that stops at the highest of them."""
    from p2d_ray.models.geometry import decoder_layers
    from p2d_ray.models.loss import base_model

    top, got = max(layers), {}

    def keep(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if layer == top:
                raise _Stop(h)
            got[layer] = h

        return hook

    blocks = decoder_layers(model)
    handles = [blocks[layer - 1].register_forward_hook(keep(layer)) for layer in sorted(set(layers))]
    try:
        base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop as done:
        got[top] = done.hidden
    finally:
        for h in handles:
            h.remove()
    if top not in got:
        raise RuntimeError(f"the forward never reached decoder layer {top - 1}")
    return [got[layer] for layer in layers]


def pool_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, E]`` -> ``[B, 2E + 1]`` float32: mean and position-weighted mean (weight = position + 1) over
    the row's tokens, and log(length)."""
    m = attention_mask.to(torch.float32)  # [B, T]
    h = hidden.to(torch.float32)
    n = m.sum(1).clamp(min=1)  # [B]
    mean = (h * m[..., None]).sum(1) / n[:, None]
    w = m * torch.arange(1, m.shape[1] + 1, dtype=torch.float32, device=m.device)[None]
    wmean = (h * w[..., None]).sum(1) / w.sum(1).clamp(min=1)[:, None]
    return torch.cat([mean, wmean, n.log()[:, None]], dim=1)


# The cascade's second stage pools more: + the mean over the response tokens and the last token's state,
# each pool's block weighted 1 / sqrt(its width) ("block-balanced"). Offline at layer 15 this beat the three
# engine pools at every refine band (nine SmolLM2 corpora and the 3,000-row arithmetic draw: -0.04 against
# -0.06 at r = 0.05; RESULTS.md Session 11 and Session 12, issue 24).
CASCADE_POOLING = "all"


def pool_features_all(
    hidden: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """``[B, T, E]`` -> ``[B, 4E + 1]``: :func:`pool_features` (mean, position-weighted mean, log length),
    the mean over the response tokens (``loss_mask``) and the last real token's state (right padding)."""
    h = hidden.to(torch.float32)
    lm = loss_mask.to(torch.float32)
    resp = (h * lm[..., None]).sum(1) / lm.sum(1).clamp(min=1)[:, None]
    last = h[torch.arange(len(h), device=h.device), (attention_mask.sum(1) - 1).clamp(min=0)]
    return torch.cat([pool_features(hidden, attention_mask), resp, last], dim=1)


def pool_blocks(d: int, pooling: str) -> list[int] | None:
    """The widths of a feature vector's pool blocks (for block balancing), or None: not balanced."""
    if pooling != "all":
        return None
    e = (d - 1) // 4
    return [e, e, 1, e, e]
