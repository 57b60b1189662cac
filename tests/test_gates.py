"""Head gates on the attention output projection's input: exactness, uniform mode, cleanup, per-sample gates."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import save_tiny_model

from p2d_ray.config import ModelConfig
from p2d_ray.heads.gates import HeadGates, gated_forward
from p2d_ray.models.geometry import attention_geometry, output_projections, value_projection
from p2d_ray.models.loading import load_model

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gate_families")
    return {family: save_tiny_model(root / family, family, seed=1) for family in FAMILIES}


def _load(path: str, attn: str = "sdpa"):
    return load_model(ModelConfig(name_or_path=path, attn_implementation=attn))


def _batch(seed: int = 0, B: int = 3, T: int = 12, lengths=(12, 7, 4), vocab: int = 256):
    """Right-padded ids [B, T] and attention mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_gates_are_bit_identical(tiny_models, family):
    model = _load(tiny_models[family])
    geo = attention_geometry(model)
    ids, mask = _batch()
    base = _logits(model, ids, mask)
    ones = torch.ones(geo.n_layers, geo.n_heads)
    for mode in ("zero", "uniform"):
        with torch.no_grad():
            gated = gated_forward(model, ids, mask, ones, mode)
        assert torch.equal(gated, base), f"{family} {mode}: max diff {(gated - base).abs().max()}"
    # ...and the gates are really in the graph: closing one head changes the output.
    off = ones.clone()
    off[0, 1] = 0
    with torch.no_grad():
        assert not torch.allclose(gated_forward(model, ids, mask, off, "zero"), base)


def test_gating_a_whole_layer_deletes_its_attention_output(tiny_models):
    """Bias-free o_proj (Llama): all heads of layer 1 off == a hook zeroing o_proj's output."""
    model = _load(tiny_models["llama"])
    geo = attention_geometry(model)
    ids, mask = _batch(seed=2)
    gates = torch.ones(geo.n_layers, geo.n_heads)
    gates[1] = 0
    with torch.no_grad():
        gated = gated_forward(model, ids, mask, gates, "zero")
    handle = output_projections(model)[1].register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        deleted = _logits(model, ids, mask)
    finally:
        handle.remove()
    assert torch.equal(gated, deleted)
    assert not torch.allclose(gated, _logits(model, ids, mask))  # the layer mattered


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_whole_layer_with_output_bias(tiny_models, family):
    """gpt2's c_proj / neox's dense have a bias: gating every head leaves exactly that bias (the gate acts
    on the projection's input), so it equals deleting the attention output only when the bias is zero."""
    model = _load(tiny_models[family])
    geo = attention_geometry(model)
    proj = output_projections(model)[0]
    with torch.no_grad():
        proj.bias.copy_(torch.randn_like(proj.bias, generator=torch.Generator().manual_seed(0)) * 0.5)
    ids, mask = _batch(seed=3)
    gates = torch.ones(geo.n_layers, geo.n_heads)
    gates[0] = 0
    with torch.no_grad():
        gated = gated_forward(model, ids, mask, gates, "zero")

    def run_with(replace):
        handle = proj.register_forward_hook(lambda m, a, out: replace(out))
        try:
            return _logits(model, ids, mask)
        finally:
            handle.remove()

    only_bias = run_with(lambda out: proj.bias.expand_as(out).clone())
    deleted = run_with(torch.zeros_like)
    assert torch.equal(gated, only_bias)
    assert not torch.allclose(gated, deleted)
    with torch.no_grad():
        proj.bias.zero_()
        gated = gated_forward(model, ids, mask, gates, "zero")
    assert torch.equal(gated, run_with(torch.zeros_like))


