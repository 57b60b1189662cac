"""Held-out evaluation: exact-match parsing, greedy decoding with left padding, response loss against a
direct full-logits computation, and base vs adapted side by side (the callable class the Ray Data actors run;
``run_evaluate`` on Ray is exercised end to end in tests/test_e2e.py)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA

from p2d_ray.config import build_config
from p2d_ray.data.answers import cut_at_stop, exact_match, is_answer_format, parse_answer
from p2d_ray.data.formatting import collate, encode_row
from p2d_ray.eval.evaluate import (
    HeldoutEvaluator,
    eval_variants,
    greedy_generate,
    prompt_ids,
    read_heldout,
    summarize,
)
from p2d_ray.models.loading import load_tokenizer

QUESTIONS = [
    "What is 3 plus 4?\n",
    "Add 5 and 2.\n",
    "Total?\n",
    "How many apples are there in all?\n",
    "Sum 1 and 7.\n",
    "Eight?\n",
]


# -- parsing ---------------------------------------------------------------------------------------------
def test_parse_answer_forms():
    assert parse_answer("3 * 4 = 12. 20 - 12 = 8. #### 8") == "8"
    assert parse_answer("####-3") == "-3"
    assert parse_answer("#### 1,234") == "1234"
    assert parse_answer("#### 7.50 dollars") == "7.5"
    assert parse_answer("#### 7.0") == "7"
    assert parse_answer("#### 12 #### 13") == "12"  # the first answer counts
    assert parse_answer("the answer is 8") is None
    assert parse_answer("####") is None
    assert parse_answer(None) is None


def test_exact_match_and_answer_format():
    assert exact_match("5 + 2 = 7. #### 7", "#### 7")
    assert exact_match("#### 1,000", "#### 1000.0")
    assert not exact_match("#### 17", "#### 7")  # no substring match
    assert not exact_match("7", "#### 7")  # a prediction without #### is wrong
    assert not exact_match("#### 7", "seven")  # no reference answer: never a match
    assert is_answer_format(["#### 1", "a #### 2"])
    assert not is_answer_format(["#### 1", "no answer"])
    assert not is_answer_format([])
    assert cut_at_stop("#### 7\n#### 8") == "#### 7"


# -- a tiny Llama whose greedy answer is known -------------------------------------------------------------
def save_answering_model(path, answer: str, seed: int = 0) -> str:
    """A tiny Llama whose attention and MLP outputs are zeroed, so its next token depends only on the
    current one (a bigram table): "\\n" -> "####" -> " <answer>" -> "\\n" -> ... Every prompt ending in a
    newline is answered "#### <answer>" -- but only if generation continues from each prompt's real last
    token (left padding) and stops at the newline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from p2d_ray.assets.tokenizer import build_tokenizer

    tok = build_tokenizer([q + f"#### {a}" for q in QUESTIONS for a in "78"] * 10, vocab_size=300)
    nl, hashes = tok.convert_tokens_to_ids(["Ċ", "####"])
    ans = tok(f" {answer}", add_special_tokens=False)["input_ids"]
    assert len(ans) == 1 and hashes != tok.unk_token_id, "the tokenizer must merge '####' and ' <answer>'"
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{**TINY_LLAMA, "max_position_embeddings": 256},
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # residual stream = token embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()  # any other token (e.g. a pad a wrong padding side would end on) predicts nothing
        head.zero_()
        for slot, (cur, nxt) in enumerate([(nl, hashes), (hashes, ans[0]), (ans[0], nl)]):
            emb[cur] = 0
            emb[cur, slot] = 1.0
            head[nxt, slot] = 10.0
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def answering_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("answering")
    return save_answering_model(root / "says7", "7"), save_answering_model(root / "says8", "8", seed=1)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    # Odd ids expect 7, even ids expect 8: a model that always answers 7 scores exactly 3/6.
    rows = [
        {"id": i, "prompt": q, "response": f"{i} + 0 = {i}. #### {7 if i % 2 else 8}"}
        for i, q in enumerate(QUESTIONS)
    ]
    path = tmp_path_factory.mktemp("heldout") / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path), rows


def _cfg(model_path, heldout_path, run_dir, **extra):
    over = [
        f"model.name_or_path={model_path}",
        f"evaluate.heldout_path={heldout_path}",
        f"run_dir={run_dir}",
        "evaluate.n_samples=6",
        "evaluate.batch_size=4",
        "evaluate.max_new_tokens=8",
    ]
    return build_config({}, over + [f"{k}={v}" for k, v in extra.items()])


def test_greedy_generate_left_pads_and_stops_at_newline(answering_models, heldout):
    from p2d_ray.models.loading import load_model

    cfg = _cfg(answering_models[0], heldout[0], "unused")
    tok, model = load_tokenizer(cfg.model), load_model(cfg.model)
    prompts = [prompt_ids(encode_row(r, tok, cfg.data, "prompt_response")) for r in heldout[1]]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the padding"
    batched = greedy_generate(model, tok, prompts, max_new_tokens=8)
    assert batched == ["#### 7"] * len(prompts)  # cut at the newline the bigram table loops back to
    assert tok.padding_side == "right", "generation must not change the shared tokenizer's padding side"


