"""Scorer ``gradient_alignment``: the probe's loss gradient in the task heads' subspace as the compass.

TracIn / LESS restricted to the head subspace, from forwards only.

1. **Probe gradient** ``G`` (:func:`probe_gradient`, once per run, on a worker sized like a scoring actor): the gradient of the probe
   set's mean per-row loss w.r.t. the task heads' parameters -- exactly the parameters Stage 3 trains
   (``training.deltas.plan_head_deltas``: each head's q rows, its GQA group's k/v rows, its o_proj columns; a
   group shared by several heads counted once) -- normalised to unit length. Stored per projection module
   in the head-delta layout (rows: ``[r, in]``, cols: ``[out, r]``), so ``G`` is a direction in the very
   parameter space training moves in. Saved as ``probe_gradient.safetensors`` with its fingerprint.
2. **Row score** (``scoring.scorers.alignment_score``): the row's loss gradient ``g_i`` in the same
   subspace, compared with ``G``. ``score.alignment_normalize``: ``cosine`` (default) =
   ``<g_i, G> / |g_i|``, the cosine of LESS (Xia et al. 2024) restricted to the head subspace; ``loss`` = ``<g_i, G> / L_i``; ``none`` = ``<g_i, G>``.

Sign: ``d_i = <g_i, G> > 0`` means the row's gradient points the same way as the probe's, so a descent step on
the row (``theta -= lr * g_i``) changes the probe loss by ``-lr * |grad L_probe| * d_i < 0``: **a high score =
training on the row lowers the probe loss.** Why normalise (RESULTS.md, exact per-row gradients on SmolLM2):
the raw ``d_i`` favours rows with large gradients (hard or long-tailed rows); dividing by ``L_i`` fixes that but
lifts short, easy rows whose small loss makes a small alignment look large; the cosine asks only whether the
row's gradient points the probe's way.

Methods (``score.alignment_method``; all share the layers below the lowest task-head layer ``l_min``):
- ``exact`` (default): one forward with autograd from layer ``l_min`` up and one backward to it, no weight
  gradients: hooks on the heads' projections take each row's gradient slice ``sum_t delta_t^T x_t`` exactly
  (:class:`RowGradients`), so ``<g_i, G>`` and ``|g_i|`` come from one batched pass. Cost ``1 + (L - l_min) / L``
  forwards (a backward without weight gradients costs about one forward).
- ``central``: ``(L_i(theta + eps G) - L_i(theta - eps G)) / 2 eps`` + the plain loss: error ``O(eps^2)``,
  cost ``1 + 2 (L - l_min) / L`` forwards per row (models.shared_lower). No ``|g_i|``: ``cosine`` needs ``exact``.
- ``forward``: ``(L_i(theta + eps G) - L_i(theta)) / eps`` reusing the plain loss: error ``O(eps)``,
  cost ``1 + (L - l_min) / L``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import decoder_layers
from p2d_ray.models.loss import hidden_states, loss_from_hidden
from p2d_ray.models.shared_lower import SharedLowerLayers
from p2d_ray.training.deltas import DeltaSpec, attach_from_specs, head_deltas, plan_head_deltas

FORMAT = "p2d-probe-gradient/1"
FILENAME = "probe_gradient.safetensors"
METHODS = ("exact", "central", "forward")
NORMALIZATIONS = ("cosine", "loss", "none")
GRAD_NORM_COL = "grad_norm"  # |g_i|, the row gradient's norm in the head subspace (exact only)
DERIVATIVE_COL = "directional_derivative"
# The shifted losses L_i(theta +- eps G) beside d_i: the central run also holds the forward estimate
# (L+ - L) / eps, so both can be compared on one pass (loss_minus is NaN for alignment_method=forward).
SHIFTED_COLS = ("loss_plus", "loss_minus")
EPS = 1e-8


def gradient_fingerprint(model_fingerprint: str, heads: HeadSet, probe_hash: str, data: dict) -> str:
    """What ``G`` depends on: the weights, the heads, the probe rows and how they are encoded."""
    payload = {
        "format": FORMAT,
        "model": model_fingerprint,
        "heads": heads.fingerprint(),
        "probe": probe_hash,
        "data": data,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ProbeGradient:
    """Unit direction ``G`` in the head subspace: ``{projection module name: Δ-shaped fp32 tensor}``."""

    specs: list[DeltaSpec]
    direction: dict[str, torch.Tensor]
    meta: dict  # fingerprint, heads, first_layer, model_fingerprint, probe hash, n_probe, grad_norm

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def first_layer(self) -> int:
        """The lowest layer holding a task head: every pass is identical below it."""
        return int(self.meta["first_layer"])

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = {**self.meta, "format": FORMAT, "specs": [s.to_json() for s in self.specs]}
        return save({k: v.contiguous() for k, v in self.direction.items()}, {"p2d": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "probe gradient") -> ProbeGradient:
        from safetensors.torch import load

        tensors = load(data)
        # load() drops the metadata; the header is documented: 8-byte little-endian length, then JSON.
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        raw = header.get("__metadata__", {}).get("p2d")
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{source}: format {meta.get('format')!r} is not {FORMAT!r}")
        specs = [DeltaSpec.from_json(s) for s in meta.pop("specs")]
        meta.pop("format")
        if set(tensors) != {s.module_name for s in specs}:
            raise ValueError(f"{source}: tensors {sorted(tensors)} do not match its specs")
        return cls(specs, tensors, meta)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeGradient:
        return cls.from_bytes(Path(path).read_bytes(), str(path))


def _probe_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """``[B]`` each probe row's mean response loss: the scores' ``loss_full`` of a corpus row, for a probe row."""
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    loss = loss_from_hidden(model, hidden, batch["input_ids"], batch["loss_mask"], chunk_tokens)
    if bool((loss.n_tokens == 0).any()):
        raise ValueError("every probe row needs at least one target token")
    return loss.mean


def probe_row_losses(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], chunk_tokens: int = 1024
) -> list[float]:
    """Each probe row's mean response loss (no gradient), in the batches' order: what a clean row of the
    target task costs the model, measured as ``loss_full`` is (issue 29's typicality reference)."""
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out += _probe_loss(model, batch, chunk_tokens).float().cpu().tolist()
    return out


def probe_gradient(
    model: nn.Module,
    heads: HeadSet,
    batches: Iterable[dict[str, torch.Tensor]],
    meta: dict,
    chunk_tokens: int = 1024,
) -> ProbeGradient:
    """``G = g / |g|`` with ``g`` the gradient of the probe's mean per-row loss w.r.t. the heads' slices.

    Uses the training's own head deltas (zero, so the model is unchanged): ``dL/dΔ`` equals ``dL/dW`` on the
    selected rows / columns. The deltas are removed and every ``requires_grad`` flag restored afterwards.
    ``meta`` must carry ``fingerprint`` (:func:`gradient_fingerprint`); heads, first layer, probe count and
    the gradient's norm are added.
    """
    if "fingerprint" not in meta:
        raise ValueError("probe_gradient: meta needs the gradient's fingerprint")
    specs = plan_head_deltas(model, heads, train_o_proj=True)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    deltas = attach_from_specs(model, specs)
    try:
        n = 0
        device = next(model.parameters()).device
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                _probe_loss(model, batch, chunk_tokens).sum().backward()
                n += batch["input_ids"].shape[0]
        if n == 0:
            raise ValueError("probe_gradient: the probe set is empty")
        grads = {name: hd.delta.grad.detach().float().cpu() / n for name, hd in head_deltas(model).items()}
    finally:
        for name, hd in head_deltas(model).items():
            hd.detach(modules[name])
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    del deltas
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    if not norm > 0:
        raise ValueError("probe_gradient: the probe loss has zero gradient in the heads' subspace")
    direction = {k: g / norm for k, g in grads.items()}
    meta = {
        **meta,
        "heads": [list(h) for h in heads.heads],
        "heads_fingerprint": heads.fingerprint(),
        "first_layer": min(layer for layer, _ in heads.heads),
        "n_probe": n,
        "grad_norm": norm,
    }
    return ProbeGradient(specs, direction, meta)


class HeadShift:
    """Shifts the heads' weight slices in place, ``W[idx] = W0[idx] + step * G``, and restores them exactly
    (a copy of the original slices is kept, so no rounding drift accumulates over millions of rows)."""

    def __init__(self, model: nn.Module, pg: ProbeGradient):
        modules = dict(model.named_modules())
        self._parts = []  # (weight, dim, index, original slice, G in the weight's layout)
        for spec in pg.specs:
            module = modules.get(spec.module_name)
            if module is None:
                raise ValueError(
                    f"probe gradient targets {spec.module_name!r}, which this model does not have"
                )
            w = module.weight
            g = pg.direction[spec.module_name]
            # Δ layout -> weight layout (as HeadDelta.merge_into): Conv1D stores weights [in, out].
            conv = isinstance(module, Conv1D)
            if spec.axis == "rows":
                dim, g = (1, g.T) if conv else (0, g)
            else:
                dim, g = (0, g.T) if conv else (1, g)
            idx = torch.tensor(spec.index, dtype=torch.long, device=w.device)
            orig = w.detach().index_select(dim, idx).clone()
            if tuple(orig.shape) != tuple(g.shape):
                raise ValueError(
                    f"{spec.module_name}: probe gradient {tuple(g.shape)} != slice {tuple(orig.shape)}"
                )
            self._parts.append((w, dim, idx, orig, g.to(device=w.device, dtype=torch.float32)))

    @contextmanager
    def shifted(self, step: float):
        with torch.no_grad():
            for w, dim, idx, orig, g in self._parts:
                w.index_copy_(dim, idx, (orig.float() + step * g).to(w.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for w, dim, idx, orig, _ in self._parts:
                    w.index_copy_(dim, idx, orig)


class MultiRowGradients:
    """Each row's ``<g_i, G_t>`` and ``|g_i^t|^2`` for every target ``t`` (its heads ``H_t``, its unit probe
    gradient ``G_t``) from ONE batched forward + backward over the union of the targets' head subspaces.

    A projection ``y = x W^T`` (or Conv1D's ``x W``) seen by row ``i`` over its tokens ``t``: with
    ``x [B, T, in]`` its input and ``delta [B, T, out] = dL/dy`` (rows do not interact, so the gradient of
    the summed row losses gives every row's own ``delta``), row ``i``'s gradient of the trained slice in the
    head-delta layout is
        rows (q, k, v rows r):  ``P_i = sum_t delta[i, t, r]^T x[i, t]``          ``[|r|, in]``
        cols (o_proj cols c):   ``P_i = sum_t delta[i, t]^T x[i, t, c]``          ``[out, |c|]``
    with ``r`` / ``c`` the union of the targets' rows / columns of that module. Target ``t`` reads its own
    coordinates: ``<g_i, G_t> = sum_modules <P_i[H_t], G_t,module>``, ``|g_i^t|^2 = sum_modules |P_i[H_t]|^2``
    (a target whose coordinates are the module's whole union reads ``P_i`` itself, no copy: always so with
    one target). ``P`` is formed in the backward hook of each projection and dropped at once
    (``B x |r| x in`` floats: ~2 MB per head at B=16 on SmolLM2), a few percent of the forward's work; no
    ``[B, T, out]`` gradient is kept past its layer.

    Autograd starts at the input of the union's lowest layer (a pre-hook makes it require grad) and no
    parameter requires grad during the pass, so the lower layers build no graph and the backward computes
    activation gradients only. ``feature_layer``: also keep the residual stream after decoder layer
    ``feature_layer - 1``, pooled (``features.pool_features``), as ``self.features`` ``[B, D]`` -- the distilled
    strategy's features, taken from this very forward (stored for targets added later, scoring/targets.py).
    """

    def __init__(
        self, model: nn.Module, gradients: dict[str, ProbeGradient], feature_layer: int | None = None
    ):
        modules = dict(model.named_modules())
        layers = decoder_layers(model)
        self.model = model
        self.feature_at = layers[feature_layer - 1] if feature_layer else None
        self.features = None
        self.names = list(gradients)
        self.first = layers[min(pg.first_layer for pg in gradients.values())]
        union: dict[str, tuple[str, set[int]]] = {}
        for pg in gradients.values():
            for spec in pg.specs:
                axis, idx = union.setdefault(spec.module_name, (spec.axis, set()))
                if axis != spec.axis:
                    raise ValueError(f"{spec.module_name}: targets disagree on its delta axis")
                idx.update(spec.index)
        # (module, axis, union index, [(target position k, its positions in the union or None = all, G_t)])
        self._parts = []
        for name, (axis, idx) in union.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"probe gradient targets {name!r}, which this model does not have")
            device = module.weight.device
            index = sorted(idx)
            where = {f: i for i, f in enumerate(index)}
            per_target = []
            for k, pg in enumerate(gradients.values()):
                for spec in pg.specs:
                    if spec.module_name == name:
                        pos = None
                        if list(spec.index) != index:
                            pos = torch.tensor(
                                [where[f] for f in spec.index], dtype=torch.long, device=device
                            )
                        per_target.append((k, pos, pg.direction[name].to(device, torch.float32)))
            self._parts.append(
                (module, axis, torch.tensor(index, dtype=torch.long, device=device), per_target)
            )

    def __call__(self, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024):
        """``(mean loss [B], target tokens [B], dot [K, B], sq [K, B], union sq [B])``; with one target the
        union's ``|P_i|^2`` is its own ``sq[0]``."""
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        B, K = ids.shape[0], len(self.names)
        dot = torch.zeros(K, B, dtype=torch.float64, device=ids.device)
        sq = torch.zeros(K, B, dtype=torch.float64, device=ids.device)
        union_sq = torch.zeros(B, dtype=torch.float64, device=ids.device) if K > 1 else None

        def start_graph(module, args, kwargs):
            if args:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

        def capture(axis: str, idx: torch.Tensor, per_target):
            # Forward: keep the input slice the product needs (rows: the whole input, a view autograd keeps
            # anyway; cols: the selected input features). Backward: form the per-row slice gradient at once and
            # fold it into dot / sq, so no [B, T, out] gradient outlives its layer's backward.
            def hook(module, args, output):
                x = args[0].detach()
                x = x if axis == "rows" else x.index_select(-1, idx)  # [B, T, in']

                def on_grad(delta):  # delta [B, T, out] = dL/dy
                    d = delta.detach().float()
                    d = d.index_select(-1, idx) if axis == "rows" else d  # [B, T, out']
                    per_row = torch.einsum("bto,bti->boi", d, x.float())  # [B, out', in'] on the union
                    if union_sq is not None:
                        union_sq.add_(per_row.square().sum(dim=(1, 2)).double())
                    for k, pos, g in per_target:
                        own = (
                            per_row if pos is None else per_row.index_select(1 if axis == "rows" else 2, pos)
                        )
                        dot[k].add_((own * g).sum(dim=(1, 2)).double())  # target t's Δ layout
                        sq[k].add_(own.square().sum(dim=(1, 2)).double())

                y = output[0] if isinstance(output, tuple) else output
                y.register_hook(on_grad)

            return hook

        params = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = [self.first.register_forward_pre_hook(start_graph, with_kwargs=True)]
        handles += [m.register_forward_hook(capture(axis, idx, pt)) for m, axis, idx, pt in self._parts]
        self.features = None
        if self.feature_at is not None:
            from p2d_ray.scoring.features import pool_features

            def keep(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                self.features = pool_features(hidden.detach(), am)

            handles.append(self.feature_at.register_forward_hook(keep))
        try:
            for p, _ in params:
                p.requires_grad_(False)
            with torch.enable_grad():
                loss = loss_from_hidden(self.model, hidden_states(self.model, ids, am), ids, lm, chunk_tokens)
                loss.mean.sum().backward()  # every row's own delta (rows do not interact)
        finally:
            for h in handles:
                h.remove()
            for p, flag in params:
                p.requires_grad_(flag)
        # A slice whose output never reaches the loss gets no gradient hook call: it adds 0, as it should.
        union_sq = sq[0] if union_sq is None else union_sq
        return loss.mean.detach(), loss.n_tokens, dot.float(), sq.float(), union_sq.float()


class RowGradients(MultiRowGradients):
    """One target's :class:`MultiRowGradients` (the single-target exact scorer's compass): each row's
    ``<g_i, G>`` and ``|g_i|^2`` in the head subspace from one batched forward + backward."""

    def __init__(self, model: nn.Module, pg: ProbeGradient):
        super().__init__(model, {"": pg})

    def __call__(self, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024):
        """``(mean loss [B], target tokens [B], <g_i, G> [B], |g_i|^2 [B])`` for a collated batch."""
        loss, n_tokens, dot, sq, _ = super().__call__(batch, chunk_tokens)
        return loss, n_tokens, dot[0], sq[0]


def check_alignment(method: str, normalize: str) -> None:
    if method not in METHODS:
        raise ValueError(f"score.alignment_method={method!r} is not one of {METHODS}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"score.alignment_normalize={normalize!r} is not one of {NORMALIZATIONS}")
    if normalize == "cosine" and method != "exact":
        raise ValueError(
            f"score.alignment_normalize=cosine needs the row gradient's norm, which only "
            f"score.alignment_method=exact computes (got {method!r}); use normalize=loss with finite differences"
        )


def finite_difference(
    model, batch, shift: HeadShift, first_layer: int, eps: float, method: str, chunk_tokens: int
):
    """``(plain loss [B], target tokens [B], d_i [B], shifted losses)`` from forwards with the slices shifted."""
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    shared = SharedLowerLayers(model, first_layer)
    plain = loss_from_hidden(model, shared.full(ids, am), ids, lm, chunk_tokens)
    with shift.shifted(eps):
        up = loss_from_hidden(model, shared.rerun(), ids, lm, chunk_tokens).mean
    extra = {"loss_plus": up}
    if method == "central":
        with shift.shifted(-eps):
            down = loss_from_hidden(model, shared.rerun(), ids, lm, chunk_tokens).mean
        deriv, extra["loss_minus"] = (up - down) / (2 * eps), down
    else:
        deriv = (up - plain.mean) / eps
    return plain.mean, plain.n_tokens, deriv, extra


def prepare_probe_gradient(
    cfg, heads: HeadSet, fingerprint: str, rows: list[dict], model_fp: str
) -> ProbeGradient:
    """The run's probe gradient: ``<run_dir>/probe_gradient.safetensors`` if it carries ``fingerprint``
    (a resumed run, or `p2d-ray compare` reusing a run), else computed in this process from ``rows`` (the
    plan's probe rows, whose hash is in ``fingerprint``) and saved there. Scoring calls it on a worker
    (:func:`probe_gradient_on_a_worker`), never in the driver.

    Cost: one model load and ``score.alignment_probe_rows`` rows of forward + backward.
    """
    from p2d_ray.assets.paths import probe_path
    from p2d_ray.data.formatting import encode_probe, probe_batches
    from p2d_ray.data.io import rows_hash
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.rundir import RunDir
    from p2d_ray.runtime import available_cpus

    path = RunDir(cfg.run_dir).path(FILENAME)
    if path.is_file():
        old = ProbeGradient.load(path)
        if old.fingerprint == fingerprint:
            return old
    tok = load_tokenizer(cfg.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = probe_batches(encode_probe(rows, tok, cfg.data), cfg.localize.batch_size, pad_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.localize.torch_threads or available_cpus())
    try:
        model = load_model(cfg.model)
        meta = {
            "fingerprint": fingerprint,
            "model_fingerprint": model_fp,
            "probe_hash": rows_hash(rows),
            "probe_path": probe_path(cfg),
        }
        pg = probe_gradient(model, heads, batches, meta, cfg.score.loss_chunk_tokens)
    finally:
        torch.set_num_threads(threads)
    pg.save(path)
    return pg


def _probe_gradient_bytes(cfg, heads: HeadSet, fingerprint: str, rows: list[dict], model_fp: str):
    """The worker's half of :func:`probe_gradient_on_a_worker`: ``(True, bytes)``; the first output is
    tiny, for the driver to wait on (and to receive an error through)."""
    return True, prepare_probe_gradient(cfg, heads, fingerprint, rows, model_fp).to_bytes()


def probe_gradient_on_a_worker(cfg, heads: HeadSet, fingerprint: str, rows: list[dict], model_fp: str):
    """:func:`prepare_probe_gradient` as a Ray task sized like one scoring actor (a GPU node when the
    scoring actors take a GPU), never in the driver: on a cluster the driver sits on the head, which holds
    no GPU and is not sized for a model. Returns the ObjectRef of ``ProbeGradient.to_bytes()``, for the
    scoring actors; it never passes through the driver. Raises what the task raised (e.g. ValueError)."""
    from p2d_ray.runtime import on_a_worker, scoring_worker, worker_result

    done, data = on_a_worker(
        scoring_worker(cfg), _probe_gradient_bytes, cfg, heads, fingerprint, rows, model_fp, num_returns=2
    )
    worker_result(done)
    return data
