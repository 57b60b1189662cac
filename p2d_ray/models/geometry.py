"""Attention geometry per model family: where the heads live and which weight slices belong to each.

Every supported family computes, per layer, an attention output ``attn [B, T, H*D]`` (heads concatenated
in order) and then applies an output projection ``o_proj: H*D -> hidden``. That input is where head gates
act (p2d_ray.heads.gates) and where a head's columns of ``o_proj`` are found (p2d_ray.training).

Query/key/value projections differ by family:
- llama / mistral / qwen2 / qwen3: separate ``q_proj`` (H*D rows), ``k_proj`` / ``v_proj`` (KV*D rows; GQA).
- gpt_neox: fused ``query_key_value`` Linear whose output is viewed as ``[B, T, H, 3*D]`` and chunked into
  q, k, v, so head h's q rows are ``[3Dh, 3Dh+D)``, k rows ``[3Dh+D, 3Dh+2D)``, v rows ``[3Dh+2D, 3Dh+3D)``.
- gpt2: fused ``c_attn`` Conv1D (weight ``[in, 3*H*D]``, so the output axis is dim 1) split into q | k | v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2")


@dataclass(frozen=True)
class WeightSlice:
    """Rows or columns ``[start, stop)`` along ``dim`` of ``module.weight`` (and of ``bias`` when dim is
    the output axis)."""

    module: nn.Module
    dim: int
    start: int
    stop: int
    is_output_axis: bool  # True: the slice indexes the module's outputs (bias slice applies too)


@dataclass(frozen=True)
class HeadParams:
    """The weight slices that make up one query head's operator."""

    q: WeightSlice
    k: WeightSlice
    v: WeightSlice
    o: WeightSlice


@dataclass(frozen=True)
class AttentionGeometry:
    family: str
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int  # key/value heads per layer (== n_heads without GQA)
    head_dim: int
    hidden_size: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def kv_group(self, head: int) -> int:
        """GQA: query head h reads key/value head h // (H / KV) (transformers' repeat_kv order)."""
        return head // self.group_size

    @property
    def total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its attention: one row of :data:`FAMILIES` (no if/elif per family).

    ``layers``: attribute of the base model holding the decoder layers; ``attention``: attribute of a layer
    holding its attention module; ``o_proj``: attribute of that module taking the concatenated heads
    ``[B, T, H*D]``; ``qkv``: the q/k/v layout (a key of ``_HEAD_SLICES``); ``n_layers`` / ``n_heads`` /
    ``hidden``: the config attribute names.
    """

    layers: str
    attention: str
    o_proj: str
    qkv: str  # "separate" | "neox" | "gpt2"
    n_layers: str = "num_hidden_layers"
    n_heads: str = "num_attention_heads"
    hidden: str = "hidden_size"


_LLAMA = Family(layers="layers", attention="self_attn", o_proj="o_proj", qkv="separate")
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt_neox": Family(layers="layers", attention="attention", o_proj="dense", qkv="neox"),
    "gpt2": Family(
        layers="h",
        attention="attn",
        o_proj="c_proj",
        qkv="gpt2",
        n_layers="n_layer",
        n_heads="n_head",
        hidden="n_embd",
    ),
}
assert set(FAMILIES) == set(SUPPORTED_FAMILIES)
_GEOMETRY_ATTR = "_p2d_attention_geometry"  # the geometry, cached on the model object


def model_family(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"model family {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return family


def geometry_from_config(config) -> AttentionGeometry:
    family = model_family(config)
    spec = FAMILIES[family]
    n_layers, n_heads = getattr(config, spec.n_layers), getattr(config, spec.n_heads)
    hidden = getattr(config, spec.hidden)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads  # gpt2 / neox: no GQA
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    if n_heads % n_kv != 0:
        raise UnsupportedModelError(f"{family}: {n_heads} query heads not divisible by {n_kv} kv heads")
    return AttentionGeometry(family, n_layers, n_heads, n_kv, head_dim, hidden)


def attention_geometry(model: nn.Module) -> AttentionGeometry:
    """Geometry of a loaded model; also checks that the modules we hook really have those shapes.

    Computed once per model and cached on the model object (localisation, gates and deltas all ask)."""
    cached = getattr(model, _GEOMETRY_ATTR, None)
    if cached is not None:
        return cached
    geo = geometry_from_config(model.config)
    o_projs = output_projections(model)
    if len(o_projs) != geo.n_layers:
        raise UnsupportedModelError(f"{geo.family}: found {len(o_projs)} layers, config says {geo.n_layers}")
    in_features = _in_features(o_projs[0])
    if in_features != geo.n_heads * geo.head_dim:
        raise UnsupportedModelError(
            f"{geo.family}: o_proj takes {in_features} inputs, expected heads*head_dim = "
            f"{geo.n_heads}*{geo.head_dim}"
        )
    # object.__setattr__: a plain attribute, not a registered submodule or parameter.
    object.__setattr__(model, _GEOMETRY_ATTR, geo)
    return geo


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]  # transformers' Conv1D: weight [in, out]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    spec = FAMILIES[model_family(model)]
    return list(getattr(getattr(model, "base_model", model), spec.layers))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    spec = FAMILIES[model_family(model)]
    return [getattr(layer, spec.attention) for layer in decoder_layers(model)]


def output_projections(model: nn.Module) -> list[nn.Module]:
    """Per layer, the module whose input is the concatenated head outputs ``[B, T, H*D]``."""
    spec = FAMILIES[model_family(model)]
    return [getattr(a, spec.o_proj) for a in attention_modules(model)]


def value_projection(model: nn.Module, layer: int) -> tuple[nn.Module, slice | None, str]:
    """The module producing values for ``layer``, and how to cut V out of its output.

    Returns ``(module, sl, layout)``: layout ``"separate"`` (output is V ``[B, T, KV*D]``), ``"neox"``
    (output ``[B, T, H, 3D]``, V is ``[..., 2D:3D]``) or ``"gpt2"`` (output ``[B, T, 3*H*D]``, V is ``sl``).
    """
    return _value_source(attention_modules(model)[layer], FAMILIES[model_family(model)].qkv, model.config)


def _value_source(attn: nn.Module, layout: str, config) -> tuple[nn.Module, slice | None, str]:
    """:func:`value_projection` for one attention module already found."""
    if layout == "separate":
        return attn.v_proj, None, layout
    if layout == "neox":
        return attn.query_key_value, None, layout
    hidden = config.n_embd
    return attn.c_attn, slice(2 * hidden, 3 * hidden), layout


# Per q/k/v layout: (attention module, geometry, head, its kv group) -> the head's weight slices.
def _separate_slices(attn: nn.Module, geo: AttentionGeometry, head: int, g: int) -> HeadParams:
    d = geo.head_dim
    return HeadParams(
        q=WeightSlice(attn.q_proj, 0, head * d, (head + 1) * d, True),
        k=WeightSlice(attn.k_proj, 0, g * d, (g + 1) * d, True),
        v=WeightSlice(attn.v_proj, 0, g * d, (g + 1) * d, True),
        o=WeightSlice(attn.o_proj, 1, head * d, (head + 1) * d, False),
    )


def _neox_slices(attn: nn.Module, geo: AttentionGeometry, head: int, g: int) -> HeadParams:
    d = geo.head_dim
    qkv, base = attn.query_key_value, 3 * d * head  # output viewed as [B, T, H, 3*D]
    return HeadParams(
        q=WeightSlice(qkv, 0, base, base + d, True),
        k=WeightSlice(qkv, 0, base + d, base + 2 * d, True),
        v=WeightSlice(qkv, 0, base + 2 * d, base + 3 * d, True),
        o=WeightSlice(attn.dense, 1, head * d, (head + 1) * d, False),
    )


def _gpt2_slices(attn: nn.Module, geo: AttentionGeometry, head: int, g: int) -> HeadParams:
    # Conv1D: weight [in, out] -> output axis is dim 1; c_proj input axis is dim 0.
    d, hidden = geo.head_dim, geo.hidden_size
    return HeadParams(
        q=WeightSlice(attn.c_attn, 1, head * d, (head + 1) * d, True),
        k=WeightSlice(attn.c_attn, 1, hidden + head * d, hidden + (head + 1) * d, True),
        v=WeightSlice(attn.c_attn, 1, 2 * hidden + head * d, 2 * hidden + (head + 1) * d, True),
        o=WeightSlice(attn.c_proj, 0, head * d, (head + 1) * d, False),
    )


_HEAD_SLICES = {"separate": _separate_slices, "neox": _neox_slices, "gpt2": _gpt2_slices}


def head_params(model: nn.Module, geo: AttentionGeometry, layer: int, head: int) -> HeadParams:
    """Weight slices of query head ``head`` in ``layer``; k/v are its GQA group's slices."""
    attn = attention_modules(model)[layer]
    return _HEAD_SLICES[FAMILIES[geo.family].qkv](attn, geo, head, geo.kv_group(head))


