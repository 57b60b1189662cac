"""``p2d-ray select``: keep the top fraction (or top k) of the scored corpus, optionally per stratum.

Ranking is by ``select.score_column`` (``score`` by default; ``loss_full`` with ``ascending=true`` gives
perplexity selection from the same scores files; ``random`` ranks by a hash of (run seed, id): a seeded
uniform random selection that does not depend on shard layout or actor count), ties broken by id
ascending: the selection is exact and deterministic. It never collects the corpus on the driver:

1. ``keyed``: one Ray task per shard reads the shard's score file and, when stratifying, the stratum column
   of the corpus row group -> (id, value, stratum) rows only, materialised in the object store.
2. Counts and value range per stratum: one Ray Data aggregation (small result).
3. The threshold of each stratum: a distributed sort of its (value, id) rows, ``limit(k)``; the k-th row
   is the threshold ``(value*, id*)``. A row is selected iff it ranks at or before it.
4. One Ray task per shard reads the FULL corpus row group and its scores, keeps the rows that pass the
   threshold and writes ``subset/<shard>.parquet`` (original columns + the score), returning only counts
   and a histogram. Score files are aligned with corpus row groups, so no join or shuffle of the corpus.

Outputs: ``subset/*.parquet`` (``datasets.load_dataset("parquet", data_files=...)`` reads it),
``selection.json`` (thresholds and counts per stratum, and clean-row rates when the corpus carries
``is_clean_on_task``), ``histogram.png`` (score histogram, all vs selected).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2d_ray.config import P2DConfig
from p2d_ray.report.histogram import save_selection_histogram
from p2d_ray.rundir import RunDir, stage_fingerprint
from p2d_ray.scoring.outputs import ScoreStore
from p2d_ray.scoring.shards import Shard, read_footer, read_shard

LABEL = "is_clean_on_task"  # hidden label of the demo corpus: read for reporting only, never for ranking
VALUE, STRATUM = "_value", "_stratum"
ALL = "<all>"
RANDOM = "random"
NULL_STRATUM = "<null>"
BINS = 50


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


def _aligned(
    shard: Shard, score_file: str, id_column: str, columns: list[str], ids: pa.ChunkedArray | None = None
) -> tuple[pa.Table, pa.Array]:
    """(scores of the shard, index of each scored row in the corpus row group).

    An id's scored row is its FIRST row in the row group: a later row with the same id is a quarantined
    duplicate, and a null id is never scored. ``ids``: the row group's id column, if already read."""
    scores = pq.read_table(score_file, columns=[id_column, *columns])
    if ids is None:
        ids = read_shard(shard, [id_column]).column(id_column)
    idx = pc.index_in(scores.column(id_column), value_set=ids)
    if idx.null_count:
        raise RuntimeError(
            f"{score_file}: {idx.null_count} scored ids are not in {shard.path} row group "
            f"{shard.row_group}; the corpus changed after scoring"
        )
    return scores, idx


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


def _stored(column: str) -> list[str]:
    """The scores-file columns ``column`` is read from (``random`` needs only the ids)."""
    return [] if column == RANDOM else [column]


def _strata(shard: Shard, idx: pa.Array, n: int, stratify_by: str | None, corpus: pa.Table | None = None):
    """The stratum (as a string) of each scored row; ``corpus``: the row group, if already read."""
    if stratify_by is None:
        return pa.array([ALL] * n, pa.string())
    col = (corpus if corpus is not None else read_shard(shard, [stratify_by])).column(stratify_by).take(idx)
    return pc.fill_null(col.cast(pa.string()), NULL_STRATUM)


def keyed_block(
    batch: pa.Table,
    shards: list[dict],
    files: list[str],
    id_column: str,
    column: str,
    stratify_by: str | None,
    seed: int,
) -> pa.Table:
    """Ray task: (id, value, stratum) of the scored rows of the shards in ``batch``."""
    parts = []
    for i in batch.column("i").to_pylist():
        shard = Shard(**shards[i])
        scores, idx = _aligned(shard, files[i], id_column, _stored(column))
        parts.append(
            pa.table(
                {
                    id_column: scores.column(id_column),
                    VALUE: _values(scores, column, id_column, seed),
                    STRATUM: _strata(shard, idx, scores.num_rows, stratify_by),
                }
            )
        )
    return pa.concat_tables(parts)


