"""``score.strategy=distilled``: exact scores on a seeded sample, a regressor for the rest, gated by fidelity.

The engine's own machinery (plan, ParquetShards, tokenize tasks, the scorer actor pool, per-shard markers,
quarantine) runs up to four passes over the corpus instead of one::

    sample pass  S + A rows (seeded, stratified by shard) -> the exact scorer + pooled layer-l_f features
                 (and layer-l_c features when the cascade is on)
    fit          driver: ridge (strength by k-fold held-out Spearman) on S's z-scored exact scores; the
                 cascade's second ridge the same way on S's layer-l_c features
    gate         k-fold Spearman / top recall on S, the same on the fresh audit rows A (never fitted on);
                 below score.gate_* thresholds: a warning and score.gate_fallback (exact: every row exactly;
                 a failed cascade gate: the cascade is dropped, the band taken from stage 1)
    bulk pass    every other row -> a forward that STOPS at layer l_f (no upper layers, LM head or backward),
                 pooled features -> predicted score, out-of-distribution flag
    cascade pass the stage-1 predicted top score.distill_cascade_fraction of the corpus -> a forward that stops
                 at layer l_c, the second regressor's prediction replaces stage 1's (these rows rank first);
                 skipped when the refine band covers it (:func:`cascade_needed`)
    refine pass  the predicted top band (:func:`refine_rows`: by default the selection's band, select.band_factor
                 x its k) and, by default, the OOD rows re-scored exactly, so the rows the selection looks at
                 are ranked by exact scores and carry the loss its quality rule reads
    assemble     per shard: the passes' rows merged by row, ``score_source`` in {exact, distilled, refined},
                 ``predicted_layer`` (l_f or l_c: which stage ranked the row; null for S and A), written
                 through the engine's ShardCollector (scores/, quarantine/, marker last)

Each pass keeps per-shard part files and markers under ``_state/distill/<pass>/`` keyed by a fingerprint
of what that pass depends on, so a killed run resumes per shard in every pass, and a changed refine band or
gate reuses the sample's exact scores. The regressor is saved beside the probe gradient
(``distill_regressor.npz`` + ``.json``) with its fingerprint (model, heads, probe, sample seed, l_f,
regressor) and the fidelity figures.

Several targets (``targets:``, issue 27): every pass runs once for all of them (the exact passes with the
union backward of scoring/targets.py, the predict passes with one regressor per target); each target has its
own fit, gate, cascade band and refine band, the cascade and refine passes cover the union of the bands, and
the scores carry the shared pass's per-target columns (``score__<t>``, ``predicted_layer__<t>``) beside one
``score_source`` and the stored features (``features``, for a target added later). See :func:`run_distilled`.

This module is the engine's side (passes, parts, assembly); the features (which layers, the truncated forward,
pooling) are ``scoring/features.py`` and the regressor and its gate ``scoring/regressor.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from p2d_ray.scoring.actor import SCORE_TIME_COL, ScorerActor, collate_arrow, micro_batch_rows
from p2d_ray.scoring.features import (
    CASCADE_POOLING,
    pool_blocks,
    pool_features,
    pool_features_all,
    truncated_hiddens,
)
from p2d_ray.scoring.regressor import ALPHAS, Regressor, fit_regressor, gate, spearman, top_recall
from p2d_ray.scoring.scorers import COMPONENT_COLUMNS, ScoreOutput

log = logging.getLogger("p2d_ray.score")

SOURCE_COL = "score_source"
OOD_COL = "ood"
FEATURES_COL = "_features"
CASCADE_FEATURES_COL = "_features_cascade"  # the sample's pooled features at the cascade layer l_c
LAYER_COL = "predicted_layer"  # the layer whose prediction ranked the row (l_f / l_c); null for S and A
PICK_COL = "_pick"
REGRESSOR_FILE = "distill_regressor.npz"
FIDELITY_FILE = "distill_regressor.json"
CASCADE_REGRESSOR_FILE = "distill_regressor_cascade.npz"


# -- sample ---------------------------------------------------------------------------------------
def sample_size(n_rows: int, s) -> int:
    """score.distill_sample_fraction of the corpus clamped to [distill_sample_min, distill_sample_max]."""
    want = round(n_rows * s.distill_sample_fraction)
    return int(min(n_rows, max(s.distill_sample_min, min(s.distill_sample_max, want))))


def refine_rows(s, sel, n_rows: int) -> int:
    """Rows of one target's refine band: ``score.refine_fraction`` of the corpus when set, else the selection's
    band (``select.band_factor`` x its k: ``fraction`` / ``top_k`` of ``sel``, a SelectConfig), so every row
    the selection looks at is ranked by its exact score and has its loss (RESULTS.md Session 14)."""
    if s.refine_fraction is not None:
        return int(round(s.refine_fraction * n_rows))
    from p2d_ray.scoring.select import total_k

    return int(min(n_rows, math.ceil(sel.band_factor * total_k(n_rows, sel.fraction, sel.top_k) - 1e-9)))


def cascade_needed(s, selects: list, n_rows: int) -> bool:
    """Whether the cascade can change what is refined: its band (the stage-1 top ``distill_cascade_fraction``)
    is larger than some target's refine band. Otherwise every cascade row is refined anyway, and the refine
    band, its band's rows first then stage 1's ranking, is stage 1's top: the cascade pass would change
    nothing (``selects``: every target's SelectConfig)."""
    n_c = int(round(s.distill_cascade_fraction * n_rows))
    return n_c > 0 and any(n_c > refine_rows(s, sel, n_rows) for sel in selects)


def pick_rows(
    shard_rows: list[tuple[str, int]], n_pick: int, seed: int, exclude: dict[int, np.ndarray] | None = None
) -> dict[int, np.ndarray]:
    """A seeded sample of ``n_pick`` rows stratified by shard (largest-remainder quotas proportional to the
    rows each shard has left); ``shard_rows`` = [(shard key, rows)]. Returns {shard index: sorted rows}."""
    exclude = exclude or {}
    avail = [n - len(exclude.get(i, ())) for i, (_, n) in enumerate(shard_rows)]
    total = sum(avail)
    n_pick = min(n_pick, total)
    if n_pick <= 0:
        return {}
    quota = np.array(avail, dtype=np.float64) * n_pick / total
    take = np.floor(quota).astype(np.int64)
    rest = n_pick - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
    out = {}
    for i, (key, n) in enumerate(shard_rows):
        if take[i] == 0:
            continue
        rows = np.setdiff1d(np.arange(n), exclude.get(i, np.array([], dtype=np.int64)))
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        out[i] = np.sort(rng.choice(rows, size=int(take[i]), replace=False))
    return out


# -- the actor --------------------------------------------------------------------------------------
class DistillActor(ScorerActor):
    """The engine's ScorerActor, plus: ``mode="exact"`` appends the rows' pooled layer-``layer`` features
    (``features=True``; and layer-``cascade_layer`` ones from the same truncated forward when given);
    ``mode="predict"`` runs no scorer at all, only the truncated forward to ``layer``, and writes each
    regressor's prediction into its column (``regressors``: {column: [bytes or ObjectRef]}; ``score`` for one
    target, ``score__<t>`` per target with ``targets:``) and the ``ood`` flag."""

    def __init__(
        self,
        mode: str,
        layer: int,
        features: bool,
        regressors: dict | None,
        cascade_layer=None,
        pooling: str = "engine",
        **kw,
    ):
        super().__init__(**kw)
        self.mode, self.layer, self.want_features = mode, layer, features
        self.layers = [layer] + ([cascade_layer] if cascade_layer and mode == "exact" and features else [])
        self.poolings = [pooling, CASCADE_POOLING][: len(self.layers)]  # per layer
        self.regs: dict[str, Regressor] = {}
        if regressors:
            import ray

            for column, ref in regressors.items():
                data = ref[0]
                self.regs[column] = Regressor.from_bytes(
                    ray.get(data) if isinstance(data, ray.ObjectRef) else data
                )
        if mode == "predict":
            self.score = self._count_only  # the base __call__'s loop only collates and counts

    def _count_only(self, tensors):
        n_tokens = tensors["loss_mask"][:, 1:].sum(1)
        return ScoreOutput(torch.full((len(n_tokens),), float("nan")), n_tokens)

    def _features(self, batch: pa.Table, ok: np.ndarray) -> tuple[list[np.ndarray], float]:
        """Pooled features at each of ``self.layers`` (one truncated forward per micro-batch)."""
        t0 = time.perf_counter()
        feats = None
        with torch.no_grad():
            for idx in micro_batch_rows(batch, ok, self.cfg.batch_size, self.window_rows):
                t = collate_arrow(batch.column("input_ids"), batch.column("loss_mask"), idx, self.pad_id)
                ids, mask = t["input_ids"].to(self.device), t["attention_mask"].to(self.device)
                hs = truncated_hiddens(self.model, ids, mask, self.layers)
                lm = t["loss_mask"].to(self.device)
                fs = [
                    (pool_features_all(h, mask, lm) if how == "all" else pool_features(h, mask)).cpu().numpy()
                    for h, how in zip(hs, self.poolings, strict=True)
                ]
                if feats is None:
                    feats = [np.full((batch.num_rows, f.shape[1]), np.nan, dtype=np.float32) for f in fs]
                for out, f in zip(feats, fs, strict=True):
                    out[idx] = f
        return feats, time.perf_counter() - t0

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.flatnonzero(batch.column("reason").is_null().to_numpy(zero_copy_only=False))
        all_feats, secs = (None, 0.0)
        if len(ok) and (self.want_features or self.mode == "predict"):
            all_feats, secs = self._features(batch, ok)
        feats = all_feats[0] if all_feats is not None else None
        out = super().__call__(batch)
        n = out.num_rows
        valid = np.zeros(n, dtype=bool)
        valid[ok] = True
        ood = np.zeros(n, dtype=bool)
        dist = np.full(n, np.nan)
        if self.mode == "predict":
            for column, reg in self.regs.items():  # one regressor per target (the same PCA frame: one ood)
                score = np.full(n, np.nan)
                if feats is not None:
                    score[ok], dist[ok], flag = reg.predict(feats[ok].astype(np.float64))
                    ood[ok] |= flag
                i = out.schema.get_field_index(column)
                out = out.set_column(i, column, pa.array(score, mask=~valid))
            # the exact scorer's own columns (and every target's): not computed
            for c in (*COMPONENT_COLUMNS.get(self.cfg.scorer, ()), *self.target_columns):
                if c not in self.regs:
                    i = out.schema.get_field_index(c)
                    out = out.set_column(i, c, pa.nulls(n, out.schema.field(c).type))
        if secs and len(ok):  # the truncated forward's seconds, shared out over the call's rows
            t = out.column(SCORE_TIME_COL).to_numpy() + np.float32(secs / len(ok)) * valid
            out = out.set_column(out.schema.get_field_index(SCORE_TIME_COL), SCORE_TIME_COL, pa.array(t))
        out = out.append_column(OOD_COL, pa.array(ood))
        out = out.append_column("ood_distance", pa.array(dist, mask=~valid))
        if self.want_features:
            for j, name in enumerate((FEATURES_COL, CASCADE_FEATURES_COL)[: len(self.layers)]):
                f = all_feats[j] if all_feats is not None else None
                d = f.shape[1] if f is not None else 1
                flat = f if f is not None else np.full((n, d), np.nan, dtype=np.float32)
                out = out.append_column(
                    name, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), d)
                )
        return out


