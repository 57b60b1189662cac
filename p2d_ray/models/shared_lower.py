"""Shared lower layers: run a batch through the whole decoder once, then re-run only layers ``first..L-1``.

Scorers that compare passes which differ only from some layer up (influence: heads gated off from the lowest
gated layer; gradient alignment: head weights shifted from the lowest task-head layer) compute the same
activations below that layer in every pass. :class:`SharedLowerLayers` records, during the one full pass,
the input ``[B, T, E]`` of layer ``first`` and the keyword arguments the model hands each decoder layer
(causal mask -- per layer for Qwen2/Qwen3 sliding windows --, rotary ``position_embeddings``,
``position_ids``), then :meth:`rerun` calls layers ``first..L-1`` and the final norm directly with them.
A rerun costs ``(L - first) / L`` of a forward.

Wired for the llama-like families (llama, mistral, qwen2, qwen3: in transformers 5.23 their decoder layer
returns the hidden states and the base model applies ``norm`` after the last layer). For other supported
families (gpt2, gpt_neox) :meth:`rerun` falls back to a full forward: same numbers, no saving.
"""

from __future__ import annotations

import torch
from torch import nn

from p2d_ray.models.geometry import decoder_layers, model_family
from p2d_ray.models.loss import base_model, hidden_states

WIRED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class SharedLowerLayers:
    """Usage (hooks exist only inside :meth:`full`)::

    shared = SharedLowerLayers(model, first_layer=l_min)
    h0 = shared.full(input_ids, attention_mask)    # [B, T, E] final hidden states, one full forward
    with something_that_changes_layers_from(l_min):
        h1 = shared.rerun()                          # [B, T, E], layers l_min..L-1 only
    """

    def __init__(self, model: nn.Module, first_layer: int):
        self.model = model
        self.layers = decoder_layers(model)
        if not 0 <= first_layer < len(self.layers):
            raise ValueError(f"first_layer={first_layer} outside the model's {len(self.layers)} layers")
        self.first = first_layer
        self.wired = model_family(model) in WIRED_FAMILIES
        self._inputs: torch.Tensor | None = None  # [B, T, E] input of layer `first`
        self._kwargs: dict[int, dict] = {}  # layer -> kwargs the model passed it
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def rerun_fraction(self) -> float:
        """Cost of one :meth:`rerun` in forwards (decoder layers only; embeddings and norm are negligible)."""
        return (len(self.layers) - self.first) / len(self.layers) if self.wired else 1.0

    def full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One full forward ``[B, T] -> [B, T, E]`` (after the final norm), recording what a rerun needs."""
        self._batch = (input_ids, attention_mask)
        self._kwargs.clear()
        self._inputs = None
        if not self.wired:
            return hidden_states(self.model, input_ids, attention_mask)
        handles = [
            layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
            if i >= self.first
        ]
        try:
            out = hidden_states(self.model, input_ids, attention_mask)
        finally:
            for h in handles:
                h.remove()
        assert self._inputs is not None and len(self._kwargs) == len(self.layers) - self.first
        return out

    def _recorder(self, index: int):
        def hook(module, args, kwargs):
            if index == self.first:
                self._inputs = args[0] if args else kwargs["hidden_states"]
            self._kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    def rerun(self) -> torch.Tensor:
        """Final hidden states ``[B, T, E]`` recomputed from layer ``first`` under the model's current
        weights and hooks (the layers below ``first`` must not have changed since :meth:`full`)."""
        if self._batch is None:
            raise RuntimeError("SharedLowerLayers.rerun() before full()")
        if not self.wired:
            return hidden_states(self.model, *self._batch)
        h = self._inputs
        for i in range(self.first, len(self.layers)):
            h = self.layers[i](h, **self._kwargs[i])
            if isinstance(h, tuple):  # older layer signatures return (hidden, ...)
                h = h[0]
        return base_model(self.model).norm(h)
