"""Export: head deltas as safetensors round-trip, and the same update as a standard PEFT LoRA adapter that
``PeftModel.from_pretrained`` loads to our trained model's logits (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry
from p2d_ray.training.deltas import attach_from_specs, attach_head_deltas, delta_state, load_delta_values
from p2d_ray.training.export import (
    head_deltas_to_lora,
    load_head_deltas,
    save_head_deltas,
    save_peft_from_deltas,
)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_peft_adapter_reproduces_head_delta_logits(tmp_path, family):
    path = save_tiny_model(tmp_path / "base", family)
    model = _load(path)
    geo = attention_geometry(model)
    heads = HeadSet(((0, 0), (0, 1), (1, 3)), geo)  # llama: heads 0 and 1 share a kv group
    deltas = attach_head_deltas(model, heads)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hd in deltas:  # stand-in for trained values: large enough to change the logits clearly
            hd.delta.copy_(0.1 * torch.randn(hd.delta.shape, generator=g))
    specs, values = delta_state(model)
    for s in specs:  # B @ A is exactly the scattered delta
        a, b = head_deltas_to_lora(specs, values)[s.module_name]
        dense = torch.zeros(s.out_features, s.in_features)
        idx = torch.tensor(s.index)
        if s.axis == "rows":
            dense[idx] = values[s.module_name]
        else:
            dense[:, idx] = values[s.module_name]
        assert torch.equal(b @ a, dense)

    heads_dir = save_head_deltas(specs, values, heads, tmp_path / "adapter" / "heads")
    peft_dir = save_peft_from_deltas(
        specs, values, tmp_path / "adapter" / "peft", path, fan_in_fan_out=family == "gpt2"
    )
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["rank_pattern"]) == {s.module_name for s in specs}
    assert cfg["base_model_name_or_path"] == path  # as named by the caller
    assert "library_name: peft" in (peft_dir / "README.md").read_text()  # PEFT's own model card
    assert all(cfg["alpha_pattern"][k] == v for k, v in cfg["rank_pattern"].items())  # scale 1

    x = torch.randint(5, 200, (2, 16), generator=g)
    with torch.no_grad():
        ours = model(input_ids=x).logits
        base_logits = _load(path)(input_ids=x).logits
        peft_model = PeftModel.from_pretrained(_load(path), str(peft_dir)).eval()
        theirs = peft_model(input_ids=x).logits
    assert (ours - base_logits).abs().max() > 1e-2, (
        "the update must matter for the comparison to mean anything"
    )
    assert (ours - theirs).abs().max().item() <= 1e-4

    # The head-delta files round-trip into a fresh model and are tiny.
    specs2, values2, heads2 = load_head_deltas(heads_dir)
    assert specs2 == specs and heads2.heads == heads.heads
    fresh = _load(path)
    attach_from_specs(fresh, specs2)
    load_delta_values(fresh, values2)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=x).logits, ours)
    assert sum(f.stat().st_size for f in heads_dir.iterdir()) < 1_000_000


def test_load_rejects_deltas_for_another_model(tmp_path):
    llama = _load(save_tiny_model(tmp_path / "llama", "llama"))
    heads = HeadSet(((0, 0),), attention_geometry(llama))
    attach_head_deltas(llama, heads)
    specs, values = delta_state(llama)
    gpt2 = _load(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    with pytest.raises(ValueError, match="does not have"):
        attach_from_specs(gpt2, specs)


def test_adapter_names_the_base_model_as_the_user_did(tmp_path):
    """Written through PEFT's save_pretrained: the adapter and its model card record the configured name
    (a hub name here), not the local path the weights were read from; PEFT loads it onto that path's model."""
    path = save_tiny_model(tmp_path / "base", "llama")
    model = _load(path)
    heads = HeadSet(((1, 2),), attention_geometry(model))
    attach_head_deltas(model, heads)
    specs, values = delta_state(model)
    values = {k: torch.full_like(v, 0.01) for k, v in values.items()}
    out = save_peft_from_deltas(
        specs,
        values,
        tmp_path / "peft",
        "Qwen/Qwen2.5-0.5B-Instruct",
        hf_config=AutoConfig.from_pretrained(path),
        card="P2D head update of heads L1.H2.",
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    card = (out / "README.md").read_text()
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card and "P2D head update of heads L1.H2." in card
    assert str(tmp_path) not in card + json.dumps(cfg)
    peft_model = PeftModel.from_pretrained(_load(path), str(out))
    lora_a = dict(peft_model.named_parameters())
    name = next(k for k in lora_a if k.endswith("lora_A.default.weight"))
    assert lora_a[name].abs().sum() > 0  # the weights were saved, not the meta model's


def test_lora_export_goes_through_peft_with_the_configured_name(tmp_path):
    """adaptation=lora: the trained adapter is re-saved through PEFT's save_pretrained under the configured
    model name, with a model card, and loads to the trained weights."""
    from peft import LoraConfig, get_peft_model

    from p2d_ray.config import build_config
    from p2d_ray.training.export import export_from_checkpoint

    path = save_tiny_model(tmp_path / "base", "llama")
    trained = get_peft_model(
        _load(path), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    trained.save_pretrained(str(tmp_path / "ckpt" / "peft"))  # what the training worker writes
    cfg = build_config(
        {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": path}, "train": {"adaptation": "lora"}}
    )
    export_from_checkpoint(cfg, tmp_path / "ckpt")
    out = tmp_path / "run" / "adapter" / "peft"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == path
    assert "LoRA (r=2)" in (out / "README.md").read_text()
    x = torch.randint(5, 200, (1, 12))
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(_load(path), str(out)).eval()
        assert torch.allclose(reloaded(input_ids=x).logits, trained.eval()(input_ids=x).logits, atol=1e-5)
