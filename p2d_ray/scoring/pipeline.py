"""Stage 2, ``p2d-ray score``: head-gated affinity scores for a Parquet corpus on a Ray Data actor pool.

    corpus shards (file, row group) ──► ParquetShards read tasks ──► tokenize_block (CPU tasks)
        ──► ScorerActor pool (frozen model + head gates, loaded once per actor; GPUs on a fleet)
        ──► driver: rows grouped by shard ──► scores/<shard>.parquet, quarantine/<shard>.parquet, marker

Everything that can be wrong with the inputs is checked before Ray starts (``plan.plan_score``). One Ray Data
pass covers all shards not finished yet; the driver only receives the small score rows (id + 4 numbers),
writes a shard's files the moment its last row arrives, and then its marker, so an interrupted run loses
at most the shards in flight and a rerun produces the same scores as an uninterrupted run
(``collect.ShardCollector``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager

from p2d_ray.config import P2DConfig
from p2d_ray.progress import Progress, ray_data_output, stage_summary
from p2d_ray.rundir import RunDir, stage_fingerprint
from p2d_ray.runtime import ensure_ray
from p2d_ray.scoring.actor import ScorerActor, actor_env
from p2d_ray.scoring.collect import ShardCollector, summarize
from p2d_ray.scoring.outputs import ScoreStore
from p2d_ray.scoring.plan import ScorePlan, pick_demos, plan_score
from p2d_ray.scoring.quarantine import duplicate_positions, duplicate_positions_local
from p2d_ray.scoring.shards import ParquetShards, Shard
from p2d_ray.scoring.tokenize import DUP_COL, tokenize_block

__all__ = ["ScorePlan", "pick_demos", "plan_score", "run_score", "score_corpus"]

log = logging.getLogger("p2d_ray.score")


def rows_per_block(n_rows: int, cfg) -> int:
    """Enough blocks that every actor gets work (``blocks_per_actor`` each), never tiny or huge ones."""
    target = math.ceil(n_rows / (cfg.max_actors * cfg.blocks_per_actor))
    return max(cfg.batch_size, min(target, cfg.max_rows_per_block))


WINDOWS_MIN = 16  # a small corpus is cut into at least this many bucketing windows (blocks for the actors)


def window_rows(n_rows: int, cfg) -> int:
    """The length-bucketing window: ``batch_size * bucket_batches`` rows, but on a small corpus at most
    ``1 / WINDOWS_MIN`` of it, so blocks of whole windows still reach every actor. A function of the corpus
    size and the two knobs only (never of the actor count or of what a resumed run had left)."""
    return max(cfg.batch_size, min(cfg.batch_size * cfg.bucket_batches, math.ceil(n_rows / WINDOWS_MIN)))


@contextmanager
def _wait_for_actors(seconds: int):
    """Start dispatching only once ``min_actors`` actors are up (else the first actor ready can take every
    block of a small corpus while the others still load the model), and fail with a timeout instead of
    waiting forever when the cluster cannot place them (MEASURED.md: the 2-CPU deadlock)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = seconds if seconds > 0 else -1
    try:
        yield
    finally:
        ctx.wait_for_min_actors_s = old


