"""Any corpus a user has -> Parquet shards every stage reads the same way.

Accepted sources (``data.corpus_path``, and the probe / held-out paths through ``data.io``):

- Parquet: a file, a directory (searched recursively) or a glob, local or any pyarrow / fsspec URI. Read in
  place, never copied.
- JSON Lines / CSV (``.jsonl``, ``.ndjson``, ``.json``, ``.csv``, ``.tsv``; a file or a directory of them):
  parsed by pyarrow's streaming readers; a ``.json`` file holding one JSON array of objects (Alpaca's release)
  by ``datasets``' JSON builder.
- A ``datasets`` ``save_to_disk`` directory (``state.json`` / ``dataset_dict.json``): ``datasets.load_from_disk``.
- A Hugging Face dataset name (``org/name``, not a local path): ``datasets.load_dataset``; offline
  (``HF_HUB_OFFLINE=1``) it must be in the local cache, on a cluster with network it is downloaded.

Everything that is not Parquet is converted ONCE into ``<run_dir>/corpus/part-*.parquet`` (row groups of
:data:`ROW_GROUP_ROWS`: the unit of scoring and resume). The record ``<run_dir>/corpus_ingest.json`` sits
beside the data and carries a fingerprint of the source (file sizes and mtimes, or the dataset's own
fingerprint), so a rerun reuses the shards and a changed source is converted again. A source without the
id column gets one: ``data.id_column`` = row number in source order.

The file-listing rule (:func:`list_data_files`) is the one every stage uses: names starting with ``_`` or
``.`` are metadata (Spark's ``_SUCCESS``, ``.crc``; our ``_state/``), a file is Parquet by its suffix
(``.parquet``/``.parq``/``.pq``, any case) or, without a known suffix (Hive / Spark ``part-00000``), by its
``PAR1`` magic bytes; anything else is skipped and reported.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from p2d_ray.config import DataConfig

ROW_GROUP_ROWS = 10_000  # rows per shard of an ingested corpus
FILE_ROWS = 100_000  # rows per ingested Parquet file
INGEST_DIR, INGEST_RECORD = "corpus", "corpus_ingest.json"

_SUFFIXES = {
    "parquet": (".parquet", ".parq", ".pq"),
    "json": (".jsonl", ".ndjson", ".json"),
    "csv": (".csv", ".tsv"),
}
_COMPRESSION = (".gz", ".bz2", ".zst", ".xz", ".lz4")
_GLOB = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """What a path holds: ``kind`` in parquet / json / csv / disk / hub, its data files and what was skipped."""

    path: str
    kind: str
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-metadata files that are not data ("name: why")

    def skipped_note(self) -> str:
        if not self.skipped:
            return ""
        shown = ", ".join(self.skipped[:3]) + (
            f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        )
        return f"; skipped {len(self.skipped)} file(s) that are not {self.kind}: {shown}"


@lru_cache(maxsize=64)
def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI: pyarrow's native filesystems (s3, gs, hdfs,
    file) first, any other fsspec protocol through pyarrow's fsspec adapter."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:
        import fsspec

        fs, inner = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def _join(uri: str, inner: str) -> str:
    if "://" not in uri:
        return inner
    scheme = uri.split("://", 1)[0]
    return f"{scheme}://{inner.lstrip('/')}" if scheme != "file" else f"file://{inner}"


def is_metadata(name: str) -> bool:
    """Spark / pyarrow / datasets convention: ``_SUCCESS``, ``_state/``, ``.crc`` and temp files are not data."""
    return name.startswith(("_", "."))


def file_kind(path: str, fs: pafs.FileSystem | None = None, inner: str | None = None) -> str | None:
    """parquet / json / csv by suffix (any case, compression suffixes ignored for text formats), else
    parquet when the file starts with the ``PAR1`` magic, else None."""
    kind = file_kind_by_suffix(os.path.basename(path))
    if kind is not None:
        return kind
    if fs is None:
        fs, inner = resolve_fs(path)
    try:
        with fs.open_input_stream(inner) as f:
            return "parquet" if f.read(4) == b"PAR1" else None
    except OSError:
        return None


def _is_disk_dataset(fs: pafs.FileSystem, inner: str) -> bool:
    names = ("state.json", "dataset_dict.json")
    return any(fs.get_file_info(f"{inner.rstrip('/')}/{n}").type == pafs.FileType.File for n in names)


def looks_like_hub_id(path: str) -> bool:
    return "://" not in path and bool(_HUB_ID.match(path)) and file_kind_by_suffix(path) is None


def file_kind_by_suffix(name: str) -> str | None:
    name = name.lower()
    if name.endswith(_COMPRESSION) and not name.endswith(_SUFFIXES["parquet"]):
        name = name.rsplit(".", 1)[0]  # data.jsonl.gz: pyarrow decompresses text formats on the fly
        if name.endswith(_SUFFIXES["parquet"]):
            return None
    return next((k for k, sfx in _SUFFIXES.items() if name.endswith(sfx)), None)


def list_data_files(path: str, what: str = "data.corpus_path") -> Source:
    """Resolve ``path`` to a :class:`Source` by the one listing rule (module docstring).

    Raises:
        ValueError: no such path (and not a dataset name), no data files, or several formats mixed in one
            directory -- each naming ``what`` and the path.
        RuntimeError: the storage cannot be reached (an ``s3://`` bucket offline, without credentials, a
            network error): one line naming ``what`` and the path, not a traceback from the filesystem.
    """
    try:
        return _list_data_files(path, what)
    except OSError as err:  # FileNotFoundError included: only a filesystem's own errors get here
        why = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise RuntimeError(
            f"{what}={path!r} cannot be read from here ({why}); check the path, the network and credentials"
        ) from None


def _list_data_files(path: str, what: str) -> Source:
    if _GLOB.search(path):
        if "://" in path:
            import fsspec

            fs_, _ = fsspec.core.url_to_fs(path)
            found = [_join(path, p) for p in fs_.glob(path.split("://", 1)[1])]
        else:
            found = glob.glob(path, recursive=True)
        candidates = [f for f in found if not is_metadata(os.path.basename(f))]
    else:
        fs, inner = resolve_fs(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            if looks_like_hub_id(path):
                return Source(path, "hub")
            raise ValueError(f"{what}={path!r}: no such file or directory")
        if info.type == pafs.FileType.File:
            kind = file_kind(path, fs, inner)
            if kind is None:
                raise ValueError(
                    f"{what}={path!r}: not a Parquet, JSON Lines or CSV file (by suffix or Parquet magic bytes)"
                )
            return Source(path, kind, [path])
        if _is_disk_dataset(fs, inner):
            return Source(path, "disk")
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        candidates = [
            _join(path, i.path)
            for i in infos
            if i.type == pafs.FileType.File
            and not any(is_metadata(part) for part in os.path.relpath(i.path, inner).split(os.sep))
        ]
    by_kind: dict[str, list[str]] = {}
    skipped = []
    for f in sorted(candidates):
        kind = file_kind(f)
        if kind is None:
            skipped.append(f"{os.path.basename(f)} (unknown suffix, no Parquet magic)")
        else:
            by_kind.setdefault(kind, []).append(f)
    if not by_kind:
        note = f" (skipped: {', '.join(skipped[:3])})" if skipped else ""
        raise ValueError(f"{what}={path!r}: no Parquet, JSON Lines or CSV files found{note}")
    if len(by_kind) > 1:
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
        raise ValueError(f"{what}={path!r}: mixes file formats ({counts}); keep one format per directory")
    kind, files = next(iter(by_kind.items()))
    return Source(path, kind, files, skipped)


# -- reading a whole (small or large) source as Arrow ---------------------------------------------------
def _read_text_file(path: str, kind: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    fs, inner = resolve_fs(path)
    if kind == "json" and _is_json_array(fs, inner):
        return _read_json_array(path)
    try:
        with fs.open_input_stream(inner, compression="detect") as f:
            if kind == "json":
                return pajson.read_json(f)
            delimiter = "\t" if ".tsv" in path.lower() else ","
            return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError) as err:
        if "Empty" in str(err):  # pyarrow refuses an empty file; for us it is a table of 0 rows
            return pa.table({})
        hint = " (JSON Lines or a JSON array of objects expected)" if kind == "json" else ""
        raise ValueError(
            f"cannot parse {path} as {kind.upper()}{hint}: {str(err).splitlines()[0][:300]}"
        ) from None


def _is_json_array(fs: pafs.FileSystem, inner: str) -> bool:
    """The file is one JSON array (``[{...}, ...]``, as Alpaca's release), not JSON Lines: its first
    non-blank character is ``[``."""
    with fs.open_input_stream(inner, compression="detect") as f:
        head = f.read(4096).lstrip()
    return head[:1] == b"["


def _read_json_array(path: str) -> pa.Table:
    """A JSON array file read by ``datasets``' JSON builder (which reads a top-level array of objects; pyarrow's
    reader takes JSON Lines only), as one Arrow table."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files=[path], split="train")
    except Exception as err:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        raise ValueError(
            f"cannot parse {path} as a JSON array of objects: {str(err).splitlines()[0][:300]}"
        ) from None
    return ds.with_format("arrow")[:].replace_schema_metadata(None)


def _hub_dataset(name: str, config: str | None, split: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ValueError(
                f"data.corpus_path={name!r}: no such local path, and no dataset {name!r} (split {split!r}) in the "
                "local Hugging Face cache (HF_HUB_OFFLINE=1); download it where there is network or point "
                "data.corpus_path at a file"
            ) from None
        raise ValueError(
            f"data.corpus_path={name!r}: cannot load dataset: {str(err).splitlines()[0][:300]}"
        ) from None
    return ds


def _disk_dataset(path: str, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as err:
        raise ValueError(f"cannot load datasets directory {path}: {str(err).splitlines()[0][:300]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: a DatasetDict without split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds


def _batches(source: Source, config: str | None, split: str):
    """Arrow tables of the source in order (each at most FILE_ROWS rows for datasets sources)."""
    if source.kind in ("json", "csv"):
        for f in source.files:
            yield _read_text_file(f, source.kind)
        return
    ds = (
        _hub_dataset(source.path, config, split)
        if source.kind == "hub"
        else _disk_dataset(source.path, split)
    )
    ds = ds.with_format("arrow")
    for start in range(0, len(ds), FILE_ROWS):
        yield ds[start : start + FILE_ROWS]


def read_source_table(path: str, what: str, config: str | None = None, split: str = "train") -> pa.Table:
    """A whole small table (probe set, held-out set) from any source kind, as one Arrow table."""
    source = list_data_files(path, what)
    try:
        if source.kind == "parquet":
            return parquet_dataset(source).to_table()
        tables = list(_batches(source, config, split))
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read {what}={path!r}: {str(err).splitlines()[0][:300]}") from None


def parquet_dataset(source: Source):
    """A ``pyarrow.dataset`` over exactly the listed Parquet files (never pyarrow's own listing)."""
    import pyarrow.dataset as pads

    if "://" not in source.path:
        return pads.dataset(source.files, format="parquet")
    fs = resolve_fs(source.path)[0]
    return pads.dataset([resolve_fs(f)[1] for f in source.files], format="parquet", filesystem=fs)


# -- the corpus: ingest once into the run directory ------------------------------------------------------
def _source_fingerprint(source: Source, config: str | None, split: str) -> str:
    h = hashlib.sha256(json.dumps([source.path, source.kind, config, split]).encode())
    if source.kind in ("json", "csv"):
        for f in source.files:
            fs, inner = resolve_fs(f)
            info = fs.get_file_info(inner)
            h.update(f"{f}:{info.size}:{info.mtime_ns}".encode())
    elif source.kind == "disk":
        for p in sorted(Path(source.path).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(source.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:  # hub: the dataset's own fingerprint (cached offline, resolved revision online)
        h.update(_hub_dataset(source.path, config, split)._fingerprint.encode())
    return h.hexdigest()[:16]


def ingested(run_dir: str) -> dict | None:
    p = Path(run_dir, INGEST_RECORD)
    return json.loads(p.read_text()) if p.is_file() else None


def ingest(
    source: Source, run_dir: str, id_column: str, config: str | None = None, split: str = "train"
) -> dict:
    """Convert ``source`` into ``<run_dir>/corpus/part-*.parquet`` unless already done for this fingerprint.

    Returns the record written to ``<run_dir>/corpus_ingest.json``:
    ``{source, kind, fingerprint, rows, files, added_id_column}``.
    """
    fingerprint = _source_fingerprint(source, config, split)
    out = Path(run_dir, INGEST_DIR)
    old = ingested(run_dir)
    if old is not None and old["fingerprint"] == fingerprint and out.is_dir():
        return old
    tmp = Path(run_dir, f".{INGEST_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows, files, schema, added_id = 0, 0, None, False
    for table in _batches(source, config, split):
        if id_column not in table.column_names:
            # Row number in source order: stable across reruns of the same source.
            table = table.append_column(id_column, pa.array(range(rows, rows + table.num_rows), pa.int64()))
            added_id = True
        if schema is None:
            schema = table.schema
        elif table.schema != schema:
            try:
                table = table.select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(
                    f"data.corpus_path={source.path!r}: files disagree on columns or types "
                    f"({schema} vs {table.schema}): {str(err).splitlines()[0][:200]}"
                ) from None
        for start in range(0, table.num_rows, FILE_ROWS):
            pq.write_table(
                table.slice(start, FILE_ROWS),
                tmp / f"part-{files:05d}.parquet",
                row_group_size=ROW_GROUP_ROWS,
            )
            files += 1
        rows += table.num_rows
    if rows == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"data.corpus_path={source.path!r}: the corpus is empty (0 rows)")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    record = {
        "source": source.path,
        "kind": source.kind,
        "fingerprint": fingerprint,
        "rows": rows,
        "files": files,
        "added_id_column": id_column if added_id else None,
    }
    Path(run_dir, INGEST_RECORD).write_text(json.dumps(record, indent=1))
    return record


def as_parquet(path: str, run_dir: str, data: DataConfig) -> str:
    """The corpus at ``path`` as Parquet: ``path`` itself when it is Parquet, else ``<run_dir>/corpus``
    (ingested once; ``data`` gives the id column and a hub dataset's config / split)."""
    source = list_data_files(path)
    if source.kind == "parquet":
        return path
    ingest(source, run_dir, data.id_column, data.corpus_config, data.corpus_split)
    return str(Path(run_dir, INGEST_DIR))
