"""Corpus shards: one Parquet row group = one shard, the unit of scoring, resume and selection.

``plan_shards`` lists the corpus (a file, directory or glob; local or any pyarrow / fsspec URI such as
``s3://``), reads only the Parquet footers (in a thread pool: 1,000 files on S3 take seconds, not minutes),
and checks every file up front: unreadable file (named), missing columns, inconsistent id types, empty
corpus -> one ``ValueError`` before any work starts.

``ParquetShards`` is a Ray Data ``Datasource`` with one read task per shard. Unlike ``read_parquet`` it
tags each row with its shard (``_shard``) and its row index in that shard (``_row``): resume (a marker per
finished shard) and selection (score files aligned with corpus row groups) need both, and
``read_parquet`` cannot say which row group a row came from. Each task yields blocks of at most
``rows_per_block`` rows so that even a one-file corpus feeds every actor (MEASURED.md: one big block
means one busy actor).
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from p2d_ray.data.ingest import resolve_fs

SHARD_COL, ROW_COL, POS_COL = "_shard", "_row", "_pos"
NONSTRING_COL = "_nonstring"  # bool: a text column of this row holds a non-string value
UNREADABLE_COL = "_unreadable"  # string: why this row's shard could not be decoded (null when it could)
RAW_COL = "_raw"  # JSON of such a row's original text values (for quarantine)


@dataclass(frozen=True)
class Shard:
    key: str  # stable, file-name-safe: "<file stem>-rg<row group>-<hash of path>"
    path: str  # the file's URI or local path
    row_group: int
    num_rows: int
    nbytes: int  # uncompressed size (Ray's memory estimate)

    def to_dict(self) -> dict:
        return asdict(self)


def list_parquet_files(path: str) -> list[str]:
    """Sorted Parquet files under ``path`` (file, directory searched recursively, or glob), by the one
    listing rule every stage uses (``p2d_ray.data.ingest.list_data_files``)."""
    from p2d_ray.data.ingest import list_data_files

    source = list_data_files(path)
    if source.kind != "parquet":
        raise ValueError(f"data.corpus_path={path!r} holds {source.kind} data, not Parquet (ingest it first)")
    return source.files


def shard_key(path: str, row_group: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path).removesuffix(".parquet")).lstrip("_.")
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f"{stem[:60] or 'shard'}-rg{row_group:05d}-{digest}"


def read_footer(path: str) -> pq.FileMetaData:
    fs, inner = resolve_fs(path)
    try:
        with fs.open_input_file(inner) as f:
            return pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"cannot read Parquet file {path}: {err}") from None


def plan_shards(
    path: str, required: list[str], threads: int = 16, files: list[str] | None = None
) -> tuple[list[Shard], pa.Schema]:
    """Every row group of every file under ``path`` as a :class:`Shard`, after checking all files.

    Args:
        required: columns every file must have (the id column first).
        files: the listing of ``path`` when the caller already has it.
    Returns:
        (shards in file order, the Arrow schema of the first file)
    Raises:
        ValueError: unreadable file (named), missing columns, id column types that differ between
        files, or an empty corpus -- all found before any work starts.
    """
    files = files or list_parquet_files(path)
    with ThreadPoolExecutor(max_workers=min(threads, len(files))) as pool:
        metas = list(pool.map(read_footer, files))
    schema0 = metas[0].schema.to_arrow_schema()
    id_col = required[0]
    problems = []
    shards: list[Shard] = []
    for f, meta in zip(files, metas, strict=True):
        schema = meta.schema.to_arrow_schema()
        missing = [c for c in required if c not in schema.names]
        if missing:
            problems.append(f"{f}: missing column(s) {missing} (has {schema.names})")
            continue
        if id_col in schema0.names and not _same_kind(schema.field(id_col).type, schema0.field(id_col).type):
            problems.append(
                f"{f}: id column {id_col!r} has type {schema.field(id_col).type}, "
                f"but {files[0]} has {schema0.field(id_col).type}"
            )
        for rg in range(meta.num_row_groups):
            g = meta.row_group(rg)
            if g.num_rows:
                shards.append(Shard(shard_key(f, rg), f, rg, g.num_rows, int(g.total_byte_size)))
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ValueError("corpus check failed:\n  " + "\n  ".join(shown))
    if not shards:
        raise ValueError(f"data.corpus_path={path!r}: the corpus is empty (0 rows in {len(files)} file(s))")
    return shards, schema0


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _same_kind(a: pa.DataType, b: pa.DataType) -> bool:
    return a == b or (_is_text(a) and _is_text(b)) or (pa.types.is_integer(a) and pa.types.is_integer(b))


def read_shard(shard: Shard, columns: list[str] | None, id_type: pa.DataType | None = None) -> pa.Table:
    """One row group's ``columns`` (None: all), the first cast to ``id_type`` so every block has one schema."""
    fs, inner = resolve_fs(shard.path)
    with fs.open_input_file(inner) as f:
        table = pq.ParquetFile(f).read_row_group(shard.row_group, columns=columns)
    if columns and id_type is not None and table.schema.field(columns[0]).type != id_type:
        table = table.set_column(0, columns[0], table.column(0).cast(id_type))
    return table


