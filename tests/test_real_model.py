"""Every stage on a real pre-trained model: SmolLM2-135M-Instruct (``smollm2-135m``, a Llama with GQA 9/3).

Behaviour that depends on what a model has learned (localisation, gates on real heads, scorers, training and
export) is checked here on real weights, on a handful of rows so the module stays small. The model is the
project's own asset: installed by ``make install`` and converted once into ``$P2D_RAY_CACHE`` (the session
fixture converts it there on first use, ~20-60 s, then every test reuses it). Stages run through their
stage functions, as ``p2d-ray run`` calls them, on one local Ray.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_probe_and_heldout

from p2d_ray.assets import SMOLLM2, resolve_model
from p2d_ray.assets.synthetic import generate_corpus
from p2d_ray.config import ScoreConfig, build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry

pytestmark = [pytest.mark.real_model]

N_LAYERS, N_HEADS, N_KV = 30, 9, 3


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The converted model directory (converted once into the project cache, then reused)."""
    return resolve_model(SMOLLM2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A few rows of the demo mixture: corpus (every task and quality), probe and held-out sets."""
    root = tmp_path_factory.mktemp("real_data")
    corpus = generate_corpus(24, seed=5)
    pq.write_table(corpus, root / "corpus.parquet", row_group_size=12)
    write_probe_and_heldout(root, corpus, n_probe=4, n_heldout=4)
    return root


def _cfg(run_dir: Path, data: Path, *overrides: str):
    return build_config(
        {
            "run_dir": str(run_dir),
            "model": {"name_or_path": SMOLLM2},
            "data": {
                "probe_path": str(data / "probe.parquet"),
                "corpus_path": str(data / "corpus.parquet"),
                "format": "chat",
                "max_length": 128,
            },
            "evaluate": {"heldout_path": str(data / "heldout.parquet")},
        },
        [
            "localize.max_probe_samples=4",
            "localize.batch_size=4",
            "localize.top_k=6",
            "score.min_actors=1",
            "score.max_actors=1",
            "score.batch_size=8",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def model(smollm2):
    from p2d_ray.config import ModelConfig
    from p2d_ray.models.loading import load_model

    return load_model(ModelConfig(name_or_path=SMOLLM2, device="cpu"))


def test_short_name_resolves_to_the_converted_safetensors_model(smollm2, model):
    path = Path(smollm2)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["recipe"]["model"] == SMOLLM2 and len(meta["recipe"]["gguf_sha256"]) == 64
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    geo = attention_geometry(model)
    assert (geo.family, geo.n_layers, geo.n_heads, geo.n_kv_heads) == ("llama", N_LAYERS, N_HEADS, N_KV)
    assert resolve_model(SMOLLM2) == smollm2  # cached: the second resolve converts nothing
    assert json.loads((path / "meta.json").read_text()) == meta


@pytest.mark.parametrize(
    "method, contrast", [("gradient", "none"), ("fisher", "none"), ("alps", "none"), ("gradient", "corpus")]
)
def test_localisation_under_gqa(tmp_path, smollm2, data, method, contrast):
    from p2d_ray.heads.localize import run_localize

    cfg = _cfg(
        tmp_path / "run",
        data,
        f"localize.method={method}",
        f"localize.contrast={contrast}",
        "localize.contrast_samples=4",
        "localize.alps_steps=2",
    )
    run_localize(cfg)
    heads = HeadSet.load(tmp_path / "run" / "heads.json")
    assert len(heads) == 6 and all(0 <= layer < N_LAYERS and 0 <= h < N_HEADS for layer, h in heads)
    scores = torch.tensor(heads.meta["scores"])
    assert scores.shape == (N_LAYERS, N_HEADS) and torch.isfinite(scores).all()
    # Real heads differ in importance, and the chosen six are the six highest-scoring ones.
    assert scores.std() > 0
    top6 = {divmod(int(i), N_HEADS) for i in torch.topk(scores.flatten(), 6).indices}
    assert set(heads) == top6


def test_head_gates_equal_zeroing_o_proj_columns(model):
    """Gating a query head of a GQA layer off = removing its columns of o_proj (its output's only path)."""
    from p2d_ray.heads.gates import HeadGates

    geo = attention_geometry(model)
    x = torch.randint(100, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    off = [(3, 1), (3, 4), (17, 8)]  # heads 1 and 4 of layer 3 read different kv groups
    gates = torch.ones(N_LAYERS, N_HEADS)
    for layer, h in off:
        gates[layer, h] = 0.0
    with torch.no_grad():
        full = model(input_ids=x).logits
        with HeadGates(model, mode="zero") as hg:
            hg.gates = gates
            gated = model(input_ids=x).logits
        saved = {}
        for layer, h in off:
            o = model.model.layers[layer].self_attn.o_proj.weight  # [hidden, H * head_dim]
            cols = slice(h * geo.head_dim, (h + 1) * geo.head_dim)
            saved[(layer, h)] = o[:, cols].clone()
            o[:, cols] = 0.0
        try:
            zeroed = model(input_ids=x).logits
        finally:
            for (layer, h), w in saved.items():
                model.model.layers[layer].self_attn.o_proj.weight[
                    :, h * geo.head_dim : (h + 1) * geo.head_dim
                ] = w
    assert (gated - zeroed).abs().max().item() <= 1e-4
    assert (gated - full).abs().max().item() > 1e-3  # the real heads matter


@pytest.fixture(scope="module")
def localized(tmp_path_factory, smollm2, data) -> Path:
    """A run dir with real gradient-localised heads (shared by the scorer and training tests)."""
    from p2d_ray.heads.localize import run_localize

    run = tmp_path_factory.mktemp("real_run") / "run"
    run_localize(_cfg(run, data))
    return run


SCORERS = typing.get_args(ScoreConfig.model_fields["scorer"].annotation)


def test_every_scorer_scores_every_row(tmp_path, data, localized, ray_local):
    """Every scorer through the actor pool on the real model, on half the corpus (12 rows, two row groups:
    two blocks): seven scorers' passes are this module's largest cost."""
    import shutil

    from p2d_ray.scoring.pipeline import run_score

    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pq.read_table(data / "corpus.parquet").slice(0, 12), corpus, row_group_size=6)
    assert {"influence", "perplexity"} <= set(SCORERS)
    for scorer in SCORERS:
        run = tmp_path / scorer
        run.mkdir()
        shutil.copy(localized / "heads.json", run / "heads.json")
        cfg = _cfg(run, data, f"score.scorer={scorer}", f"data.corpus_path={corpus}")
        run_score(cfg)
        scores = pq.read_table(run / "scores").to_pylist()
        assert sorted(r["id"] for r in scores) == list(range(12)), scorer
        values = torch.tensor([r["score"] for r in scores], dtype=torch.float64)
        assert torch.isfinite(values).all(), scorer
        if scorer != "noop":
            assert values.std() > 0, f"{scorer}: a real model scores different rows differently"


def _train(run: Path, data: Path, localized: Path, *overrides: str):
    """``run_train`` through Ray Train + DeepSpeed (2 workers of half a CPU, batch 2) on the localised heads,
    the whole corpus as the selected subset. Returns (cfg, summary)."""
    import shutil

    from p2d_ray.training.trainer import run_train

    (run / "subset").mkdir(parents=True)
    shutil.copy(localized / "heads.json", run / "heads.json")
    shutil.copy(data / "corpus.parquet", run / "subset" / "part-0.parquet")
    cfg = _cfg(
        run, data, "train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=2", *overrides
    )
    return cfg, run_train(cfg)


@pytest.fixture(scope="module")
def trained_heads(tmp_path_factory, data, localized, ray_local):
    """Head deltas trained through Ray Train + DeepSpeed (2 workers, 2 steps), with PEFT and merged export."""
    run = tmp_path_factory.mktemp("real_heads") / "run"
    return _train(
        run,
        data,
        localized,
        "train.adaptation=heads",
        "train.max_steps=2",
        "train.lr=0.01",
        "train.export_merged=true",
    )


def test_head_deltas_train_and_peft_export_matches(trained_heads, model):
    from peft import PeftModel

    from p2d_ray.models.loading import load_model
    from p2d_ray.training.export import load_adapted_model

    cfg, summary = trained_heads
    assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["ranks_identical"] is True
    heads = HeadSet.load(Path(cfg.run_dir) / "heads.json")
    geo = attention_geometry(model)
    # q and o rows of 6 heads, k/v rows of the kv groups they read (GQA: shared once per group).
    per_head = geo.head_dim * geo.hidden_size
    assert summary["trainable_params"] == (2 * len(heads) + 2 * len(heads.kv_groups())) * per_head
    x = torch.randint(100, 5000, (2, 16), generator=torch.Generator().manual_seed(1))
    adapted = load_adapted_model(cfg)
    with torch.no_grad():
        ours = adapted(input_ids=x).logits
        peft_model = PeftModel.from_pretrained(
            load_model(cfg.model), str(Path(cfg.run_dir, "adapter", "peft"))
        ).eval()
        assert (peft_model(input_ids=x).logits - ours).abs().max().item() <= 1e-3
        assert (model(input_ids=x).logits - ours).abs().max().item() > 1e-4  # training moved something
        merged = Path(cfg.run_dir, "merged")
        assert (merged / "model.safetensors").is_file()
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(merged, use_safetensors=True, dtype=torch.float32).eval()
        assert (m(input_ids=x).logits - ours).abs().max().item() <= 1e-3


@pytest.mark.parametrize("adaptation", ["lora", "full"])
def test_lora_and_full_train_through_ray_train_deepspeed(tmp_path, data, localized, ray_local, adaptation):
    run = tmp_path / "run"
    _, summary = _train(
        run,
        data,
        localized,
        f"train.adaptation={adaptation}",
        "train.max_steps=1",
        "train.lora_r=4",
        "train.zero_stage=1" if adaptation == "full" else "train.zero_stage=2",
    )
    assert summary["steps"] == 1 and summary["world_size"] == 2 and summary["ranks_identical"] is True
    n_params = 134_515_008
    if adaptation == "full":
        assert summary["trainable_params"] == n_params
    else:
        # r=4 on q/k/v/o of 30 layers: 4 x (in + out) per projection.
        assert 0 < summary["trainable_params"] < 0.02 * n_params
    assert json.loads(Path(run, "adapter", "manifest.json").read_text())["adaptation"] == adaptation


def test_evaluation_with_the_chat_template(trained_heads, ray_local):
    from p2d_ray.eval.evaluate import run_evaluate
    from p2d_ray.models.loading import load_tokenizer

    cfg, _ = trained_heads
    cfg = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"n_samples": 4, "max_new_tokens": 8})}
    )
    tok = load_tokenizer(cfg.model)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")  # SmolLM2's own template, not ours
    result = run_evaluate(cfg)
    ev = json.loads(Path(cfg.run_dir, "eval.json").read_text())
    assert ev["n_samples"] == 4
    for name in ("base", "adapted"):
        assert 0 < ev[name]["loss"] < 20 and "exact_match" in ev[name], ev
    assert result is not None


