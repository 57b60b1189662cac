"""Export: head deltas as safetensors round-trip, and the same update as a standard PEFT LoRA adapter that
``PeftModel.from_pretrained`` loads to our trained model's logits (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM

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
