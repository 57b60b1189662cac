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
                 at layer l_c, the second regressor's prediction replaces stage 1's (these rows rank first)
    refine pass  the predicted top score.refine_fraction of the corpus (and, by default, the OOD rows)
                 re-scored exactly, so the rows finally selected are ranked by exact scores
    assemble     per shard: the passes' rows merged by row, ``score_source`` in {exact, distilled, refined},
                 ``predicted_layer`` (l_f or l_c: which stage ranked the row; null for S and A), written
                 through the engine's ShardCollector (scores/, quarantine/, marker last)

Each pass keeps per-shard part files and markers under ``_state/distill/<pass>/`` keyed by a fingerprint
of what that pass depends on, so a killed run resumes per shard in every pass, and a changed refine band or
gate reuses the sample's exact scores. The regressor is saved beside the probe gradient
(``distill_regressor.npz`` + ``.json``) with its fingerprint (model, heads, probe, sample seed, l_f,
regressor) and the fidelity figures.

This module is the engine's side (passes, parts, assembly); the features (which layers, the truncated forward,
pooling) are ``scoring/features.py`` and the regressor and its gate ``scoring/regressor.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
    ``mode="predict"`` runs no scorer at all, only the truncated forward to ``layer``, and writes the
    regressor's prediction as ``score`` and the ``ood`` flag."""

    def __init__(
        self,
        mode: str,
        layer: int,
        features: bool,
        regressor: list | None,
        cascade_layer=None,
        pooling: str = "engine",
        **kw,
    ):
        super().__init__(**kw)
        self.mode, self.layer, self.want_features = mode, layer, features
        self.layers = [layer] + ([cascade_layer] if cascade_layer and mode == "exact" and features else [])
        self.poolings = [pooling, CASCADE_POOLING][: len(self.layers)]  # per layer
        self.reg = None
        if regressor:
            import ray

            data = regressor[0]
            self.reg = Regressor.from_bytes(ray.get(data) if isinstance(data, ray.ObjectRef) else data)
        if mode == "predict":
            self.score = self._count_only  # the base __call__'s loop only collates and counts

    def _count_only(self, tensors):
        n_tokens = tensors["loss_mask"][:, 1:].sum(1)
        return ScoreOutput(torch.zeros(len(n_tokens)), n_tokens)

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
            score = np.full(n, np.nan)
            if feats is not None:
                score[ok], dist[ok], ood[ok] = self.reg.predict(feats[ok].astype(np.float64))
            i = out.schema.get_field_index("score")
            out = out.set_column(i, "score", pa.array(score, mask=~valid))
            for c in COMPONENT_COLUMNS.get(self.cfg.scorer, ()):  # the exact scorer's own: not computed
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
    regressor: bytes | None = None
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
    reg_ref = [ray.put(p.regressor)] if p.regressor is not None else None
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
            "regressor": reg_ref,
            "model_json": plan.model_json,
            "score_json": s.model_dump_json(),
            "heads_json": plan.heads.to_json() if plan.heads is not None else None,
            "id_column": cfg.data.id_column,
            "icl_json": None,
            "probe_gradient": probe_gradient,
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


def _exact_xy(table: pa.Table, column: str = FEATURES_COL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, d], exact scores [n], keep mask) of a sample part table: scorable, finite rows."""
    ok = table.column("reason").is_null().to_numpy(zero_copy_only=False)
    y = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
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


def _predictions(parts: Parts, plan, picks: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """A predict pass's rows: shard, row, scorable, predicted score (-inf where not), OOD flag."""
    table = _read_parts(parts, plan, picks, ["reason", "score", OOD_COL])
    ok = table.column("reason").is_null().to_numpy(zero_copy_only=False)
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    return {
        "sid": table.column("_shard").to_numpy().astype(np.int64),
        "row": table.column("_row").to_numpy().astype(np.int64),
        "ok": ok,
        "pred": np.where(ok & np.isfinite(score), score, -np.inf),
        "ood": table.column(OOD_COL).to_numpy(zero_copy_only=False) & ok,
    }


def _picks_of(sid: np.ndarray, row: np.ndarray, chosen: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): np.sort(row[chosen & (sid == i)]) for i in np.unique(sid[chosen])}


def _key(sid: np.ndarray, row: np.ndarray) -> np.ndarray:
    return sid.astype(np.int64) << 32 | row.astype(np.int64)


