"""Scorer math and chunked losses on tiny real models, against references computed from full logits.

No Ray here: the scorers are pure torch on a collated batch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_model
from transformers import AutoModelForCausalLM

from p2d_ray.assets.tokenizer import build_tokenizer
from p2d_ray.config import DataConfig, ModelConfig
from p2d_ray.data.formatting import collate, encode_row
from p2d_ray.heads.gates import gated_forward
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry, output_projections
from p2d_ray.models.loading import load_tokenizer
from p2d_ray.models.loss import sample_loss
from p2d_ray.scoring.scorers import activation_score, build_scorer, influence_score, perplexity_score
from p2d_ray.scoring.tokenize import BatchedTokenizer

TEXTS = [
    ("Q: what is 2 plus 3? ", "A: 5. #### 5"),
    ("Summarise: the cat sat on the mat all day long. ", "A cat sat."),
    ("", "plain text without a prompt, a little longer than the others to force padding"),
    ("Name a colour. ", "Blue"),
]


def _batch(tok, rows=TEXTS, max_length=256):
    cfg = DataConfig(max_length=max_length)
    enc = [encode_row({"prompt": p, "response": r}, tok, cfg, "prompt_response") for p, r in rows]
    return collate(enc, tok.pad_token_id)


def _reference_loss(logits: torch.Tensor, batch) -> torch.Tensor:
    """Per-sample mean NLL over target tokens from full logits [B, T, V] (the thing we never build)."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # [B, T-1, V]
    tgt = batch["input_ids"][:, 1:]
    nll = -logp.gather(-1, tgt[..., None])[..., 0]  # [B, T-1]
    mask = batch["loss_mask"][:, 1:].float()
    return (nll * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # A larger init than the default 0.02 so that gating 3 of 8 heads moves the loss well above the 1e-5
    # tolerance: otherwise a scorer that ignored the gates could pass.
    path = save_tiny_model(tmp_path_factory.mktemp("llama_strong"), "llama", initializer_range=0.3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, load_tokenizer(ModelConfig(name_or_path=path))


@pytest.fixture(scope="module")
def heads(llama):
    return HeadSet(((0, 1), (1, 0), (1, 3)), attention_geometry(llama[0]))


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("gpt2", {}), ("gpt_neox", {})],
    ids=["llama-untied", "llama-tied", "gpt2", "gpt_neox"],
)
def test_chunked_loss_equals_full_logits_reference(tmp_path, family, overrides):
    path = save_tiny_model(tmp_path, family, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = build_tokenizer()
    batch = _batch(tok)
    with torch.no_grad():
        ref = _reference_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch
        )
        for chunk in (1, 7, 10_000):  # chunk boundaries inside and across samples, and one chunk
            got = sample_loss(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk)
            torch.testing.assert_close(got.mean, ref, rtol=0, atol=1e-5)
    assert got.n_tokens.tolist() == batch["loss_mask"][:, 1:].sum(1).tolist()
    # per_token puts each loss at its target position and nowhere else
    per_tok = got.per_token(batch["input_ids"].shape[1])
    assert ((per_tok != 0) == batch["loss_mask"].bool()).all()


@pytest.mark.parametrize("chunk_tokens", [5, 1024])
def test_chunked_loss_gradients_match_full_logits(llama, chunk_tokens):
    """With grad on and several chunks, each chunk is checkpointed (5); one chunk is not (1024): either way the
    gradients must be the full-logit ones."""
    model, tok = llama
    batch = _batch(tok)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _reference_loss(logits, batch).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sample_loss(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_tokens
    ).mean.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)
    model.zero_grad()


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_influence_matches_hand_reference(llama, heads, mode):
    model, tok = llama
    batch = _batch(tok)
    with torch.no_grad():
        full = _reference_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch
        )
        gated_logits = gated_forward(
            model, batch["input_ids"], batch["attention_mask"], heads.gates_off(), mode
        )
        gated = _reference_loss(gated_logits, batch)
    expected = (gated - full) / full
    assert (gated - full).abs().min() > 1e-3, (
        "gating the heads must change the loss for this test to mean anything"
    )
    for fused in (True, False):
        out = influence_score(model, batch, heads, mode, chunk_tokens=16, fused=fused)
        torch.testing.assert_close(out.loss_full, full, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.loss_gated, gated, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.score, expected, rtol=0, atol=1e-5)


def test_activation_matches_hand_reference(llama, heads):
    """Reference: our own pre-hooks on o_proj record the head outputs; mean norm over predicting positions."""
    model, tok = llama
    batch = _batch(tok)
    geo = attention_geometry(model)
    seen = {}
    hooks = [
        o.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[0].detach()))
        for layer, o in enumerate(output_projections(model))
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    B, T = batch["input_ids"].shape
    pred = torch.zeros(B, T)
    pred[:, :-1] = batch["loss_mask"][:, 1:].float()
    expected = torch.zeros(B)
    for layer, head in heads:
        out = seen[layer].view(B, T, geo.n_heads, geo.head_dim)[:, :, head]  # [B, T, D]
        expected += (out.norm(dim=-1) * pred).sum(1)
    expected /= pred.sum(1) * len(heads)
    got = activation_score(model, batch, heads, chunk_tokens=16)
    torch.testing.assert_close(got.score, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        full = _reference_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch
        )
    torch.testing.assert_close(got.loss_full, full, rtol=0, atol=1e-5)
    assert got.loss_gated is None


