"""The demo model: a small variant of the real recipe, built once in a temp cache, through the same code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from p2d_ray.assets import demo_model as demo
from p2d_ray.config import ModelConfig
from p2d_ray.models.geometry import attention_geometry
from p2d_ray.models.loading import load_model, load_tokenizer

# Same code path as the real recipe, scaled down so the build takes seconds.
SMALL = dict(
    demo.DEMO_RECIPE,
    steps=60,
    batch_size=16,
    warmup=5,
    n_train_rows=2000,
    vocab_size=384,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_size=64,
    intermediate_size=128,
    threads=1,
    n_eval=50,
    n_exact=5,
)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """``$P2D_RAY_CACHE`` pointing at a temp dir whose ``demo/model`` was built by ensure_demo_model with
    the small recipe; kept for the whole module so ``p2d-demo`` resolves there."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("P2D_RAY_CACHE", str(cache))
        mp.setattr(demo, "DEMO_RECIPE", SMALL)
        path = demo.ensure_demo_model()
        yield cache, path


def test_built_where_the_cache_says_with_safetensors(demo_cache):
    cache, path = demo_cache
    assert path == cache / "demo" / "model"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # no pickle weights
    assert any(k.endswith("self_attn.o_proj.weight") for k in load_file(path / "model.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["recipe"]["steps"] == SMALL["steps"]


def test_p2d_demo_name_loads_the_cached_model(demo_cache):
    _, path = demo_cache
    stamp = (path / "meta.json").stat().st_mtime_ns
    model = load_model(ModelConfig(name_or_path="p2d-demo", device="cpu"))
    tok = load_tokenizer(ModelConfig(name_or_path="p2d-demo"))
    assert (path / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    geo = attention_geometry(model)
    assert (geo.family, geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim) == ("llama", 2, 4, 2, 16)
    assert model.config.vocab_size == len(tok) <= SMALL["vocab_size"]
    text = "Tom has 3 apples and gets 4 more. How many apples does Tom have now?\n3 + 4 = 7. #### 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # BPE trained on the mixture: far shorter than bytes (44 tokens for these 86 bytes with the two-target
    # generator's wider vocabulary at vocab 384; 1 token per byte without merges)
    assert len(ids) < 0.6 * len(text)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_pretraining_lowers_training_and_heldout_loss(demo_cache):
    _, path = demo_cache
    meta = json.loads((path / "meta.json").read_text())
    assert len(meta["loss_curve"]) == 10
    assert meta["mixture_loss_after"] < 0.8 * meta["mixture_loss_before"], meta
    assert meta["heldout_arithmetic_loss_after"] < 0.8 * meta["heldout_arithmetic_loss_before"], meta
    assert 0 <= meta["greedy_exact_match"] <= meta["n_exact_match"]


def test_changed_recipe_rebuilds(tmp_path, monkeypatch):
    tiny = dict(SMALL, steps=2, n_train_rows=300, n_eval=10, n_exact=0)
    monkeypatch.setattr(demo, "DEMO_RECIPE", tiny)
    path = demo.ensure_demo_model(tmp_path)
    before = load_file(path / "model.safetensors")
    monkeypatch.setattr(demo, "DEMO_RECIPE", dict(tiny, steps=3))
    assert demo.ensure_demo_model(tmp_path) == path
    assert json.loads((path / "meta.json").read_text())["recipe"]["steps"] == 3
    after = load_file(path / "model.safetensors")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_same_seed_same_weights(tmp_path):
    tiny = dict(SMALL, steps=2, n_train_rows=300, n_eval=10, n_exact=0)
    demo.build_demo_model(tmp_path / "a", **tiny)
    demo.build_demo_model(tmp_path / "b", **tiny)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_bad_knobs_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="n_kv_heads"):
        demo.build_demo_model(tmp_path, **dict(SMALL, n_kv_heads=3))
    with pytest.raises(ValueError, match="n_train_rows"):
        demo.build_demo_model(tmp_path, **dict(SMALL, n_train_rows=4))