def check_pool_fits(s) -> None:
    """Reserve the minimum pool (``min_actors`` actors + one tokenize task) as a placement group and wait up
    to ``actor_start_timeout_s`` for it (an autoscaler sees the request and adds nodes), then release it.

    Without this, a pool the cluster cannot place waits forever (MEASURED.md: two 1-CPU actors on a 2-CPU
    node starve the read tasks); and a pool Ray Data gave up on keeps its actors' CPUs for minutes.
    Raises RuntimeError (a bad environment, not bad input) naming what was asked and what exists.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    actor = {"CPU": s.num_cpus_per_actor, **({"GPU": s.num_gpus_per_actor} if s.num_gpus_per_actor else {})}
    pg = placement_group([actor] * s.min_actors + [{"CPU": s.num_cpus_per_tokenize_task}], strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=max(s.actor_start_timeout_s, 1))
    finally:
        remove_placement_group(pg)
    if not ready:
        raise RuntimeError(
            f"score: the cluster cannot place {s.min_actors} actor(s) of {actor} plus one tokenize task of "
            f"{s.num_cpus_per_tokenize_task} CPU within score.actor_start_timeout_s={s.actor_start_timeout_s}s "
            f"(cluster: CPU {ray.cluster_resources().get('CPU', 0)}, GPU {ray.cluster_resources().get('GPU', 0)}); "
            "lower score.min_actors or the per-actor resources, or give the autoscaler longer"
        )


def score_corpus(cfg: P2DConfig, on_shard_done: Callable[[Shard], None] | None = None) -> dict:
    """The body of ``p2d-ray score`` (see module docstring). ``on_shard_done`` is called after each shard's
    files and marker are written (progress hooks; tests use it to interrupt a run part-way).

    Steps: plan (driver, no Ray) -> the shards not done yet -> probe gradient (gradient_alignment) -> Ray ->
    duplicate flags -> one Ray Data pass -> summary and stats files."""
    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    plan = _plan(cfg)
    store = ScoreStore(cfg.run_dir)
    store.open(plan.manifest)
    todo = {i: sh for i, sh in enumerate(plan.shards) if store.marker(sh, plan.fingerprint) is None}
    wall["plan"] = time.perf_counter() - t_start
    collector = ShardCollector(store, plan, todo, cfg.data.id_column, on_shard_done)
    if plan.targets:  # several targets (scoring/targets.py): their columns beside the shared ones
        from p2d_ray.scoring.targets import FEATURES_COL, check_feature_store, target_columns

        collector.extra_columns = (*target_columns(plan.targets), FEATURES_COL)  # features: for later targets
        if todo:
            check_feature_store(store, plan, todo)
    ray_stats = distill_stats = None
    if todo and plan.strategy == "distilled":  # sample, fit, gate, bulk, refine, assemble (distill.py)
        from p2d_ray.scoring.distill import run_distilled

        t = time.perf_counter()
        collector, distill_stats = run_distilled(cfg, plan, store, todo, on_shard_done, wall)
        wall["score_pass"] = time.perf_counter() - t
    elif todo:
        probe_gradient, dups = _start_pass(cfg, plan, wall)
        s = cfg.score
        with ray_data_output(cfg.run_dir), _wait_for_actors(s.actor_start_timeout_s):  # read at creation
            ds = _score_dataset(cfg, plan, todo, dups, probe_gradient)
            t = time.perf_counter()
            _drain(ds, collector, sum(sh.num_rows for sh in todo.values()), s, wall)
        collector.check_complete()
        wall["score_pass"] = time.perf_counter() - t
        wall["write"] = collector.write_seconds
        ray_stats = ds.stats()
    summary = summarize(store, plan)
    summary["strategy_reason"] = plan.strategy_reason
    if plan.targets:  # each target's view of the shared pass: targets/<name>/scores/ (an ordinary run dir)
        from p2d_ray.scoring.targets import write_target_views

        summary["target_scores"] = write_target_views(cfg, plan, store)
        if getattr(plan, "late", None):  # targets added later: an exact sample + the stored features
            from p2d_ray.scoring.targets import score_late_targets

            summary["late_targets"] = score_late_targets(cfg, plan, store)
    if plan.strategy == "distilled":
        from p2d_ray.scoring.distill import summary_block

        summary["distilled"] = summary_block(cfg.run_dir)
    RunDir(cfg.run_dir).path("score_summary.json").write_text(json.dumps(summary, indent=1))
    if summary["rows_in"] and not summary["rows_scored"]:  # issue 25: never an empty score set, rc 0
        raise ValueError(
            f"no row of the corpus could be scored: all {summary['rows_in']} rows were quarantined "
            f"({summary['quarantine_reasons']}; rows in {RunDir(cfg.run_dir).quarantine}); `p2d-ray validate` "
            "names the problem"
        )
    wall["total"] = time.perf_counter() - t_start
    stats = _pass_stats(cfg, plan, todo, collector, wall, ray_stats)
    stats["strategy"] = plan.strategy
    if distill_stats is not None:
        stats["distill"] = distill_stats
    RunDir(cfg.run_dir).path("score_stats.json").write_text(json.dumps(stats, indent=1, default=str))
    return {k: summary[k] for k in ("rows_in", "rows_scored", "rows_quarantined", "quarantine_reasons")} | {
        "rows_per_s": stats["rows_per_s"],
        "actors_used": stats["actors"]["used"],
        "scores": str(store.scores),
        "strategy": plan.strategy,
        "strategy_reason": plan.strategy_reason,
    }


def _plan(cfg: P2DConfig) -> ScorePlan:
    """One target (``plan_score``) or several in one pass (``targets``: scoring/targets.py)."""
    if cfg.targets:
        from p2d_ray.scoring.targets import plan_targets

        return plan_targets(cfg)
    return plan_score(cfg)


def _start_pass(cfg: P2DConfig, plan: ScorePlan, wall: dict) -> tuple[list | None, dict]:
    """Before the pass: Ray, the minimum pool's placement, the probe gradient (gradient_alignment; a Ray
    task sized like a scoring actor, never in the driver, its bytes left in the object store for every
    actor), and the corpus's duplicate-id flags.
    Returns ``(probe_gradient object refs or None, duplicate positions)``."""
    s = cfg.score
    probe_gradient = None
    ensure_ray()
    check_pool_fits(s)
    if plan.targets:  # every target's probe gradient, {name: [ObjectRef]}
        from p2d_ray.scoring.targets import probe_gradients

        t = time.perf_counter()
        probe_gradient = probe_gradients(cfg, plan)
        wall["probe_gradient"] = time.perf_counter() - t
    elif s.scorer == "gradient_alignment":
        from p2d_ray.scoring.gradient import probe_gradient_on_a_worker

        t = time.perf_counter()
        model_fp = plan.provenance["model_fingerprint"]
        probe_gradient = [
            probe_gradient_on_a_worker(cfg, plan.heads, plan.gradient_fingerprint, plan.probe_rows, model_fp)
        ]
        wall["probe_gradient"] = time.perf_counter() - t
    t = time.perf_counter()
    n_rows = sum(sh.num_rows for sh in plan.shards)
    find = duplicate_positions_local if n_rows <= s.local_dedup_max_rows else duplicate_positions
    dups = find(plan.shards, cfg.data.id_column, plan.id_type)
    wall["duplicates"] = time.perf_counter() - t
    return probe_gradient, dups


def corpus_blocks(cfg: P2DConfig, plan: ScorePlan, todo: dict[int, Shard], flags: dict, keep=None):
    """The lazy read -> tokenize part of a scoring pass over the shards in ``todo`` (exact or distilled).

    Blocks and bucketing windows come from the WHOLE corpus (not the shards left to do), cut from each
    shard's row 0, and each actor call gets one block: a row's micro-batch depends on its shard alone, so a
    resumed run or another actor count gives bit-identical scores (actor.micro_batch_rows). ``keep``: an
    optional block filter applied before tokenizing (the distilled passes score a subset of a shard's rows).
    Returns ``(dataset, window_rows)``."""
    import ray.data

    s = cfg.score
    n_rows = sum(sh.num_rows for sh in plan.shards)
    window = window_rows(n_rows, s)
    block_rows = max(window, rows_per_block(n_rows, s) // window * window)
    if s.scorer == "icl_attention":  # blocks hold whole ICL groups (rows // icl_pool of a shard)
        block_rows = -(-block_rows // s.icl_pool) * s.icl_pool
    source = ParquetShards(
        list(todo.values()),
        list(todo),
        [cfg.data.id_column, *plan.text_columns],
        plan.id_type,
        tuple(plan.text_columns),
        block_rows,
        flags=flags,
        json_columns=(cfg.data.messages_column,),  # chat rows travel as JSON text
    )
    # One read task per shard, its blocks cut as above: override_num_blocks stops Ray Data from splitting
    # them further by a factor that depends on how many shards are left (SplitBlocks(k) cut windows apart).
    ds = ray.data.read_datasource(source, override_num_blocks=len(todo))
    if keep is not None:
        ds = ds.map_batches(keep, batch_format="pyarrow", batch_size=None)
    ds = ds.map_batches(
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
    return ds, window


def actor_pool(ds, actor_cls, cfg: P2DConfig, constructor_kwargs: dict):
    """``ds`` through a pool of ``actor_cls`` (a frozen model per actor) sized by the score section.

    One block per call: whole windows (and whole ICL groups), so a row's micro-batch depends on its shard
    alone. Ray Data's map_batches refuses batch_size=None when actors take GPUs (found by the fleet
    rehearsal, tests/test_fleet.py), a guard against unbounded batches; an explicit batch_size would re-cut
    the blocks (a shard's short last block joins the next one's rows, in arrival order), and the resumed
    scores would differ again. Our blocks are bounded (block_rows) and the actor cuts them into micro-batches
    of score.batch_size, so GPU pools go through map_batches_internal, the unvalidated entry point Ray's own
    map_groups uses for GPUs with batch_size=None."""
    import ray.data

    s = cfg.score
    map_batches = ds.map_batches_internal if s.num_gpus_per_actor else ds.map_batches
    return map_batches(
        actor_cls,
        batch_format="pyarrow",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
        num_cpus=s.num_cpus_per_actor,
        num_gpus=s.num_gpus_per_actor,
        runtime_env={"env_vars": actor_env()},  # the allocator settings of actor.ACTOR_MALLOC_ENV
        fn_constructor_kwargs=constructor_kwargs,
    )


def _score_dataset(cfg: P2DConfig, plan: ScorePlan, todo: dict[int, Shard], dups: dict, probe_gradient):
    """The lazy Ray Data pipeline over the shards in ``todo``: read -> tokenize tasks -> scorer actor pool."""
    s = cfg.score
    ds, window = corpus_blocks(cfg, plan, todo, {DUP_COL: dups})
    icl = s.scorer == "icl_attention"
    icl_json = {"data_json": cfg.data.model_dump_json(), "fmt": plan.fmt, "probe_rows": plan.probe_rows}
    return actor_pool(
        ds,
        ScorerActor,
        cfg,
        {
            "model_json": plan.model_json,
            "score_json": s.model_dump_json(),
            "heads_json": plan.heads.to_json() if plan.heads is not None else None,
            "id_column": cfg.data.id_column,
            "icl_json": icl_json if icl else None,
            "probe_gradient": None if plan.targets else probe_gradient,
            "window_rows": window,
            "targets": probe_gradient if plan.targets else None,
            "feature_layer": plan.manifest.get("feature_layer") if plan.targets else None,
        },
    )


def _drain(ds, collector: ShardCollector, n_todo: int, s, wall: dict) -> None:
    """Run the pass: hand each result block to the collector (which writes finished shards) and show
    progress. Fails with a clear error if the pool's ``min_actors`` never start."""
    import ray

    t = time.perf_counter()
    bar = Progress("score", n_todo)
    try:
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            # pipeline fill: plan + actor start-up (imports, model load) + the first block's work
            wall.setdefault("first_result", time.perf_counter() - t)
            collector.add(block)
            bar.update(block.num_rows)
    except ray.exceptions.GetTimeoutError as err:
        # NB (Ray 2.60): the actors of a pool that timed out keep their resources for ~2 minutes in a
        # long-lived driver; the CLI exits, which frees them at once.
        raise RuntimeError(
            f"score: {s.min_actors} actor(s) of {s.num_cpus_per_actor} CPU / {s.num_gpus_per_actor} "
            f"GPU did not start within score.actor_start_timeout_s={s.actor_start_timeout_s}s "
            f"(cluster: {ray.cluster_resources()}); lower score.min_actors or the per-actor "
            "resources, or wait longer for the autoscaler"
        ) from err
    bar.close()


