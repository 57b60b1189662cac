"""Small-table I/O (probe sets, held-out sets): Parquet or JSONL, local or any pyarrow/fsspec URI.

Large corpora never come through here: they stream through Ray Data (p2d_ray.scoring.pipeline).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.json as pajson


def read_table(path: str) -> pa.Table:
    """Read a Parquet file/directory/glob or a ``.jsonl`` / ``.json`` file into one Arrow table."""
    try:
        if path.endswith((".jsonl", ".json")):
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
            with fs.open_input_stream(inner) as f:
                return pajson.read_json(f)
        return pads.dataset(path, format="parquet").to_table()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file or directory: {path}") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def read_rows(path: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows (all when None); a Parquet corpus is read only as far as needed."""
    if limit is not None and not path.endswith((".jsonl", ".json")):
        try:
            return pads.dataset(path, format="parquet").head(limit).to_pylist()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file or directory: {path}") from None
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"cannot read {path}: {err}") from None
    table = read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def rows_hash(rows: list[dict]) -> str:
    """Content hash of a small row set (the probe-set hash recorded in heads.json)."""
    payload = json.dumps(rows, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
