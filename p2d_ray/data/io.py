"""Small-table I/O (probe sets, held-out sets): any source ``p2d_ray.data.ingest`` accepts -- Parquet, JSON
Lines, CSV, a ``datasets`` directory or dataset name -- local or any pyarrow/fsspec URI, listed by the same
rule as the corpus.

Large corpora never come through here: they stream through Ray Data (p2d_ray.scoring.pipeline).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from p2d_ray.config import DataConfig
from p2d_ray.data.columns import apply_column_map
from p2d_ray.data.ingest import list_data_files, parquet_dataset, read_source_table


def read_table(
    path: str, what: str = "table", data: DataConfig | None = None, column_map: dict | None = None
) -> pa.Table:
    """The whole table at ``path`` (small by construction), its ``column_map`` columns renamed to ``data``'s
    (``data.columns.apply_column_map``). Raises ValueError naming ``what`` and the path."""
    table = read_source_table(path, what)
    return apply_column_map(table, data, column_map, f"{what}={path!r}") if column_map else table


def read_rows(
    path: str,
    limit: int | None = None,
    what: str = "table",
    data: DataConfig | None = None,
    column_map: dict | None = None,
) -> list[dict]:
    """The first ``limit`` rows (all when None), mapped as :func:`read_table`; a Parquet source is read only
    as far as needed."""
    if limit is not None:
        source = list_data_files(path, what)
        if source.kind == "parquet":
            try:
                table = parquet_dataset(source).head(limit)
            except (pa.ArrowInvalid, OSError) as err:
                raise ValueError(f"cannot read {what}={path!r}: {str(err).splitlines()[0][:300]}") from None
            if column_map:
                table = apply_column_map(table, data, column_map, f"{what}={path!r}")
            return table.to_pylist()
    table = read_table(path, what, data, column_map)
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def rows_hash(rows: list[dict]) -> str:
    """Content hash of a small row set (the probe-set hash recorded in heads.json)."""
    payload = json.dumps(rows, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