def _keep_picked(block: pa.Table) -> pa.Table:
    return block.filter(block.column(PICK_COL)).drop_columns([PICK_COL])


# -- parts: one pass's per-shard files and markers ----------------------------------------------------
class Parts:
    """``_state/distill/<name>/<shard key>.parquet`` + ``done/<shard key>.json`` (written last, with the
    pass's fingerprint)."""

    def __init__(self, run_dir, name: str, fingerprint: str):
        from p2d_ray.rundir import RunDir
        from p2d_ray.scoring.outputs import STATE_DIR

        self.dir = RunDir(run_dir).path(STATE_DIR) / "distill" / name
        self.done = self.dir / "done"
        self.fingerprint = fingerprint
        self.done.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.parquet"

    def finished(self, key: str) -> bool:
        p = self.done / f"{key}.json"
        return (
            p.is_file()
            and self.path(key).is_file()
            and json.loads(p.read_text()).get("fingerprint") == self.fingerprint
        )

    def write(self, key: str, table: pa.Table) -> None:
        for p, write in ((self.path(key), lambda t: pq.write_table(table, t)),):
            tmp = p.with_name(f".{p.name}.tmp")
            write(tmp)
            os.replace(tmp, p)
        tmp = self.done / f".{key}.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "rows": table.num_rows}))
        os.replace(tmp, self.done / f"{key}.json")

    def read(self, key: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(key), columns=columns)


