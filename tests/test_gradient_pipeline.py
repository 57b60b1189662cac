"""gradient_alignment through the real Ray scoring pipeline: one score per id, equal to the in-process scorer,
the probe gradient computed once and reused, and its fingerprint guarding a resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import task_or_item_rows
from transformers import AutoConfig, AutoModelForCausalLM

from p2d_ray.config import DataConfig, ModelConfig, build_config
from p2d_ray.data.formatting import collate, encode_row
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.models.loading import load_tokenizer
from p2d_ray.scoring.gradient import DERIVATIVE_COL, FILENAME, ProbeGradient
from p2d_ray.scoring.outputs import read_provenance
from p2d_ray.scoring.pipeline import run_score
from p2d_ray.scoring.scorers import build_scorer

pytestmark = pytest.mark.ray
HEADS = ((1, 0), (1, 3))  # layer 1 of 2: the scorer re-runs one layer per shifted pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("galign")
    corpus = d / "corpus"
    corpus.mkdir()
    pq.write_table(
        pa.Table.from_pylist(task_or_item_rows(0, 30, True) + task_or_item_rows(30, 20, False)),
        corpus / "a.parquet",
        row_group_size=25,
    )
    probe = d / "probe.jsonl"
    probe.write_text("\n".join(json.dumps(r) for r in task_or_item_rows(1000, 12, True)))
    return corpus, probe


def _cfg(run_dir, model, corpus, probe, heads=HEADS, **score):
    HeadSet(heads, geometry_from_config(AutoConfig.from_pretrained(model))).save(Path(run_dir) / "heads.json")
    knobs = {"batch_size": 8, "bucket_batches": 2, "max_rows_per_block": 20, "min_actors": 2, "max_actors": 2}
    return build_config(
        {
            "run_dir": str(run_dir),
            "model": {"name_or_path": model},
            "data": {"corpus_path": str(corpus), "probe_path": str(probe), "max_length": 64},
            "score": {"scorer": "gradient_alignment", **knobs, **score},
        }
    )


def test_gradient_alignment_on_ray_equals_in_process(ray_local, tiny_llama, setup, tmp_path):
    corpus, probe = setup
    out = run_score(_cfg(tmp_path, tiny_llama, corpus, probe))
    # Both actors start; which of them gets blocks is Ray Data's least-busy choice: a loaded machine that
    # tokenizes slower than one tiny-model actor scores rightly gives every block to it (test_scoring_pipeline).
    assert out["rows_in"] == out["rows_scored"] == 50 and 1 <= out["actors_used"] <= 2, out
    got = pq.read_table(tmp_path / "scores").sort_by("id")
    assert got.column("id").to_pylist() == list(range(50)), "one score per id"
    assert got.column("score").null_count == 0 and got.column(DERIVATIVE_COL).null_count == 0
    pg = ProbeGradient.load(tmp_path / FILENAME)
    meta = read_provenance(next((tmp_path / "scores").glob("*.parquet")))
    assert meta["probe_gradient_fingerprint"] == pg.fingerprint and pg.first_layer == 1
    stats = json.loads((tmp_path / "score_stats.json").read_text())
    assert stats["wall_s"]["probe_gradient"] > 0

    # In process, same rows, same G: the same numbers (finite differences of fp32 losses: tolerance 1e-4).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_llama))
    heads = HeadSet(HEADS, geometry_from_config(model.config))
    fn = build_scorer("gradient_alignment", model, heads, probe_gradient=pg)
    rows = pq.read_table(corpus).sort_by("id").to_pylist()
    enc = [encode_row(r, tok, DataConfig(max_length=64), "prompt_response") for r in rows]
    ref = fn(collate(enc, tok.pad_token_id))
    np.testing.assert_allclose(got.column("loss_full").to_numpy(), ref.loss_full.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        got.column(DERIVATIVE_COL).to_numpy(), ref.extra[DERIVATIVE_COL].numpy(), rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(got.column("score").to_numpy(), ref.score.numpy(), rtol=0, atol=1e-4)
    assert float(torch.as_tensor(got.column("score").to_numpy()).abs().max()) > 1e-3

    # The probe gradient is reused (same fingerprint: not recomputed) and guards a resume: other heads
    # (the random-heads control lives in another run dir) or another eps refuse to mix.
    mtime = (tmp_path / FILENAME).stat().st_mtime_ns
    run_score(_cfg(tmp_path, tiny_llama, corpus, probe))  # every shard done: nothing to do
    assert (tmp_path / FILENAME).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="different configuration"):
        run_score(_cfg(tmp_path, tiny_llama, corpus, probe, alignment_eps=0.1))
    with pytest.raises(ValueError, match="different configuration"):
        run_score(_cfg(tmp_path, tiny_llama, corpus, probe, heads=((1, 1), (1, 2))))
