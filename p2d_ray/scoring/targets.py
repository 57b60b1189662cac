"""Several targets, one corpus pass (``targets:`` in the config; issue 27), exact ``gradient_alignment``.

Every target ``t`` has its own heads ``H_t`` (``targets/<t>/heads.json``) and its own unit probe gradient
``G_t`` in ``H_t``'s head-delta subspace. One forward + ONE backward per row over the union of the targets'
heads gives the row's per-row gradient slice ``P_i`` on the union's coordinates
(``gradient.MultiRowGradients``, whose one-target case is the single-target scorer's ``RowGradients``: the same
hooks, on every projection any target touches); each target's alignment is then read off ``P_i`` restricted to
its own coordinates:

    d_i^t = <P_i[H_t], G_t>,   |g_i^t|^2 = |P_i[H_t]|^2,   score__t = d_i^t / |g_i^t|  (cosine)

which is exactly what a single-target pass computes (the backward's activation gradients do not depend on
which slices are read; only the matmul's rounding differs). Cost: the union's lowest layer decides where
the graph starts, and the per-row products grow with the union's width (a few percent of the forward each).

Scores layout (why): ONE scores directory for the pass, ``scores/<shard>.parquet`` with ``score__<t>``,
``directional_derivative__<t>`` and ``grad_norm__<t>`` columns per target beside the shared ``loss_full`` /
``n_tokens`` (``score`` itself is NaN: no single relevance exists across targets, and ``grad_norm`` is the
union subspace's norm). Its markers, manifest, quarantine and resume are the single-target machinery
unchanged, so exactly-once accounting and resume per shard hold for all targets at once (one marker per
shard, written last), and the quarantine is shared. Each target then gets a *view*,
``targets/<t>/scores/<shard>.parquet`` with its own columns renamed to the single-target names (``score``,
``directional_derivative``, ``grad_norm``) and its own manifest / markers: ``targets/<t>/`` is an ordinary run
directory, so ``select`` / ``train`` / ``evaluate`` / ``compare`` run on it unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from p2d_ray.heads.headset import HeadSet
from p2d_ray.scoring.actor import FEATURES_COL
from p2d_ray.scoring.gradient import DERIVATIVE_COL, GRAD_NORM_COL, MultiRowGradients, ProbeGradient
from p2d_ray.scoring.scorers import EPS, ScoreOutput

log = logging.getLogger("p2d_ray.score")
SCORE_PREFIX = "score__"


def score_col(name: str) -> str:
    return f"{SCORE_PREFIX}{name}"


def target_columns(names) -> tuple[str, ...]:
    """The per-target columns of the shared scores files, in target order."""
    return tuple(c for n in names for c in (score_col(n), f"{DERIVATIVE_COL}__{n}", f"{GRAD_NORM_COL}__{n}"))


def build_multi_scorer(
    model: nn.Module,
    gradients: dict[str, ProbeGradient],
    normalize: str,
    chunk_tokens: int,
    feature_layer: int | None = None,
):
    """``batch -> ScoreOutput``: ``score`` NaN, every target's ``score__<t>`` and components in ``extra``
    (and the pooled layer-``feature_layer`` features, ``[B, D]``, as ``extra["features"]``)."""
    compass = MultiRowGradients(model, gradients, feature_layer)
    names = compass.names

    def run(batch):
        loss, n_tokens, dot, sq, union_sq = compass(batch, chunk_tokens)
        extra = {GRAD_NORM_COL: union_sq.sqrt()}
        for k, name in enumerate(names):
            norm = sq[k].sqrt()
            if normalize == "cosine":
                score = dot[k] / norm.clamp(min=EPS)
            elif normalize == "loss":
                score = dot[k] / loss.clamp(min=EPS)
            else:
                score = dot[k]
            extra[score_col(name)] = score
            extra[f"{DERIVATIVE_COL}__{name}"] = dot[k]
            extra[f"{GRAD_NORM_COL}__{name}"] = norm
        if compass.features is not None:
            extra[FEATURES_COL] = compass.features
        return ScoreOutput(torch.full_like(loss, float("nan")), n_tokens, loss_full=loss, extra=extra)

    return run


# -- planning (driver) ---------------------------------------------------------------------------------
def plan_targets(cfg):
    """The shared pass's plan: ``plan_score`` over the union heads (``<run_dir>/heads.json``, written by the
    multi-target localize), then every target's heads, probe rows and probe-gradient fingerprint. The
    fingerprint covers the target set (names, heads, probe gradients) and the resolved strategy (exact, or
    distilled: scoring/distill.py runs its passes once for every target)."""
    from p2d_ray.assets.paths import probe_path
    from p2d_ray.data.io import rows_hash
    from p2d_ray.rundir import RunDir
    from p2d_ray.scoring.gradient import gradient_fingerprint
    from p2d_ray.scoring.plan import _hash, _read_probe, plan_score
    from p2d_ray.targets import target_config

    first = target_config(cfg, cfg.targets[0])
    root = cfg.model_copy(update={"data": cfg.data.model_copy(update={"probe_path": probe_path(first)})})
    # resolves score.strategy (auto: distilled from distill_min_rows rows up); each target's selection size
    # sizes its refine band (scoring/distill.refine_rows)
    selects = [target_config(cfg, t).select for t in cfg.targets if not t.later]
    plan = plan_score(root, selects=selects)
    union = plan.heads
    model_fp = plan.provenance["model_fingerprint"]
    data = plan.manifest["identity"]["data"]
    targets, late = {}, {}
    for t in cfg.targets:
        tcfg = target_config(cfg, t)
        heads = HeadSet.load(RunDir(tcfg.run_dir).heads_json)
        heads.check_fits(union.geometry)
        heads.check_model(model_fp, cfg.model.name_or_path)
        if t.later:  # scored after the pass, from the stored features (score_late_targets)
            rows = _read_probe(tcfg, plan.fmt)[: cfg.score.alignment_probe_rows]
            fp = gradient_fingerprint(model_fp, heads, rows_hash(rows), data)
            late[t.name] = {"cfg": tcfg, "heads": heads, "probe_rows": rows, "gradient_fingerprint": fp}
            continue
        if len(heads) == 0 or not set(heads.heads) <= set(union.heads):
            raise ValueError(
                f"target {t.name}: {RunDir(tcfg.run_dir).heads_json} is empty or not within the union "
                f"{RunDir(cfg.run_dir).heads_json}; rerun `p2d-ray localize`"
            )
        rows = _read_probe(tcfg, plan.fmt)[: cfg.score.alignment_probe_rows]
        targets[t.name] = {
            "cfg": tcfg,
            "heads": heads,
            "probe_rows": rows,
            "gradient_fingerprint": gradient_fingerprint(model_fp, heads, rows_hash(rows), data),
        }
    identity = dict(plan.manifest["identity"])
    identity["probe_gradient"] = None  # the root probe is no target's
    identity["targets"] = {
        n: {"heads": v["heads"].fingerprint(), "probe_gradient": v["gradient_fingerprint"]}
        for n, v in targets.items()
    }
    fingerprint = _hash(identity)
    from p2d_ray.models.loading import load_config_checked
    from p2d_ray.scoring.features import distill_layer

    layer = distill_layer(cfg.score, load_config_checked(cfg.model))
    manifest = {
        **plan.manifest,
        "fingerprint": fingerprint,
        "identity": identity,
        "targets": list(targets),
        "feature_layer": layer,
        # what the stored features depend on (model, layer, tokenisation and format, corpus shards)
        "feature_fingerprint": _hash(
            {
                "model": model_fp,
                "layer": layer,
                "data": data,
                "format": plan.fmt,
                "shards": plan.manifest["shards"],
            }
        ),
    }
    provenance = {
        **plan.provenance,
        "config_fingerprint": fingerprint,
        "probe_gradient_fingerprint": None,
        "targets": identity["targets"],
    }
    out = replace(
        plan,
        manifest=manifest,
        fingerprint=fingerprint,
        provenance=provenance,
        probe_rows=[],
        gradient_fingerprint=None,
        strategy_reason=f"{len(targets)} targets in one "
        + (
            "exact pass (union of their heads, one backward a row)"
            if plan.strategy == "exact"
            else f"distilled pass, one regressor each; {plan.strategy_reason}"
        ),
        targets=targets,
    )
    out.late = late  # targets added later: scored from the stored features after the pass
    return out


def _probe_gradients_bytes(items: list, model_fp: str):
    """The worker's half of :func:`probe_gradients`: every target's probe gradient with ONE model load
    (``prepare_probe_gradient`` per target would load it K times); a target whose saved gradient carries its
    fingerprint is reused. Returns ``(True, bytes_1, ..., bytes_K)``."""
    from p2d_ray.assets.paths import probe_path
    from p2d_ray.data.formatting import encode_probe, probe_batches
    from p2d_ray.data.io import rows_hash
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.rundir import RunDir
    from p2d_ray.runtime import available_cpus
    from p2d_ray.scoring.gradient import FILENAME, probe_gradient

    out, model, tok = [], None, None
    threads = torch.get_num_threads()
    try:
        for tcfg, heads, fingerprint, rows in items:
            path = RunDir(tcfg.run_dir).path(FILENAME)
            if path.is_file():
                old = ProbeGradient.load(path)
                if old.fingerprint == fingerprint:
                    out.append(old.to_bytes())
                    continue
            if model is None:
                torch.set_num_threads(tcfg.localize.torch_threads or available_cpus())
                tok, model = load_tokenizer(tcfg.model), load_model(tcfg.model)
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            batches = probe_batches(encode_probe(rows, tok, tcfg.data), tcfg.localize.batch_size, pad_id)
            meta = {
                "fingerprint": fingerprint,
                "model_fingerprint": model_fp,
                "probe_hash": rows_hash(rows),
                "probe_path": probe_path(tcfg),
            }
            pg = probe_gradient(model, heads, batches, meta, tcfg.score.loss_chunk_tokens)
            path.parent.mkdir(parents=True, exist_ok=True)
            pg.save(path)
            out.append(pg.to_bytes())
    finally:
        torch.set_num_threads(threads)
    return (True, *out)


def probe_gradients(cfg, plan, targets: dict | None = None) -> dict[str, list]:
    """Every target's probe gradient (``targets/<t>/probe_gradient.safetensors``) from ONE Ray task sized
    like a scoring actor, one model load: ``{name: [ObjectRef of its bytes]}`` for the actors (never through
    the driver)."""
    from p2d_ray.runtime import on_a_worker, scoring_worker, worker_result

    targets = plan.targets if targets is None else targets
    items = [(v["cfg"], v["heads"], v["gradient_fingerprint"], v["probe_rows"]) for v in targets.values()]
    refs = on_a_worker(
        scoring_worker(cfg),
        _probe_gradients_bytes,
        items,
        plan.provenance["model_fingerprint"],
        num_returns=len(items) + 1,
    )
    worker_result(refs[0])
    return {n: [ref] for n, ref in zip(targets, refs[1:], strict=True)}


# -- per-target views --------------------------------------------------------------------------------
def _view_fingerprint(fingerprint: str, name: str) -> str:
    from p2d_ray.scoring.plan import _hash

    return _hash({"shared_pass": fingerprint, "target": name})


def write_target_views(cfg, plan, store) -> dict[str, str]:
    """``targets/<t>/scores/``: each finished shard's rows with target ``t``'s columns under the single-target
    names, its own manifest and markers (written last), so ``targets/<t>/`` is an ordinary run directory for
    select / train / evaluate. Shards whose view is already there under this pass are skipped.
    Returns ``{name: scores dir}``."""
    from p2d_ray.scoring.distill import LAYER_COL, OOD_COL, SOURCE_COL
    from p2d_ray.scoring.outputs import SCORE_COLUMNS, ScoreStore, _atomic_write_text

    t0 = time.perf_counter()
    out = {}
    for name, t in plan.targets.items():
        view = ScoreStore(t["cfg"].run_dir)
        fp = _view_fingerprint(plan.fingerprint, name)
        old = view.read_manifest()
        if old is not None and old["fingerprint"] != fp:  # a view of an earlier pass: derived, so redone
            shutil.rmtree(view.scores, ignore_errors=True)
            shutil.rmtree(view.state, ignore_errors=True)
        identity = {
            "shared_pass": plan.fingerprint,
            "target": name,
            **plan.manifest["identity"]["targets"][name],
        }
        view.open({**plan.manifest, "fingerprint": fp, "identity": identity, "target": name})
        rename = {score_col(name): "score", f"{DERIVATIVE_COL}__{name}": DERIVATIVE_COL}
        rename[f"{GRAD_NORM_COL}__{name}"] = GRAD_NORM_COL
        for shard in plan.shards:
            if view.marker(shard, fp) is not None:
                continue
            record = store.marker(shard, plan.fingerprint)
            table = pq.read_table(store.score_path(shard))
            # a distilled pass: the shared score_source / ood and this target's predicted_layer (distill.py)
            rename[f"{LAYER_COL}__{name}"] = LAYER_COL
            shared = [c for c in (SOURCE_COL, OOD_COL) if c in table.column_names]
            own = [c for c in rename if c in table.column_names]
            cols = [cfg.data.id_column, *[c for c in SCORE_COLUMNS if c != "score"], *own, *shared]
            part = table.select(cols).rename_columns([rename.get(c, c) for c in cols])
            part = part.select(
                [cfg.data.id_column, "score", *[c for c in part.column_names[1:] if c != "score"]]
            )
            provenance = {**plan.provenance, "target": name, "config_fingerprint": fp}
            empty = pa.table({cfg.data.id_column: pa.array([], table.schema.field(cfg.data.id_column).type)})
            view.write_shard(shard, part, empty, {**record, "fingerprint": fp, "target": name}, provenance)
        _atomic_write_text(
            view.state / "shared_pass.json",
            json.dumps(
                {"scores": str(store.scores), "quarantine": str(store.quarantine), "column": score_col(name)}
            ),
        )
        out[name] = str(view.scores)
    log.info("target views written in %.2f s", time.perf_counter() - t0)
    return out


# -- targets added later: the stored features, an exact sample and a regressor ---------------------------
def check_feature_store(store, plan, todo: dict) -> None:
    """The features in the scores files were made by this model, layer, tokenisation and corpus: else a clear
    error, never a regressor fitted on another model's features (or a pass that mixes two layers)."""
    old = store.read_manifest() or {}
    stored, now = old.get("feature_fingerprint"), plan.manifest["feature_fingerprint"]
    if stored is not None and stored != now:
        raise ValueError(
            f"the features stored with {store.scores} were made with another model, layer or tokenisation "
            f"(stored: layer {old.get('feature_layer')}, fingerprint {stored}; this config: layer "
            f"{plan.manifest['feature_layer']}, fingerprint {now}): "
            + (
                "refusing to add to them"
                if todo
                else "a target added later cannot be predicted from them; rescore the corpus (delete scores/) "
                "or set score.distill_layer back"
            )
        )


