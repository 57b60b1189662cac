"""icl_attention (scoring/icl.py): context plans, and the scores against a brute-force eager computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from p2d_ray.assets.tokenizer import build_tokenizer
from p2d_ray.config import ScoreConfig
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.scoring.icl import build_icl_scorer, plan_contexts


def test_every_row_is_in_repeats_contexts_of_its_own_group():
    groups = np.array([[0, 0]] * 24 + [[0, 1]] * 3 + [[2, 0]] * 9)  # 3 groups: 24, 3 and 9 rows
    ctxs = plan_contexts(groups, n_d=8, n_q=2, repeats=3, seed=5, n_probe=10)
    count = np.zeros(len(groups), dtype=int)
    for c in ctxs:
        assert 1 <= len(c.demos) <= 8 and len(c.queries) == 2 == len(set(c.queries))
        assert len({tuple(groups[i]) for i in c.demos}) == 1  # never mixes groups
        count[c.demos] += 1
    assert (count == 3).all()
    sizes = sorted(len(c.demos) for c in ctxs)
    assert sizes[0] == 3 and sizes[-1] == 8  # a group smaller than n_d is still one context
    assert [(c.demos, c.queries) for c in ctxs] == [
        (c.demos, c.queries) for c in plan_contexts(groups, 8, 2, 3, 5, 10)
    ]
    other = plan_contexts(groups, 8, 2, 3, 6, 10)
    assert [c.demos for c in other] != [c.demos for c in ctxs]  # the seed decides co-demonstrations
    first = {tuple(c.demos) for c in ctxs[:3]}
    assert len(first) == 3  # repeats of the 24-row group use different co-demonstrations


def test_position_debias_makes_every_slot_mean_one_per_group():
    from p2d_ray.scoring.icl import debias_positions

    groups = np.array([[0, 0]] * 16 + [[0, 1]] * 7)
    ctxs = plan_contexts(groups, n_d=4, n_q=1, repeats=2, seed=0, n_probe=3)
    rng = np.random.default_rng(0)
    weights = [np.linspace(0.5, 2.0, len(c.demos)) * rng.uniform(0.5, 1.5, len(c.demos)) for c in ctxs]
    out = debias_positions(ctxs, weights)
    for g in {c.group for c in ctxs}:
        slots = [o for c, o in zip(ctxs, out, strict=True) if c.group == g]
        width = max(len(o) for o in slots)
        for p in range(width):
            filled = [o[p] for o in slots if len(o) > p]
            if len(filled) >= 2:  # a slot one context fills carries no position information: left as is
                assert np.mean(filled) == pytest.approx(1.0)
    # a group small enough for ONE context keeps its within-context weights (not all 1: real-model test)
    one = plan_contexts(np.array([[0, 0]] * 4), n_d=4, n_q=1, repeats=1, seed=0, n_probe=3)
    assert len(one) == 1
    np.testing.assert_allclose(
        debias_positions(one, [np.array([0.5, 1.5, 1.0, 1.0])])[0], [0.5, 1.5, 1.0, 1.0]
    )
    # a pure position effect (same slot, same weight) is removed completely
    flat = debias_positions(ctxs, [1 + 0.3 * np.arange(len(c.demos)) for c in ctxs])
    assert all(np.allclose(o, 1.0) for o in flat)


def _rows(n):
    return [
        {"prompt": f"Q{i}: what is {i} times {i % 4}{' please' * (i % 3)}? ", "response": f"{i * (i % 4)}"}
        for i in range(n)
    ]


@pytest.mark.parametrize("metric", ["likelihood", "none"])
def test_scores_equal_brute_force_eager(tiny_llama, metric):
    from p2d_ray.config import DataConfig
    from p2d_ray.data.formatting import encode_row
    from p2d_ray.scoring.icl import to_segment

    tok = build_tokenizer()
    heads = HeadSet(((0, 1), (1, 3)), geometry_from_config(AutoConfig.from_pretrained(tiny_llama)))
    cfg = ScoreConfig(
        scorer="icl_attention",
        icl_demos=4,
        icl_queries=2,
        icl_repeats=2,
        icl_metric=metric,
        icl_position_debias=False,
        batch_size=8,
    )
    data = DataConfig(max_length=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    probe = [{"prompt": f"P{i} ", "response": f"ans {i}"} for i in range(5)]
    scorer = build_icl_scorer(model, heads, cfg, tok, data.model_dump_json(), "prompt_response", probe)
    corpus = _rows(10)
    segs = []
    for r in corpus:
        e = encode_row(r, tok, data, "prompt_response")
        segs.append(to_segment(np.array(e.input_ids), np.array(e.loss_mask), tok.bos_token_id))
    groups = np.array([[0, i // 7] for i in range(10)])  # groups of 7 and 3 rows
    got = scorer.score_rows(segs, groups)

    eager = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    want_wm, want_w, n = np.zeros(10), np.zeros(10), np.zeros(10)
    for ctx in plan_contexts(groups, 4, 2, 2, 0, 5):
        ids, target, span, rows = scorer._assemble(ctx, segs)
        assert ids[0] == tok.bos_token_id and (span[:1] == -1).all()  # BOS (the sink) is in no span
        with torch.inference_mode():
            out = eager(input_ids=torch.tensor(ids)[None], output_attentions=True, use_cache=False)
        a = np.zeros(len(ctx.demos))
        for layer, head in heads:
            att = out.attentions[layer][0, head].numpy()  # [T, T]
            for j in range(len(ctx.demos)):
                a[j] += att[np.ix_(rows, np.flatnonzero(span == j))].mean()
        w = len(a) * a / a.sum()
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][torch.tensor(target[1:]).bool()]
        m = float(torch.exp(-nll.mean())) if metric == "likelihood" else 1.0
        want_w[ctx.demos] += w
        want_wm[ctx.demos] += w * m
        n[ctx.demos] += 1
    assert (got.contexts == 2).all() and (n == 2).all()
    np.testing.assert_allclose(got.weight, want_w / 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.score, want_wm / 2, rtol=1e-4, atol=1e-6)
    if metric == "none":
        np.testing.assert_allclose(got.metric, 1.0)
    else:
        assert ((got.metric > 0) & (got.metric < 1)).all()
