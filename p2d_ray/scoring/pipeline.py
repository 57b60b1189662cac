"""Stage 2, ``p2d-ray score``: head-gated affinity scores for a Parquet corpus on a Ray Data actor pool.

    corpus shards (file, row group) ──► ParquetShards read tasks ──► tokenize_block (CPU tasks)
        ──► ScorerActor pool (frozen model + head gates, loaded once per actor; GPUs on a fleet)
        ──► driver: rows grouped by shard ──► scores/<shard>.parquet, quarantine/<shard>.parquet, marker

Everything that can be wrong with the inputs is checked before Ray starts (``plan_score``). One Ray Data
pass covers all shards not finished yet; the driver only receives the small score rows (id + 4 numbers),
writes a shard's files the moment its last row arrives, and then its marker, so an interrupted run loses
at most the shards in flight and a rerun produces the same scores as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2d_ray.config import SCORE_RESOURCE_FIELDS, P2DConfig
from p2d_ray.heads.headset import HeadSet
from p2d_ray.rundir import RunDir, stage_fingerprint
from p2d_ray.scoring.actor import ACTOR_COL, PAD_COL, SCORE_TIME_COL, ScorerActor
from p2d_ray.scoring.outputs import SCORE_COLUMNS, ScoreStore
from p2d_ray.scoring.quarantine import (
    count_reasons,
    duplicate_positions,
    duplicate_positions_local,
    quarantine_table,
)
from p2d_ray.scoring.scorers import USES_HEADS
from p2d_ray.scoring.shards import ParquetShards, Shard, list_parquet_files, plan_shards, read_footer
from p2d_ray.scoring.tokenize import DUP_COL, TOKENIZE_TIME_COL, tokenize_block

log = logging.getLogger("p2d_ray.score")


@dataclass
class ScorePlan:
    """Everything the Ray pass needs, resolved and checked on the driver."""

    shards: list[Shard]
    id_type: pa.DataType
    fmt: str
    text_columns: list[str]
    demos: list[dict]
    heads: HeadSet | None
    model_json: str  # ModelConfig with the resolved local path, for the workers
    manifest: dict
    fingerprint: str
    provenance: dict = field(default_factory=dict)


def _context_length(hf_config) -> int | None:
    return getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)


def pick_demos(probe_rows: list[dict], k: int, seed: int) -> list[dict]:
    """P2D's selection prompt: k probe-set demonstrations, fixed for a run by ``seed``."""
    if len(probe_rows) < k:
        raise ValueError(f"data.icl_k={k} but the probe set has only {len(probe_rows)} rows")
    picked = sorted(random.Random(seed).sample(range(len(probe_rows)), k))
    return [probe_rows[i] for i in picked]


def plan_score(cfg: P2DConfig) -> ScorePlan:
    """Resolve and check model, heads, corpus and prompt format. Raises ValueError before any work."""
    from p2d_ray.data.formatting import resolve_format
    from p2d_ray.data.io import read_rows, rows_hash
    from p2d_ray.data.paths import corpus_path, probe_path
    from p2d_ray.models.geometry import geometry_from_config
    from p2d_ray.models.loading import load_config_checked, model_fingerprint, resolve_path

    d, s = cfg.data, cfg.score
    hf_config = load_config_checked(cfg.model)
    ctx = _context_length(hf_config)
    if ctx is not None and d.max_length > ctx:
        raise ValueError(f"data.max_length={d.max_length} exceeds the model's context length ({ctx})")
    heads = None
    if USES_HEADS[s.scorer]:
        heads = HeadSet.load(RunDir(cfg.run_dir).heads_json)
        heads.check_fits(geometry_from_config(hf_config))
        if len(heads) == 0:
            raise ValueError(
                f"{RunDir(cfg.run_dir).heads_json} lists no heads; scorer {s.scorer!r} needs some"
            )

    corpus = corpus_path(cfg)
    files = list_parquet_files(corpus)
    first = read_footer(files[0]).schema.to_arrow_schema()
    fmt = resolve_format(d, first.names)
    # encode_row reads prompt/response when a row has both, else the text column.
    has_pr = d.prompt_column in first.names and d.response_column in first.names
    text_columns = [d.prompt_column, d.response_column] if has_pr else [d.text_column]
    shards, schema = plan_shards(corpus, [d.id_column, *text_columns], files=files)
    id_type = canonical_id_type(schema.field(d.id_column).type)

    demos: list[dict] = []
    if fmt == "icl":
        demos = pick_demos(read_rows(probe_path(cfg)), d.icl_k, cfg.seed)

    model_json = cfg.model.model_copy(update={"name_or_path": resolve_path(cfg.model)}).model_dump_json()
    # What the scores depend on. Not: where the corpus lives (its shards are compared separately), resource
    # knobs, and settings the chosen format / scorer ignores (changing them must not block a resume).
    data = cfg.data.model_dump(
        mode="json",
        exclude={"corpus_path", "probe_path"} | (set() if fmt == "icl" else {"icl_k", "icl_instruction"}),
    )
    score = cfg.score.model_dump(
        mode="json",
        exclude=set(SCORE_RESOURCE_FIELDS) | (set() if s.scorer == "influence" else {"gate_mode"}),
    )
    identity = {
        "model": cfg.model.model_dump(mode="json", exclude={"device"}),
        "model_fingerprint": model_fingerprint(cfg.model),
        "data": data,
        "format": fmt,
        "score": score,
        "heads": heads.fingerprint() if heads is not None else None,
        "icl_demos": rows_hash(demos) if demos else None,
    }
    fingerprint = _hash(identity)
    demo_ids = [r.get(d.id_column) for r in demos]
    manifest = {
        "fingerprint": fingerprint,
        "identity": identity,
        "scorer": s.scorer,
        "corpus": corpus,
        "icl_demos": demos,
        "shards": [sh.to_dict() for sh in shards],
    }
    provenance = {
        "scorer": s.scorer,
        "gate_mode": s.gate_mode if heads is not None else None,
        "heads_fingerprint": identity["heads"],
        "config_fingerprint": fingerprint,
        "model_fingerprint": identity["model_fingerprint"],
        "format": fmt,
        "icl_demo_ids": demo_ids,
    }
    return ScorePlan(
        shards, id_type, fmt, text_columns, demos, heads, model_json, manifest, fingerprint, provenance
    )


