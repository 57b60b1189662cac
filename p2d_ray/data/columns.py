"""Which column of a dataset plays which role, and the columns a run would leave unread.

The corpus's columns are ``data.id_column`` / ``prompt_column`` / ``response_column`` / ``text_column`` /
``input_column`` / ``messages_column``. A probe or held-out set that names them otherwise has a column map
(torchtune's ``column_map``, LLaMA-Factory's dataset ``columns``): ``data.probe_column_map`` /
``evaluate.heldout_column_map``, ``{role: that set's column}``. :func:`apply_column_map` renames the mapped
columns to the corpus's names when the set is read, so every stage reads every set the same way.

A column that holds text of a common dataset shape (``instruction``, ``input``, ``output``, ``question``,
``messages``, ...) but that the resolved format does not read is named in a warning
(:func:`unread_columns`): e.g. an Alpaca set mapped without its ``input``, or chat rows beside a
prompt/response pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyarrow as pa

from p2d_ray.config import COLUMN_ROLES, DataConfig

log = logging.getLogger("p2d_ray.data")

# Column names that hold a row's text in common dataset shapes (Alpaca, Dolly, OpenAssistant / ShareGPT,
# TRL's prompt-completion and preference sets, QA sets): unread, they are worth a warning. Other columns
# (labels, sources, metadata) are expected to be unread.
TEXT_LIKE = (
    "instruction",
    "input",
    "output",
    "prompt",
    "response",
    "completion",
    "text",
    "question",
    "answer",
    "context",
    "query",
    "system",
    "history",
    "messages",
    "conversations",
    "chosen",
    "rejected",
)


def role_columns(data: DataConfig) -> dict[str, str]:
    """{role: the corpus's column name} for every role."""
    return {role: getattr(data, f"{role}_column") for role in COLUMN_ROLES}


def apply_column_map(table: pa.Table, data: DataConfig, column_map: dict[str, str], what: str) -> pa.Table:
    """``table`` with each mapped column renamed to the corpus's name for its role (``column_map``: {role:
    column of this table}). Raises ValueError naming ``what`` for a mapped column the table lacks, or a
    rename onto a column the table already has for something else."""
    if not column_map:
        return table
    names = list(table.column_names)
    target = role_columns(data)
    problems = []
    renames = {}
    for role, column in column_map.items():
        if column not in names:
            problems.append(f"maps {role} to {column!r}, which {what} does not have (found {names})")
            continue
        renames[column] = target[role]
    for column, new in renames.items():
        if new in names and new not in renames and new != column:
            problems.append(
                f"renaming {column!r} to {new!r} would clash with {what}'s own column {new!r}; map that one too"
            )
    if problems:
        raise ValueError(f"column map of {what}: " + "; ".join(problems))
    return table.rename_columns([renames.get(n, n) for n in names])


def read_columns(data: DataConfig, names: Sequence[str]) -> list[str]:
    """The text columns a row is read from (id excluded), as ``formatting.row_parts`` reads them: prompt +
    response (+ input when present), else messages, else text."""
    cols = set(names)
    if data.prompt_column in cols and data.response_column in cols:
        extra = [data.input_column] if data.input_column in cols else []
        return [data.prompt_column, data.response_column, *extra]
    if data.messages_column in cols:
        return [data.messages_column]
    return [data.text_column]


def unread_columns(data: DataConfig, fmt: str, names: Sequence[str]) -> list[str]:
    """Text-like columns (:data:`TEXT_LIKE`, or a role's column name) of ``names`` that a row of format
    ``fmt`` is not read from."""
    used = {data.id_column, *read_columns(data, names)}
    text_like = set(TEXT_LIKE) | set(role_columns(data).values()) - {data.id_column}
    return [n for n in names if n not in used and n.lower() in text_like]


def warn_unread(data: DataConfig, fmt: str, names: Sequence[str], what: str) -> list[str]:
    """Log a warning naming the unread text-like columns of ``what`` (see :func:`unread_columns`); returns
    them."""
    unread = unread_columns(data, fmt, names)
    if unread:
        log.warning(
            "%s: column(s) %s hold text but are not read (format %s reads %s); map them (data.*_column, "
            "data.probe_column_map, evaluate.heldout_column_map) or drop them to silence this",
            what,
            unread,
            fmt,
            read_columns(data, names),
        )
    return unread
