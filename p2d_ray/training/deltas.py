"""Head deltas: the only trainable parameters of P2D's sparse head adaptation (Stage 3).

For each selected query head ``(l, h)`` the update touches
- its rows of the query projection (``D`` output features),
- its key/value group's rows of the key and value projections (GQA: a group shared by several selected
  heads is one set of rows, trained once),
- its columns of the output projection (``D`` input features; ``train_o_proj``).

All selected slices of one projection module are gathered into ONE :class:`HeadDelta` with a sorted index
of output rows (``axis="rows"``) or input columns (``axis="cols"``). The base weight stays frozen and
untouched; a forward hook adds the delta's contribution to the module's output::

    rows:  y[..., idx] += x @ Δᵀ            Δ [r, in],   x [B, T, in]  -> [B, T, r]
    cols:  y           += x[..., idx] @ Δᵀ   Δ [out, r],  x[..., idx] [B, T, r] -> [B, T, out]

which is exactly ``y = x @ (W + scatter(Δ))ᵀ`` without materialising a full-size weight, and exactly a LoRA
product with a one-hot selection matrix (p2d_ray.training.export). ``merge_head_deltas`` writes
``W + scatter(Δ)`` into the weights and removes the hooks, leaving a plain model.

Works for every family in p2d_ray.models.geometry: separate q/k/v (llama, mistral, qwen2, qwen3), fused
``query_key_value`` (gpt_neox) and fused ``c_attn`` Conv1D (gpt2; weight stored ``[in, out]``).
Biases stay frozen (as in LoRA), so the update is expressible as a standard PEFT LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_map

DELTA_CHILD = "head_delta"  # attribute name of the HeadDelta child inside its projection module


def _features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a transformers Conv1D (weight ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    raise TypeError(f"head deltas support nn.Linear and Conv1D projections, got {type(module).__name__}")


@dataclass(frozen=True)
class DeltaSpec:
    """Which rows (output features) or columns (input features) of one projection module are trained."""

    module_name: str  # dotted name in the model, e.g. "model.layers.0.self_attn.q_proj"
    axis: str  # "rows" | "cols"
    index: tuple[int, ...]  # sorted, unique feature indices
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of Δ: ``[r, in]`` for rows, ``[out, r]`` for cols."""
        r = len(self.index)
        return (r, self.in_features) if self.axis == "rows" else (self.out_features, r)

    def to_json(self) -> dict:
        return {
            "module_name": self.module_name,
            "axis": self.axis,
            "index": list(self.index),
            "out_features": self.out_features,
            "in_features": self.in_features,
        }

    @classmethod
    def from_json(cls, d: dict) -> DeltaSpec:
        return cls(d["module_name"], d["axis"], tuple(d["index"]), d["out_features"], d["in_features"])


def plan_head_deltas(model: nn.Module, heads: HeadSet, train_o_proj: bool = True) -> list[DeltaSpec]:
    """One :class:`DeltaSpec` per projection module touched by ``heads``, in module order.

    Index sets are unions, so a GQA key/value group shared by several selected heads appears once.
    Raises ValueError if ``heads`` was localised on a model of another shape, or is empty.
    """
    attention = attention_map(model)
    heads.check_fits(attention.geometry)
    if len(heads) == 0:
        raise ValueError("heads.json selects no heads: nothing to train with train.adaptation=heads")
    names = {id(m): n for n, m in model.named_modules()}
    rows: dict[int, set[int]] = {}  # id(module) -> output-feature indices
    cols: dict[int, set[int]] = {}  # id(module) -> input-feature indices
    modules: dict[int, nn.Module] = {}
    for layer, head in heads:
        hp = attention.layers[layer].heads[head]
        slices = [hp.q, hp.k, hp.v] + ([hp.o] if train_o_proj else [])
        for ws in slices:
            target = rows if ws.is_output_axis else cols
            modules[id(ws.module)] = ws.module
            target.setdefault(id(ws.module), set()).update(range(ws.start, ws.stop))
    both = rows.keys() & cols.keys()
    assert not both, f"a module would get both row and column deltas: {[names[i] for i in both]}"
    specs = []
    for key, axis in [(k, "rows") for k in rows] + [(k, "cols") for k in cols]:
        index = rows[key] if axis == "rows" else cols[key]
        out_f, in_f = _features(modules[key])
        specs.append(DeltaSpec(names[key], axis, tuple(sorted(index)), out_f, in_f))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(specs, key=lambda s: order[s.module_name])


