"""Selection precision on a labelled corpus: how much of the selected subset is clean on-task data.

Only for corpora that carry a hidden label column (the demo corpus's ``is_clean_on_task``); the label is
read here, for evaluation (and by ``histogram.py``, to colour the selection's picture), never to score or
rank a row. Three numbers side by side:

- ``selected``: the label's rate in the subset P2D selected;
- ``base_rate``: its rate in the whole corpus (what a random subset would get);
- ``perplexity``: its rate among the same number of rows with the lowest ungated loss (``loss_full`` in
  the same scores files): the classic perplexity-filtering baseline, at no extra scoring cost.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

LABEL = "is_clean_on_task"


def _columns(path: str, columns: list[str]) -> pa.Table | None:
    """Those columns of a Parquet dataset (files starting ``_`` or ``.``, e.g. ``_done/`` markers, are
    ignored by pyarrow), or None when one of them does not exist."""
    ds = pads.dataset(path, format="parquet")
    if any(c not in ds.schema.names for c in columns):
        return None
    return ds.to_table(columns=columns)


def lowest_ids(scores: pa.Table, column: str, k: int, id_column: str = "id") -> pa.Array:
    """Ids of the ``k`` rows with the lowest ``column`` (ties broken by id, ascending): deterministic."""
    order = pc.sort_indices(scores, sort_keys=[(column, "ascending"), (id_column, "ascending")])
    return pc.take(scores.column(id_column), order[:k])


def label_rate(labels: pa.Table, ids: pa.Array, id_column: str = "id", label: str = LABEL) -> float:
    """Fraction of ``ids`` whose label is true (ids missing from ``labels`` count as not clean)."""
    if len(ids) == 0:
        return 0.0
    hit = labels.filter(pc.is_in(labels.column(id_column), value_set=ids))
    return pc.sum(hit.column(label).cast(pa.int64())).as_py() / len(ids)


def selection_precision(
    corpus_path: str, subset_path: str, scores_path: str, id_column: str = "id", label: str = LABEL
) -> dict | None:
    """Label rates of the selected subset, the corpus and perplexity selection of the same size.

    Returns None when the corpus has no ``label`` column (an unlabelled, real corpus).
    """
    labels = _columns(corpus_path, [id_column, label])
    if labels is None:
        return None
    subset_ids = _columns(subset_path, [id_column]).column(id_column)
    k = len(subset_ids)
    out = {
        "label": label,
        "k": k,
        "n_corpus": labels.num_rows,
        "selected": label_rate(labels, subset_ids, id_column, label),
        "base_rate": pc.sum(labels.column(label).cast(pa.int64())).as_py() / max(labels.num_rows, 1),
    }
    scores = _columns(scores_path, [id_column, "loss_full"])
    if scores is not None and scores.column("loss_full").null_count < scores.num_rows:
        out["perplexity"] = label_rate(
            labels, lowest_ids(scores, "loss_full", k, id_column), id_column, label
        )
    return out