def read_shard_or_nulls(
    shard: Shard, columns: list[str], id_type: pa.DataType | None = None
) -> tuple[pa.Table, str | None]:
    """:func:`read_shard`, or -- when the row group cannot be decoded (a corrupt data page behind an intact
    footer) -- ``num_rows`` null rows and the error naming file and row group. The rows are then counted and
    quarantined as ``unreadable`` instead of failing the whole pass."""
    try:
        return read_shard(shard, columns, id_type), None
    except (OSError, pa.ArrowException) as err:
        why = f"{shard.path} row group {shard.row_group}: {str(err).strip().splitlines()[0][:200]}"
        types = [id_type or pa.string()] + [pa.string()] * (len(columns) - 1)
        return pa.table({c: pa.nulls(shard.num_rows, t) for c, t in zip(columns, types, strict=True)}), why


def normalize_text(table: pa.Table, text_columns: list[str], json_columns: tuple[str, ...] = ()) -> pa.Table:
    """Make every text column ``string``: a column of another type (int, binary, ...) becomes nulls, its
    rows are flagged ``_nonstring`` and their original values kept as JSON in ``_raw`` (for quarantine).
    A list column named in ``json_columns`` (chat ``messages``) becomes its values' JSON text instead, which
    ``formatting.row_chat`` reads back."""
    import json

    flag = np.zeros(table.num_rows, dtype=bool)
    raw: list[str | None] = [None] * table.num_rows
    for name in text_columns:
        column = table.column(name)
        if name in json_columns and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            text = [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(text, pa.string()))
            continue
        if _is_text(column.type) or pa.types.is_null(column.type):
            table = table.set_column(table.schema.get_field_index(name), name, column.cast(pa.string()))
            continue
        values = column.to_pylist()
        for i, v in enumerate(values):
            if v is not None:
                flag[i] = True
                raw[i] = json.dumps({name: v}, default=str)
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.nulls(table.num_rows, pa.string())
        )
    table = table.append_column(NONSTRING_COL, pa.array(flag))
    return table.append_column(RAW_COL, pa.array(raw, pa.string()))


class ParquetShards(Datasource):
    """Ray Data source: one read task per shard, rows tagged with ``_shard`` (index into ``shards``) and
    ``_row`` (or, with ``positions=True``, a single int64 ``_pos = _shard << 32 | _row``).

    Args:
        shards: the shards to read (e.g. only those not finished yet).
        shard_ids: their indices in the full shard list (the values written to ``_shard``).
        columns: columns to read, the id column first.
        text_columns: columns to normalise to ``string`` (see :func:`normalize_text`).
        json_columns: list columns among them kept as JSON text (chat ``messages``).
        rows_per_block: upper bound on rows per output block.
        flags: per shard index, rows to flag in a bool column (e.g. ``{"_dup": {3: rows}}``).
    """

    def __init__(
        self,
        shards: list[Shard],
        shard_ids: list[int],
        columns: list[str],
        id_type: pa.DataType | None = None,
        text_columns: tuple[str, ...] = (),
        rows_per_block: int = 4096,
        positions: bool = False,
        flags: dict[str, dict[int, np.ndarray]] | None = None,
        json_columns: tuple[str, ...] = (),
    ):
        super().__init__()
        self.shards, self.shard_ids = shards, shard_ids
        self.columns, self.id_type, self.text_columns = columns, id_type, list(text_columns)
        self.json_columns = tuple(json_columns)
        self.rows_per_block, self.positions = max(1, rows_per_block), positions
        self.flags = flags or {}

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for shard, sid in zip(self.shards, self.shard_ids, strict=True):
            flags = {name: rows.get(sid) for name, rows in self.flags.items()}
            meta = BlockMetadata(
                num_rows=shard.num_rows, size_bytes=shard.nbytes, input_files=[shard.path], exec_stats=None
            )
            tasks.append(
                ReadTask(self._reader(shard, sid, flags), meta, per_task_row_limit=per_task_row_limit)
            )
        return tasks

    def _reader(self, shard: Shard, sid: int, flags: dict[str, np.ndarray | None]):
        columns, id_type, text_columns = self.columns, self.id_type, self.text_columns
        rows_per_block, positions, json_columns = self.rows_per_block, self.positions, self.json_columns

        def read():
            table, unreadable = read_shard_or_nulls(shard, columns, id_type)
            if text_columns:
                table = normalize_text(table, text_columns, json_columns)
                why = pa.array([unreadable] * table.num_rows, pa.string())
                table = table.append_column(UNREADABLE_COL, why)
            n = table.num_rows
            rows = np.arange(n, dtype=np.int64)
            if positions:
                table = table.append_column(POS_COL, pa.array((sid << 32) | rows))
            else:
                table = table.append_column(SHARD_COL, pa.array(np.full(n, sid, dtype=np.int32)))
                table = table.append_column(ROW_COL, pa.array(rows.astype(np.int32)))
            for name, flagged in flags.items():
                mask = np.zeros(n, dtype=bool)
                if flagged is not None:
                    mask[flagged] = True
                table = table.append_column(name, pa.array(mask))
            for start in range(0, n, rows_per_block):
                yield table.slice(start, rows_per_block)

        return read


def shard_positions(pos: np.ndarray) -> dict[int, np.ndarray]:
    """``_pos`` values -> {shard index: sorted row indices}."""
    out: dict[int, np.ndarray] = {}
    if len(pos) == 0:
        return out
    pos = np.sort(pos.astype(np.int64))
    sid, row = pos >> 32, pos & 0xFFFFFFFF
    for s in np.unique(sid):
        out[int(s)] = row[sid == s]
    return out