class HeadDelta(nn.Module):
    """Trainable Δ on some rows or columns of one frozen projection, added at forward by a hook.

    Registered as child ``head_delta`` of the projection, so its parameter is named
    ``<module>.head_delta.delta`` and travels with the model (DeepSpeed broadcast, state dicts).
    """

    def __init__(self, spec: DeltaSpec, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.spec = spec
        self.axis = spec.axis
        # Zero init: the adapted model starts exactly at the base model.
        self.delta = nn.Parameter(torch.zeros(spec.shape, dtype=dtype, device=device))
        self.register_buffer(
            "index", torch.tensor(spec.index, dtype=torch.long, device=device), persistent=False
        )
        self._handle = None

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.axis == "rows":
            # [B, T, in] @ [in, r] -> [B, T, r], added to the selected output features.
            return output.index_add(-1, self.index, F.linear(x, self.delta).to(output.dtype))
        # x[..., idx] [B, T, r] @ [r, out] -> [B, T, out]
        return output + F.linear(x.index_select(-1, self.index), self.delta).to(output.dtype)

    def attach(self, module: nn.Module) -> None:
        module.add_module(DELTA_CHILD, self)
        self._handle = module.register_forward_hook(self.hook)

    def detach(self, module: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        delattr(module, DELTA_CHILD)

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        """``W <- W + scatter(Δ)`` in the module's weight layout; rows/columns outside ``index`` untouched."""
        w = module.weight
        delta = self.delta.to(w.dtype)
        conv = isinstance(module, Conv1D)  # weight [in, out]: output features along dim 1
        if self.axis == "rows":
            dim, src = (1, delta.T) if conv else (0, delta)
        else:
            dim, src = (0, delta.T) if conv else (1, delta)
        w.index_add_(dim, self.index.to(w.device), src)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def attach_head_deltas(
    model: nn.Module, heads: HeadSet, train_o_proj: bool = True, dtype: torch.dtype | None = None
) -> list[HeadDelta]:
    """Freeze every base weight and attach zero-initialised head deltas. Returns the deltas, whose
    parameters are the only ones with ``requires_grad`` (what the optimizer must get)."""
    return attach_from_specs(model, plan_head_deltas(model, heads, train_o_proj), dtype=dtype)


def attach_from_specs(
    model: nn.Module, specs: list[DeltaSpec], dtype: torch.dtype | None = None
) -> list[HeadDelta]:
    freeze(model)
    modules = dict(model.named_modules())
    deltas = []
    for spec in specs:
        module = modules.get(spec.module_name)
        if module is None:
            raise ValueError(
                f"head delta targets module {spec.module_name!r}, which this model does not have"
            )
        if hasattr(module, DELTA_CHILD):
            raise ValueError(f"{spec.module_name} already has a head delta attached")
        if _features(module) != (spec.out_features, spec.in_features):
            raise ValueError(
                f"{spec.module_name}: delta made for (out, in) = ({spec.out_features}, {spec.in_features}), "
                f"module has {_features(module)}"
            )
        w = module.weight
        hd = HeadDelta(spec, dtype or w.dtype, w.device)
        hd.attach(module)
        deltas.append(hd)
    return deltas


def head_deltas(model: nn.Module) -> dict[str, HeadDelta]:
    """Attached deltas by projection module name."""
    return {
        name.removesuffix("." + DELTA_CHILD): m
        for name, m in model.named_modules()
        if isinstance(m, HeadDelta)
    }


def delta_state(model: nn.Module) -> tuple[list[DeltaSpec], dict[str, torch.Tensor]]:
    """(specs, ``{module_name: Δ}``) of the attached deltas, detached copies on CPU."""
    deltas = head_deltas(model)
    specs = [hd.spec for hd in deltas.values()]
    return specs, {name: hd.delta.detach().cpu().clone() for name, hd in deltas.items()}


@torch.no_grad()
def load_delta_values(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy Δ values (``{module_name: Δ}``) into the attached deltas; every attached delta must be given."""
    deltas = head_deltas(model)
    if set(values) != set(deltas):
        raise ValueError(
            f"delta values for {sorted(set(values) ^ set(deltas))[:5]} do not match the attached deltas"
        )
    for name, hd in deltas.items():
        if tuple(values[name].shape) != tuple(hd.delta.shape):
            raise ValueError(f"{name}: delta shape {tuple(values[name].shape)} != {tuple(hd.delta.shape)}")
        hd.delta.copy_(values[name].to(hd.delta.dtype))


def merge_head_deltas(model: nn.Module) -> nn.Module:
    """Write ``W + scatter(Δ)`` into every projection with a delta and remove the deltas and hooks.

    Returns the same (now plain) model; weights outside the selected rows/columns are bitwise unchanged.
    """
    modules = dict(model.named_modules())
    for name, hd in head_deltas(model).items():
        module = modules[name]
        hd.merge_into(module)
        hd.detach(module)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
