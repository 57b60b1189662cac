"""Relevance, then quality (issue 29): a quality re-rank inside the relevance band of the selection.

The scorer's relevance (the head-subspace gradient cosine, by default) finds the target task; among the
task's rows it takes corrupted ones (wrong answers, mismatched text) nearly as readily as clean ones. The
exact scorer's pass already holds each row's own loss (``loss_full``: the mean loss of the response given
the prompt), so the selection can prefer the rows the model finds coherent without a new pass:

1. **Band** (relevance first): the ``band_factor * k`` rows ranked first by relevance (per stratum), then
   trimmed by a guard derived from the data so that rows of another task cannot enter: a band row must
   have a relevance of at least ``r_k - guard * (r_1 - r_k)`` (``r_1`` / ``r_k``: the relevance of the first
   and the k-th row). When the task's rows run out before the band does, the relevance falls off a cliff
   and the guard cuts there; while the band is inside the task's mode, it cuts nothing. The band never
   holds fewer than ``k`` rows, so the rule can only re-order what relevance ranks first.
2. **Re-rank** inside the band: each band row's relevance percentile (0 = most relevant) plus
   ``quality_weight`` times its quality percentile (0 = lowest ``quality_column`` among the band rows that
   have one), lowest sum first. Weight 1 (the default, a rank sum) lets neither term alone decide: measured on
   three demo draws per target it kept more clean rows than quality alone (``quality_weight: null``), which
   let low-loss rows from the band's tail displace the most relevant ones (RESULTS.md, Session 10). A band row
   without quality (a distilled row that was not refined, issue 24) takes its relevance percentile for both
   terms: it is ranked by relevance only. Ties: relevance order, then id.

Everything here works on the band's few rows (at most ``band_factor * k`` per stratum), held by the
driver; ``scoring/select.py`` finds them with its exact per-shard machinery.
"""

from __future__ import annotations

import math

import numpy as np

RULES = ("relevance", "relevance_then_quality")


def band_size(k: int, n: int, band_factor: float) -> int:
    """Rows of the band before the guard: ``ceil(band_factor * k)``, within ``[k, n]``."""
    return max(k, min(n, math.ceil(band_factor * k - 1e-9)))


def guard_cut(relevance_ranked: np.ndarray, k: int, guard: float | None) -> int:
    """How many of the band's rows (given in rank order, best first, higher = more relevant) the guard
    keeps: those with relevance >= ``r_k - guard * (r_1 - r_k)``; at least ``k``. ``guard`` None: all."""
    n = len(relevance_ranked)
    if guard is None or n <= k:
        return n
    r1, rk = float(relevance_ranked[0]), float(relevance_ranked[k - 1])
    floor = rk - guard * (r1 - rk)
    return max(k, int(np.count_nonzero(relevance_ranked >= floor)))


def _pct(values: np.ndarray) -> np.ndarray:
    """Percentile rank in [0, 1] (0 = lowest), ties averaged; one value -> 0."""
    n = len(values)
    if n <= 1:
        return np.zeros(n)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n)
    # average ties so that equal qualities rank equally (then relevance order decides)
    _, inv = np.unique(values, return_inverse=True)
    sums = np.bincount(inv, weights=ranks)
    counts = np.bincount(inv)
    return (sums / counts)[inv] / (n - 1)


def pick_in_band(
    relevance: np.ndarray,
    quality: np.ndarray,
    ids: np.ndarray,
    k: int,
    band_factor: float,
    guard: float | None,
    ascending: bool = False,
    quality_weight: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Indices of the ``k`` rows the rule selects among the given rows, and the rule's record.

    ``relevance``, ``quality`` (NaN = missing), ``ids``: one entry per candidate row; the candidates must
    include the first ``band_size`` rows in relevance order (more is fine). ``ascending``: relevance ranks
    lowest first (as ``select.ascending``). ``quality_weight``: the quality percentile's weight against the
    relevance percentile's; None: quality alone decides inside the band."""
    n = len(ids)
    k = min(k, n)
    if k == 0:
        return np.zeros(0, dtype=np.int64), {"band": 0, "band_before_guard": 0}
    key = -relevance if not ascending else relevance
    order = np.lexsort((ids, key))  # relevance rank order, ties by id ascending
    b = band_size(k, n, band_factor)
    band = order[:b]
    rel_desc = -key[band]  # higher = more relevant, in rank order
    b_guard = guard_cut(rel_desc, k, guard)
    band = band[:b_guard]
    q = quality[band].astype(float)
    has = np.isfinite(q)
    rel_pct = np.arange(len(band)) / max(len(band) - 1, 1)  # 0 = most relevant
    q_pct = rel_pct.copy()  # rows without quality: their relevance percentile
    if has.any():
        q_pct[has] = _pct(q[has])
    score = q_pct if quality_weight is None else rel_pct + quality_weight * q_pct
    pos = np.arange(len(band))
    pick = band[np.lexsort((pos, score))[:k]]  # the rank sum (or quality alone), then relevance order
    info = {
        "band_before_guard": int(b),
        "band": int(len(band)),
        "band_relevance_floor": float(rel_desc[len(band) - 1]),
        "k_th_relevance": float(rel_desc[k - 1]),
        "band_rows_without_quality": int((~has).sum()),
    }
    return pick, info


def select_ids(run: dict, k: int, rule: str = "relevance", **params) -> tuple[np.ndarray, dict]:
    """Offline evaluation helper: the ids a rule selects from a scores table given as arrays by column
    (``benchmarks/relevance_quality.py``). ``run`` holds ``id``, ``score`` and the quality column."""
    rel, ids = np.asarray(run["score"], float), np.asarray(run["id"])
    if rule == "relevance":
        return ids[np.lexsort((ids, -rel))[:k]], {}
    q = np.asarray(run[params.get("quality_column", "loss_full")], float)
    pick, info = pick_in_band(
        rel,
        q,
        ids,
        k,
        params.get("band_factor", 2.0),
        params.get("guard"),
        quality_weight=params.get("quality_weight"),
    )
    return ids[pick], info
