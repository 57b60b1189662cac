"""score.strategy=distilled (scoring/distill.py, features.py, regressor.py): the truncated forward, the sample, the regressor, and the
strategy end to end through the engine on Ray with the tiny model (ids once, resume, fingerprints, the gate)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import save_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.scoring.distill import CASCADE_REGRESSOR_FILE, FIDELITY_FILE, REGRESSOR_FILE, pick_rows
from p2d_ray.scoring.features import (
    cascade_layer,
    pool_features,
    pool_features_all,
    truncated_hidden,
    truncated_hiddens,
)
from p2d_ray.scoring.pipeline import run_score
from p2d_ray.scoring.regressor import Regressor, fit_regressor, spearman

HEADS = ((1, 0), (1, 3))


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory) -> str:
    """The tiny Llama with 3 layers: room for a cascade (l_f = 1 < l_c = 2 < L = 3)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny3"), "llama", num_hidden_layers=3)


# -- no Ray ---------------------------------------------------------------------------------------------
def test_truncated_forward_equals_full_models_hidden_state(tiny3):
    model = AutoModelForCausalLM.from_pretrained(tiny3).eval()
    ids = torch.randint(3, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    calls = []
    top = model.model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        h1 = truncated_hidden(model, ids, mask, 1)
        h1b, h2 = truncated_hiddens(model, ids, mask, [1, 2])  # the cascade's two layers, one forward
    top.remove()
    assert not calls, "the forward ran past layer l_f"
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(h1, ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(h1b, ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(h2, ref[2], rtol=0, atol=1e-6)
    f = pool_features(h1, mask)
    assert f.shape == (3, 2 * h1.shape[-1] + 1)
    lm = torch.zeros_like(mask)
    lm[:, 4:7] = 1  # the response tokens
    fa = pool_features_all(h1, mask, lm)  # the cascade's: + response-token mean, last token
    e = h1.shape[-1]
    torch.testing.assert_close(fa[:, : 2 * e + 1], f)
    torch.testing.assert_close(fa[1, 2 * e + 1 : 3 * e + 1], h1[1, 4:7].mean(0))
    torch.testing.assert_close(fa[1, 3 * e + 1 :], h1[1, 6]) and torch.testing.assert_close(
        fa[0, -e:], h1[0, 10]
    )
    torch.testing.assert_close(f[1, : h1.shape[-1]], h1[1, :7].mean(0))
    assert float(f[1, -1]) == pytest.approx(np.log(7))


def test_sample_is_seeded_stratified_and_audit_disjoint():
    shards = [("a", 100), ("b", 300), ("c", 600)]
    s = pick_rows(shards, 100, seed=3)
    assert {k: len(v) for k, v in s.items()} == {0: 10, 1: 30, 2: 60}
    assert all(np.array_equal(s[k], pick_rows(shards, 100, seed=3)[k]) for k in s)
    a = pick_rows(shards, 50, seed=4, exclude=s)
    assert sum(len(v) for v in a.values()) == 50
    assert all(not set(a[k]) & set(s.get(k, ())) for k in a)


def test_ridge_recovers_a_linear_score_and_round_trips():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 40))
    y = X[:, :3] @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=120)
    reg, cv = fit_regressor(X, y, folds=5, seed=0, top_fraction=0.1, ood_factor=1.5)
    assert cv["spearman"] > 0.9 and cv["top_recall"] >= 0.5
    Xt = rng.normal(size=(50, 40))
    pred, _, ood = Regressor.from_bytes(reg.to_bytes()).predict(Xt)
    assert spearman(Xt[:, :3] @ np.array([1.0, -2.0, 0.5]), pred) > 0.9
    assert not ood.any()
    assert reg.predict(Xt * 20)[2].all(), "rows far from the sample are flagged"
    # block-balanced: each z-scored block weighted 1 / sqrt(width), i.e. its std scaled by sqrt(width)
    regb, cvb = fit_regressor(X, y, folds=5, seed=0, top_fraction=0.1, ood_factor=1.5, blocks=[3, 37])
    np.testing.assert_allclose(regb.std, reg.std * np.r_[np.full(3, np.sqrt(3)), np.full(37, np.sqrt(37))])
    assert cvb["spearman"] > 0.9


