"""``histogram.png``: the selection's score histogram, rows coloured by what they are when the corpus says.

Rows are split by the corpus's hidden label (``is_clean_on_task``, the demo's) or else its ``task`` column,
when one exists: stacked bars of every scored row per group, and the selected rows of each group as an
outline on top, so one look shows whether the threshold cuts the on-task rows from the rest. A corpus with
neither column gets the plain all-vs-selected histogram. Read for the picture only, never for ranking.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from p2d_ray.report.precision import LABEL

GROUP_COLUMNS = (LABEL, "task")  # first one present colours the rows
MAX_ROWS = 2_000_000  # a histogram needs no more; beyond it, the first MAX_ROWS scored rows are drawn
MAX_GROUPS = 8  # more task values than this: the largest ones, the rest as "other"
BINS = 50


def _dataset(path: str) -> pads.Dataset:
    # Names starting with "_" or "." (markers, temporary files) are not data, as for every reader here.
    return pads.dataset(path, format="parquet", ignore_prefixes=["_", "."])


def _groups(corpus_path: str, id_column: str, ids: pa.Array) -> tuple[str | None, pa.Array | None]:
    """(group column, its value per id as strings) from the corpus, or (None, None) without one."""
    try:
        corpus = _dataset(corpus_path)
    except (OSError, pa.ArrowException, ValueError):
        return None, None  # a corpus this reader cannot open (e.g. not Parquet): no colouring
    column = next((c for c in GROUP_COLUMNS if c in corpus.schema.names), None)
    if column is None or id_column not in corpus.schema.names:
        return None, None
    table = corpus.to_table(columns=[id_column, column], filter=pc.field(id_column).isin(ids))
    idx = pc.index_in(ids, value_set=table.column(id_column))
    values = pc.take(table.column(column), idx).cast(pa.string())
    if column == LABEL:
        values = pc.if_else(pc.equal(values, "true"), "on-task", "off-task")
    return column, pc.fill_null(values, "unknown")


def save_selection_histogram(
    path: str | Path,
    scores_path: str,
    subset_path: str,
    id_column: str,
    value_column: str,
    corpus_path: str | None = None,
) -> Path:
    """Write the histogram of ``value_column`` over ``scores_path``, selected rows = ids in ``subset_path``.

    Args:
        value_column: a column of the score files (``score``, ``loss_full``, ...).
        corpus_path: the corpus, for its label / ``task`` column; None: no colouring.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    ids, values, selected = _scored(scores_path, subset_path, id_column, value_column)
    column, groups = _groups(corpus_path, id_column, ids) if corpus_path else (None, None)

    finite = np.isfinite(values)
    lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        if column is None:
            ax.hist(values[finite], bins=edges, alpha=0.4, label=f"all scored ({finite.sum():,})")
            ax.hist(values[finite & selected], bins=edges, alpha=0.9, label=f"selected ({selected.sum():,})")
            title = "score histogram"
        else:
            _stacked_by_group(
                ax, values, finite, selected, np.asarray(groups.to_pylist(), dtype=object), column, edges
            )
            title = f"score histogram by {column} (filled: all scored, outline: selected)"
        ax.set_xlabel(value_column)
        ax.set_ylabel("rows")
        if finite.sum() > 1000:  # a big corpus: the tail of selected rows would vanish on a linear axis
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _scored(scores_path: str, subset_path: str, id_column: str, value_column: str):
    """``(ids [N], values [N] float, selected [N] bool)`` of the first ``MAX_ROWS`` score rows."""
    scores = _dataset(scores_path).head(MAX_ROWS, columns=[id_column, value_column])
    ids = scores.column(id_column).combine_chunks()
    values = scores.column(value_column).to_numpy(zero_copy_only=False).astype(float)
    subset = _dataset(subset_path) if Path(subset_path).is_dir() else None
    chosen = subset.to_table(columns=[id_column]).column(id_column) if subset is not None else pa.array([])
    selected = pc.is_in(ids, value_set=chosen.combine_chunks() if len(chosen) else pa.array([], ids.type))
    return ids, values, selected.to_numpy(zero_copy_only=False)


def _stacked_by_group(ax, values, finite, selected, names, column: str, edges) -> None:
    """Filled stacked bars of every group's scored rows, each group's selected rows as an outline on top.
    ``values``, ``finite``, ``selected``, ``names``: ``[N]``; the largest groups first (at most MAX_GROUPS)."""
    kinds, counts = np.unique(names, return_counts=True)
    order = [k for _, k in sorted(zip(-counts, kinds, strict=True))]
    if column == LABEL:  # on-task first, in a colour that stands out
        order = sorted(order, key=lambda k: (k != "on-task", k))
    if len(order) > MAX_GROUPS:
        keep = set(order[: MAX_GROUPS - 1])
        names = np.where(np.isin(names, list(keep)), names, "other")
        order = order[: MAX_GROUPS - 1] + ["other"]
    colours = {k: f"C{i}" for i, k in enumerate(order)}
    data = [values[finite & (names == k)] for k in order]
    ax.hist(
        data,
        bins=edges,
        stacked=True,
        alpha=0.35,
        color=[colours[k] for k in order],
        label=[f"{k}: {len(d):,} scored" for k, d in zip(order, data, strict=True)],
    )
    for k in order:
        sel = values[finite & selected & (names == k)]
        if len(sel):
            ax.hist(
                sel,
                bins=edges,
                histtype="step",
                linewidth=1.8,
                color=colours[k],
                label=f"{k}: {len(sel):,} selected",
            )