class _PartCollector:
    """Driver side of a subset pass: a shard's rows -> its part file once all its picked rows arrived."""

    def __init__(self, parts: Parts, shards: list, expected: dict[int, int]):
        self.parts, self.shards, self.expected = parts, shards, expected
        self.got: dict[int, list[pa.Table]] = {}
        self.count: dict[int, int] = {}
        self.rows, self.busy = 0, 0.0

    def add(self, block: pa.Table) -> None:
        sids = block.column("_shard").to_numpy()
        self.busy += float(pc.sum(block.column(SCORE_TIME_COL)).as_py() or 0.0)
        self.rows += block.num_rows
        for sid in np.unique(sids):
            sid = int(sid)
            part = block.filter(pa.array(sids == sid))
            self.got.setdefault(sid, []).append(part)
            self.count[sid] = self.count.get(sid, 0) + part.num_rows
            if self.count[sid] > self.expected[sid]:
                raise RuntimeError(f"shard {self.shards[sid].key}: more rows than picked in {self.parts.dir}")
            if self.count[sid] == self.expected[sid]:
                table = pa.concat_tables(self.got.pop(sid)).sort_by("_row")
                self.parts.write(self.shards[sid].key, table)

    def check_complete(self) -> None:
        left = [self.shards[s].key for s, n in self.expected.items() if self.count.get(s, 0) != n]
        if left:
            raise RuntimeError(f"{len(left)} shard(s) lost rows in a distilled pass (e.g. {left[:3]})")


