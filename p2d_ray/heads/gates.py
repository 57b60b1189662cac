"""Head gates: scale (or replace) each attention head's output before the output projection.

transformers 5 has no working ``head_mask`` for SDPA / flash attention, so we gate on the *input* of each
layer's output projection, ``attn [B, T, H*D]`` (heads concatenated in order): whatever attention kernel
produced it, slicing it per head is exact.

Gates are a float tensor ``[L, H]`` (or ``[B, L, H]``: a gate pattern per sample, so several patterns run
in one batched forward). They may require grad: Stage 1 differentiates the loss with respect to them.

Modes, for a head with gate ``g``:
- ``zero``:    out_h = g * attn_h                       (g=0 removes the head)
- ``uniform``: out_h = g * attn_h + (1 - g) * mean_{s<=t} v_s   (g=0: the head attends uniformly over its
  causal prefix -- AttentionInfluence's masking). ``v`` is the head's value vector (its GQA group's), read
  from the value projection's output by a forward hook, so this too works under any attention kernel.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from p2d_ray.models.geometry import AttentionGeometry, AttentionMap, attention_map

GateMode = Literal["zero", "uniform"]


class HeadGates:
    """Install gates on a model; use as a context manager so the hooks are always removed.

    Example::

        with HeadGates(model, mode="zero") as hg:
            hg.gates = headset.gates_off()          # [L, H]
            logits = model(input_ids).logits
    """

    def __init__(
        self,
        model: nn.Module,
        gates: torch.Tensor | None = None,
        mode: GateMode = "zero",
        capture: bool = False,
        attention: AttentionMap | None = None,
    ):
        """``attention``: the model's map when the caller already holds one (found once per piece of work)."""
        if mode not in ("zero", "uniform"):
            raise ValueError(f"gate mode must be 'zero' or 'uniform', got {mode!r}")
        self.model = model
        self.attention = attention or attention_map(model)
        self.geometry: AttentionGeometry = self.attention.geometry
        self.mode = mode
        self.gates = gates
        # uniform mode needs the padding mask [B, T] so padded positions are not averaged in.
        self.attention_mask: torch.Tensor | None = None
        # capture=True keeps each layer's pre-gate head outputs [B, T, H, D] (for the activation scorer).
        self.capture = capture
        self.captured: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._install()

    # -- hooks ------------------------------------------------------------------------------------
    def _install(self) -> None:
        for layer, la in enumerate(self.attention.layers):
            self._handles.append(la.o_proj.register_forward_pre_hook(self._make_pre_hook(layer)))
            if self.mode == "uniform":
                self._handles.append(la.values.register_forward_hook(self._make_value_hook(layer)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._values.clear()
        self.captured.clear()

    def __enter__(self) -> HeadGates:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _layer_gates(self, layer: int, batch: int) -> torch.Tensor | None:
        g = self.gates
        if g is None:
            return None
        L, H = self.geometry.n_layers, self.geometry.n_heads
        if g.dim() == 2:
            assert g.shape == (L, H), f"gates must be [L={L}, H={H}], got {tuple(g.shape)}"
            return g[layer].view(1, 1, H, 1)
        assert g.shape == (batch, L, H), f"per-sample gates must be [B={batch}, L, H], got {tuple(g.shape)}"
        return g[:, layer].reshape(batch, 1, H, 1)

    def _make_pre_hook(self, layer: int):
        def hook(module, args):
            x = args[0]  # [B, T, H*D]
            B, T, _ = x.shape
            H, D = self.geometry.n_heads, self.geometry.head_dim
            heads = x.view(B, T, H, D)
            if self.capture:
                self.captured[layer] = heads
            g = self._layer_gates(layer, B)
            if g is None:
                return None
            g = g.to(dtype=x.dtype, device=x.device)
            if self.mode == "zero":
                out = heads * g
            else:
                out = heads * g + (1.0 - g) * self._uniform_output(layer, B, T)
            return (out.reshape(B, T, H * D), *args[1:])

        return hook

    def _make_value_hook(self, layer: int):
        la, geo = self.attention.layers[layer], self.geometry
        sl, layout = la.v_slice, la.v_layout

        def hook(module, args, output):
            B, T = output.shape[:2]
            D = geo.head_dim
            if layout == "separate":
                v = output.view(B, T, geo.n_kv_heads, D)
            elif layout == "neox":
                v = output.view(B, T, geo.n_heads, 3 * D)[..., 2 * D :]
            else:  # gpt2: q | k | v along the last axis
                v = output[..., sl].reshape(B, T, geo.n_heads, D)
            self._values[layer] = v  # [B, T, KV, D]

        return hook

    def _uniform_output(self, layer: int, B: int, T: int) -> torch.Tensor:
        """Causal-prefix mean of each query head's values: ``[B, T, H, D]``."""
        v = self._values.pop(layer)  # [B, T, KV, D]
        mask = self.attention_mask
        m = torch.ones(B, T, dtype=v.dtype, device=v.device) if mask is None else mask.to(v.dtype)
        summed = torch.cumsum(v * m[:, :, None, None], dim=1)
        count = torch.cumsum(m, dim=1).clamp(min=1.0)[:, :, None, None]
        mean = summed / count  # [B, T, KV, D]
        # GQA: query head h reads kv head h // group (transformers' repeat_kv order).
        return mean.repeat_interleave(self.geometry.group_size, dim=2)


def gated_forward(model, input_ids, attention_mask, gates, mode: GateMode = "zero"):
    """One forward pass under ``gates``; returns logits ``[B, T, V]``. Convenience for tests and scripts."""
    with HeadGates(model, gates, mode) as hg:
        hg.attention_mask = attention_mask
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