def test_strategy_resolution_keeps_the_demo_exact():
    from types import SimpleNamespace

    from p2d_ray.config import ScoreConfig, SelectConfig
    from p2d_ray.scoring.distill import cascade_needed, refine_rows
    from p2d_ray.scoring.plan import resolve_strategy

    hf = SimpleNamespace(num_hidden_layers=30)
    SEL = SelectConfig()
    assert resolve_strategy(ScoreConfig(), 300, hf, [SEL])[0] == "exact"  # the demo: below distill_min_rows
    strategy, why = resolve_strategy(ScoreConfig(), 100_000, hf, [SEL])
    assert strategy == "distilled" and "2,000 scored exactly" in why and "layer 3" in why
    # the sample would be the whole corpus
    assert resolve_strategy(ScoreConfig(strategy="distilled"), 1_100, hf, [SEL])[0] == "exact"
    assert resolve_strategy(ScoreConfig(scorer="perplexity"), 100_000, hf, [SEL])[0] == "exact"
    with pytest.raises(ValueError, match="noop"):
        resolve_strategy(ScoreConfig(scorer="noop", strategy="distilled"), 100_000, hf, [SEL])
    # the refine band: by default the selection's band (band_factor x k, per target); a fraction caps it
    assert refine_rows(ScoreConfig(), SEL, 100_000) == 15_000 and "top 15,000 rescored exactly" in why
    assert refine_rows(ScoreConfig(), SelectConfig(top_k=101), 100_000) == 152
    assert refine_rows(ScoreConfig(refine_fraction=0.05), SEL, 100_000) == 5_000
    # the cascade runs only where it can change what is refined: its band (10 %) beyond a refine band
    assert not cascade_needed(ScoreConfig(), [SEL], 100_000) and "again from layer" not in why
    # ... unless some target selects fewer rows (its band is then smaller than the cascade's)
    assert cascade_needed(ScoreConfig(), [SEL, SelectConfig(fraction=0.05)], 100_000)
    low = ScoreConfig(refine_fraction=0.05)
    assert cascade_needed(low, [SEL], 100_000)
    assert "again from layer 15" in resolve_strategy(low, 100_000, hf, [SEL])[1]
    # the cascade's layer: round(L / 2) by default, off on a model too shallow for it or at fraction 0
    assert cascade_layer(ScoreConfig(), hf) == 15
    assert cascade_layer(ScoreConfig(distill_layer=1), SimpleNamespace(num_hidden_layers=2)) is None
    assert cascade_layer(ScoreConfig(distill_cascade_fraction=0), hf) is None
    with pytest.raises(ValueError, match="below the last layer"):
        cascade_layer(ScoreConfig(distill_cascade_layer=30), hf)
    with pytest.raises(ValueError, match="above distill_layer"):
        ScoreConfig(distill_layer=5, distill_cascade_layer=4)


# -- through Ray ------------------------------------------------------------------------------------------
def _rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"id": i, "prompt": f"What is {i} plus {i % 7}? ", "response": f"It is {i + i % 7}."})
        else:
            words = " please" * (i % 5)
            out.append(
                {"id": i, "prompt": f"Tell me about item {i}{words}. ", "response": f"Item {i} is blue."}
            )
    out[5]["response"] = ""  # quarantined (empty)
    return out


def _cfg(run_dir, model, corpus, probe, **score):
    HeadSet(HEADS, geometry_from_config(AutoConfig.from_pretrained(model))).save(Path(run_dir) / "heads.json")
    knobs = {"batch_size": 8, "bucket_batches": 2, "max_rows_per_block": 40, "min_actors": 1, "max_actors": 2}
    distill = {
        "strategy": "distilled",
        "distill_sample_min": 30,
        "distill_audit_rows": 12,
        "refine_fraction": 0.1,
        "distill_layer": 1,
        "distill_cascade_layer": 2,
        "distill_cascade_fraction": 0.25,
        "gate_fallback": "warn",
    }
    return build_config(
        {
            "run_dir": str(run_dir),
            "model": {"name_or_path": model},
            "data": {"corpus_path": str(corpus), "probe_path": str(probe), "max_length": 64},
            "score": {"scorer": "gradient_alignment", **knobs, **distill, **score},
        }
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    corpus = d / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(120)), corpus / "a.parquet", row_group_size=40)
    probe = d / "probe.jsonl"
    probe.write_text("\n".join(json.dumps({"id": 1000 + i, **_rows(30)[i * 3]}) for i in range(8)))
    return corpus, probe


def _outputs(run_dir: Path) -> list[dict]:
    t = pq.read_table(run_dir / "scores").sort_by("id")
    return t.select(["id", "score", "score_source", "predicted_layer", "loss_full"]).to_pylist()


def _part(run_dir: Path, name: str) -> pa.Table:
    """A distilled pass's part files (``_state/distill/<name>/``), all shards."""
    parts = sorted((run_dir / "_state" / "distill" / name).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p, columns=["id", "reason", "score"]) for p in parts])


def _same(a: list[dict], b: list[dict]) -> None:
    """The same rows, sources and exact numbers; a re-predicted shard's scores up to float32 rounding of its
    truncated forward (measured ~1e-9 relative), which never reorders a top band here."""
    assert [(r["id"], r["score_source"], r["predicted_layer"], r["loss_full"]) for r in a] == [
        (r["id"], r["score_source"], r["predicted_layer"], r["loss_full"]) for r in b
    ]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], rtol=1e-6, atol=1e-9)