def canonical_id_type(t: pa.DataType) -> pa.DataType:
    """One id type for every block (files may differ: int32 vs int64, string vs large_string)."""
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def _hash(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rows_per_block(n_rows: int, cfg) -> int:
    """Enough blocks that every actor gets work (``blocks_per_actor`` each), never tiny or huge ones."""
    target = math.ceil(n_rows / (cfg.max_actors * cfg.blocks_per_actor))
    return max(cfg.batch_size, min(target, cfg.max_rows_per_block))


def ensure_ray() -> bool:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray; True if we started it."""
    import os

    import ray

    if ray.is_initialized():
        return False
    env = {
        k: os.environ[k]
        for k in ("HF_HUB_OFFLINE", "P2D_RAY_CACHE", "TOKENIZERS_PARALLELISM")
        if k in os.environ
    }
    ray.init(include_dashboard=False, runtime_env={"env_vars": env})
    return True


def _warn_on_resources(s) -> None:
    """A pool that cannot start on the cluster as it is now waits for the autoscaler -- or forever on a
    fixed cluster (MEASURED.md: two 1-CPU actors on a 2-CPU node). Say so instead of hanging silently."""
    import ray

    have = ray.cluster_resources()
    need_cpu = s.min_actors * s.num_cpus_per_actor + s.num_cpus_per_tokenize_task
    if need_cpu > have.get("CPU", 0):
        log.warning(
            "score pool needs %.1f CPUs (min_actors * num_cpus_per_actor + a tokenize task) but the "
            "cluster has %.1f now: it will wait for the autoscaler (or hang on a fixed cluster)",
            need_cpu,
            have.get("CPU", 0),
        )
    if s.num_gpus_per_actor and s.min_actors * s.num_gpus_per_actor > have.get("GPU", 0):
        log.warning(
            "score pool needs %.1f GPUs but the cluster has %.1f now",
            s.min_actors * s.num_gpus_per_actor,
            have.get("GPU", 0),
        )


class ShardCollector:
    """Driver side of the pass: groups result rows by shard, writes a shard once all its rows arrived."""

    def __init__(
        self,
        store: ScoreStore,
        plan: ScorePlan,
        todo: dict[int, Shard],
        id_column: str,
        on_shard_done: Callable[[Shard], None] | None = None,
    ):
        self.store, self.plan, self.todo, self.id_column = store, plan, todo, id_column
        self.on_shard_done = on_shard_done
        self.parts: dict[int, list[pa.Table]] = {}
        self.count: dict[int, int] = {}
        self.finished: list[int] = []
        self.write_seconds = 0.0
        self.stats = {
            "rows": 0,
            "scored": 0,
            "tokens": 0,
            "target_tokens": 0,
            "padded_tokens": 0,
            "tokenize_s": 0.0,
            "score_s": 0.0,
        }
        self.actors: set[int] = set()

    def add(self, block: pa.Table) -> None:
        sids = block.column("_shard").to_numpy()
        for sid in np.unique(sids):
            part = block.filter(pa.array(sids == sid))
            sid = int(sid)
            self.parts.setdefault(sid, []).append(part)
            self.count[sid] = self.count.get(sid, 0) + part.num_rows
            if self.count[sid] > self.todo[sid].num_rows:
                raise RuntimeError(f"shard {self.todo[sid].key}: received more rows than it has")
            if self.count[sid] == self.todo[sid].num_rows:
                self._finish(sid)

    def _finish(self, sid: int) -> None:
        t0 = time.perf_counter()
        shard = self.todo[sid]
        table = pa.concat_tables(self.parts.pop(sid)).sort_by("_row")
        rows = table.column("_row").to_numpy()
        if not np.array_equal(rows, np.arange(shard.num_rows)):
            raise RuntimeError(f"shard {shard.key}: rows missing or duplicated in the pipeline output")
        bad = table.column("reason").is_valid()
        scored = table.filter(pc.invert(bad))
        quarantined = table.filter(bad)
        score_table = scored.select([self.id_column, *SCORE_COLUMNS])
        record = {
            "shard": shard.key,
            "path": shard.path,
            "row_group": shard.row_group,
            "rows_in": shard.num_rows,
            "rows_scored": scored.num_rows,
            "rows_quarantined": quarantined.num_rows,
            "reasons": count_reasons(quarantined.column("reason")),
            "rows_truncated": int(pc.sum(scored.column("truncated")).as_py() or 0),
            "target_tokens": int(pc.sum(scored.column("n_tokens")).as_py() or 0),
            "fingerprint": self.plan.fingerprint,
        }
        if record["rows_scored"] + record["rows_quarantined"] != record["rows_in"]:
            raise RuntimeError(f"shard {shard.key}: rows_in != rows_scored + rows_quarantined: {record}")
        self.store.write_shard(
            shard,
            score_table,
            quarantine_table(quarantined, shard, self.id_column),
            record,
            self.plan.provenance,
        )
        st = self.stats
        st["rows"] += shard.num_rows
        st["scored"] += scored.num_rows
        st["tokens"] += int(pc.sum(scored.column("length")).as_py() or 0)
        st["target_tokens"] += record["target_tokens"]
        st["padded_tokens"] += int(pc.sum(scored.column(PAD_COL)).as_py() or 0)
        st["tokenize_s"] += float(pc.sum(table.column(TOKENIZE_TIME_COL)).as_py() or 0.0)
        st["score_s"] += float(pc.sum(table.column(SCORE_TIME_COL)).as_py() or 0.0)
        self.actors.update(int(a) for a in pc.unique(scored.column(ACTOR_COL)).to_pylist())
        self.finished.append(sid)
        self.write_seconds += time.perf_counter() - t0
        log.info("scored shard %s (%d/%d this run)", shard.key, len(self.finished), len(self.todo))
        if self.on_shard_done is not None:
            self.on_shard_done(shard)

    def check_complete(self) -> None:
        missing = [self.todo[s].key for s in self.todo if s not in self.finished]
        if missing:
            raise RuntimeError(
                f"{len(missing)} shard(s) did not receive all their rows (e.g. {missing[:3]}): rows were lost "
                "in the pipeline; nothing was marked done for them"
            )


def summarize(store: ScoreStore, plan: ScorePlan) -> dict:
    """score_summary.json from every shard's marker; fails loudly if any row is unaccounted for."""
    per_shard, reasons = {}, {}
    totals = {"rows_in": 0, "rows_scored": 0, "rows_quarantined": 0, "rows_truncated": 0}
    for shard in plan.shards:
        rec = store.marker(shard, plan.fingerprint)
        if rec is None:
            raise RuntimeError(f"shard {shard.key} has no completion marker after the run")
        if rec["rows_in"] != shard.num_rows or rec["rows_scored"] + rec["rows_quarantined"] != rec["rows_in"]:
            raise RuntimeError(f"shard {shard.key}: rows_in != rows_scored + rows_quarantined ({rec})")
        per_shard[shard.key] = {k: rec[k] for k in ("rows_in", "rows_scored", "rows_quarantined", "reasons")}
        for k in totals:
            totals[k] += rec[k]
        for r, n in rec["reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
    if totals["rows_in"] != totals["rows_scored"] + totals["rows_quarantined"]:
        raise RuntimeError(f"rows_in != rows_scored + rows_quarantined in total: {totals}")
    return {
        **totals,
        "quarantine_reasons": reasons,
        "n_shards": len(plan.shards),
        **plan.provenance,
        "shards": per_shard,
    }


def score_corpus(cfg: P2DConfig, on_shard_done: Callable[[Shard], None] | None = None) -> dict:
    """The body of ``p2d-ray score`` (see module docstring). ``on_shard_done`` is called after each shard's
    files and marker are written (progress hooks; tests use it to interrupt a run part-way)."""
    import ray
    import ray.data

    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    s = cfg.score
    plan = plan_score(cfg)
    store = ScoreStore(cfg.run_dir)
    store.open(plan.manifest)
    todo = {i: sh for i, sh in enumerate(plan.shards) if store.marker(sh, plan.fingerprint) is None}
    wall["plan"] = time.perf_counter() - t_start
    collector = ShardCollector(store, plan, todo, cfg.data.id_column, on_shard_done)
    ray_stats = None
    if todo:
        ensure_ray()
        _warn_on_resources(s)
        t = time.perf_counter()
        n_rows = sum(sh.num_rows for sh in plan.shards)
        find = duplicate_positions_local if n_rows <= s.local_dedup_max_rows else duplicate_positions
        dups = find(plan.shards, cfg.data.id_column, plan.id_type)
        wall["duplicates"] = time.perf_counter() - t
        n_todo = sum(sh.num_rows for sh in todo.values())
        source = ParquetShards(
            list(todo.values()),
            list(todo),
            [cfg.data.id_column, *plan.text_columns],
            plan.id_type,
            tuple(plan.text_columns),
            rows_per_block(n_todo, s),
            flags={DUP_COL: dups},
        )
        ds = ray.data.read_datasource(source).map_batches(
            tokenize_block,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=s.num_cpus_per_tokenize_task,
            fn_kwargs={
                "model_json": plan.model_json,
                "data_json": cfg.data.model_dump_json(),
                "fmt": plan.fmt,
                "demos": plan.demos,
                "text_columns": plan.text_columns,
            },
        )
        ds = ds.map_batches(
            ScorerActor,
            batch_format="pyarrow",
            batch_size=s.batch_size * s.bucket_batches,
            compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
            num_cpus=s.num_cpus_per_actor,
            num_gpus=s.num_gpus_per_actor,
            fn_constructor_kwargs={
                "model_json": plan.model_json,
                "score_json": s.model_dump_json(),
                "heads_json": plan.heads.to_json() if plan.heads is not None else None,
                "id_column": cfg.data.id_column,
            },
        )
        t = time.perf_counter()
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(block)
        collector.check_complete()
        wall["score_pass"] = time.perf_counter() - t
        wall["write"] = collector.write_seconds
        ray_stats = ds.stats()
    summary = summarize(store, plan)
    RunDir(cfg.run_dir).path("score_summary.json").write_text(json.dumps(summary, indent=1))
    wall["total"] = time.perf_counter() - t_start
    st = collector.stats
    pass_s = wall.get("score_pass", 0.0)
    stats = {
        "scorer": s.scorer,
        "shards": {
            "total": len(plan.shards),
            "already_done": len(plan.shards) - len(todo),
            "scored_this_run": len(collector.finished),
        },
        "rows_this_run": st["rows"],
        "rows_scored_this_run": st["scored"],
        "rows_per_s": st["rows"] / pass_s if pass_s else None,
        "tokens_per_s": st["tokens"] / pass_s if pass_s else None,
        "target_tokens_per_s": st["target_tokens"] / pass_s if pass_s else None,
        "padding_fraction": 1 - st["tokens"] / st["padded_tokens"] if st["padded_tokens"] else None,
        "actors": {"min": s.min_actors, "max": s.max_actors, "used": len(collector.actors)},
        "wall_s": wall,
        "busy_s": {"tokenize": st["tokenize_s"], "score": st["score_s"]},
        "icl_demo_ids": plan.provenance["icl_demo_ids"],
        "ray_data_stats": ray_stats,
    }
    RunDir(cfg.run_dir).path("score_stats.json").write_text(json.dumps(stats, indent=1, default=str))
    return {k: summary[k] for k in ("rows_in", "rows_scored", "rows_quarantined", "quarantine_reasons")} | {
        "rows_per_s": stats["rows_per_s"],
        "actors_used": stats["actors"]["used"],
        "scores": str(store.scores),
    }


def run_score(cfg: P2DConfig, on_shard_done: Callable[[Shard], None] | None = None) -> dict:
    """``p2d-ray score``: score the corpus into ``<run_dir>/scores/`` (resumable). See :func:`score_corpus`."""
    run = RunDir(cfg.run_dir)
    with run.timed("score", stage_fingerprint(cfg, "score")):
        cfg.save(run.path("config.yaml"))
        return score_corpus(cfg, on_shard_done)