def test_perplexity_noop_and_registry(llama, heads):
    model, tok = llama
    batch = _batch(tok)
    with torch.no_grad():
        full = _reference_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch
        )
    out = perplexity_score(model, batch, 16)
    torch.testing.assert_close(out.score, full, rtol=0, atol=1e-5)
    noop = build_scorer("noop", None)(batch)
    assert noop.score.tolist() == [0.0] * 4 and noop.n_tokens.tolist() == out.n_tokens.tolist()
    scored = build_scorer("influence", model, heads, "zero", 16)(batch)
    assert scored.score.shape == (4,) and not scored.score.requires_grad
    with pytest.raises(ValueError, match="needs the task heads"):
        build_scorer("activation", model, None)
    with pytest.raises(ValueError, match="not one of"):
        build_scorer("entropy", model, heads)


@pytest.mark.parametrize("fmt", ["plain", "prompt_response", "chat", "icl"])
@pytest.mark.parametrize("overlong", ["truncate", "quarantine"])
def test_batched_tokenizer_equals_encode_row(llama, fmt, overlong):
    """The Ray tokenize stage's batched path must give exactly encode_row's ids, masks and reasons."""
    _, tok = llama
    # icl: the instruction + demos prefix alone is ~90 byte tokens
    cfg = DataConfig(max_length=160 if fmt == "icl" else 48, overlong=overlong)
    rows = [{"prompt": p, "response": r} for p, r in TEXTS] + [
        {"prompt": "ok ", "response": "   "},  # empty
        {"prompt": None, "response": "x"},  # non_string
        {"prompt": "a very long prompt " * 12, "response": "tail"},  # truncated to no target / too_long
    ]
    if fmt in ("plain", "icl"):
        rows = [{"text": r["response"]} for r in rows] + [{"text": None}, {"text": ""}]
    demos = (
        [{"prompt": "2+2? ", "response": "4"}, {"prompt": "3+1? ", "response": "4"}] if fmt == "icl" else []
    )
    expected = []
    for row in rows:
        try:
            expected.append(encode_row(row, tok, cfg, fmt, demos))
        except ValueError as err:
            expected.append(str(err))
    assert BatchedTokenizer(tok).encode_rows(rows, cfg, fmt, demos) == expected
    assert any(isinstance(e, str) for e in expected) and any(not isinstance(e, str) for e in expected)


def test_collate_arrow_equals_collate(llama):
    """The actor's vectorised collate from Arrow list columns == formatting.collate, for any row subset."""
    import numpy as np
    import pyarrow as pa

    from p2d_ray.scoring.actor import collate_arrow

    _, tok = llama
    cfg = DataConfig()
    enc = [encode_row({"prompt": p, "response": r}, tok, cfg, "prompt_response") for p, r in TEXTS]
    ids = pa.chunked_array(
        [pa.array([e.input_ids for e in enc[:2]]), pa.array([e.input_ids for e in enc[2:]])]
    )
    mask = pa.chunked_array(
        [
            pa.array([e.loss_mask for e in enc[:2]], pa.list_(pa.int8())),
            pa.array([e.loss_mask for e in enc[2:]], pa.list_(pa.int8())),
        ]
    )
    for rows in ([0, 1, 2, 3], [3, 0], [2]):
        got = collate_arrow(ids, mask, np.array(rows), tok.pad_token_id)
        ref = collate([enc[i] for i in rows], tok.pad_token_id)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), (rows, k)


def test_ifd_matches_hand_reference(llama):
    """IFD = L(response | prompt) / L(response alone), the alone loss from BOS + the response's own tokens
    (encoded separately, as Cherry-LLM does); ratios >= 1 score 0 (Cherry-LLM drops them)."""
    from p2d_ray.scoring.scorers import ifd_score

    model, tok = llama
    batch = _batch(tok)
    bos = tok.bos_token_id
    with torch.no_grad():
        cond = _reference_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch
        )
        alone = []
        for ids, lm in zip(batch["input_ids"], batch["loss_mask"], strict=True):
            seq = torch.cat([torch.tensor([bos]), ids[lm.bool()]])[None]  # [1, 1 + R], no padding at all
            one = {"input_ids": seq, "loss_mask": torch.ones_like(seq)}
            one["loss_mask"][0, 0] = 0
            alone.append(_reference_loss(model(input_ids=seq).logits, one)[0])
        alone = torch.stack(alone)
    with torch.no_grad():
        out = ifd_score(model, batch, bos, tok.pad_token_id, chunk_tokens=16)
    torch.testing.assert_close(out.loss_full, cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss_gated, alone, rtol=0, atol=1e-5)
    ratio = cond / alone
    torch.testing.assert_close(
        out.score, torch.where(ratio < 1, ratio, torch.zeros_like(ratio)), rtol=0, atol=1e-5
    )
    # the row without a prompt: the "alone" sequence is the conditioned one, so IFD = 1
    assert abs(float(out.loss_full[2] / out.loss_gated[2]) - 1) < 1e-4
    assert (out.score < 1).all() and (ratio >= 1).sum() >= 1 or (ratio < 1).all()
    assert out.n_tokens.tolist() == batch["loss_mask"][:, 1:].sum(1).tolist()
    assert build_scorer("ifd", model, None, bos_id=bos, pad_id=tok.pad_token_id)(batch).score.shape == (4,)
