"""Rows -> token ids on CPU tasks (the Ray Data stage before the scorer actors).

Encoding is exactly ``p2d_ray.data.formatting.encode_row``. Calling a Hugging Face tokenizer once per
string costs ~100 us of Python overhead, which alone would cap a core at ~3,000 rows/s, so
:class:`BatchedTokenizer` answers ``encode_row``'s per-string calls from ONE batched call per block:
a first pass records the strings ``encode_row`` asks for, one ``encode_batch`` tokenises them, and a
second pass runs ``encode_row`` against the cache. Same code path, same ids (tested), a fraction of the cost.

Quarantine reasons decided here, in priority order: ``unreadable`` (the row group could not be decoded),
``bad_utf8`` (a string column with bytes that are not UTF-8: Parquet does not check, Python's decode does),
``null_id``, ``duplicate_id``, ``non_string`` (a text column of a non-string type), then encode_row's ``null`` / ``empty`` / ``non_string`` / ``too_long`` /
``no_target_tokens``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2d_ray.config import DataConfig, ModelConfig
from p2d_ray.data.formatting import Encoded, encode_row
from p2d_ray.scoring.shards import NONSTRING_COL, RAW_COL, UNREADABLE_COL

DUP_COL = "_dup"
REASON_COL = "reason"
TOKENIZE_TIME_COL = "_t_tokenize"  # per-row share of its block's tokenisation seconds (for stats)


class BatchedTokenizer:
    """Duck-types the slice of the tokenizer API that ``encode_row`` uses, served from a batched cache."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self._ids: dict[str, list[int]] = {}
        self._chat: dict[str, str] = {}
        self._recording: list[str] | None = None

    def apply_chat_template(self, messages, **kwargs):
        key = json.dumps([messages, kwargs], sort_keys=True, default=str)
        if key not in self._chat:
            self._chat[key] = self.tokenizer.apply_chat_template(messages, **kwargs)
        return self._chat[key]

    def __call__(self, text: str, add_special_tokens: bool = True):
        assert add_special_tokens is False, "encode_row adds special tokens itself"
        ids = self._ids.get(text)
        if ids is None:
            if self._recording is not None:
                self._recording.append(text)
                ids = []
            else:  # not seen in the recording pass: tokenise alone (never expected, but always correct)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids}

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # fast tokenizers: the Rust batch call, no per-string Python overhead
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_rows(self, rows: Sequence[dict], cfg: DataConfig, fmt: str, demos: Sequence[dict]):
        """``encode_row`` for every row: a list of :class:`Encoded` or a quarantine reason string."""
        self._recording = []
        for row in rows:
            with contextlib.suppress(ValueError):  # the reason is found again in the second pass
                encode_row(row, self, cfg, fmt, demos)
        texts = list(dict.fromkeys(self._recording))
        self._recording = None
        self._ids = dict(zip(texts, self._encode_batch(texts), strict=True)) if texts else {}
        out: list[Encoded | str] = []
        for row in rows:
            try:
                out.append(encode_row(row, self, cfg, fmt, demos))
            except ValueError as err:
                out.append(str(err))
        self._ids = {}
        return out


@lru_cache(maxsize=4)
def _tokenizer(model_json: str):
    from p2d_ray.models.loading import load_tokenizer

    # Loaded once per worker process (Ray reuses task workers), not once per block.
    return load_tokenizer(ModelConfig.model_validate_json(model_json))


