"""Outputs open in one call: a scored and selected tiny run's scores/, subset/ and quarantine/ load with
``datasets.load_dataset(dir)`` and ``pandas.read_parquet(dir)``; markers and the manifest live beside them."""

from __future__ import annotations

import json
import shutil

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2d_ray.config import build_config
from p2d_ray.scoring.pipeline import run_score
from p2d_ray.scoring.select import run_select

pytestmark = pytest.mark.ray


def _rows(start: int, n: int) -> list[dict]:
    tasks = ("math", "chat", "code")
    return [
        {
            "id": i,
            "text": f"row {i}: " + "word " * (i % 7 + 1),
            "task": tasks[i % 3],
            "is_clean_on_task": i % 3 == 0,
        }
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def scored(ray_local, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    corpus = root / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(0, 30)), corpus / "a.parquet", row_group_size=15)
    bad = _rows(30, 10) + [{"id": 99, "text": "", "task": "chat", "is_clean_on_task": False}]  # quarantined
    pq.write_table(pa.Table.from_pylist(bad), corpus / "b.parquet")
    cfg = build_config(
        {
            "run_dir": str(root / "run"),
            "model": {"name_or_path": tiny_llama},
            "data": {"corpus_path": str(corpus), "max_length": 32},
            "score": {"scorer": "perplexity", "batch_size": 8, "min_actors": 1, "max_actors": 1},
            "select": {"fraction": 0.25, "score_column": "loss_full", "ascending": True},
        }
    )
    out = run_score(cfg)
    assert out["rows_in"] == 41 and out["rows_scored"] == 40 and out["rows_quarantined"] == 1, out
    run_select(cfg)
    return root / "run", cfg


def test_outputs_load_with_datasets_and_pandas(scored):
    run, _ = scored
    scores = datasets.load_dataset(str(run / "scores"), split="train")
    assert scores.num_rows == 40 and {"id", "score", "loss_full"} <= set(scores.column_names)
    assert sorted(scores["id"]) == list(range(40))
    subset = datasets.load_dataset(str(run / "subset"), split="train")
    assert subset.num_rows == 10 and {"id", "text", "task", "loss_full"} <= set(subset.column_names)
    quarantine = datasets.load_dataset(str(run / "quarantine"), split="train")
    assert quarantine.num_rows == 1 and quarantine["reason"] == ["empty"]
    assert len(pd.read_parquet(run / "scores")) == 40 and len(pd.read_parquet(run / "subset")) == 10

    # Data directories hold data only; the bookkeeping sits beside them.
    for d in ("scores", "subset", "quarantine"):
        assert all(p.suffix == ".parquet" for p in (run / d).iterdir()), list((run / d).iterdir())
    state = run / "_state" / "scores"
    manifest = json.loads((state / "manifest.json").read_text())
    assert len(list((state / "done").glob("*.json"))) == len(manifest["shards"]) == 3


def test_histogram_colours_rows_by_the_label(scored):
    from p2d_ray.report.histogram import _groups

    run, cfg = scored
    assert (run / "histogram.png").stat().st_size > 10_000  # a drawn figure, not an empty canvas
    column, groups = _groups(cfg.data.corpus_path, "id", pa.array([0, 1, 3, 99]))
    assert column == "is_clean_on_task" and groups.to_pylist() == [
        "on-task",
        "off-task",
        "on-task",
        "off-task",
    ]


def test_old_layout_still_resumes(scored, tmp_path):
    """A run made when the markers lived inside scores/ is moved to the new layout and resumes as done."""
    run, cfg = scored
    old = tmp_path / "run"
    shutil.copytree(run, old)
    shutil.move(old / "_state" / "scores" / "manifest.json", old / "scores" / "_manifest.json")
    shutil.move(old / "_state" / "scores" / "done", old / "scores" / "_done")
    shutil.rmtree(old / "_state")
    out = run_score(cfg.model_copy(update={"run_dir": str(old)}))
    assert out["rows_scored"] == 40
    stats = json.loads((old / "score_stats.json").read_text())
    assert stats["shards"]["already_done"] == 3 and stats["shards"]["scored_this_run"] == 0
    assert not (old / "scores" / "_done").exists() and (old / "_state" / "scores" / "manifest.json").is_file()