def find_thresholds(
    keyed, counts: dict[str, int], k: dict[str, int], id_column: str, ascending: bool
) -> dict:
    """Per stratum, its k-th row ``(value*, id*)`` in rank order (value, then id ascending).

    ONE distributed sort by (stratum, value, id), materialised in the object store; the k-th row of each
    stratum sits at a known offset, so ``split_at_indices`` cuts out exactly that one row (block metadata
    only: nothing else reaches the driver).
    """
    ranked = keyed.sort([STRATUM, VALUE, id_column], descending=[False, not ascending, False]).materialize()
    order = sorted(counts)  # Arrow sorts strings by UTF-8 bytes = code points = Python's str order
    cuts, wanted, offset = [], [], 0
    for s in order:
        if k[s] > 0:
            cuts += [offset + k[s] - 1, offset + k[s]]
            wanted.append(s)
        offset += counts[s]
    pieces = ranked.split_at_indices(cuts)  # pieces[1 + 2j] = the single k-th row of stratum wanted[j]
    thresholds = {}
    for j, s in enumerate(wanted):
        (row,) = pieces[1 + 2 * j].take(1)
        assert row[STRATUM] == s, f"sorted strata out of the expected order: {row[STRATUM]!r} != {s!r}"
        thresholds[s] = (row[VALUE], row[id_column])
    return thresholds


def _selected_mask(values: pa.Array, ids: pa.Array, strata: pa.Array, thresholds: dict, ascending: bool):
    mask = np.zeros(len(values), dtype=bool)
    for s, (tv, tid) in thresholds.items():
        in_s = pc.equal(strata, s)
        better = pc.less(values, tv) if ascending else pc.greater(values, tv)
        tie = pc.and_(pc.equal(values, tv), pc.less_equal(ids, pa.scalar(tid, ids.type)))
        mask |= pc.and_(in_s, pc.or_(better, tie)).to_numpy(zero_copy_only=False)
    return mask


def write_block(
    batch: pa.Table,
    shards: list[dict],
    files: list[str],
    id_column: str,
    column: str,
    stratify_by: str | None,
    seed: int,
    thresholds: dict,
    ascending: bool,
    out_dir: str,
    out_column: str,
    edges: list[float],
) -> pa.Table:
    """Ray task: write the selected FULL rows of each shard in ``batch``; return counts and histograms."""
    results = []
    for i in batch.column("i").to_pylist():
        shard = Shard(**shards[i])
        corpus = read_shard(shard, None)  # the full row group: every original column
        scores, idx = _aligned(shard, files[i], id_column, _stored(column), corpus.column(id_column))
        values = _values(scores, column, id_column, seed)
        strata = _strata(shard, idx, scores.num_rows, stratify_by, corpus)
        keep = _selected_mask(
            values, scores.column(id_column).combine_chunks(), strata, thresholds, ascending
        )
        rows = np.sort(np.asarray(idx)[keep])
        order = np.argsort(np.asarray(idx)[keep], kind="stable")
        subset = corpus.take(pa.array(rows, pa.int64())).append_column(
            out_column, pc.take(values, pa.array(np.flatnonzero(keep)[order]))
        )
        if subset.num_rows:
            path = Path(out_dir, f"{shard.key}.parquet")
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(subset, tmp)
            os.replace(tmp, path)
        v = values.to_numpy(zero_copy_only=False)
        rec = {
            "strata_selected": _count(strata.filter(pa.array(keep))),
            "hist_all": np.histogram(v, bins=edges)[0].tolist(),
            "hist_selected": np.histogram(v[keep], bins=edges)[0].tolist(),
            "n_corpus_rows": corpus.num_rows,
        }
        if LABEL in corpus.column_names:
            label = corpus.column(LABEL).to_numpy(zero_copy_only=False).astype(bool)
            rec["clean_corpus"] = int(label.sum())
            rec["clean_scored"] = int(label[np.asarray(idx)].sum())
            rec["clean_selected"] = int(label[rows].sum())
        results.append(json.dumps(rec))
    return pa.table({"result": pa.array(results, pa.string())})