# -- the driver -------------------------------------------------------------------------------------
def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _positions_hash(picks: dict[int, np.ndarray]) -> str:
    h = hashlib.sha256()
    for sid in sorted(picks):
        h.update(np.int64(sid).tobytes() + np.asarray(picks[sid], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class _Pass:
    name: str
    mode: str  # exact | predict
    picks: dict[int, np.ndarray]  # shard index -> rows
    fingerprint: str
    features: bool = False
    regressors: dict[str, bytes] | None = None  # predict mode: {score column: regressor bytes}
    stats: dict = field(default_factory=dict)
    layer: int | None = None  # the truncated forward's layer (None: the plan's l_f)
    pooling: str = "engine"  # predict mode: the features' pools (pool_features; "all": pool_features_all)
    cascade_layer: int | None = None  # features=True: also write the sample's features at this layer


def _run_pass(cfg, plan, dups, probe_gradient, p: _Pass, wall: dict) -> Parts:
    """One Ray Data pass of the engine over ``p.picks`` (only shards whose part is not finished)."""
    import ray

    from p2d_ray.progress import Progress, ray_data_output
    from p2d_ray.scoring.pipeline import _wait_for_actors, actor_pool, corpus_blocks
    from p2d_ray.scoring.tokenize import DUP_COL

    s = cfg.score
    parts = Parts(cfg.run_dir, p.name, p.fingerprint)
    todo = {
        sid: rows for sid, rows in p.picks.items() if len(rows) and not parts.finished(plan.shards[sid].key)
    }
    p.stats = {"rows": int(sum(len(r) for r in p.picks.values())), "rows_this_run": 0, "busy_s": 0.0}
    p.stats["shards_this_run"] = len(todo)
    if not todo:
        return parts
    t0 = time.perf_counter()
    n_todo = int(sum(len(r) for r in todo.values()))
    # the exact pass's blocks and bucketing windows (pipeline.corpus_blocks), so a row's micro-batch depends
    # on its shard and the pass's picks alone: a resumed pass gives identical numbers
    flags = {DUP_COL: dups}
    subset = any(len(r) < plan.shards[sid].num_rows for sid, r in todo.items())
    if subset:
        flags[PICK_COL] = todo
    shards = {sid: plan.shards[sid] for sid in todo}
    ds, window = corpus_blocks(cfg, plan, shards, flags, keep=_keep_picked if subset else None)
    reg_refs = {c: [ray.put(b)] for c, b in p.regressors.items()} if p.regressors else None
    ds = actor_pool(
        ds,
        DistillActor,
        cfg,
        {
            "mode": p.mode,
            "layer": p.layer or plan.distill_layer,
            "cascade_layer": p.cascade_layer,
            "pooling": p.pooling,
            "features": p.features,
            "regressors": reg_refs,
            "model_json": plan.model_json,
            "score_json": s.model_dump_json(),
            "heads_json": plan.heads.to_json() if plan.heads is not None else None,
            "id_column": cfg.data.id_column,
            "icl_json": None,
            # several targets: every target's probe gradient ({name: [ObjectRef]}, the union backward)
            "probe_gradient": None if plan.targets else probe_gradient,
            "targets": probe_gradient if plan.targets else None,
            "window_rows": window,
        },
    )
    collector = _PartCollector(parts, plan.shards, {sid: len(r) for sid, r in todo.items()})
    bar = Progress(f"score ({p.name})", n_todo)
    with ray_data_output(cfg.run_dir), _wait_for_actors(s.actor_start_timeout_s):
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(block)
            bar.update(block.num_rows)
    bar.close()
    collector.check_complete()
    p.stats.update(rows_this_run=collector.rows, busy_s=collector.busy)
    wall[f"{p.name}_pass"] = time.perf_counter() - t0
    return parts


def _read_parts(parts: Parts, plan, picks: dict[int, np.ndarray], columns: list[str]) -> pa.Table:
    """The rows ``picks`` of a pass's part files (a part may hold more rows: the sample pass holds S and A)."""
    tables = []
    for sid in sorted(picks):
        t = parts.read(plan.shards[sid].key, columns + ["_shard", "_row"])
        tables.append(
            t.filter(pc.is_in(t.column("_row"), value_set=pa.array(picks[sid], t.column("_row").type)))
        )
    return pa.concat_tables(tables) if tables else None


def _exact_xy(
    table: pa.Table, column: str = FEATURES_COL, y_column: str = "score"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, d], exact scores [n], keep mask) of a sample part table: scorable, finite rows.
    ``y_column``: the target's exact score (``score__<t>`` with several targets)."""
    ok = table.column("reason").is_null().to_numpy(zero_copy_only=False)
    y = table.column(y_column).to_numpy(zero_copy_only=False).astype(np.float64)
    feats = table.column(column)
    d = feats.type.list_size
    X = feats.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, d)
    keep = ok & np.isfinite(y) & np.isfinite(X).all(1)
    return X[keep], y[keep], keep


