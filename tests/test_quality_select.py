"""Relevance, then quality (issue 29): the band, its guard, the quality re-rank, rows without a quality value,
and the rule through ``run_select`` (driver and Ray paths, strata, top-k, random, the record, both histograms).
Constructed score tables only: no model."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_scores

from p2d_ray.config import build_config
from p2d_ray.scoring.quality import band_size, guard_cut, pick_in_band
from p2d_ray.scoring.select import run_select

# A corpus of 200 rows: the target task "t" (60 rows: 36 clean, 24 corrupted) is the most relevant; the
# other tasks are less relevant but the model finds them easy (lowest loss of all), the trap a too-wide
# band falls into. Corrupted task rows are as relevant as clean ones but have a higher loss.
N, K = 200, 20


def _row(i: int) -> dict:
    rng = random.Random(i)
    if i < 60:
        clean = i % 5 < 3
        rel = 0.6 + 0.3 * rng.random()
        return {
            "id": i,
            "task": "t" if i % 2 else "t2",
            "clean": clean,
            "rel": rel,
            "loss": 0.5 if clean else 1.5,
        }
    return {"id": i, "task": "other", "clean": False, "rel": 0.4 * rng.random(), "loss": 0.01 + i / 1e4}


ROWS = [_row(i) for i in range(N)]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = [{"id": r["id"], "task": r["task"], "text": f"row {r['id']}"} for r in ROWS]
    random.Random(1).shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows[:120]), corpus / "a.parquet", row_group_size=50)
    pq.write_table(pa.Table.from_pylist(rows[120:]), corpus / "b.parquet", row_group_size=80)
    by_id = {r["id"]: r for r in ROWS}

    def columns(ids):
        ids = ids.to_pylist()
        return {
            "score": [by_id[i]["rel"] for i in ids],
            # a third of the task rows have no loss (as distilled rows that were not refined)
            "loss_full": [None if i % 7 == 0 and i < 60 else by_id[i]["loss"] for i in ids],
            "loss_gated": [0.0] * len(ids),
            "n_tokens": [5] * len(ids),
        }

    write_scores(root / "run", corpus, columns)
    return root


def _cfg(root, **select):
    select = {"top_k": K, "rule": "relevance_then_quality", **select}
    return build_config({"run_dir": str(root / "run"), "select": select})


def _picked(root) -> list[int]:
    return sorted(pq.read_table(root / "run" / "subset").column("id").to_pylist())


def test_band_and_guard_arithmetic():
    assert band_size(10, 100, 2.0) == 20 and band_size(10, 15, 2.0) == 15 and band_size(10, 100, 1.0) == 10
    assert band_size(3, 100, 1.5) == 5  # ceil(4.5)
    ranked = np.array([1.0, 0.9, 0.8, 0.78, 0.76, 0.2, 0.1])  # the task's rows, then a cliff
    # k = 3: r_1 = 1.0, r_k = 0.8, floor = 0.8 - 0.5 * 0.2 = 0.7: the rows past the cliff stay out
    assert guard_cut(ranked, 3, 0.5) == 5
    assert guard_cut(ranked, 3, None) == 7
    assert guard_cut(ranked, 6, 0.0) == 6  # never fewer than k rows


def test_rerank_inside_the_band_and_rows_without_quality():
    rel = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.05])
    loss = np.array([2.0, 0.1, 1.0, 0.5, 0.0, 0.0])  # the last two: off-task, easy
    ids = np.arange(6) * 10
    pick, info = pick_in_band(rel, loss, ids, 2, band_factor=2.0, guard=None)
    assert sorted(ids[pick]) == [10, 30] and info["band"] == 4  # best quality of the 4 most relevant
    pick, _ = pick_in_band(rel, loss, ids, 2, band_factor=3.0, guard=None)
    assert sorted(ids[pick]) == [40, 50]  # no guard and a wide band: off-task easy rows enter ...
    pick, info = pick_in_band(rel, loss, ids, 2, band_factor=3.0, guard=0.5)
    assert sorted(ids[pick]) == [0, 10] and info["band"] == 2  # ... the guard keeps them out
    # No quality anywhere: relevance order, as the plain top k
    pick, info = pick_in_band(rel, np.full(6, np.nan), ids, 2, 2.0, None)
    assert list(ids[pick]) == [0, 10] and info["band_rows_without_quality"] == 4
    # A row without quality is placed by its relevance percentile among the band's quality percentiles
    q = np.array([np.nan, 0.1, 1.0, 0.5, 0.0, 0.0])  # row 0: most relevant, no loss -> percentile 0
    pick, _ = pick_in_band(rel, q, ids, 2, 2.0, None)
    assert sorted(ids[pick]) == [0, 10]
    # ascending relevance (lowest first) ranks the band from the other end
    pick, _ = pick_in_band(-rel, loss, ids, 2, 2.0, None, ascending=True)
    assert sorted(ids[pick]) == [10, 30]


def test_rank_sum_keeps_relevance_in_the_decision():
    # 6-row band, k = 3. Quality alone takes the band's three lowest losses, the band's tail included; the
    # rank sum (weight 1) trades one percentile of relevance for one of quality.
    rel = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # relevance percentiles 0, .2, .4, .6, .8, 1
    loss = np.array([1.0, 3.0, 0.1, 0.3, 1.5, 0.5])  # quality percentiles .6, 1, 0, .2, .8, .4
    ids = np.arange(6)
    pick, _ = pick_in_band(rel, loss, ids, 3, band_factor=2.0, guard=None)
    assert sorted(ids[pick]) == [2, 3, 5]  # quality alone: the least relevant row 5 displaces row 0
    pick, _ = pick_in_band(rel, loss, ids, 3, band_factor=2.0, guard=None, quality_weight=1.0)
    assert sorted(ids[pick]) == [0, 2, 3]  # sums .6 1.2 .4 .8 1.6 1.4: row 1 (worst loss) makes way
    pick, _ = pick_in_band(rel, loss, ids, 3, band_factor=2.0, guard=None, quality_weight=0.0)
    assert sorted(ids[pick]) == [0, 1, 2]  # weight 0: relevance alone


def test_rule_through_select_records_and_draws_both_terms(scored):
    plain = run_select(_cfg(scored, rule="relevance"))
    plain_ids = _picked(scored)
    assert plain["rule"] == {"name": "relevance"}
    out = run_select(_cfg(scored, rule="relevance_then_quality", band_factor=2.0, band_guard=0.5))
    ids = _picked(scored)
    by_id = {r["id"]: r for r in ROWS}
    assert len(ids) == K and all(by_id[i]["task"] != "other" for i in ids)  # on-task only
    assert sum(by_id[i]["clean"] for i in ids) > sum(by_id[i]["clean"] for i in plain_ids)
    rule = json.loads((scored / "run" / "selection.json").read_text())["rule"]
    assert rule == out["rule"] and rule["name"] == "relevance_then_quality"
    assert rule["band_factor"] == 2.0 and rule["band_guard"] == 0.5 and rule["quality_column"] == "loss_full"
    band = rule["strata"]["<all>"]
    assert K <= band["band"] <= band["band_before_guard"] == 2 * K
    sub = pq.read_table(scored / "run" / "subset")
    assert {"score", "loss_full"} <= set(sub.column_names)  # both terms beside the full row
    for name in ("histogram.png", "histogram_quality.png"):
        assert (scored / "run" / name).read_bytes()[:4] == b"\x89PNG"
    # a wide band without a guard lets the easy off-task rows in: the guard is what keeps them out
    run_select(_cfg(scored, band_factor=4.0, band_guard=None))
    assert any(by_id[i]["task"] == "other" for i in _picked(scored))
    run_select(_cfg(scored, band_factor=4.0))
    assert all(by_id[i]["task"] != "other" for i in _picked(scored))


def test_rule_leaves_random_and_loss_selection_alone(scored):
    out = run_select(_cfg(scored, score_column="random"))
    assert (
        out["rule"] == {"name": "relevance"}
        and "loss_full" not in pq.read_schema(next((scored / "run" / "subset").glob("*.parquet"))).names
    )


@pytest.mark.ray
@pytest.mark.parametrize("select", [{}, {"top_k": None, "fraction": 0.1, "stratify_by": "task"}])
def test_ray_tasks_apply_the_rule_as_the_driver(ray_local, scored, monkeypatch, select):
    import p2d_ray.scoring.select as sel

    local = run_select(_cfg(scored, **select))
    local_ids = _picked(scored)
    monkeypatch.setattr(sel, "LOCAL_MAX_ROWS", 0)
    on_ray = run_select(_cfg(scored, **select))
    assert _picked(scored) == local_ids and on_ray["rule"] == local["rule"]
    if select:  # per stratum: each task's own band and k
        assert set(on_ray["rule"]["strata"]) == {"t", "t2", "other"}
        assert all(v["selected"] == v["k"] for v in on_ray["strata"].values())