def invalid_utf8(column: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Bool mask of rows whose string value is not valid UTF-8, or None when all are valid (one vectorised
    check; the per-row decode runs only for a column that failed it)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    try:
        column.validate(full=True)
        return None
    except pa.ArrowInvalid:
        values = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        bad = np.zeros(len(column), dtype=bool)
        for i, v in enumerate(values.to_pylist()):
            if v is not None:
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    bad[i] = True
        return bad


def _raw_json(block: pa.Table, columns: list[str], i: int) -> str:
    """A bad_utf8 row's values as JSON, undecodable bytes shown as escapes."""
    out = {}
    for c in columns:
        v = block.column(c)[i]
        if pa.types.is_string(v.type) or pa.types.is_large_string(v.type):
            b = v.cast(pa.binary()).as_py()
            out[c] = None if b is None else b.decode("utf-8", errors="backslashreplace")
        else:
            out[c] = v.as_py()
    return json.dumps(out, default=str)


def _row_problems(block: pa.Table, id_col: str, text_columns: list[str]):
    """What is wrong with each row before tokenising: unreadable, bad_utf8, null_id, duplicate_id, non_string
    (first match wins). Bad UTF-8 values are nulled so the rest of the block decodes, and the row's raw bytes
    kept for its quarantine row. Returns ``(block, ids, reasons [n] (None: fine), raw row JSON [n])``."""
    n = block.num_rows
    ids = block.column(id_col)
    reasons: list[str | None] = [None] * n
    null_id = ids.is_null().to_numpy(zero_copy_only=False)
    dup = block.column(DUP_COL).to_numpy(zero_copy_only=False) if DUP_COL in block.column_names else None
    nonstring = block.column(NONSTRING_COL).to_numpy(zero_copy_only=False)
    unreadable = (
        block.column(UNREADABLE_COL).to_pylist() if UNREADABLE_COL in block.column_names else [None] * n
    )
    raw = block.column(RAW_COL).to_pylist()
    bad_utf8 = np.zeros(n, dtype=bool)
    for c in [id_col, *text_columns]:
        bad = invalid_utf8(block.column(c))
        if bad is not None:
            for i in np.flatnonzero(bad & ~bad_utf8):
                raw[i] = _raw_json(block, [id_col, *text_columns], i)
            bad_utf8 |= bad
            if c != id_col:  # null the bad values so the rest of the block decodes
                idx = block.schema.get_field_index(c)
                block = block.set_column(
                    idx, c, pc.if_else(pa.array(bad), None, block.column(c).cast(pa.string()))
                )
    if bad_utf8.any() and invalid_utf8(ids) is not None:
        ids = pc.if_else(pa.array(bad_utf8), None, ids.cast(pa.binary())).cast(ids.type, safe=False)
    for i in range(n):
        if unreadable[i] is not None:
            reasons[i] = "unreadable"
            raw[i] = json.dumps({"error": unreadable[i]})
        elif bad_utf8[i]:
            reasons[i] = "bad_utf8"
        elif null_id[i]:
            reasons[i] = "null_id"
        elif dup is not None and dup[i]:
            reasons[i] = "duplicate_id"
        elif nonstring[i]:
            reasons[i] = "non_string"
    return block, ids, reasons, raw


def _token_table(block: pa.Table, id_col: str, ids, encoded: list, reasons: list, row_json: list) -> pa.Table:
    """The tokenize task's output table (see :func:`tokenize_block`), one row per input row."""
    lengths = np.array([len(e.input_ids) if e else 0 for e in encoded], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    kept = [e for e in encoded if e]
    # Flat values + offsets: building list<int> columns row by row costs more than the tokenizer.
    ids_flat = pa.array(list(chain.from_iterable(e.input_ids for e in kept)), pa.int32())
    mask_flat = pa.array(list(chain.from_iterable(e.loss_mask for e in kept)), pa.int8())
    return pa.table(
        {
            id_col: ids,
            "input_ids": pa.ListArray.from_arrays(offsets, ids_flat),
            "loss_mask": pa.ListArray.from_arrays(offsets, mask_flat),
            "length": pa.array(lengths),
            "truncated": pa.array([bool(e and e.truncated) for e in encoded]),
            REASON_COL: pa.array(reasons, pa.string()),
            "row_json": pa.array(row_json, pa.string()),
            "_shard": block.column("_shard"),
            "_row": block.column("_row"),
        }
    )


def tokenize_block(
    block: pa.Table,
    model_json: str,
    data_json: str,
    fmt: str,
    demos: list[dict],
    text_columns: list[str],
) -> pa.Table:
    """Ray Data map_batches task: a block of corpus rows -> token ids + loss mask, or a quarantine reason.

    Output columns: id, ``input_ids`` list<int32>, ``loss_mask`` list<int8>, ``length``, ``truncated``,
    ``reason`` (null when the row is scorable), ``row_json`` (the quarantined row's values), ``_shard``,
    ``_row``, ``_t_tokenize``.
    """
    t0 = time.perf_counter()
    cfg = DataConfig.model_validate_json(data_json)
    tok = BatchedTokenizer(_tokenizer(model_json))
    n = block.num_rows
    block, ids, reasons, raw = _row_problems(block, cfg.id_column, text_columns)
    text = {c: block.column(c).to_pylist() for c in text_columns}
    todo = [i for i in range(n) if reasons[i] is None]
    rows = [{c: text[c][i] for c in text_columns} for i in todo]
    encoded: list[Encoded | None] = [None] * n
    for i, enc in zip(todo, tok.encode_rows(rows, cfg, fmt, demos), strict=True):
        if isinstance(enc, str):
            reasons[i] = enc  # null, empty, too_long, no_target_tokens: the encoder's reason
        else:
            encoded[i] = enc
    row_json = [
        None
        if reasons[i] is None
        else (raw[i] or json.dumps({c: text[c][i] for c in text_columns}, default=str))
        for i in range(n)
    ]
    out = _token_table(block, cfg.id_column, ids, encoded, reasons, row_json)
    per_row = (time.perf_counter() - t0) / max(n, 1)
    return out.append_column(TOKENIZE_TIME_COL, pa.array(np.full(n, per_row, dtype=np.float32)))