def _sub(picks: dict[int, np.ndarray], minus: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {s: np.setdiff1d(r, minus.get(s, [])) for s, r in picks.items()}


def _union(*ps: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for p in ps:
        for s, r in p.items():
            out[s] = np.union1d(out.get(s, np.array([], dtype=np.int64)), r)
    return out


def _fit_stage(
    run, name: str, fp: str, read, s, meta: dict, pooling: str = "engine"
) -> tuple[Regressor, dict]:
    """Fit (or, on a resumed run with the same fingerprint, load) one stage's regressor on S."""
    saved = run.path(name)
    reg = Regressor.from_bytes(saved.read_bytes()) if saved.is_file() else None
    if reg is not None and reg.meta.get("fingerprint") == fp:  # a resumed run: the very same numbers
        return reg, reg.meta["kfold"]
    Xs, ys, _ = read()
    if len(ys) < max(s.distill_folds, 3):
        raise RuntimeError(f"distilled: {len(ys)} scorable sample rows; raise score.distill_sample_min")
    blocks = pool_blocks(Xs.shape[1], pooling)
    reg, cv = fit_regressor(
        Xs, ys, s.distill_folds, s.distill_seed, s.gate_top_fraction, s.distill_ood_factor, blocks
    )
    reg.meta = {
        "fingerprint": fp,
        **meta,
        "regressor": "ridge (dual, strength by k-fold Spearman) on z-scored mean / position-weighted "
        "mean / log-length features"
        + (", response-token mean and last token, each block weighted 1 / sqrt(width)" if blocks else ""),
        "features": int(Xs.shape[1]),
        "kfold": cv,
    }
    tmp = saved.with_name(f".{saved.name}.tmp")
    tmp.write_bytes(reg.to_bytes())
    os.replace(tmp, saved)
    return reg, cv


def _audit(reg: Regressor, read, s) -> dict:
    """The regressor on the fresh audit rows A (never fitted on)."""
    Xa, ya, _ = read()
    if not len(ya):
        return {"rows": 0}
    pred, _, ood = reg.predict(Xa)
    return {
        "rows": len(ya),
        "spearman": spearman(ya, pred),
        "top_recall": top_recall(ya, pred, s.gate_top_fraction),
        "ood": int(ood.sum()),
    }


def _predictions(parts: Parts, plan, picks: dict[int, np.ndarray], columns: list[str]) -> dict:
    """A predict pass's rows: shard, row, scorable, per score column the predicted score (-inf where not
    scorable), OOD flag."""
    table = _read_parts(parts, plan, picks, ["reason", *columns, OOD_COL])
    ok = table.column("reason").is_null().to_numpy(zero_copy_only=False)
    pred = {}
    for c in columns:
        score = table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
        pred[c] = np.where(ok & np.isfinite(score), score, -np.inf)
    return {
        "sid": table.column("_shard").to_numpy().astype(np.int64),
        "row": table.column("_row").to_numpy().astype(np.int64),
        "ok": ok,
        "pred": pred,
        "ood": table.column(OOD_COL).to_numpy(zero_copy_only=False) & ok,
    }


def _picks_of(sid: np.ndarray, row: np.ndarray, chosen: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): np.sort(row[chosen & (sid == i)]) for i in np.unique(sid[chosen])}


def _key(sid: np.ndarray, row: np.ndarray) -> np.ndarray:
    return sid.astype(np.int64) << 32 | row.astype(np.int64)


def _targets(plan) -> dict:
    """{target name: its exact score column}: ``{None: "score"}`` for one target; with ``targets:`` one entry
    per target, named as the exact shared pass names them (``score__<t>``, scoring/targets.py)."""
    if not plan.targets:
        return {None: "score"}
    from p2d_ray.scoring.targets import score_col

    return {name: score_col(name) for name in plan.targets}


def _col(base: str, name: str | None) -> str:
    """A per-target column: ``base`` for one target, ``base__<t>`` with several (as scoring/targets.py)."""
    return base if name is None else f"{base}__{name}"


def _one(values: list):
    """A fingerprint input: the value itself for one target (what it always was), the list for several."""
    return values[0] if len(values) == 1 else values


@dataclass
class _Fit:
    """One target's regressors, fidelity figures and gate verdicts."""

    reg: Regressor
    fp: str
    fidelity: dict
    fallback: bool  # its stage-1 gate failed with score.gate_fallback=exact
    reg2: Regressor | None = None  # the cascade's stage 2 (None: no cascade)
    fp2: str | None = None


def _fit_target(run, name, column: str, reader, S, A, s, meta: dict, sample_fp: str, l_f, l_c) -> _Fit:
    """Fit, audit and gate one target's regressor on S (stage 1 at l_f; the cascade's stage 2 at l_c), saved
    in ``run`` (the target's own run dir with several targets)."""
    label = "" if name is None else f" (target {name})"
    fp = _hash(
        {"sample": sample_fp, "alphas": ALPHAS, "folds": s.distill_folds, "ood": s.distill_ood_factor}
        | ({} if name is None else {"target": name})
    )
    reg, cv = _fit_stage(run, REGRESSOR_FILE, fp, reader(S, FEATURES_COL, column), s, {**meta, "layer": l_f})
    audit = _audit(reg, reader(A, FEATURES_COL, column), s) if A else {"rows": 0}
    verdict = gate(cv, audit, s)
    fid = {"layer": l_f, "kfold": cv, "audit": audit, "gate": verdict, "cascade": None, "regressor": reg.meta}
    fit = _Fit(reg, fp, fid, not verdict["passed"] and s.gate_fallback == "exact")
    if not verdict["passed"]:
        log.warning(
            "distilled%s: the fidelity gate FAILED (%s); %s",
            label,
            "; ".join(verdict["failed"]),
            "falling back to exact scores for every row (score.gate_fallback=exact)"
            if fit.fallback
            else "continuing with predicted scores (score.gate_fallback=warn): the selection may be poor",
        )
        print(
            f"score: WARNING fidelity gate failed{label} ({'; '.join(verdict['failed'])}); "
            f"fallback={s.gate_fallback}"
        )
    if l_c is not None:
        fit.fp2 = _hash([fp, "cascade", l_c, CASCADE_POOLING])
        fit.reg2, cv2 = _fit_stage(
            run,
            CASCADE_REGRESSOR_FILE,
            fit.fp2,
            reader(S, CASCADE_FEATURES_COL, column),
            s,
            {**meta, "layer": l_c, "pooling": CASCADE_POOLING},
            CASCADE_POOLING,
        )
        audit2 = _audit(fit.reg2, reader(A, CASCADE_FEATURES_COL, column), s) if A else {"rows": 0}
        fid["cascade"] = {
            "layer": l_c,
            "fraction": s.distill_cascade_fraction,
            "kfold": cv2,
            "audit": audit2,
            "gate": gate(cv2, audit2, s),
            "regressor": fit.reg2.meta,
        }
    return fit


def _use_cascade(fit: _Fit, name, fallback: bool, s) -> bool:
    """Whether a target's cascade ranks its band: it has one, no exact fallback, and its gate passed (or
    score.gate_fallback=warn); a failed cascade gate is warned about."""
    cas = fit.fidelity["cascade"]
    if cas is None:
        return False
    used = not fallback
    if used and not cas["gate"]["passed"]:
        failed = "; ".join(cas["gate"]["failed"])
        used = s.gate_fallback == "warn"
        label = "" if name is None else f" (target {name})"
        log.warning(
            "distilled%s: the cascade's (layer %d) fidelity gate FAILED (%s)", label, cas["layer"], failed
        )
        print(
            f"score: WARNING the cascade's fidelity gate failed{label} ({failed}); "
            + ("continuing with it (score.gate_fallback=warn)" if used else "the band from stage 1 alone")
        )
    cas["used"] = used
    return used


def run_distilled(cfg, plan, store, todo: dict, on_shard_done, wall: dict):
    """The distilled strategy's passes (module docstring); returns the final ShardCollector and the
    ``distill`` stats block. ``todo``: the shards without a final marker.

    With several targets (``targets:``, issue 27) every pass runs ONCE for all of them: the sample and refine
    passes score exactly with the union backward (scoring/targets.py: every target's score from one
    backward), the bulk and cascade passes' truncated forward feeds one regressor per target. Each target has
    its own fit, gate and cascade band; the cascade pass runs over the union of the targets' bands and the
    refine pass over the union of their refine bands (each target keeps the exact scores of every refined
    row, its own band's or another's). One exact fallback (a failed gate, score.gate_fallback=exact) scores
    every row exactly for every target: one exact pass gives all their scores."""
    from p2d_ray.rundir import RunDir
    from p2d_ray.scoring.collect import ShardCollector
    from p2d_ray.scoring.pipeline import _start_pass

    s = cfg.score
    run = RunDir(cfg.run_dir)
    columns = _targets(plan)
    multi = bool(plan.targets)
    l_f, l_c = plan.distill_layer, plan.cascade_layer
    shard_rows = [(sh.key, sh.num_rows) for sh in plan.shards]
    n_rows = sum(n for _, n in shard_rows)
    n_sample = sample_size(n_rows, s)
    S = pick_rows(shard_rows, n_sample, s.distill_seed)
    A = pick_rows(shard_rows, s.distill_audit_rows, s.distill_seed + 1, exclude=S)
    SA = _union(S, A)
    rest = _sub({i: np.arange(n) for i, (_, n) in enumerate(shard_rows)}, SA)
    identity = dict(plan.manifest["identity"])
    score_id = {k: v for k, v in identity["score"].items() if not k.startswith(("gate_", "refine_"))}
    for k in ("distill_folds", "distill_ood_factor", "distill_ood_exact", "distill_min_rows"):
        score_id.pop(k, None)
    # the cascade: its fraction never changes the sample pass; its layer does (the features it writes)
    score_id.pop("distill_cascade_layer", None), score_id.pop("distill_cascade_fraction", None)
    sample_id = {**identity, "score": score_id, "S": _positions_hash(S), "A": _positions_hash(A)}
    if l_c is not None:
        sample_id["cascade_layer"], sample_id["cascade_pooling"] = l_c, CASCADE_POOLING
    sample_fp = _hash(sample_id)

    probe_gradient, dups = _start_pass(cfg, plan, wall)
    passes: dict[str, _Pass] = {}
    sample = passes["sample"] = _Pass("sample", "exact", SA, sample_fp, features=True, cascade_layer=l_c)
    sample_parts = _run_pass(cfg, plan, dups, probe_gradient, sample, wall)

    # fit on S, audit on A, per target (stage 1 at l_f; the cascade's stage 2 at l_c)
    t = time.perf_counter()
    meta = {
        "model_fingerprint": identity["model_fingerprint"],
        "heads": identity["heads"],
        "probe_gradient": identity["probe_gradient"],
        "sample_seed": s.distill_seed,
    }

    def reader(picks, features, y):
        return lambda: _exact_xy(_read_parts(sample_parts, plan, picks, ["reason", y, features]), features, y)

    fits: dict = {}
    for name, column in columns.items():
        trun, tmeta = run, meta
        if name is not None:  # its regressors and figures in its own run dir, beside its probe gradient
            entry = plan.targets[name]
            trun = RunDir(entry["cfg"].run_dir)
            tmeta = {
                **meta,
                "target": name,
                "heads": entry["heads"].fingerprint(),
                "probe_gradient": entry["gradient_fingerprint"],
            }
        fits[name] = _fit_target(trun, name, column, reader, S, A, s, tmeta, sample_fp, l_f, l_c)
    wall["fit"] = time.perf_counter() - t
    fallback = any(f.fallback for f in fits.values())
    if fallback and multi:
        print("score: the exact fallback scores every row exactly for every target (one pass gives all)")
    users = [name for name, f in fits.items() if _use_cascade(f, name, fallback, s)]

    # bulk: predicted (or, after a failed gate with fallback exact, exact) scores for every other row; with
    # several targets it also keeps every row's layer-l_f features (stored for targets added later)
    if fallback:
        bulk = passes["bulk"] = _Pass("bulk", "exact", rest, _hash([sample_fp, "exact"]), features=multi)
    else:
        bulk = passes["bulk"] = _Pass(
            "bulk",
            "predict",
            rest,
            _hash([_one([f.fp for f in fits.values()]), "predict"]),
            regressors={columns[n]: f.reg.to_bytes() for n, f in fits.items()},
            features=multi,
        )
    bulk_parts = _run_pass(cfg, plan, dups, probe_gradient, bulk, wall)

    # cascade: each target's stage-1 predicted top distill_cascade_fraction, re-predicted from layer l_c
    # (one pass over the union of the targets' bands)
    bands: dict = {}  # target -> its cascade band's rows {shard index: rows}
    cascade_picks: dict[int, np.ndarray] = {}
    cascade_parts = None
    refine_picks: dict[int, np.ndarray] = {}
    n_ood = 0
    per_target: dict = {name: {"cascade_band_rows": 0, "refine_band_rows": 0} for name in columns}
    if not fallback:
        p1 = _predictions(bulk_parts, plan, rest, list(columns.values()))
        n_ok = int(p1["ok"].sum())
        ood = p1["ood"]
        in_band = {}
        for name in users:
            order = np.argsort(-p1["pred"][columns[name]], kind="stable")  # its stage 1's ranking
            n_c = min(int(round(s.distill_cascade_fraction * n_rows)), n_ok)
            in_band[name] = np.zeros(len(order), dtype=bool)
            in_band[name][order[:n_c]] = True
            bands[name] = _picks_of(p1["sid"], p1["row"], in_band[name])
            per_target[name]["cascade_band_rows"] = n_c
        if users:
            cascade_picks = _picks_of(p1["sid"], p1["row"], np.logical_or.reduce(list(in_band.values())))
            cascade = passes["cascade"] = _Pass(
                "cascade",
                "predict",
                cascade_picks,
                _hash(
                    [
                        _one([fits[n].fp2 for n in users]),
                        bulk.fingerprint,
                        _positions_hash(cascade_picks),
                        "predict",
                    ]
                ),
                regressors={columns[n]: fits[n].reg2.to_bytes() for n in users},
                layer=l_c,
                pooling=CASCADE_POOLING,
            )
            if cascade_picks:
                cascade_parts = _run_pass(cfg, plan, dups, probe_gradient, cascade, wall)
                p2 = _predictions(cascade_parts, plan, cascade_picks, [columns[n] for n in users])
                at = np.searchsorted(_key(p1["sid"], p1["row"]), _key(p2["sid"], p2["row"]))
                ood = ood.copy()
                ood[at] |= p2["ood"]
                for name in users:  # a target's stage 2 replaces its stage 1 on its own band only
                    own = in_band[name][at]
                    p1["pred"][columns[name]][at[own]] = p2["pred"][columns[name]][own]
        # refine: per target the top band of its cascaded ranking (its band's rows first, by stage 2; then
        # the others by stage 1); the union of the targets' bands + the OOD rows, scored exactly
        n_ood = int(ood.sum())
        chosen = np.zeros(len(ood), dtype=bool)
        for name, column in columns.items():
            k = min(refine_rows(s, _select_of(cfg, plan, name), n_rows), n_ok)
            own = in_band.get(name, np.zeros(len(ood), dtype=bool))
            order = np.lexsort((-p1["pred"][column], ~own))
            chosen[order[:k]] = True
            per_target[name]["refine_band_rows"] = k
        if s.distill_ood_exact:
            chosen |= ood
        refine_picks = _picks_of(p1["sid"], p1["row"], chosen)
    base_fp = passes["cascade"].fingerprint if "cascade" in passes else bulk.fingerprint
    refine = passes["refine"] = _Pass(
        "refine", "exact", refine_picks, _hash([base_fp, _positions_hash(refine_picks)])
    )
    refine_parts = _run_pass(cfg, plan, dups, probe_gradient, refine, wall) if refine_picks else None

    # assemble: per shard, the passes' rows merged by row, through the engine's collector
    t = time.perf_counter()
    collector = ShardCollector(store, plan, todo, cfg.data.id_column, on_shard_done)
    collector.extra_columns = _output_columns(plan)
    merge = [
        (bulk_parts, rest, "exact" if fallback else "distilled"),
        (sample_parts, SA, "exact"),
        (refine_parts, refine_picks, "refined"),
    ]
    for sid, shard in todo.items():
        table = _assemble_shard(
            sid, shard.key, merge, (cascade_parts, cascade_picks), columns, bands, l_f, l_c
        )
        collector.add(_with_stored_features(table, sid, shard.key, merge) if multi else table)
    collector.check_complete()
    wall["assemble"] = time.perf_counter() - t
    fidelity = {
        "strategy": "distilled",
        "reason": plan.strategy_reason,
        "layer": l_f,
        "sample_rows": int(sum(len(r) for r in S.values())),
        "audit_rows_picked": int(sum(len(r) for r in A.values())),
        "cascade_rows": int(sum(len(r) for r in cascade_picks.values())),
        "refine_rows": int(sum(len(r) for r in refine_picks.values())),
        "ood_rows": n_ood,
        "score_source": _count_sources(store, plan),
    }
    if multi:  # every target's own fit, gate and bands (also in targets/<t>/distill_regressor.json)
        fidelity["targets"] = {
            name: {**f.fidelity, **per_target[name], "fallback_exact": f.fallback} for name, f in fits.items()
        }
        for name, block in fidelity["targets"].items():
            RunDir(plan.targets[name]["cfg"].run_dir).path(FIDELITY_FILE).write_text(
                json.dumps(block, indent=1)
            )
    else:
        fidelity.update(fits[None].fidelity)
    run.path(FIDELITY_FILE).write_text(json.dumps(fidelity, indent=1))
    stats = {
        "passes": {
            name: {"mode": p.mode, "layer": (p.layer or l_f) if p.mode == "predict" else None, **p.stats}
            for name, p in passes.items()
        },
        "fit_s": wall["fit"],
    }
    return collector, stats


def _select_of(cfg, plan, name):
    """A target's SelectConfig (its own fraction / top_k), or the run's for a single target."""
    return cfg.select if name is None else plan.targets[name]["cfg"].select


def _output_columns(plan) -> tuple[str, ...]:
    """The columns a distilled run writes beside the scores: ``score_source``, ``predicted_layer`` and ``ood``;
    with several targets every target's exact-pass columns (``score__<t>`` ...), one ``predicted_layer__<t>``
    each (which of ITS stages ranked the row), the shared ``score_source`` (a row scored exactly is exact for
    every target) and the stored features (for targets added later)."""
    if not plan.targets:
        return (SOURCE_COL, LAYER_COL, OOD_COL)
    from p2d_ray.scoring.actor import FEATURES_COL as STORED_FEATURES_COL
    from p2d_ray.scoring.targets import target_columns

    layers = tuple(_col(LAYER_COL, name) for name in plan.targets)
    return (*target_columns(plan.targets), SOURCE_COL, *layers, OOD_COL, STORED_FEATURES_COL)


def _assemble_shard(sid, key, merge: list, cascade: tuple, columns: dict, bands: dict, l_f, l_c) -> pa.Table:
    """One shard's final rows: the bulk, sample and refine passes' rows merged by row (a later pass wins),
    ``score_source``; each target's score on its own cascade band (rows not refined) from the cascade pass,
    with the cascade's ``ood``; each target's ``predicted_layer`` (l_c on its band, l_f elsewhere, null where
    the row's score is the sample's or the exact fallback's)."""
    pieces = []
    for parts, picks, src in merge:
        if parts is None or sid not in picks or not len(picks[sid]):
            continue
        # everything but the pooled features (the bulk of a part's bytes; the feature store reads its own)
        names = pq.read_schema(parts.path(key)).names
        tb = parts.read(key, [c for c in names if c not in (FEATURES_COL, CASCADE_FEATURES_COL)])
        pieces.append(tb.append_column(SOURCE_COL, pa.array([src] * tb.num_rows, pa.string())))
    table = _merge_by_row(pieces)
    rows = table.column("_row").to_numpy()
    src = table.column(SOURCE_COL).to_numpy(zero_copy_only=False)
    cascade_parts, cascade_picks = cascade
    if cascade_parts is not None and len(cascade_picks.get(sid, ())):
        cas = cascade_parts.read(key, ["_row", OOD_COL, *(columns[n] for n in bands)])
        crow = cas.column("_row").to_numpy()
        at = np.searchsorted(rows, crow)
        keep = src[at] == "distilled"  # a refined row keeps its exact score
        table = _set_rows(table, OOD_COL, at[keep], cas.column(OOD_COL).to_numpy(zero_copy_only=False)[keep])
        for name, picks in bands.items():
            own = keep & np.isin(crow, picks.get(sid, ()))
            values = cas.column(columns[name]).to_numpy(zero_copy_only=False)[own]
            table = _set_rows(table, columns[name], at[own], values)
    for name in columns:
        layer = np.where(np.isin(rows, bands.get(name, {}).get(sid, ())), l_c or 0, l_f).astype(np.int16)
        table = table.append_column(_col(LAYER_COL, name), pa.array(layer, mask=src == "exact"))
    return table


def _set_rows(table: pa.Table, column: str, at: np.ndarray, values: np.ndarray) -> pa.Table:
    """``table[column][at] = values`` (its nulls kept)."""
    col = table.column(column)
    out = col.to_numpy(zero_copy_only=False).copy()
    out[at] = values
    i = table.schema.get_field_index(column)
    return table.set_column(
        i, column, pa.array(out, col.type, mask=col.is_null().to_numpy(zero_copy_only=False))
    )


def _with_stored_features(table: pa.Table, sid, key, merge: list) -> pa.Table:
    """Several targets: every row's pooled layer-l_f features (written by the sample and bulk passes) as the
    ``features`` column (fp16), the feature store a target added later reads (scoring/targets.py)."""
    from p2d_ray.scoring.actor import FEATURES_COL as STORED_FEATURES_COL

    feats = [
        parts.read(key, ["_row", FEATURES_COL])
        for parts, picks, _ in merge[:2]  # bulk + sample: every row of the shard once
        if parts is not None
        and len(picks.get(sid, ()))
        and FEATURES_COL in pq.read_schema(parts.path(key)).names
    ]
    f = pa.concat_tables(feats).sort_by("_row")
    if not np.array_equal(f.column("_row").to_numpy(), table.column("_row").to_numpy()):
        raise RuntimeError(f"shard {key}: the stored features do not cover its rows once")
    col = f.column(FEATURES_COL).combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
    return table.append_column(
        STORED_FEATURES_COL,
        pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), col.type.list_size),
    )