def run_distilled(cfg, plan, store, todo: dict, on_shard_done, wall: dict):
    """The distilled strategy's passes (module docstring); returns the final ShardCollector and the
    ``distill`` stats block. ``todo``: the shards without a final marker."""
    from p2d_ray.rundir import RunDir
    from p2d_ray.scoring.collect import ShardCollector
    from p2d_ray.scoring.pipeline import _start_pass

    s = cfg.score
    run = RunDir(cfg.run_dir)
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

    # fit on S, audit on A (stage 1 at l_f; the cascade's stage 2 at l_c)
    t = time.perf_counter()
    meta = {
        "model_fingerprint": identity["model_fingerprint"],
        "heads": identity["heads"],
        "probe_gradient": identity["probe_gradient"],
        "sample_seed": s.distill_seed,
    }

    def reader(picks, column):
        return lambda: _exact_xy(_read_parts(sample_parts, plan, picks, ["reason", "score", column]), column)

    reg_fp = _hash(
        {"sample": sample_fp, "alphas": ALPHAS, "folds": s.distill_folds, "ood": s.distill_ood_factor}
    )
    reg, cv = _fit_stage(run, REGRESSOR_FILE, reg_fp, reader(S, FEATURES_COL), s, {**meta, "layer": l_f})
    audit = _audit(reg, reader(A, FEATURES_COL), s) if A else {"rows": 0}
    verdict = gate(cv, audit, s)
    cascade_fid = None
    if l_c is not None:
        reg2_fp = _hash([reg_fp, "cascade", l_c, CASCADE_POOLING])
        reg2, cv2 = _fit_stage(
            run,
            CASCADE_REGRESSOR_FILE,
            reg2_fp,
            reader(S, CASCADE_FEATURES_COL),
            s,
            {**meta, "layer": l_c, "pooling": CASCADE_POOLING},
            CASCADE_POOLING,
        )
        audit2 = _audit(reg2, reader(A, CASCADE_FEATURES_COL), s) if A else {"rows": 0}
        cascade_fid = {
            "layer": l_c,
            "fraction": s.distill_cascade_fraction,
            "kfold": cv2,
            "audit": audit2,
            "gate": gate(cv2, audit2, s),
            "regressor": reg2.meta,
        }
    wall["fit"] = time.perf_counter() - t
    fallback = not verdict["passed"] and s.gate_fallback == "exact"
    if not verdict["passed"]:
        log.warning(
            "distilled: the fidelity gate FAILED (%s); %s",
            "; ".join(verdict["failed"]),
            "falling back to exact scores for every row (score.gate_fallback=exact)"
            if fallback
            else "continuing with predicted scores (score.gate_fallback=warn): the selection may be poor",
        )
        print(
            f"score: WARNING fidelity gate failed ({'; '.join(verdict['failed'])}); fallback={s.gate_fallback}"
        )
    use_cascade = cascade_fid is not None and not fallback
    if use_cascade and not cascade_fid["gate"]["passed"]:
        failed = "; ".join(cascade_fid["gate"]["failed"])
        use_cascade = s.gate_fallback == "warn"
        log.warning("distilled: the cascade's (layer %d) fidelity gate FAILED (%s)", l_c, failed)
        print(
            f"score: WARNING the cascade's fidelity gate failed ({failed}); "
            + (
                "continuing with it (score.gate_fallback=warn)"
                if use_cascade
                else "the band from stage 1 alone"
            )
        )
    if cascade_fid is not None:
        cascade_fid["used"] = use_cascade

    # bulk: predicted (or, after a failed gate with fallback exact, exact) scores for every other row
    if fallback:
        bulk = passes["bulk"] = _Pass("bulk", "exact", rest, _hash([sample_fp, "exact"]))
    else:
        bulk = passes["bulk"] = _Pass(
            "bulk", "predict", rest, _hash([reg_fp, "predict"]), regressor=reg.to_bytes()
        )
    bulk_parts = _run_pass(cfg, plan, dups, probe_gradient, bulk, wall)

    # cascade: the stage-1 predicted top distill_cascade_fraction re-predicted from layer l_c
    cascade_picks: dict[int, np.ndarray] = {}
    cascade_parts = None
    refine_picks: dict[int, np.ndarray] = {}
    n_ood = 0
    if not fallback:
        p1 = _predictions(bulk_parts, plan, rest)
        order = np.argsort(-p1["pred"], kind="stable")  # stage 1's ranking
        in_cascade = np.zeros(len(order), dtype=bool)
        ood = p1["ood"]
        if use_cascade:
            n_c = min(int(round(s.distill_cascade_fraction * n_rows)), int(p1["ok"].sum()))
            in_cascade[order[:n_c]] = True
            cascade_picks = _picks_of(p1["sid"], p1["row"], in_cascade)
            cascade = passes["cascade"] = _Pass(
                "cascade",
                "predict",
                cascade_picks,
                _hash([reg2_fp, bulk.fingerprint, _positions_hash(cascade_picks), "predict"]),
                regressor=reg2.to_bytes(),
                layer=l_c,
                pooling=CASCADE_POOLING,
            )
            if cascade_picks:
                cascade_parts = _run_pass(cfg, plan, dups, probe_gradient, cascade, wall)
                p2 = _predictions(cascade_parts, plan, cascade_picks)
                at = np.searchsorted(_key(p1["sid"], p1["row"]), _key(p2["sid"], p2["row"]))
                p1["pred"][at] = p2["pred"]  # the parts are read in (shard, row) order: keys sorted
                ood = ood.copy()
                ood[at] |= p2["ood"]
        # refine: the top band of the cascaded ranking (the cascade's rows first, by stage 2; then the
        # others by stage 1) + the OOD rows, scored exactly
        n_ood = int(ood.sum())
        order = np.lexsort((-p1["pred"], ~in_cascade))
        k = min(int(round(s.refine_fraction * n_rows)), int(p1["ok"].sum()))
        chosen = np.zeros(len(order), dtype=bool)
        chosen[order[:k]] = True
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
    collector.extra_columns = (SOURCE_COL, LAYER_COL, OOD_COL)
    bulk_source = "exact" if fallback else "distilled"
    for sid, shard in todo.items():
        pieces = []
        for parts, picks, src in (
            (bulk_parts, rest, bulk_source),
            (cascade_parts, cascade_picks, "distilled"),
            (sample_parts, SA, "exact"),
            (refine_parts, refine_picks, "refined"),
        ):
            if parts is None or sid not in picks or not len(picks[sid]):
                continue
            tb = parts.read(shard.key)
            tb = tb.drop_columns([c for c in (FEATURES_COL, CASCADE_FEATURES_COL) if c in tb.column_names])
            rows = tb.column("_row").to_numpy()
            if parts is sample_parts or fallback:
                layer = np.zeros(len(rows), dtype=np.int16)
                valid = np.zeros(len(rows), dtype=bool)
            else:  # which stage ranked the row: l_c for the cascade's rows, l_f for the others
                layer = np.where(np.isin(rows, cascade_picks.get(sid, ())), l_c or 0, l_f).astype(np.int16)
                valid = np.ones(len(rows), dtype=bool)
            tb = tb.append_column(SOURCE_COL, pa.array([src] * tb.num_rows, pa.string()))
            pieces.append(tb.append_column(LAYER_COL, pa.array(layer, mask=~valid)))
        merged = _merge_by_row(pieces)
        collector.add(merged)
    collector.check_complete()
    wall["assemble"] = time.perf_counter() - t
    sources = _count_sources(store, plan)
    fidelity = {
        "strategy": "distilled",
        "reason": plan.strategy_reason,
        "layer": l_f,
        "sample_rows": int(sum(len(r) for r in S.values())),
        "audit_rows_picked": int(sum(len(r) for r in A.values())),
        "kfold": cv,
        "audit": audit,
        "gate": verdict,
        "cascade": cascade_fid,
        "cascade_rows": int(sum(len(r) for r in cascade_picks.values())),
        "refine_rows": int(sum(len(r) for r in refine_picks.values())),
        "ood_rows": n_ood,
        "score_source": sources,
        "regressor": reg.meta,
    }
    run.path(FIDELITY_FILE).write_text(json.dumps(fidelity, indent=1))
    stats = {
        "passes": {
            name: {"mode": p.mode, "layer": (p.layer or l_f) if p.mode == "predict" else None, **p.stats}
            for name, p in passes.items()
        },
        "fit_s": wall["fit"],
    }
    return collector, stats


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
