"""Selection on known scores: exact top-k with ties broken by id, strata, ascending on another score column,
full original rows out (readable by ``datasets``), and refusal on incomplete or unsuitable scores."""

from __future__ import annotations

import json
import random
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_scores

from p2d_ray.config import build_config
from p2d_ray.report.precision import selection_precision
from p2d_ray.scoring.select import allocate, run_select, total_k

N = 60
TASK_SIZES = {"a": 30, "b": 20, "c": 10}


def _corpus_rows() -> list[dict]:
    tasks = [t for t, n in TASK_SIZES.items() for _ in range(n)]
    ids = list(range(N))
    random.Random(0).shuffle(ids)  # file order != id order, so id tie-breaking is really tested
    return [
        {"id": i, "task": tasks[i], "text": f"row {i}", "is_clean_on_task": i % 3 == 0, "loss_full": -1.0}
        for i in ids
    ]


def _known(i: int) -> tuple[float, float]:
    """(score, loss_full): few distinct values, so many ties, also at the thresholds."""
    return (i * 7 % 10) / 10, ((i * 3) % 8) / 4


def _known_columns(ids: pa.ChunkedArray) -> dict:
    ids = ids.to_pylist()
    return {
        "score": [_known(i)[0] for i in ids],
        "loss_full": [_known(i)[1] for i in ids],
        "loss_gated": [0.0] * len(ids),
        "n_tokens": [5] * len(ids),
    }


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A corpus (2 files, 4 row groups) and a scores directory with known scores, written through the same
    ScoreStore API the pipeline uses (marker last)."""
    root = tmp_path_factory.mktemp("select")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = _corpus_rows()
    pq.write_table(pa.Table.from_pylist(rows[:36]), corpus / "a.parquet", row_group_size=18)
    pq.write_table(pa.Table.from_pylist(rows[36:]), corpus / "b.parquet", row_group_size=12)
    write_scores(root / "run", corpus, _known_columns)
    return root, rows


def _cfg(root, **select):
    # the exact top k by one column (the quality re-rank of issue 29 is tests/test_quality_select.py's)
    return build_config({"run_dir": str(root / "run"), "select": {"rule": "relevance", **select}})


def _subset(root) -> pa.Table:
    return pq.read_table(root / "run" / "subset").sort_by("id")


def _rank(rows, key, k):
    return sorted(rows, key=key)[:k]


@pytest.mark.ray
def test_top_k_with_ties_is_exact_and_keeps_full_rows(ray_local, scored_run):
    root, rows = scored_run
    out = run_select(_cfg(root, top_k=7))
    expected = _rank(rows, lambda r: (-_known(r["id"])[0], r["id"]), 7)
    # the 7th place falls inside a tie (score 0.8 has 6 rows after the 0.9s): id decides
    assert sum(_known(r["id"])[0] == out["threshold"] for r in rows) > 1
    got = _subset(root)
    assert got.column("id").to_pylist() == sorted(r["id"] for r in expected)
    by_id = {r["id"]: r for r in rows}
    for r in got.to_pylist():  # the FULL original row, plus the score it was selected by
        assert {k: v for k, v in r.items() if k != "score"} == by_id[r["id"]]
        assert r["score"] == _known(r["id"])[0]
    assert out["strata"]["<all>"]["threshold_id"] == expected[-1]["id"]
    assert out["n_selected"] == 7 and out["n_scored"] == N
    files = sorted(str(p) for p in (root / "run" / "subset").glob("*.parquet"))
    hf = datasets.load_dataset("parquet", data_files=files, split="train")
    assert sorted(hf["id"]) == got.column("id").to_pylist() and "text" in hf.column_names
    # the hidden label is never read by selection (issue 10): only report/precision.py reads it
    assert "clean" not in out
    clean = selection_precision(
        str(root / "corpus"), str(root / "run" / "subset"), str(root / "run" / "scores")
    )
    assert clean["selected"] == pytest.approx(sum(r["id"] % 3 == 0 for r in expected) / 7)
    assert clean["base_rate"] == pytest.approx(sum(r["id"] % 3 == 0 for r in rows) / N)
    assert (root / "run" / "histogram.png").stat().st_size > 0
    saved = json.loads((root / "run" / "selection.json").read_text())
    assert saved["n_selected"] == 7 and saved["score_column"] == "score"


@pytest.mark.ray
def test_stratified_fraction_per_task(ray_local, scored_run):
    root, rows = scored_run
    out = run_select(_cfg(root, fraction=0.25, stratify_by="task"))
    # 15 rows over strata of 30/20/10: quotas 7.5/5/2.5 -> 7/5/2 + the remainder to "a" (tie with "c": name)
    assert {s: v["k"] for s, v in out["strata"].items()} == {"a": 8, "b": 5, "c": 2}
    expected = []
    for task, k in {"a": 8, "b": 5, "c": 2}.items():
        expected += _rank([r for r in rows if r["task"] == task], lambda r: (-_known(r["id"])[0], r["id"]), k)
    assert _subset(root).column("id").to_pylist() == sorted(r["id"] for r in expected)
    assert all(v["selected"] == v["k"] for v in out["strata"].values())


@pytest.mark.ray
def test_ascending_on_loss_full_from_the_same_scores(ray_local, scored_run):
    """Perplexity selection (lowest ungated loss first) without a second scoring pass."""
    root, rows = scored_run
    out = run_select(_cfg(root, top_k=9, score_column="loss_full", ascending=True))
    expected = _rank(rows, lambda r: (_known(r["id"])[1], r["id"]), 9)
    got = _subset(root)
    assert got.column("id").to_pylist() == sorted(r["id"] for r in expected)
    # the corpus already has a column named loss_full: the selection value must not overwrite it
    assert out["subset_score_column"] == "p2d_loss_full"
    assert set(got.column("loss_full").to_pylist()) == {-1.0}
    assert got.column("p2d_loss_full").to_pylist() == [_known(i)[1] for i in got.column("id").to_pylist()]


def test_select_refuses_unusable_scores(scored_run, tmp_path):
    root, _ = scored_run
    with pytest.raises(ValueError, match="not a corpus column"):
        run_select(_cfg(root, stratify_by="colour"))
    with pytest.raises(ValueError, match="run `p2d-ray score` first"):
        run_select(build_config({"run_dir": str(tmp_path / "empty")}))
    other = tmp_path / "ppl"
    shutil.copytree(root / "run" / "scores", other / "scores")
    shutil.copytree(root / "run" / "_state", other / "_state")  # the markers and manifest beside scores/
    manifest = json.loads((other / "_state" / "scores" / "manifest.json").read_text())
    (other / "_state" / "scores" / "manifest.json").write_text(
        json.dumps({**manifest, "scorer": "perplexity"})
    )
    with pytest.raises(ValueError, match="'loss_gated' is not produced by scorer 'perplexity'"):
        run_select(build_config({"run_dir": str(other), "select": {"score_column": "loss_gated"}}))
    next((other / "_state" / "scores" / "done").glob("*.json")).unlink()
    with pytest.raises(ValueError, match="scoring is incomplete: 1 of 4 shards"):
        run_select(build_config({"run_dir": str(other)}))


def test_allocation_and_k():
    assert total_k(60, 0.25, None) == 15 and total_k(60, 0.1, 100) == 60 and total_k(3, 0.1, None) == 1
    assert allocate({"a": 30, "b": 20, "c": 10}, 15) == {"a": 8, "b": 5, "c": 2}
    assert allocate({"x": 1, "y": 99}, 10) == {"x": 0, "y": 10}
    assert sum(allocate({"p": 7, "q": 7, "r": 7}, 10).values()) == 10


@pytest.mark.ray
def test_random_selection_is_seeded_and_layout_free(ray_local, scored_run):
    """score_column=random: the k ids with the highest hash(seed, id), the same for any shard layout."""
    from p2d_ray.scoring.select import random_values

    root, rows = scored_run
    picked = {}
    for seed in (0, 0, 1):
        cfg = build_config(
            {"run_dir": str(root / "run"), "seed": seed, "select": {"top_k": 12, "score_column": "random"}}
        )
        out = run_select(cfg)
        ids = pa.array([r["id"] for r in rows])
        u = random_values(ids, seed).to_pylist()
        expected = sorted(
            i for _, i in sorted(zip(u, ids.to_pylist(), strict=True), key=lambda t: (-t[0], t[1]))[:12]
        )
        got = _subset(root)
        assert got.column("id").to_pylist() == expected
        assert got.column("random").to_pylist() == [u[ids.to_pylist().index(i)] for i in expected]
        assert out["seed"] == seed and out["n_selected"] == 12
        picked.setdefault(seed, []).append(expected)
    assert picked[0][0] == picked[0][1] and picked[0][0] != picked[1][0]
    assert all(0 <= x < 1 for x in random_values(pa.array(range(1000)), 3).to_pylist())


@pytest.mark.ray
@pytest.mark.parametrize("select", [{"top_k": 7}, {"fraction": 0.25, "stratify_by": "task"}])
def test_ray_tasks_select_what_the_driver_selects(ray_local, scored_run, monkeypatch, select):
    """Above LOCAL_MAX_ROWS the same steps run as one Ray task per shard: the same subset and thresholds."""
    import p2d_ray.scoring.select as sel

    root, _ = scored_run
    local = run_select(_cfg(root, **select))
    local_ids = _subset(root).column("id").to_pylist()
    monkeypatch.setattr(sel, "LOCAL_MAX_ROWS", 0)
    on_ray = run_select(_cfg(root, **select))
    assert _subset(root).column("id").to_pylist() == local_ids
    assert on_ray["strata"] == local["strata"] and on_ray["n_selected"] == local["n_selected"]


def test_lower_bound_keeps_every_selected_row():
    """The candidates' lower bound from rank pivots: at least k rows rank at or before it, and it is never
    past the true k-th value (ties, both directions, uneven shards)."""
    import numpy as np

    from p2d_ray.scoring.select import lower_bounds, pivots

    rng = np.random.default_rng(0)
    shards = [np.round(rng.normal(size=n), 1) for n in (1000, 37, 5000, 1)]
    allv = np.concatenate(shards)
    for ascending in (False, True):
        stats = [{"s": [len(v), len(v), pivots(pa.array(v), ascending, 16)]} for v in shards]
        for k in (1, 10, 600, len(allv)):
            bound = lower_bounds(stats, {"s": k}, ascending)["s"]
            kth = np.sort(allv)[k - 1] if ascending else np.sort(allv)[::-1][k - 1]
            assert (kth <= bound) if ascending else (kth >= bound), (ascending, k, kth, bound)
            assert ((allv <= bound) if ascending else (allv >= bound)).sum() >= k
