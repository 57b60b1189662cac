"""Rows that cannot be scored: found, counted by reason, written aside -- never silently dropped.

Per-row reasons (``REASONS``): ``unreadable`` (a row group that cannot be decoded: every row of it,
named by file and row group); ``bad_utf8``; ``null_id``; ``duplicate_id`` (every occurrence of an id after its first, in
corpus order = shard order, then row order: deterministic and independent of how many actors ran);
``non_string`` / ``null`` / ``empty`` text; ``too_long`` (policy ``data.overlong=quarantine``); and
``no_target_tokens`` (nothing left to score, e.g. an empty response after truncation).

Duplicate ids need a global view. At 10M rows the ids do not belong on the driver, so
:func:`duplicate_positions` is a Ray Data hash aggregation over the id column alone: group by id, keep
groups with more than one row, emit the positions of all but the first. Only those positions (8 bytes
per duplicate row) come back to the driver, and each shard's read task gets just its own. A small corpus
(``score.local_dedup_max_rows``) is checked on the driver instead with the same vectorised pyarrow
group-by (:func:`duplicate_positions_local`): a distributed shuffle of 20k ids costs seconds of fixed Ray
overhead for milliseconds of work. Both give identical positions (tested).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2d_ray.scoring.shards import POS_COL, ParquetShards, Shard, read_shard_or_nulls, shard_positions

REASONS = (
    "unreadable",  # the row group could not be decoded (corrupt data page): file and row group in row_json
    "bad_utf8",  # a string column holds bytes that are not valid UTF-8
    "null_id",
    "duplicate_id",
    "non_string",
    "null",
    "empty",
    "too_long",
    "no_target_tokens",
)


def _later_occurrences(batch: pa.Table) -> pa.Table:
    """Per duplicated id: every position but the smallest (the first occurrence in corpus order)."""
    lists = batch.column(f"list({POS_COL})").to_pylist()
    later = [p for positions in lists for p in sorted(positions)[1:]]
    return pa.table({POS_COL: pa.array(later, pa.int64())})


def duplicate_positions(
    shards: list[Shard], id_column: str, id_type: pa.DataType | None, rows_per_block: int = 65536
) -> dict[int, np.ndarray]:
    """{shard index: row indices of later occurrences of an id} over the whole corpus (Ray Data)."""
    import ray.data
    from ray.data.aggregate import AsList, Count
    from ray.data.expressions import col

    ids = ray.data.read_datasource(
        ParquetShards(
            shards, list(range(len(shards))), [id_column], id_type, (), rows_per_block, positions=True
        )
    )
    # Ray's default of 200 hash partitions costs seconds of scheduling on a small corpus; ~250k ids each.
    n_rows = sum(s.num_rows for s in shards)
    partitions = max(2, min(128, math.ceil(n_rows / 250_000)))
    dups = (
        ids.filter(expr=col(id_column).is_not_null())
        .groupby(id_column, num_partitions=partitions)
        .aggregate(Count(), AsList(POS_COL))
        .filter(expr=col("count()") > 1)
        .map_batches(_later_occurrences, batch_format="pyarrow", batch_size=None)
    )
    parts = [b[POS_COL].to_numpy(zero_copy_only=False) for b in dups.iter_batches(batch_format="pyarrow")]
    return shard_positions(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def duplicate_positions_local(shards: list[Shard], id_column: str, id_type: pa.DataType | None) -> dict:
    """Same result as :func:`duplicate_positions`, computed on the driver with pyarrow (small corpora)."""
    from concurrent.futures import ThreadPoolExecutor

    def ids(item):
        sid, shard = item
        col = read_shard_or_nulls(shard, [id_column], id_type)[0].column(id_column)  # unreadable: null ids
        pos = (np.int64(sid) << 32) | np.arange(len(col), dtype=np.int64)
        return pa.table({"id": col, POS_COL: pos})

    with ThreadPoolExecutor(max_workers=8) as pool:
        table = pa.concat_tables(pool.map(ids, enumerate(shards)))
    table = table.filter(table.column("id").is_valid())
    groups = table.group_by("id").aggregate([(POS_COL, "min"), (POS_COL, "count")])
    groups = groups.filter(pc.greater(groups.column(f"{POS_COL}_count"), 1))
    cand = table.filter(pc.is_in(table.column("id"), value_set=groups.column("id")))
    first = groups.column(f"{POS_COL}_min").take(
        pc.index_in(cand.column("id"), value_set=groups.column("id"))
    )
    later = cand.column(POS_COL).filter(pc.not_equal(cand.column(POS_COL), first))
    return shard_positions(later.to_numpy())


def quarantine_table(rows: pa.Table, shard: Shard, id_column: str) -> pa.Table:
    """The quarantined rows of one shard: id, reason, where the row came from, and its values as JSON."""
    n = rows.num_rows
    return pa.table(
        {
            id_column: rows.column(id_column),
            "reason": rows.column("reason"),
            "source": pa.array([shard.path] * n, pa.string()),
            "row_group": pa.array(np.full(n, shard.row_group, dtype=np.int32)),
            "row": rows.column("_row"),
            "row_json": rows.column("row_json"),
        }
    )


def count_reasons(reasons: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """{reason: rows} for the non-null entries of ``reasons``."""
    reasons = reasons.drop_null()
    if len(reasons) == 0:
        return {}
    return {d["values"]: int(d["counts"]) for d in pc.value_counts(reasons).to_pylist()}
