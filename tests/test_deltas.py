"""Head deltas (plain torch, no Ray): only the selected heads' slices learn, GQA groups are trained once,
the optimizer holds only deltas, hooks equal merged weights, for every supported family."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import save_tiny_model
from helpers import assert_only_heads_moved

from p2d_ray.config import DataConfig
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry
from p2d_ray.training.deltas import (
    HeadDelta,
    attach_head_deltas,
    merge_head_deltas,
    plan_head_deltas,
    trainable_parameters,
)
from p2d_ray.training.loop import encode_rows, forward_loss


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tokens(seed: int = 0, B: int = 3, T: int = 12, vocab: int = 200) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_gqa_group_trained_once_and_optimizer_holds_only_deltas(tiny_llama):
    model = _load(tiny_llama)
    geo = attention_geometry(model)  # 4 query heads, 2 kv heads: heads 0 and 1 share kv group 0
    d = geo.head_dim
    heads = HeadSet(((0, 0), (0, 1), (1, 3)), geo)
    specs = {s.module_name: s for s in plan_head_deltas(model, heads)}
    k0 = specs["model.layers.0.self_attn.k_proj"]
    assert k0.index == tuple(range(0, d)), "shared kv group 0 must appear once (D rows, not 2D)"
    assert specs["model.layers.0.self_attn.q_proj"].index == tuple(range(0, 2 * d))
    assert specs["model.layers.1.self_attn.v_proj"].index == tuple(range(d, 2 * d))  # head 3 -> group 1
    assert specs["model.layers.1.self_attn.o_proj"].axis == "cols"
    assert specs["model.layers.1.self_attn.o_proj"].index == tuple(range(3 * d, 4 * d))
    assert len(specs) == 8  # q/k/v/o in both layers

    deltas = attach_head_deltas(model, heads)
    params = trainable_parameters(model)
    assert {id(p) for p in params} == {id(hd.delta) for hd in deltas}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    hidden = geo.hidden_size
    # q and o: 3 heads x D rows/columns; k and v: 2 (layer, kv group) pairs x D rows (not 3).
    assert len(heads.kv_groups()) == 2
    expected = (3 + 2 + 2 + 3) * d * hidden
    assert n_opt == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if "head_delta" not in n)

    no_o = plan_head_deltas(_load(tiny_llama), heads, train_o_proj=False)
    assert all(s.axis == "rows" for s in no_o) and len(no_o) == 6


def test_training_moves_only_selected_slices_and_loss_falls(tiny_llama):
    base = _load(tiny_llama)
    model = _load(tiny_llama)
    geo = attention_geometry(model)
    heads = HeadSet(((0, 1), (1, 0), (1, 1)), geo)
    attach_head_deltas(model, heads)
    with torch.no_grad():  # zero-initialised deltas: exactly the base model
        x = _tokens()
        assert torch.equal(model(**x).logits, base(**x).logits)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"prompt": f"Q{i}: add {i} and {i + 1}.", "response": f" {2 * i + 1}"} for i in range(8)]
    batch = encode_rows(rows, tok, DataConfig(), "prompt_response", Counter())
    # Weight decay on: it must still never touch a frozen weight (only deltas are in the optimizer).
    opt = torch.optim.AdamW(trainable_parameters(model), lr=5e-3, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(15):
        loss = forward_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    model.eval()
    with torch.no_grad():
        hooked = model(**x).logits
    merge_head_deltas(model)
    assert not any(isinstance(m, HeadDelta) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, hooked, atol=1e-5, rtol=1e-5)
    assert {n for n, _ in base.named_parameters()} == {n for n, _ in model.named_parameters()}
    assert_only_heads_moved(model, base, heads)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2"])
def test_fused_and_biased_families_merge_equals_hooks(tmp_path, family):
    path = save_tiny_model(tmp_path / family, family)
    model, base = _load(path), _load(path)
    geo = attention_geometry(model)
    heads = HeadSet(((0, 2), (1, 0), (1, 3)), geo)
    deltas = attach_head_deltas(model, heads)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for hd in deltas:
            hd.delta.copy_(0.05 * torch.randn(hd.delta.shape, generator=g))
        x = _tokens(vocab=200)
        hooked = model(**x).logits
        assert not torch.allclose(hooked, base(**x).logits, atol=1e-3)
        merge_head_deltas(model)
        torch.testing.assert_close(model(**x).logits, hooked, atol=1e-5, rtol=1e-5)
    assert_only_heads_moved(model, base, heads)


def test_heads_from_another_model_are_rejected(tiny_llama, tmp_path):
    other = _load(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    heads = HeadSet(((0, 0),), attention_geometry(other))
    with pytest.raises(ValueError, match="geometry"):
        plan_head_deltas(_load(tiny_llama), heads)