def slice_weight(ws: WeightSlice, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The sub-tensor of ``weight`` (default: the module's current weight) that ``ws`` names."""
    w = ws.module.weight if weight is None else weight
    return w.narrow(ws.dim, ws.start, ws.stop - ws.start)


@dataclass(frozen=True)
class LayerAttention:
    """One decoder layer's attention modules and head slices, as plain data."""

    o_proj: nn.Module  # input: the concatenated heads [B, T, H*D]
    values: nn.Module  # output holds V; cut it out with ``v_layout`` / ``v_slice`` (see value_projection)
    v_layout: str  # "separate" | "neox" | "gpt2"
    v_slice: slice | None
    heads: tuple[HeadParams, ...]  # per query head; k/v are its GQA group's slices


@dataclass(frozen=True)
class AttentionMap:
    """Where a loaded model's heads live, found once: its geometry and, per layer, the modules and weight
    slices that the gates, the localisation and the head deltas hook or read.

    Built on demand by :func:`attention_map` and held by the caller for one piece of work (not cached on
    the model: wrapping a projection, e.g. by PEFT, would make a cached map stale)."""

    geometry: AttentionGeometry
    layers: tuple[LayerAttention, ...]

    @property
    def projections(self) -> tuple[nn.Module, ...]:
        """Every module holding q/k/v/o weights (fused ones once), in layer order."""
        out: dict[int, nn.Module] = {}
        for layer in self.layers:
            hp = layer.heads[0]
            for ws in (hp.q, hp.k, hp.v, hp.o):
                out.setdefault(id(ws.module), ws.module)
        return tuple(out.values())


def attention_map(model: nn.Module) -> AttentionMap:
    """The model's :class:`AttentionMap` (checks the geometry against the modules, as attention_geometry)."""
    geo = attention_geometry(model)
    spec = FAMILIES[geo.family]
    slices = _HEAD_SLICES[spec.qkv]
    layers = []
    for attn in attention_modules(model):  # one walk of the module tree (HeadGates builds a map per batch)
        values, v_slice, layout = _value_source(attn, spec.qkv, model.config)
        heads = tuple(slices(attn, geo, h, geo.kv_group(h)) for h in range(geo.n_heads))
        layers.append(LayerAttention(getattr(attn, spec.o_proj), values, layout, v_slice, heads))
    return AttentionMap(geo, tuple(layers))