def score_late_targets(cfg, plan, store, dups: dict | None = None) -> dict:
    """Every target with ``later: true``: its exact scores on a seeded sample of the scored rows (one engine
    pass over those rows only, all late targets at once), a ridge regressor (regressor.fit_regressor) from the
    stored per-row features to them, its predictions for every other row; written as ``targets/<t>/scores/``
    with ``score_source`` exact | distilled. No model pass over the rest of the corpus."""
    from p2d_ray.progress import ray_data_output
    from p2d_ray.runtime import ensure_ray
    from p2d_ray.scoring.actor import ScorerActor
    from p2d_ray.scoring.distill import sample_size
    from p2d_ray.scoring.pipeline import _wait_for_actors, actor_pool, check_pool_fits, corpus_blocks
    from p2d_ray.scoring.quarantine import duplicate_positions_local
    from p2d_ray.scoring.regressor import fit_regressor
    from p2d_ray.scoring.tokenize import DUP_COL

    late = getattr(plan, "late", {})
    if not late:
        return {}
    check_feature_store(store, plan, {})
    s, idc = cfg.score, cfg.data.id_column
    wall: dict = {}
    t = time.perf_counter()
    ids = (
        pa.concat_tables([pq.read_table(store.score_path(sh), columns=[idc]) for sh in plan.shards])
        .column(0)
        .combine_chunks()
    )
    n = len(ids)
    k = min(sample_size(n, s), n)
    pick = ids.take(pa.array(np.sort(np.random.default_rng(s.distill_seed).choice(n, size=k, replace=False))))
    wall["sample_plan"] = time.perf_counter() - t

    ensure_ray()
    t = time.perf_counter()
    grads = probe_gradients(cfg, plan, late)
    wall["probe_gradient"] = time.perf_counter() - t
    if dups is None:
        dups = duplicate_positions_local(plan.shards, idc, plan.id_type)
    wanted = pick

    def keep(block: pa.Table) -> pa.Table:
        return block.filter(pc.is_in(block.column(idc), value_set=wanted))

    t = time.perf_counter()
    todo = dict(enumerate(plan.shards))
    check_pool_fits(s)
    # as the main pass: Ray Data's output in the run dir, dispatch once min_actors are up (or a timeout)
    with ray_data_output(cfg.run_dir), _wait_for_actors(s.actor_start_timeout_s):
        ds, window = corpus_blocks(cfg, plan, todo, {DUP_COL: dups}, keep=keep)
        ds = actor_pool(
            ds,
            ScorerActor,
            cfg,
            {
                "model_json": plan.model_json,
                "score_json": s.model_dump_json(),
                "heads_json": plan.heads.to_json(),
                "id_column": idc,
                "window_rows": window,
                "targets": grads,
            },
        )
        parts = [
            b.filter(b.column("reason").is_null()).select([idc, *(score_col(nm) for nm in late)])
            for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)
        ]
    exact = pa.concat_tables(parts)
    wall["exact_sample_pass"] = time.perf_counter() - t
    if exact.num_rows != k:
        raise RuntimeError(f"the late targets' exact sample returned {exact.num_rows} of {k} rows")

    t = time.perf_counter()
    stored = pa.concat_tables(
        [pq.read_table(store.score_path(sh), columns=[idc, FEATURES_COL]) for sh in plan.shards]
    )
    wall["read_features"] = time.perf_counter() - t
    X_all = np.asarray(stored.column(FEATURES_COL).combine_chunks().flatten().to_numpy(zero_copy_only=False))
    X_all = X_all.reshape(stored.num_rows, -1).astype(np.float32)
    at = pc.index_in(exact.column(idc), value_set=stored.column(idc).combine_chunks()).to_numpy()
    out = {"sample_rows": k, "corpus_rows": n, "wall_s": wall, "targets": {}}
    for name, entry in late.items():
        t = time.perf_counter()
        y = exact.column(score_col(name)).to_numpy(zero_copy_only=False).astype(np.float64)
        reg, cv = fit_regressor(
            X_all[at], y, s.distill_folds, s.distill_seed, s.gate_top_fraction, s.distill_ood_factor
        )
        pred = reg.predict(X_all)[0]
        pred[at] = y  # the sample keeps its exact scores
        source = np.full(stored.num_rows, "distilled", dtype=object)
        source[at] = "exact"
        fit_s = time.perf_counter() - t
        by_id = pa.table(
            {idc: stored.column(idc), "score": pa.array(pred), "score_source": pa.array(source, pa.string())}
        )
        _write_late_view(cfg, plan, store, name, entry, by_id)
        out["targets"][name] = {
            "fit_s": fit_s,
            "kfold_spearman": cv["spearman"],
            "kfold_top_recall": cv["top_recall"],
        }
    stats_path = Path(cfg.run_dir, "late_targets.json")
    stats_path.write_text(json.dumps(out, indent=1, default=str))
    return out