def _count(values: pa.Array) -> dict[str, int]:
    if len(values) == 0:
        return {}
    return {d["values"]: int(d["counts"]) for d in pc.value_counts(values).to_pylist()}


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
    sel = cfg.select
    needs = {
        "loss_gated": ("influence", "ifd"),
        "loss_full": ("influence", "activation", "perplexity", "ifd"),
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
    import ray.data
    from ray.data.aggregate import Count, Max, Min

    from p2d_ray.scoring.pipeline import ensure_ray

    sel, id_column = cfg.select, cfg.data.id_column
    run, store = RunDir(cfg.run_dir), ScoreStore(cfg.run_dir)
    manifest, shards = _check_inputs(cfg, store)
    files = store.score_files(shards)
    shard_dicts = [s.to_dict() for s in shards]
    ensure_ray()
    common = {
        "shards": shard_dicts,
        "files": files,
        "id_column": id_column,
        "column": sel.score_column,
        "stratify_by": sel.stratify_by,
        "seed": cfg.seed,
    }
    index = ray.data.from_items([{"i": i} for i in range(len(shards))], override_num_blocks=len(shards))
    keyed = index.map_batches(
        keyed_block, batch_format="pyarrow", batch_size=1, fn_kwargs=common
    ).materialize()

    groups = (
        keyed.groupby(STRATUM)
        .aggregate(Count(), Count(VALUE, ignore_nulls=True, alias_name="n_valid"), Min(VALUE), Max(VALUE))
        .take_all()
    )
    nulls = sum(g["count()"] - g["n_valid"] for g in groups)
    if nulls:
        raise ValueError(f"select.score_column={sel.score_column!r} is missing or NaN for {nulls} rows")
    counts = {g[STRATUM]: g["count()"] for g in groups}
    n_scored = sum(counts.values())
    k = allocate(counts, total_k(n_scored, sel.fraction, sel.top_k))
    thresholds = find_thresholds(keyed, counts, k, id_column, sel.ascending)

    lo = min(g[f"min({VALUE})"] for g in groups)
    hi = max(g[f"max({VALUE})"] for g in groups)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1).tolist()
    corpus_names = read_footer(shards[0].path).schema.to_arrow_schema().names
    out_column = sel.score_column if sel.score_column not in corpus_names else f"p2d_{sel.score_column}"
    if run.subset.exists():
        shutil.rmtree(run.subset)  # never mix with an earlier selection
    run.subset.mkdir(parents=True)
    results = index.map_batches(
        write_block,
        batch_format="pyarrow",
        batch_size=1,
        fn_kwargs={
            **common,
            "thresholds": thresholds,
            "ascending": sel.ascending,
            "out_dir": str(run.subset),
            "out_column": out_column,
            "edges": edges,
        },
    ).take_all()
    recs = [json.loads(r["result"]) for r in results]

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
    n_selected = sum(selected.values())
    out = {
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
        "n_scored": n_scored,
        "n_selected": n_selected,
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
    if recs and "clean_corpus" in recs[0]:
        clean = {key: sum(r[key] for r in recs) for key in ("clean_corpus", "clean_scored", "clean_selected")}
        out["clean"] = {
            "label": LABEL,
            "selected": clean["clean_selected"] / n_selected if n_selected else None,
            "corpus": clean["clean_corpus"] / out["n_corpus"] if out["n_corpus"] else None,
            "scored": clean["clean_scored"] / n_scored if n_scored else None,
        }
    run.path("selection.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def run_select(cfg: P2DConfig) -> dict:
    """``p2d-ray select``: write ``<run_dir>/subset/`` from ``<run_dir>/scores/``. See the module docstring."""
    run = RunDir(cfg.run_dir)
    with run.timed("select", stage_fingerprint(cfg, "select")):
        cfg.save(run.path("config.yaml"))
        return select_subset(cfg)