def _patch_uniform_reference(monkeypatch, family: str, uniform: dict[int, list[int]]) -> None:
    """Make the family's *eager* attention use uniform weights over the causal, unpadded prefix for the
    heads in ``uniform`` (layer -> heads): an independent reference for the gates' ``uniform`` mode."""
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    original = mod.eager_attention_forward

    def patched(module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = original(
            module, query, key, value, attention_mask, *args, **kwargs
        )  # out [B, T, H, D]
        heads = uniform.get(module.layer_idx, [])
        if not heads:
            return out, weights
        _, H, T, _ = query.shape  # query [B, H, T, D]; key/value [B, KV, S, D]
        S = key.shape[2]
        if attention_mask is None:
            allowed = torch.ones(T, S, dtype=torch.bool).tril()[None, None]
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask[..., :S]
        else:  # additive mask: 0 where attending is allowed
            allowed = attention_mask[..., :S] == 0
        w = allowed.to(value.dtype)
        w = w / w.sum(-1, keepdim=True).clamp(
            min=1
        )  # [B, 1, T, S] uniform over allowed keys (left pad: none)
        v = value.repeat_interleave(H // value.shape[1], dim=1)  # GQA: [B, H, S, D]
        ref = (w @ v).transpose(1, 2)  # [B, T, H, D]
        out = out.clone()
        out[:, :, heads] = ref[:, :, heads].to(out.dtype)
        return out, weights

    monkeypatch.setattr(mod, "eager_attention_forward", patched)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_mode_matches_eager_reference(tiny_models, family, monkeypatch):
    """Right and left padding; llama/mistral/qwen2 use GQA (2 query heads per kv head)."""
    uniform = {0: [1, 2], 1: [3]}
    gated_model = _load(tiny_models[family])  # sdpa
    geo = attention_geometry(gated_model)
    gates = torch.ones(geo.n_layers, geo.n_heads)
    for layer, heads in uniform.items():
        gates[layer, heads] = 0
    ref_model = _load(tiny_models[family], "eager")
    _patch_uniform_reference(monkeypatch, family, uniform)
    ids, mask = _batch(seed=4)
    left_ids, left_mask = ids.flip(1), mask.flip(1)  # the same rows, left-padded
    with torch.no_grad():
        gated = gated_forward(gated_model, ids, mask, gates, "uniform")
        zeroed = gated_forward(gated_model, ids, mask, gates, "zero")
        left = gated_forward(gated_model, left_ids, left_mask, gates, "uniform")
    # Right padding: every position, pads included (a pad query averages the real tokens only).
    torch.testing.assert_close(gated, _logits(ref_model, ids, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(zeroed, gated, atol=1e-3)  # uniform is not zero
    # Left padding: pads sit inside real tokens' causal prefix, so they must be left out of the mean.
    real = left_mask.bool()  # a left pad query has no key at all; compare real tokens
    torch.testing.assert_close(
        left[real], _logits(ref_model, left_ids, left_mask)[real], rtol=1e-5, atol=1e-5
    )


def _hook_count(model) -> int:
    n = 0
    for layer, o_proj in enumerate(output_projections(model)):
        v_module = value_projection(model, layer)[0]
        n += len(o_proj._forward_pre_hooks) + len(o_proj._forward_hooks)
        n += len(v_module._forward_pre_hooks) + len(v_module._forward_hooks)
    return n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooks_are_removed_cleanly(tiny_models, family):
    model = _load(tiny_models[family])
    geo = attention_geometry(model)
    ids, mask = _batch(seed=5)
    base = _logits(model, ids, mask)
    gates = torch.zeros(geo.n_layers, geo.n_heads)
    for mode in ("zero", "uniform"):
        with HeadGates(model, gates, mode) as hg:
            hg.attention_mask = mask
            assert _hook_count(model) > 0
            assert not torch.allclose(_logits(model, ids, mask), base)
        assert _hook_count(model) == 0
        assert torch.equal(_logits(model, ids, mask), base)
    with pytest.raises(RuntimeError, match="boom"), HeadGates(model, gates, "uniform"):
        raise RuntimeError("boom")  # an error inside the context still removes the hooks
    assert _hook_count(model) == 0
    assert torch.equal(_logits(model, ids, mask), base)


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_per_sample_gates_equal_separate_runs(tiny_models, mode):
    model = _load(tiny_models["llama"])
    geo = attention_geometry(model)
    ids, mask = _batch(seed=6)
    B = ids.shape[0]
    g = torch.rand(B, geo.n_layers, geo.n_heads, generator=torch.Generator().manual_seed(0))
    g[0, 0, :] = 0.0  # a fully closed layer for sample 0
    with torch.no_grad():
        batched = gated_forward(model, ids, mask, g, mode)  # [B, T, V]
        for i in range(B):
            # Same padded batch, one shared [L, H] pattern: row i must match the per-sample run.
            separate = gated_forward(model, ids, mask, g[i], mode)[i]
            torch.testing.assert_close(batched[i], separate, rtol=0, atol=1e-6)
            # ...and sample i alone, unpadded, agrees on its real tokens.
            n = int(mask[i].sum())
            alone = gated_forward(model, ids[i : i + 1, :n], mask[i : i + 1, :n], g[i], mode)[0]
            torch.testing.assert_close(batched[i, :n], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[1], gated_forward(model, ids, mask, g[0], mode)[1])
