"""The PEFT adapter loads by itself (issue 26, item 2): ``adapter_config.json`` names a base PEFT can load
offline on the training machine (a project asset's converted directory, a local directory, or a hub id with
its revision), never our short name; our short name stays in our manifest; the model card says what the
adapter is (base, heads, selection, run config, eval numbers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry
from p2d_ray.training.deltas import attach_head_deltas, delta_state
from p2d_ray.training.export import export_from_checkpoint, load_adapted_model, save_head_deltas
from p2d_ray.training.model_card import describe_base, peft_base, write_model_card


def test_auto_peft_model_loads_the_exported_adapter_offline_to_our_logits(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: nothing may come from the network
    path = save_tiny_model(tmp_path / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    heads = HeadSet(((0, 1), (1, 3)), attention_geometry(model))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hd in attach_head_deltas(model, heads):  # stand-in for trained values
            hd.delta.copy_(0.1 * torch.randn(hd.delta.shape, generator=g))
    specs, values = delta_state(model)
    save_head_deltas(specs, values, heads, tmp_path / "ckpt" / "heads")  # what the training worker exports
    run = tmp_path / "run"
    cfg = build_config({"run_dir": str(run), "model": {"name_or_path": path, "dtype": "float32"}})
    run.mkdir()
    (run / "eval.json").write_text(
        json.dumps(
            {
                "n_samples": 8,
                "variants": ["base", "adapted"],
                "base": {"loss": 1.5, "perplexity": 4.48, "exact_match": 0.25, "n_correct": 2},
                "adapted": {"loss": 0.5, "perplexity": 1.65, "exact_match": 0.75, "n_correct": 6},
            }
        )
    )
    manifest = export_from_checkpoint(cfg, tmp_path / "ckpt")
    peft_dir = run / "adapter" / "peft"
    adapter_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(Path(path).resolve())
    assert manifest["base_model"] == path

    x = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        standalone = AutoPeftModelForCausalLM.from_pretrained(str(peft_dir), dtype=torch.float32).eval()
        ours = load_adapted_model(cfg)
        assert torch.allclose(standalone(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5)

    card = (peft_dir / "README.md").read_text()
    assert "More Information Needed" not in card
    for part in ("## Base model", "L0.H1, L1.H3", "## Data selection", "`train.lr=", "| adapted | 0.5000"):
        assert part in card, part
    assert "base_model:" not in card and "hub" not in card  # a local base: nothing claims a hub checkpoint
    assert write_model_card(cfg) == peft_dir / "README.md"


def test_a_hub_base_is_named_with_its_revision():
    cfg = build_config({"model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "7ae557604"}})
    assert peft_base(cfg) == ("Qwen/Qwen2.5-0.5B-Instruct", "7ae557604")
    assert "revision `7ae557604`" in describe_base(cfg)


@pytest.mark.real_model
def test_our_smollm2_is_named_by_its_converted_directory_never_as_the_hub_checkpoint():
    cfg = build_config({"model": {"name_or_path": "smollm2-135m"}})
    base, revision = peft_base(cfg)
    assert Path(base).is_dir() and (Path(base) / "config.json").is_file() and revision is None
    assert "HuggingFaceTB" not in base
    text = describe_base(cfg)
    assert "de-quantised" in text and "not the Hugging Face hub checkpoint's" in text