def _ids_once(run_dir: Path, n: int) -> None:
    scored = pq.read_table(run_dir / "scores").column("id").to_pylist()
    quarantined = pq.read_table(run_dir / "quarantine").column("id").to_pylist()
    assert sorted(scored + quarantined) == list(range(n)), "every id exactly once in scores/ or quarantine/"


@pytest.mark.ray
def test_distilled_end_to_end_resume_and_fingerprints(ray_local, tiny3, setup, tmp_path):
    """With the cascade (layer 1 for every row, layer 2 for the stage-1 top 25 %), on a 3-layer tiny model."""
    corpus, probe = setup
    tiny_llama = tiny3
    # A driver killed while writing the final shards (after the passes), then a rerun: it finishes the rest.
    full = tmp_path / "full"
    done = []

    def stop_after_first(shard):
        done.append(shard.key)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_score(_cfg(full, tiny_llama, corpus, probe), on_shard_done=stop_after_first)
    first = full / "scores" / f"{done[0]}.parquet"
    assert len(done) == 1 and [p.name for p in (full / "scores").glob("*.parquet")] == [first.name]
    written = first.stat().st_mtime_ns
    out = run_score(_cfg(full, tiny_llama, corpus, probe))
    assert first.stat().st_mtime_ns == written, "a finished shard is not redone"
    assert out["strategy"] == "distilled" and out["rows_in"] == 120 and out["rows_quarantined"] == 1
    _ids_once(full, 120)
    got = _outputs(full)
    src = [r["score_source"] for r in got]
    assert set(src) == {"exact", "distilled", "refined"}
    # sample + audit rows exactly (less the empty row if it was picked), the predicted top 10 % refined
    assert src.count("exact") in (41, 42) and src.count("refined") >= 12
    assert all(r["score"] is not None for r in got)
    exact_rows = [r for r in got if r["score_source"] != "distilled"]
    assert all(r["loss_full"] is not None for r in exact_rows), "exact rows keep the scorer's own columns"
    summary = json.loads((full / "score_summary.json").read_text())
    fid = summary["distilled"]
    assert fid["kfold"]["folds"] == 5 and fid["kfold"]["rows"] in (29, 30) and "passed" in fid["gate"]
    assert fid["audit"]["rows"] in (11, 12) and fid["sample_rows"] == 30 and fid["audit_rows_picked"] == 12
    assert fid["score_source"] == {k: src.count(k) for k in ("exact", "distilled", "refined")}
    assert (
        fid["regressor"]["layer"] == 1
        and (full / REGRESSOR_FILE).is_file()
        and (full / FIDELITY_FILE).is_file()
    )
    # the cascade: its own regressor and figures, 30 rows (25 % of 120) re-predicted from layer 2, exactly the
    # stage-1 predicted top 30 of the bulk rows; the refine band (12 rows) from its ranking
    cas = fid["cascade"]
    assert cas["layer"] == 2 and cas["used"] and cas["kfold"]["rows"] in (29, 30) and "passed" in cas["gate"]
    assert cas["audit"]["rows"] in (11, 12) and (full / CASCADE_REGRESSOR_FILE).is_file()
    assert fid["cascade_rows"] == 30 and summary["distilled"]["cascade"]["regressor"]["layer"] == 2
    bulk, cascade = _part(full, "bulk"), _part(full, "cascade")
    ok = bulk.filter(bulk.column("reason").is_null())
    stage1_top = set(ok.sort_by([("score", "descending")]).column("id").to_pylist()[:30])
    assert set(cascade.column("id").to_pylist()) == stage1_top, (
        "the cascade pass touches the stage-1 band only"
    )
    by_layer = {(r["score_source"], r["predicted_layer"]) for r in got}
    assert by_layer == {("exact", None), ("distilled", 1), ("distilled", 2), ("refined", 2)} | (
        {("refined", 1)} & by_layer  # out-of-distribution rows of stage 1 are refined too
    )
    stage2_top = cascade.sort_by([("score", "descending")]).column("id").to_pylist()[:12]
    assert {r["id"] for r in got if r["score_source"] == "refined"} >= set(stage2_top)
    assert {r["id"] for r in got if r["predicted_layer"] == 2} == stage1_top
    stats = json.loads((full / "score_stats.json").read_text())["distill"]["passes"]
    assert (
        stats["cascade"]["rows"] == 30 and stats["cascade"]["layer"] == 2
    )  # (all passes done before the kill)
    killed = full

    # Passes killed part-way (one shard's bulk part, another's cascade part, and their final files gone):
    # only those shards are redone, the output is the same.
    keys = sorted(p.stem for p in (killed / "scores").glob("*.parquet"))
    cascaded = sorted(p.stem for p in (killed / "_state" / "distill" / "cascade").glob("*.parquet"))
    key_b, key_c = keys[1], next(k for k in cascaded if k != keys[1])
    (killed / "_state" / "distill" / "bulk" / "done" / f"{key_b}.json").unlink()
    (killed / "_state" / "distill" / "cascade" / "done" / f"{key_c}.json").unlink()
    for key in (key_b, key_c):
        (killed / "_state" / "scores" / "done" / f"{key}.json").unlink()
    run_score(_cfg(killed, tiny_llama, corpus, probe))
    passes = json.loads((killed / "score_stats.json").read_text())["distill"]["passes"]
    assert passes["sample"]["shards_this_run"] == 0 and passes["bulk"]["shards_this_run"] == 1
    assert passes["cascade"]["shards_this_run"] == 1
    _same(_outputs(killed), got)

    # The strategy is in the fingerprint: another refine band or cascade fraction refuses to mix; after
    # clearing scores it reruns the cascade and refine passes but reuses the sample's exact scores and the bulk.
    with pytest.raises(ValueError, match="different configuration"):
        run_score(_cfg(killed, tiny_llama, corpus, probe, distill_cascade_fraction=0.3))
    shutil.rmtree(killed / "scores"), shutil.rmtree(killed / "quarantine")
    run_score(_cfg(killed, tiny_llama, corpus, probe, refine_fraction=0.2, distill_cascade_fraction=0.3))
    passes = json.loads((killed / "score_stats.json").read_text())["distill"]["passes"]
    assert passes["sample"]["shards_this_run"] == 0 and passes["bulk"]["shards_this_run"] == 0
    assert passes["cascade"]["shards_this_run"] > 0 and passes["refine"]["shards_this_run"] > 0
    assert passes["cascade"]["rows_this_run"] == 36 and passes["cascade"]["busy_s"] > 0  # counted in the cost
    out = _outputs(killed)
    assert [r["score_source"] for r in out].count("refined") >= 24
    assert [r["predicted_layer"] for r in out].count(2) == 36
    _ids_once(killed, 120)

    # The default refine band is the selection's: select.band_factor 1.5 x its k (10 % of 120 = 12) = 18 rows.
    # A cascade band no larger (10 %: 12 rows) could not change which rows are refined, so it does not run,
    # and the sample pass no longer writes its layer's features (a new sample fingerprint: it reruns).
    shutil.rmtree(killed / "scores"), shutil.rmtree(killed / "quarantine")
    run_score(_cfg(killed, tiny_llama, corpus, probe, refine_fraction=None, distill_cascade_fraction=0.1))
    stats = json.loads((killed / "score_stats.json").read_text())["distill"]
    fid = json.loads((killed / FIDELITY_FILE).read_text())
    assert "cascade" not in stats["passes"] and fid["cascade_rows"] == 0 and fid["cascade"] is None
    assert stats["passes"]["sample"]["shards_this_run"] > 0
    out = _outputs(killed)
    assert (
        fid["refine_rows"] >= 18 and [r["score_source"] for r in out].count("refined") == fid["refine_rows"]
    )
    _ids_once(killed, 120)