def test_evaluate_base_vs_adapted(answering_models, heldout, tmp_path):
    """The actor's work, in process (the Ray Data path runs in tests/test_e2e.py)."""
    from p2d_ray.models.loading import load_model
    from p2d_ray.training.export import write_manifest

    says7, says8 = answering_models
    run_dir = tmp_path / "run"
    cfg = _cfg(says7, heldout[0], run_dir)
    assert eval_variants(cfg) == {"base": None}  # nothing trained yet
    # The "adapted" model: a full fine-tuning export (manifest + merged model), as the trainer writes it.
    write_manifest(run_dir / "adapter", adaptation="full", base_model=says7, merged_dir=says8)
    table, fmt, answers = read_heldout(cfg)
    variants = eval_variants(cfg)
    assert (fmt, answers, variants) == ("prompt_response", True, {"base": None, "adapted": str(run_dir)})
    evaluator = HeldoutEvaluator(cfg.model_dump(mode="json"), variants, fmt, answers)
    out = pa.concat_tables([evaluator(table.slice(0, 4)), evaluator(table.slice(4))])  # two batches
    result = summarize(out, variants, answers)

    assert result["base"]["n_correct"] == 3 and result["base"]["exact_match"] == pytest.approx(0.5)
    assert result["adapted"]["n_correct"] == 3
    samples = out.to_pylist()
    assert [s["id"] for s in samples] == list(range(6))
    assert [s["correct_base"] for s in samples] == [bool(i % 2) for i in range(6)]
    assert [s["correct_adapted"] for s in samples] == [not (i % 2) for i in range(6)]
    assert {s["prediction_base"] for s in samples} == {"#### 7"}
    assert {s["prediction_adapted"] for s in samples} == {"#### 8"}

    # Response-token loss against a direct full-logits computation, for both models.
    tok = load_tokenizer(cfg.model)
    enc = [encode_row(r, tok, cfg.data, "prompt_response") for r in heldout[1]]
    batch = collate(enc, tok.pad_token_id)
    for name, path in (("base", says7), ("adapted", says8)):
        model = load_model(cfg.model.model_copy(update={"name_or_path": path}))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["loss_mask"][:, 1:].bool()
        nll = F.cross_entropy(logits[:, :-1][keep], batch["input_ids"][:, 1:][keep], reduction="none")
        per_sample = torch.zeros(6).index_add_(0, keep.nonzero()[:, 0], nll)
        assert [s[f"nll_sum_{name}"] for s in samples] == pytest.approx(
            per_sample.tolist(), rel=1e-4, abs=1e-4
        )
        assert [s["n_tokens"] for s in samples] == keep.sum(1).tolist()
        assert result[name]["loss"] == pytest.approx(nll.mean().item(), rel=1e-4)
        assert result[name]["perplexity"] == pytest.approx(nll.mean().exp().item(), rel=1e-4)
    assert result["delta"]["loss"] == pytest.approx(result["adapted"]["loss"] - result["base"]["loss"])


def test_plain_text_without_adapter_in_process(tiny_llama, tmp_path):
    """The callable class needs no Ray: plain-text rows give a loss over every token and no exact match."""
    rows = [{"id": i, "text": f"plain text number {i}"} for i in range(5)]
    path = tmp_path / "plain.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(tiny_llama, path, tmp_path / "run")
    table, fmt, answers = read_heldout(cfg)
    variants = eval_variants(cfg)
    assert (fmt, answers, variants) == ("plain", False, {"base": None})
    out = HeldoutEvaluator(cfg.model_dump(mode="json"), variants, fmt, answers)(table)
    assert out.column_names == ["id", "n_tokens", "nll_sum_base"]
    summary = summarize(out, variants, answers)
    assert set(summary) == {"base"} and "exact_match" not in summary["base"]
    # plain rows: every token after bos is scored (eos included)
    tok = load_tokenizer(cfg.model)
    assert out.column("n_tokens").to_pylist() == [
        len(tok(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows
    ]
    assert summary["base"]["perplexity"] == pytest.approx(math.exp(summary["base"]["loss"]))


def test_bad_heldout_fails_before_work(tiny_llama, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"id": 1, "prompt": "q\n", "response": "#### 1"}, {"id": 2, "prompt": "q\n", "response": "   "}]
        ),
        path,
    )
    with pytest.raises(ValueError, match=r"id=2.*empty"):
        read_heldout(_cfg(tiny_llama, path, tmp_path / "run"))
    pq.write_table(pa.Table.from_pylist([{"id": 1, "prompt": "q", "response": "a"}] * 2), path)
    with pytest.raises(ValueError, match="duplicate ids"):
        read_heldout(_cfg(tiny_llama, path, tmp_path / "run"))
    pq.write_table(pa.Table.from_pylist([{"id": 1, "question": "q"}]), path)
    with pytest.raises(ValueError, match="needs column"):
        read_heldout(_cfg(tiny_llama, path, tmp_path / "run"))
    assert not (tmp_path / "run" / "stages").exists()
