"""Model loading (safe defaults) and attention geometry for every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from p2d_ray.config import ModelConfig
from p2d_ray.models.geometry import (
    UnsupportedModelError,
    attention_geometry,
    head_params,
    output_projections,
    slice_weight,
)
from p2d_ray.models.loading import load_model, model_fingerprint, resolve_device, resolve_dtype

# family -> (n_layers, n_heads, n_kv_heads, head_dim, hidden): what save_tiny_model builds.
EXPECTED = {
    "llama": (2, 4, 2, 16, 64),
    "mistral": (2, 4, 2, 16, 64),
    "qwen2": (2, 4, 2, 16, 64),
    "gpt2": (2, 4, 4, 16, 64),
    "gpt_neox": (2, 4, 4, 16, 64),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_model(root / family, family) for family in EXPECTED}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_supported_family_loads_with_geometry(tiny_models, family):
    model = load_model(ModelConfig(name_or_path=tiny_models[family]))
    geo = attention_geometry(model)
    assert geo.family == family
    assert (geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim, geo.hidden_size) == EXPECTED[family]
    assert len(output_projections(model)) == geo.n_layers
    # Every head's q/k/v/o slices have the head's shape: D rows (or columns) of hidden entries.
    for layer in range(geo.n_layers):
        for head in range(geo.n_heads):
            hp = head_params(model, geo, layer, head)
            for ws in (hp.q, hp.k, hp.v, hp.o):
                assert slice_weight(ws).numel() == geo.head_dim * geo.hidden_size
    assert next(model.parameters()).dtype == torch.float32  # auto dtype on CPU
    assert not model.training


def test_qwen3_head_dim_from_config(tmp_path):
    """Qwen3 sets head_dim independently of hidden/heads: o_proj takes H*head_dim, not hidden."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    model = load_model(ModelConfig(name_or_path=str(tmp_path)))
    geo = attention_geometry(model)
    assert (geo.family, geo.n_heads, geo.n_kv_heads, geo.head_dim, geo.hidden_size) == ("qwen3", 4, 1, 24, 32)
    assert [geo.kv_group(h) for h in range(4)] == [0, 0, 0, 0]
    hp = head_params(model, geo, 0, 3)
    assert (hp.q.start, hp.q.stop, hp.k.start, hp.k.stop, hp.o.start, hp.o.stop) == (72, 96, 0, 24, 72, 96)


def test_gqa_kv_group_slices(tiny_models):
    model = load_model(ModelConfig(name_or_path=tiny_models["llama"]))
    geo = attention_geometry(model)
    assert [geo.kv_group(h) for h in range(4)] == [0, 0, 1, 1]  # transformers' repeat_kv order
    hp = head_params(model, geo, 1, 3)
    assert (hp.k.start, hp.k.stop) == (16, 32) and (hp.v.start, hp.v.stop) == (16, 32)
    assert (hp.q.start, hp.q.stop) == (48, 64) and hp.o.dim == 1


def test_unsupported_family_names_it(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(
        OPTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=64,
            vocab_size=64,
            word_embed_proj_dim=32,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"model family 'opt' is not supported; supported: llama"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_safetensors_only_refuses_pickle_checkpoint(tiny_models, tmp_path):
    """transformers 5 always writes safetensors, so build a pickle-only checkpoint by hand."""
    src = Path(tiny_models["llama"])
    ref = load_model(ModelConfig(name_or_path=str(src)))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="no safetensors weights found.*use_safetensors=false"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    opted_in = load_model(ModelConfig(name_or_path=str(tmp_path), use_safetensors=False))
    assert torch.equal(opted_in.lm_head.weight, ref.lm_head.weight)


def test_trust_remote_code_off_by_default(tiny_models, tmp_path):
    """A checkpoint shipping its own modelling code is loaded with the library's class; its code never runs."""
    assert ModelConfig().trust_remote_code is False and ModelConfig().use_safetensors is True
    src = Path(tiny_models["llama"])
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "remote_code_ran"
    (tmp_path / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def test_device_and_dtype_resolved_in_one_place():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_model_fingerprint_tracks_weights(tmp_path):
    a = save_tiny_model(tmp_path / "a", "llama", seed=0)
    b = save_tiny_model(tmp_path / "b", "llama", seed=1)
    fa = model_fingerprint(ModelConfig(name_or_path=a))
    assert fa == model_fingerprint(ModelConfig(name_or_path=a))
    assert fa != model_fingerprint(ModelConfig(name_or_path=b))


def test_model_fingerprint_ignores_the_cache_build_record(tmp_path):
    """Two conversions of the same weights differ only in the cache's build record (timings): same model.
    Seen: every `make install` re-converted SmolLM2 to a new fingerprint, so a heads.json from another
    install was refused as "other weights"."""
    from p2d_ray.assets.cache import META_FILE

    a = save_tiny_model(tmp_path / "a", "llama", seed=0)
    before = model_fingerprint(ModelConfig(name_or_path=a))
    (Path(a) / META_FILE).write_text('{"recipe_hash": "x", "convert_seconds": 34.4}')
    assert model_fingerprint(ModelConfig(name_or_path=a)) == before
    (Path(a) / META_FILE).write_text('{"recipe_hash": "x", "convert_seconds": 35.1}')
    assert model_fingerprint(ModelConfig(name_or_path=a)) == before
    cfg = json.loads((Path(a) / "config.json").read_text())
    (Path(a) / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    assert model_fingerprint(ModelConfig(name_or_path=a)) != before
