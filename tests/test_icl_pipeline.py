"""icl_attention through the engine (score_corpus on local Ray, real actors): one score or quarantine row per id,
the same scores across runs, actor counts and resumes, and a fingerprint that covers the ICL settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoConfig

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.scoring.pipeline import score_corpus

pytestmark = pytest.mark.ray


def _rows(start, n):
    return [
        {
            "id": i,
            "prompt": f"What is {i} plus {i % 7}{' and more' * (i % 4)}? ",
            "response": f"It is {i + i % 7}." if i != 13 else "  ",
        }
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("icl")
    (d / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(0, 45)), d / "corpus" / "a.parquet", row_group_size=30)
    pq.write_table(pa.Table.from_pylist(_rows(45, 5)), d / "corpus" / "b.parquet")  # smaller than n_d
    probe = [
        {"id": 900 + i, "prompt": f"What is {i} plus 1? ", "response": f"It is {i + 1}."} for i in range(6)
    ]
    pq.write_table(pa.Table.from_pylist(probe), d / "probe.parquet")
    return d


def _cfg(run, model, d, **score):
    HeadSet(((0, 1), (1, 2)), geometry_from_config(AutoConfig.from_pretrained(model))).save(
        Path(run) / "heads.json"
    )
    knobs = {
        "scorer": "icl_attention",
        "icl_demos": 4,
        "icl_queries": 2,
        "icl_repeats": 2,
        "icl_pool": 8,
        "icl_metric": "likelihood",
        "batch_size": 8,
        "max_rows_per_block": 16,
        "min_actors": 1,
        "max_actors": 1,
    }
    return build_config(
        {
            "run_dir": str(run),
            "model": {"name_or_path": model},
            "data": {
                "corpus_path": str(d / "corpus"),
                "probe_path": str(d / "probe.parquet"),
                "max_length": 64,
            },
            "score": {**knobs, **score},
        }
    )


def _scores(run):
    return pq.read_table(Path(run) / "scores").sort_by("id")


def test_icl_attention_one_score_per_id_deterministic(ray_local, tiny_llama, files, tmp_path):
    out = score_corpus(_cfg(tmp_path / "one", tiny_llama, files))
    assert out["rows_in"] == 50 and out["rows_scored"] == 49 and out["quarantine_reasons"] == {"empty": 1}
    one = _scores(tmp_path / "one")
    assert one.column("id").to_pylist() == [i for i in range(50) if i != 13]
    assert pq.read_table(tmp_path / "one" / "quarantine").column("id").to_pylist() == [13]
    assert (one.column("icl_contexts").to_numpy() == 2).all()  # every row in icl_repeats contexts
    w = one.column("icl_weight").to_numpy()
    assert np.isfinite(w).all() and (w > 0).all() and w.std() > 0
    m = one.column("icl_metric").to_numpy()
    assert ((m > 0) & (m < 1)).all()
    np.testing.assert_allclose(one.column("score").to_numpy(), w * m, rtol=0.5)  # score ~ w x m per context

    # Two actors and a different block size (rows_per_block depends on the actor count): same scores.
    two = score_corpus(
        _cfg(tmp_path / "two", tiny_llama, files, min_actors=2, max_actors=2, max_rows_per_block=8)
    )
    # Both actors start; which of them gets blocks is Ray Data's least-busy choice (test_scoring_pipeline).
    assert 1 <= two["actors_used"] <= 2
    b = _scores(tmp_path / "two")
    assert b.column("id").to_pylist() == one.column("id").to_pylist()
    for col in ("score", "icl_weight", "icl_metric"):
        np.testing.assert_allclose(b.column(col).to_numpy(), one.column(col).to_numpy(), rtol=0, atol=1e-5)

    # The ICL settings are part of the fingerprint: a changed seed must not mix with the stored scores.
    with pytest.raises(ValueError, match="fingerprint|different|config"):
        score_corpus(_cfg(tmp_path / "one", tiny_llama, files, icl_seed=1))
    other = _cfg(tmp_path / "seed1", tiny_llama, files, icl_seed=1)
    score_corpus(other)
    assert not np.allclose(
        _scores(tmp_path / "seed1").column("score").to_numpy(), one.column("score").to_numpy()
    )


def test_icl_attention_rejects_contexts_longer_than_the_model(tiny_llama, files, tmp_path):
    from p2d_ray.scoring.plan import plan_score

    with pytest.raises(ValueError, match="context length"):
        plan_score(_cfg(tmp_path, tiny_llama, files, icl_demos=16))