def _merge_by_row(pieces: list[pa.Table]) -> pa.Table:
    """One shard's rows from several passes; a later piece overrides an earlier one on the same row."""
    names = [c for c in pieces[0].column_names if all(c in p.column_names for p in pieces)]
    tables = [p.select(names) for p in pieces]
    tables = [t.cast(tables[0].schema) for t in tables]
    table = pa.concat_tables(tables)
    rows = table.column("_row").to_numpy()
    order = np.arange(len(rows))
    # keep the LAST occurrence of each row: unique over the reversed order
    _, last = np.unique(rows[::-1], return_index=True)
    keep = np.sort(order[::-1][last])
    return table.take(pa.array(keep)).sort_by("_row")


def _count_sources(store, plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for shard in plan.shards:
        p = store.score_path(shard)
        if p.is_file() and SOURCE_COL in pq.read_schema(p).names:
            counts = pc.value_counts(pq.read_table(p, columns=[SOURCE_COL]).column(0)).to_pylist()
            for d in counts:
                out[d["values"]] = out.get(d["values"], 0) + int(d["counts"])
    return out


def summary_block(run_dir) -> dict | None:
    """The fidelity figures of a distilled run (for score_summary.json), or None."""
    from p2d_ray.rundir import RunDir

    p = RunDir(run_dir).path(FIDELITY_FILE)
    return json.loads(p.read_text()) if p.is_file() else None