def test_validate_accepts_the_short_name(tmp_path, smollm2, data):
    """What `p2d-ray validate` (and a job submitted with this model) checks before a cluster is paid for."""
    from p2d_ray.validate import run_validate

    report = run_validate(_cfg(tmp_path / "run", data), raise_on_error=False)
    model = [f for f in report["findings"] if f["check"] == "model"][0]
    assert model["status"] == "ok", model
    assert (model["geometry"]["n_heads"], model["geometry"]["n_kv_heads"]) == (N_HEADS, N_KV)


def test_chat_rows_carry_one_bos(smollm2):
    """SmolLM2's chat template opens with its BOS token (`<|im_start|>`): a row must not get a second one, and
    ICL segments keep the template's opening token (they strip only a BOS the encoding added)."""
    from p2d_ray.config import DataConfig, ModelConfig
    from p2d_ray.data.formatting import added_bos, encode_row
    from p2d_ray.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    row = {"prompt": "What is 2 + 3?", "response": "5"}
    chat = encode_row(row, tok, DataConfig(format="chat"), "chat").input_ids
    assert chat[0] == tok.bos_token_id and chat[1] != tok.bos_token_id
    assert tok.decode(chat).startswith("<|im_start|>system") and added_bos(tok, "chat") is None
    plain = encode_row(row, tok, DataConfig(), "prompt_response").input_ids
    assert plain[0] == tok.bos_token_id == added_bos(tok, "prompt_response")
    # data.system_prompt replaces the template's default system message (the demo's "" saves ~20 tokens/row)
    empty = encode_row(row, tok, DataConfig(format="chat", system_prompt=""), "chat")
    assert "SmolLM" in tok.decode(chat) and "SmolLM" not in tok.decode(empty.input_ids)
    assert tok.decode(empty.input_ids).startswith(
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?"
    )
    assert len(chat) - len(empty.input_ids) >= 15 and empty.n_target == 2  # "5" + <|im_end|>