@pytest.mark.ray
def test_gate_falls_back_to_exact_on_a_corpus_that_defeats_the_regressor(
    ray_local, tiny_llama, setup, tmp_path, capsys
):
    """Rows of random characters, all the same length: nothing in the pooled low-layer features predicts
    their exact scores, the gate fails and every row is scored exactly (score.gate_fallback=exact)."""
    _, probe = setup
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789#!?"
    rows = [
        {
            "id": i,
            "prompt": "".join(rng.choice(alphabet) for _ in range(12)),
            "response": "".join(rng.choice(alphabet) for _ in range(12)),
        }
        for i in range(90)
    ]
    corpus = tmp_path / "noise"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), corpus / "a.parquet", row_group_size=30)
    run = tmp_path / "run"
    # (2 layers: no room for a cascade; the default layer round(L / 2) = l_f turns it off)
    out = run_score(_cfg(run, tiny_llama, corpus, probe, gate_fallback="exact", distill_cascade_layer=None))
    assert out["strategy"] == "distilled"
    fid = json.loads((run / "score_summary.json").read_text())["distilled"]
    assert not fid["gate"]["passed"] and fid["gate"]["fallback"] == "exact", fid
    assert "fidelity gate failed" in capsys.readouterr().out
    got = pq.read_table(run / "scores")
    assert set(got.column("score_source").to_pylist()) == {"exact"} and got.num_rows == 90
    assert got.column("loss_full").null_count == 0
