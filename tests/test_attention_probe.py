"""p2d_sdpa: the task heads' attention for a few rows, reduced to spans, equals eager output_attentions."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_model
from transformers import AutoModelForCausalLM

from p2d_ray.heads.attention import AttentionProbe, probe_attention, use_probe_attention


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 24), generator=g)
    am = torch.ones_like(ids)
    am[1, 17:] = 0  # right padding
    am[2, :6] = 0  # left padding: the mask, not causality, must hide these keys
    return ids, am


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_probe_equals_eager_attention(tmp_path, family):
    path = save_tiny_model(tmp_path / family, family, num_hidden_layers=3)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    use_probe_attention(model)
    ids, am = _batch(model.config.vocab_size)
    B, T = ids.shape
    heads = {0: [1, 3], 2: [2]}
    rows = torch.tensor([[20, 22, 23], [10, 15, 16], [6, 15, 23]])  # valid (unpadded) positions per row
    span_of = torch.randint(-1, 4, (B, T), generator=torch.Generator().manual_seed(1))  # -1: no span
    spans = torch.zeros(B, T, 4)
    spans[span_of >= 0] = torch.nn.functional.one_hot(span_of[span_of >= 0], 4).float()
    probe = AttentionProbe(heads, rows, spans)
    with torch.inference_mode():
        ref = eager(input_ids=ids, attention_mask=am, output_attentions=True, use_cache=False).attentions
        hidden = probe_attention(model, ids, am, probe)
        plain = model.model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden, plain)  # the model's own output is unchanged by probing
    assert set(probe.result) == set(heads)
    for layer, hs in heads.items():
        a = ref[layer][:, hs]  # [B, h, T, T]
        a = a.gather(2, rows[:, None, :, None].expand(B, len(hs), rows.shape[1], T))  # [B, h, R, T]
        want = a @ spans[:, None]  # [B, h, R, S]
        torch.testing.assert_close(probe.result[layer], want, atol=1e-6, rtol=1e-5)
        # the rows' probabilities over all keys sum to 1 (padding and the future get none)
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)


def test_no_padding_and_early_stop(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama", num_hidden_layers=3)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    use_probe_attention(model)
    ids, _ = _batch(model.config.vocab_size, seed=3)
    am = torch.ones_like(ids)  # no padding: SDPA takes its is_causal path, attention_mask is None
    rows = torch.tensor([[3, 12, 23]] * 3)
    spans = torch.eye(24)[None].expand(3, -1, -1).contiguous()  # every position its own span
    probe = AttentionProbe({1: [0, 2]}, rows, spans, stop_after_last=True)
    with torch.inference_mode():
        ref = eager(input_ids=ids, attention_mask=am, output_attentions=True, use_cache=False).attentions[1]
        assert probe_attention(model, ids, am, probe) is None  # stopped after layer 1
    want = ref[:, [0, 2]][:, :, [3, 12, 23]]
    torch.testing.assert_close(probe.result[1], want, atol=1e-6, rtol=1e-5)


def test_needs_registered_implementation(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    probe = AttentionProbe({0: [0]}, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 4, 1))
    with pytest.raises(ValueError, match="p2d_sdpa"):
        probe_attention(model, torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), probe)
