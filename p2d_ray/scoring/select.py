"""``p2d-ray select``: keep the top fraction (or top k) of the scored corpus, optionally per stratum.

Ranking is by ``select.score_column`` (``score`` by default; ``loss_full`` with ``ascending=true`` gives
perplexity selection from the same scores files; ``random`` ranks by a hash of (run seed, id): a seeded
uniform random selection that does not depend on shard layout or actor count), ties broken by id
ascending: the selection is exact and deterministic. O(n) work in one task per shard; no sort or shuffle
of the corpus, and the driver holds about k + n / PIVOTS candidate rows at most:

1. ``keyed_shard`` (per shard): the shard's score file and, when stratifying, the stratum column of its
   corpus row group -> ``(id, value, stratum, row)`` (kept in the object store) and per-stratum counts,
   missing values and value range (small, to the driver). The driver allocates k per stratum.
2. ``shard_candidates`` (per shard): per stratum, the shard's own top ``k_s`` rows (``select_k``, O(n))
   among those at or before a lower bound that the driver derives from step 1's rank pivots (at least
   ``k_s`` rows rank at or before it), so a shard sends about its share of ``k_s`` plus ``n / PIVOTS``
   rows, never more than ``k_s``: the global top ``k_s`` is a subset of the union of these. The driver
   merges them as they arrive into a running top ``k_s`` (exact; memory ≤ k + one shard's candidates);
   its last row is the threshold ``(value*, id*)``: a row is selected iff it ranks at or before it.
3. ``write_shard`` (per shard): reads the FULL corpus row group, keeps the rows that pass the threshold
   and writes ``subset/<shard>.parquet`` (original columns + the score), returning only counts. Score files are aligned with corpus row groups, so no join or shuffle of the corpus.

Small corpora (≤ ``LOCAL_MAX_ROWS`` rows) run the same three steps with pyarrow on the driver: Ray task
start-up would cost more than the work.

Outputs: ``subset/*.parquet`` (``datasets.load_dataset("parquet", data_files=...)`` reads it),
``selection.json`` (thresholds and counts per stratum), ``histogram.png`` (score histogram, all vs
selected). Selection never reads a hidden label column: ``report/precision.py`` does, for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2d_ray.config import P2DConfig
from p2d_ray.progress import stage_summary
from p2d_ray.report.histogram import save_selection_histogram
from p2d_ray.rundir import RunDir, stage_fingerprint
from p2d_ray.scoring.outputs import ScoreStore
from p2d_ray.scoring.quality import band_size, pick_in_band
from p2d_ray.scoring.shards import Shard, read_footer, read_shard

VALUE, STRATUM, ROW = "_value", "_stratum", "_row"
QUALITY = "_quality"  # the quality column's value (relevance_then_quality: scoring/quality.py)
ALL = "<all>"
RANDOM = "random"
NULL_STRATUM = "<null>"
PIVOTS = 256  # rank pivots per shard and stratum (step 1) for the candidates' lower bound (step 2)
LOCAL_MAX_ROWS = 1_000_000  # up to this many scored rows, select on the driver (module-level: tests lower it)


def allocate(counts: dict[str, int], total_k: int) -> dict[str, int]:
    """Split ``total_k`` over strata in proportion to their sizes (largest remainder, ties by name)."""
    n = sum(counts.values())
    if n == 0:
        return {s: 0 for s in counts}
    quota = {s: total_k * c / n for s, c in counts.items()}
    k = {s: math.floor(q) for s, q in quota.items()}
    left = total_k - sum(k.values())
    for s in sorted(counts, key=lambda s: (-(quota[s] - k[s]), s))[:left]:
        k[s] += 1
    return {s: min(k[s], counts[s]) for s in counts}


def total_k(n: int, fraction: float | None, top_k: int | None) -> int:
    """``top_k`` if set, else ``fraction * n`` rounded half up (at least 1 row of a non-empty corpus)."""
    if top_k is not None:
        return min(top_k, n)
    return min(n, max(1, math.floor(fraction * n + 0.5))) if n else 0


def random_values(ids: pa.Array | pa.ChunkedArray, seed: int) -> pa.Array:
    """A uniform [0, 1) value per id from blake2b(seed, id): the same id always gets the same value."""
    keys = (f"{seed}:{i}".encode() for i in ids.to_pylist())
    u = [int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") / 2.0**64 for k in keys]
    return pa.array(u, pa.float64())


def _values(scores: pa.Table, column: str, id_column: str, seed: int) -> pa.Array:
    if column == RANDOM:
        return random_values(scores.column(id_column), seed)
    v = scores.column(column).combine_chunks().cast(pa.float64())
    return pc.if_else(pc.is_nan(v), pa.scalar(None, pa.float64()), v)  # NaN counts as missing


def _rank_keys(id_column: str, ascending: bool, worst_first: bool = False) -> list[tuple[str, str]]:
    """Rank order: value (descending unless ``ascending``), then id ascending; reversed for the worst."""
    up = ascending != worst_first
    return [
        (VALUE, "ascending" if up else "descending"),
        (id_column, "descending" if worst_first else "ascending"),
    ]


def _top(table: pa.Table, k: int, id_column: str, ascending: bool, worst_first: bool = False) -> pa.Table:
    """The first ``k`` rows of ``table`` in rank order (O(n) selection; ids are unique, so exact)."""
    if k >= table.num_rows:
        return table
    keys = _rank_keys(id_column, ascending, worst_first)
    return table.take(pc.select_k_unstable(table, k=k, sort_keys=keys))


def _by_stratum(keyed: pa.Table) -> dict[str, pa.Table]:
    strata = keyed.column(STRATUM)
    names = pc.unique(strata).to_pylist()
    if len(names) == 1:  # unstratified (or one stratum): no copy
        return {names[0]: keyed}
    return {s: keyed.filter(pc.equal(strata, s)) for s in names}


def pivots(values: pa.Array, ascending: bool, n_pivots: int = PIVOTS) -> list[tuple[int, float]]:
    """``(r, v)`` pairs: at least ``r`` of ``values`` rank at or before value ``v`` (``n_pivots`` ranks
    spread evenly, the last one = all rows). Nulls are left out (they are an error later)."""
    v = values.drop_null().to_numpy(zero_copy_only=False)
    if len(v) == 0:
        return []
    key = -v if ascending else v  # higher key = ranks earlier
    ranks = np.unique(np.ceil(np.arange(1, n_pivots + 1) * len(v) / n_pivots).astype(np.int64))
    at = -np.partition(-key, ranks - 1)[ranks - 1]  # the r-th highest key, for each r
    return [(int(r), float(-k if ascending else k)) for r, k in zip(ranks, at, strict=True)]


def lower_bounds(per_shard: list[dict], k: dict[str, int], ascending: bool) -> dict[str, float]:
    """Per stratum, a value ``L`` that the k-th row provably ranks at or before: at least ``k`` rows rank
    at or before ``L`` (from every shard's pivots), so a row ranking after ``L`` can never be selected."""
    bounds = {}
    for s, ks in k.items():
        if ks <= 0:
            continue
        points = sorted(
            (
                (-v if ascending else v, r, i)
                for i, st in enumerate(per_shard)
                if s in st
                for r, v in st[s][2]
            ),
            key=lambda p: -p[0],
        )
        best: dict[int, int] = {}  # shard -> rows known at or before the current key
        total = 0
        for key, r, i in points:  # keys descending: each shard's count only grows
            total += r - best.get(i, 0)
            best[i] = r
            if total >= ks:
                bounds[s] = -key if ascending else key
                break
    return bounds


def keyed_shard(
    shard: dict,
    score_file: str,
    id_column: str,
    column: str,
    stratify_by: str | None,
    seed: int,
    ascending: bool,
    quality_column: str | None = None,
) -> tuple[dict, pa.Table]:
    """Step 1 for one shard: ({stratum: [rows, valid, pivots]}, (id, value, stratum, row) table).

    ``row``: the index of each scored row in the corpus row group (an id's scored row is its FIRST row
    there: a later row with the same id is a quarantined duplicate, and a null id is never scored)."""
    sh = Shard(**shard)
    cols = [id_column] + ([] if column == RANDOM else [column])
    quality = None  # a quality column the score files lack: every row is ranked by relevance only
    if quality_column is not None and quality_column in pq.read_schema(score_file).names:
        quality = quality_column
    scores = pq.read_table(score_file, columns=cols + ([quality] if quality and quality not in cols else []))
    corpus = _read_scored_shard(sh, [id_column] + ([stratify_by] if stratify_by else []), scores.num_rows)
    idx = pc.index_in(scores.column(id_column), value_set=corpus.column(id_column))
    if idx.null_count:
        raise RuntimeError(
            f"{score_file}: {idx.null_count} scored ids are not in {sh.path} row group "
            f"{sh.row_group}; the corpus changed after scoring"
        )
    if stratify_by is None:
        strata = pa.array([ALL] * scores.num_rows, pa.string())
    else:
        strata = pc.fill_null(corpus.column(stratify_by).take(idx).cast(pa.string()), NULL_STRATUM)
    keyed = pa.table(
        {
            id_column: scores.column(id_column).combine_chunks(),
            VALUE: _values(scores, column, id_column, seed),
            STRATUM: strata.combine_chunks() if isinstance(strata, pa.ChunkedArray) else strata,
            ROW: idx.combine_chunks() if isinstance(idx, pa.ChunkedArray) else idx,
        }
    )
    if quality_column is not None:
        q = _values(scores, quality, id_column, seed) if quality else pa.nulls(scores.num_rows, pa.float64())
        keyed = keyed.append_column(QUALITY, q)
    stats = {}
    for s, part in _by_stratum(keyed).items():
        v = part.column(VALUE)
        stats[s] = [part.num_rows, part.num_rows - v.null_count, pivots(v, ascending)]
    return stats, keyed


def _read_scored_shard(sh: Shard, columns: list[str] | None, n_scored: int) -> pa.Table:
    """A shard's corpus ``columns`` for its ``n_scored`` scored rows. A shard with none (every row
    quarantined: e.g. a row group ``score`` could not decode, quarantined as ``unreadable``) is not read at
    all, as ``score`` left it; a scored shard that cannot be read now is one clear error."""
    if n_scored == 0:
        schema = read_footer(sh.path).schema.to_arrow_schema()
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    try:
        return read_shard(sh, columns)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(
            f"{sh.path} row group {sh.row_group} cannot be read ({str(err).strip().splitlines()[0][:200]}), "
            f"but {n_scored} of its rows were scored: the corpus changed after scoring; rerun `p2d-ray score`"
        ) from None


def shard_candidates(
    keyed: pa.Table, k: dict[str, int], bounds: dict[str, float], id_column: str, ascending: bool
) -> pa.Table:
    """Step 2 for one shard: per stratum, its own top ``k[stratum]`` rows among those ranking at or before
    the stratum's lower bound, as (id, value, stratum)."""
    parts = []
    for s, part in _by_stratum(keyed).items():
        if k.get(s, 0) <= 0:
            continue
        v = part.column(VALUE)
        part = part.filter(pc.less_equal(v, bounds[s]) if ascending else pc.greater_equal(v, bounds[s]))
        parts.append(_top(part, k[s], id_column, ascending).select(_carried(keyed, id_column)))
    return pa.concat_tables(parts) if parts else keyed.select(_carried(keyed, id_column)).slice(0, 0)


def _carried(keyed: pa.Table, id_column: str) -> list[str]:
    return [id_column, VALUE, STRATUM] + ([QUALITY] if QUALITY in keyed.column_names else [])


def _selected_mask(values: pa.Array, ids: pa.Array, strata: pa.Array, thresholds: dict, ascending: bool):
    if isinstance(thresholds, pa.Array):  # relevance_then_quality: the picked ids themselves
        return pc.is_in(ids, value_set=thresholds).to_numpy(zero_copy_only=False)
    mask = np.zeros(len(values), dtype=bool)
    for s, (tv, tid) in thresholds.items():
        in_s = pc.equal(strata, s)
        better = pc.less(values, tv) if ascending else pc.greater(values, tv)
        tie = pc.and_(pc.equal(values, tv), pc.less_equal(ids, pa.scalar(tid, ids.type)))
        mask |= pc.fill_null(pc.and_(in_s, pc.or_(better, tie)), False).to_numpy(zero_copy_only=False)
    return mask


def write_shard(
    shard: dict,
    keyed: pa.Table,
    id_column: str,
    thresholds: dict,
    ascending: bool,
    out_dir: str,
    out_column: str,
    quality_out: str | None = None,
) -> dict:
    """Step 3 for one shard: write its selected FULL rows; return its counts (histogram.png is drawn from
    the score files by report/histogram.py, coloured by the corpus's groups)."""
    sh = Shard(**shard)
    corpus = _read_scored_shard(sh, None, keyed.num_rows)  # the full row group: every original column
    values = keyed.column(VALUE)
    keep = _selected_mask(values, keyed.column(id_column), keyed.column(STRATUM), thresholds, ascending)
    picked = np.flatnonzero(keep)
    rows = keyed.column(ROW).to_numpy(zero_copy_only=False)[picked]
    order = np.argsort(rows, kind="stable")  # corpus order in the subset file
    subset = corpus.take(pa.array(rows[order], pa.int64())).append_column(
        out_column, values.take(pa.array(picked[order], pa.int64()))
    )
    if quality_out is not None:  # the quality term beside the relevance it was selected by
        subset = subset.append_column(quality_out, keyed.column(QUALITY).take(pa.array(picked[order])))
    if subset.num_rows:
        path = Path(out_dir, f"{sh.key}.parquet")
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(subset, tmp)
        os.replace(tmp, path)
    return {
        "strata_selected": _count(keyed.column(STRATUM).filter(pa.array(keep))),
        "n_corpus_rows": sh.num_rows,
    }


def _count(values: pa.Array) -> dict[str, int]:
    if len(values) == 0:
        return {}
    return {d["values"]: int(d["counts"]) for d in pc.value_counts(values).to_pylist()}


class _Local:
    """The three steps on the driver: ``run(fn, args_list)`` yields each result in order."""

    def run(self, fn, calls, num_returns=1):
        yield from (fn(*a) for a in calls)


class _OnRay:
    """The same steps as one Ray task per shard; results are yielded as tasks finish, so the driver
    merges candidates one shard at a time (bounded memory)."""

    def __init__(self):
        import ray

        self.ray = ray

    def run(self, fn, calls, num_returns=1):
        f = self.ray.remote(num_cpus=1, num_returns=num_returns)(fn)
        pending = [f.remote(*a) for a in calls]
        if num_returns > 1:  # (small result to the driver, big one stays in the object store)
            small = self.ray.get([p[0] for p in pending])
            yield from zip(small, (p[1] for p in pending), strict=True)
            return
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(done[0])


def _merge_stats(per_shard: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {}
    for stats in per_shard:
        for s, (n, valid, _) in stats.items():
            cur = out.setdefault(s, [0, 0])
            cur[0] += n
            cur[1] += valid
    return out


def find_thresholds(
    candidates, k: dict[str, int], id_column: str, ascending: bool, tops: dict | None = None
) -> dict[str, tuple]:
    """Per stratum, its k-th row ``(value*, id*)`` in rank order, from the shards' candidate tables
    (an iterable: merged into a running top ``k_s`` as they arrive). ``tops``: filled with each stratum's
    top ``k_s`` rows themselves (relevance_then_quality's band)."""
    best: dict[str, pa.Table] = {} if tops is None else tops
    for cand in candidates:
        for s, part in _by_stratum(cand).items():
            merged = pa.concat_tables([best[s], part]) if s in best else part
            best[s] = _top(merged.combine_chunks(), k[s], id_column, ascending)
    thresholds = {}
    for s, top in best.items():
        assert top.num_rows == k[s], f"stratum {s!r}: {top.num_rows} candidates for k={k[s]}"
        last = _top(top, 1, id_column, ascending, worst_first=True).to_pylist()[0]
        thresholds[s] = (last[VALUE], last[id_column])
    return thresholds


def _check_inputs(cfg: P2DConfig, store: ScoreStore) -> tuple[dict, list[Shard]]:
    manifest = store.read_manifest()
    if manifest is None:
        raise ValueError(f"no scores in {store.scores}: run `p2d-ray score` first")
    shards = [Shard(**d) for d in manifest["shards"]]
    missing = [s.key for s in shards if store.marker(s, manifest["fingerprint"]) is None]
    if missing:
        raise ValueError(
            f"scoring is incomplete: {len(missing)} of {len(shards)} shards have no scores "
            f"(e.g. {missing[0]}); rerun `p2d-ray score` to finish them"
        )
    # issue 25: never an empty score set without a word (the score files' footers: what select reads)
    if shards and not any(pq.read_metadata(f).num_rows for f in store.score_files(shards)):
        markers = [store.marker(s, manifest["fingerprint"]) for s in shards]
        reasons: dict[str, int] = {}
        for m in markers:
            for r, n in m.get("reasons", {}).items():
                reasons[r] = reasons.get(r, 0) + n
        raise ValueError(
            f"nothing to select: no row of the corpus was scored (all {sum(s.num_rows for s in shards)} "
            f"quarantined in {store.quarantine}: {reasons}); fix the corpus (`p2d-ray validate` names the "
            "problem) and rescore"
        )
    sel = cfg.select
    needs = {
        "loss_gated": ("influence", "ifd"),
        "loss_full": ("influence", "activation", "perplexity", "ifd", "gradient_alignment"),
    }
    if sel.score_column in needs and manifest["scorer"] not in needs[sel.score_column]:
        raise ValueError(
            f"select.score_column={sel.score_column!r} is not produced by scorer "
            f"{manifest['scorer']!r} (produced by: {', '.join(needs[sel.score_column])})"
        )
    if sel.stratify_by is not None:
        names = read_footer(shards[0].path).schema.to_arrow_schema().names
        if sel.stratify_by not in names:
            raise ValueError(
                f"select.stratify_by={sel.stratify_by!r} is not a corpus column (columns: {names})"
            )
    return manifest, shards


def select_subset(cfg: P2DConfig) -> dict:
    """The body of ``p2d-ray select`` (see the module docstring)."""
    sel, id_column = cfg.select, cfg.data.id_column
    run, store = RunDir(cfg.run_dir), ScoreStore(cfg.run_dir)
    manifest, shards = _check_inputs(cfg, store)
    files = store.score_files(shards)
    shard_dicts = [s.to_dict() for s in shards]
    if sum(s.num_rows for s in shards) <= LOCAL_MAX_ROWS:
        ex = _Local()
    else:
        from p2d_ray.runtime import ensure_ray

        ensure_ray()
        ex = _OnRay()

    # 1. keyed rows per shard (stay where they were made) + per-stratum counts -> k per stratum
    quality = sel.quality_column if uses_quality(sel) else None
    calls = [
        (d, f, id_column, sel.score_column, sel.stratify_by, cfg.seed, sel.ascending, quality)
        for d, f in zip(shard_dicts, files, strict=True)
    ]
    stats, keyed = zip(*ex.run(keyed_shard, calls, num_returns=2), strict=True) if calls else ((), ())
    groups = _merge_stats(list(stats))
    nulls = sum(n - valid for n, valid in groups.values())
    if nulls:
        raise ValueError(f"select.score_column={sel.score_column!r} is missing or NaN for {nulls} rows")
    counts = {s: g[0] for s, g in groups.items()}
    n_scored = sum(counts.values())
    k = allocate(counts, total_k(n_scored, sel.fraction, sel.top_k))

    # 2. per-shard top k_s -> exact running merge on the driver -> thresholds; relevance_then_quality:
    # the same for the band's k_s (band_factor x k_s rows), then the quality re-rank in it on the driver
    kb = k if quality is None else {s: band_size(k[s], counts[s], sel.band_factor) for s in k}
    bounds = lower_bounds(list(stats), kb, sel.ascending)  # shards send ~k + n/PIVOTS rows, not k each
    cands = ex.run(shard_candidates, [(kd, kb, bounds, id_column, sel.ascending) for kd in keyed])
    band: dict[str, pa.Table] = {}
    thresholds = find_thresholds(cands, kb, id_column, sel.ascending, tops=band)
    picked, rule = (thresholds, None) if quality is None else _rerank_bands(band, k, id_column, sel)

    # 3. write the selected full rows, per shard
    corpus_names = read_footer(shards[0].path).schema.to_arrow_schema().names
    out_column = sel.score_column if sel.score_column not in corpus_names else f"p2d_{sel.score_column}"
    q_out = None if quality is None else quality if quality not in corpus_names else f"p2d_{quality}"
    if run.subset.exists():
        shutil.rmtree(run.subset)  # never mix with an earlier selection
    run.subset.mkdir(parents=True)
    args = (id_column, picked, sel.ascending, str(run.subset), out_column, q_out)
    recs = list(ex.run(write_shard, [(d, kd, *args) for d, kd in zip(shard_dicts, keyed, strict=True)]))

    selected = {s: sum(r["strata_selected"].get(s, 0) for r in recs) for s in counts}
    if selected != {s: k[s] for s in counts}:
        raise RuntimeError(f"selection wrote {selected} rows per stratum but the thresholds allow {k}")
    save_selection_histogram(
        run.path("histogram.png"),
        str(run.scores),
        str(run.subset),
        id_column,
        "score" if sel.score_column == RANDOM else sel.score_column,
        manifest.get("corpus"),
    )
    if quality is not None:  # the second term's picture: the same rows and selection, by quality
        save_selection_histogram(
            run.path("histogram_quality.png"),
            str(run.scores),
            str(run.subset),
            id_column,
            quality,
            manifest.get("corpus"),
        )
    out = _record(cfg, manifest, out_column, recs, counts, k, selected, thresholds)
    out["rule"] = rule or {"name": "relevance"}
    run.path("selection.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def uses_quality(sel) -> bool:
    """relevance_then_quality applies to the scorer's own ranking (score_column ``score``) only: a random
    or a loss-column selection is what it says."""
    return sel.rule == "relevance_then_quality" and sel.score_column == "score"


def _rerank_bands(band: dict[str, pa.Table], k: dict[str, int], id_column: str, sel) -> tuple[pa.Array, dict]:
    """The ids relevance_then_quality picks in each stratum's band (scoring/quality.py), and the record."""
    ids, per = [], {}
    for s, t in sorted(band.items()):
        q = pc.fill_null(t.column(QUALITY), float("nan")).to_numpy(zero_copy_only=False)
        rel = t.column(VALUE).to_numpy(zero_copy_only=False)
        tid = t.column(id_column).to_numpy(zero_copy_only=False)
        pick, per[s] = pick_in_band(
            rel, q, tid, k[s], sel.band_factor, sel.band_guard, sel.ascending, sel.quality_weight
        )
        ids.append(tid[pick])
    picked = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    rule = {
        "name": "relevance_then_quality",
        "relevance": sel.score_column,
        "quality_column": sel.quality_column,
        "quality_order": "ascending",
        "band_factor": sel.band_factor,
        "band_guard": sel.band_guard,
        "quality_weight": sel.quality_weight,
        "strata": per,
    }
    return pa.array(picked), rule


def _record(cfg: P2DConfig, manifest: dict, out_column: str, recs, counts, k, selected, thresholds) -> dict:
    """``selection.json``: what was asked, what was selected per stratum, and the thresholds."""
    sel, run = cfg.select, RunDir(cfg.run_dir)
    return {
        "score_column": sel.score_column,
        "subset_score_column": out_column,
        "ascending": sel.ascending,
        "seed": cfg.seed if sel.score_column == RANDOM else None,
        "fraction": sel.fraction if sel.top_k is None else None,
        "top_k": sel.top_k,
        "stratify_by": sel.stratify_by,
        "scorer": manifest["scorer"],
        "scores_fingerprint": manifest["fingerprint"],
        "n_corpus": sum(r["n_corpus_rows"] for r in recs),
        "n_scored": sum(counts.values()),
        "n_selected": sum(selected.values()),
        "threshold": thresholds[ALL][0] if sel.stratify_by is None and ALL in thresholds else None,
        "strata": {
            s: {
                "n": counts[s],
                "k": k[s],
                "selected": selected[s],
                "threshold": thresholds.get(s, (None, None))[0],
                "threshold_id": thresholds.get(s, (None, None))[1],
            }
            for s in sorted(counts)
        },
        "subset_dir": str(run.subset),
        "histogram": str(run.path("histogram.png")),
    }


def run_select(cfg: P2DConfig) -> dict:
    """``p2d-ray select``: write ``<run_dir>/subset/`` from ``<run_dir>/scores/``. See the module docstring."""
    if cfg.targets:  # several targets: one selection each + the combined one (p2d_ray/targets.py)
        from p2d_ray.targets import run_select_targets

        return run_select_targets(cfg)
    run = RunDir(cfg.run_dir)
    with run.timed("select", stage_fingerprint(cfg, "select")):
        cfg.save(run.path("config.yaml"))
        t0 = time.perf_counter()
        out = select_subset(cfg)
    wrote = f"{out['subset_dir']} ({out['n_selected']:,} of {out['n_scored']:,} rows), selection.json"
    stage_summary("select", time.perf_counter() - t0, wrote)
    return out