def _pass_stats(
    cfg: P2DConfig, plan: ScorePlan, todo: dict, collector: ShardCollector, wall: dict, ray_stats
):
    """``score_stats.json``: shards, rows, throughput, padding, actors, wall and busy seconds."""
    s, st = cfg.score, collector.stats
    pass_s = wall.get("score_pass", 0.0)
    return {
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
        "actors": {
            "min": s.min_actors,
            "max": s.max_actors,
            "used": len(collector.actors),  # by Ray actor id: a restarted actor is the same actor
            "processes": len(collector.pids),  # used + one per restart that scored rows
            # Each actor process's peak resident set (VmHWM, bytes; model load and every call), by pid, and the
            # largest: the memory one actor needs, which decides how many fit on a node.
            "peak_rss_bytes": {str(pid): rss for pid, rss in sorted(collector.peak_rss.items())},
            "max_peak_rss_bytes": max(collector.peak_rss.values(), default=None),
        },
        "wall_s": wall,
        "busy_s": {"tokenize": st["tokenize_s"], "score": st["score_s"]},
        "icl_demo_ids": plan.provenance["icl_demo_ids"],
        "ray_data_stats": ray_stats,
    }


def run_score(cfg: P2DConfig, on_shard_done: Callable[[Shard], None] | None = None) -> dict:
    """``p2d-ray score``: score the corpus into ``<run_dir>/scores/`` (resumable). See :func:`score_corpus`."""
    run = RunDir(cfg.run_dir)
    with run.timed("score", stage_fingerprint(cfg, "score")):
        cfg.save(run.path("config.yaml"))
        t0 = time.perf_counter()
        out = score_corpus(cfg, on_shard_done)
    wrote = f"{out['scores']} ({out['rows_scored']:,} rows scored, {out['rows_quarantined']:,} quarantined)"
    print(f"score: strategy {out['strategy']} ({out['strategy_reason']})")
    stage_summary("score", time.perf_counter() - t0, wrote)
    return out