def _write_late_view(cfg, plan, store, name: str, entry: dict, by_id: pa.Table) -> None:
    """``targets/<name>/scores/`` of a late target: id, score (exact on the sample, predicted elsewhere),
    score_source, and the shared loss_full / loss_gated / n_tokens; its own manifest and markers."""
    from p2d_ray.scoring.outputs import ScoreStore

    idc = cfg.data.id_column
    view = ScoreStore(entry["cfg"].run_dir)
    fp = _view_fingerprint(plan.fingerprint, f"{name}:later:{entry['gradient_fingerprint']}")
    old = view.read_manifest()
    if old is not None and old["fingerprint"] != fp:
        shutil.rmtree(view.scores, ignore_errors=True)
        shutil.rmtree(view.state, ignore_errors=True)
    identity = {
        "shared_pass": plan.fingerprint,
        "target": name,
        "later": True,
        "probe_gradient": entry["gradient_fingerprint"],
        "heads": entry["heads"].fingerprint(),
    }
    view.open({**plan.manifest, "fingerprint": fp, "identity": identity, "target": name})
    for shard in plan.shards:
        table = pq.read_table(store.score_path(shard), columns=[idc, "loss_full", "loss_gated", "n_tokens"])
        at = pc.index_in(table.column(idc), value_set=by_id.column(idc).combine_chunks())
        part = pa.table(
            {
                idc: table.column(idc),
                "score": by_id.column("score").take(at),
                "score_source": by_id.column("score_source").take(at),
                "loss_full": table.column("loss_full"),
                "loss_gated": table.column("loss_gated"),
                "n_tokens": table.column("n_tokens"),
            }
        )
        record = {**store.marker(shard, plan.fingerprint), "fingerprint": fp, "target": name, "later": True}
        empty = pa.table({idc: pa.array([], table.schema.field(idc).type)})
        view.write_shard(shard, part, empty, record, {**plan.provenance, "target": name, "later": True})
