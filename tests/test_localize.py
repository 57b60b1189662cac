"""Stage 1 head localisation: a planted task head is found by every method; selection; heads.json; the stage."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig, LlamaForCausalLM

from p2d_ray.config import LocalizeConfig, ModelConfig, build_config, load_config
from p2d_ray.heads.gates import HeadGates
from p2d_ray.heads.headset import HeadSet
from p2d_ray.heads.localize import (
    alps_distances,
    gate_gradients,
    head_importance,
    localize_heads,
    n_selected,
    per_sample_loss,
    top_heads,
    wasserstein1,
)
from p2d_ray.models.geometry import attention_geometry, attention_map, head_params

PLANTED = (1, 2)  # layer 1, query head 2: kv group 1, shared with head 3 (GQA)
VOCAB, BOS, SEP = 32, 0, 1
KEYS = (2, 10)  # the token to recall is drawn from [2, 10); filler from [10, 32)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def recall_batch(B: int, seed: int, n_fill: int = 8) -> dict[str, torch.Tensor]:
    """``BOS A f1..fn SEP -> A``: recalling A at SEP needs attention to position 1 (content lookup)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(*KEYS, (B, 1), generator=g)
    fill = torch.randint(KEYS[1], VOCAB, (B, n_fill), generator=g)
    ids = torch.cat([torch.full((B, 1), BOS), a, fill, torch.full((B, 1), SEP), a], dim=1)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, -1] = 1  # only the recalled token is scored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def planted_model():
    """A tiny GQA Llama where only PLANTED can solve the task. Training keeps every other head's own
    weights (its q rows, o columns and, outside PLANTED's kv group, its k/v rows) frozen at their random
    init, and switches each of those heads on or off at random per sample: the rest of the network learns
    to ignore them, and the only trained path that can move A to the SEP position (an MLP or the residual
    stream cannot look back) is PLANTED. Training with the others always off instead left the model
    sensitive to their untrained outputs, and then a random layer-0 head could out-rank PLANTED."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(**{**TINY_LLAMA, "vocab_size": VOCAB, "max_position_embeddings": 64})
    )
    geo = attention_geometry(model)
    frozen = []  # weight slices of the non-planted heads
    for layer in range(geo.n_layers):
        for head in range(geo.n_heads):
            if (layer, head) == PLANTED:
                continue
            hp = head_params(model, geo, layer, head)
            shares_kv = layer == PLANTED[0] and geo.kv_group(head) == geo.kv_group(PLANTED[1])
            frozen += [hp.q, hp.o] if shares_kv else [hp.q, hp.k, hp.v, hp.o]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    coin = torch.Generator().manual_seed(0)
    with HeadGates(model) as hg:
        for step in range(100):
            gates = (torch.rand(32, geo.n_layers, geo.n_heads, generator=coin) < 0.5).float()  # [B, L, H]
            gates[:, PLANTED[0], PLANTED[1]] = 1.0
            hg.gates = gates
            loss = per_sample_loss(model, recall_batch(32, seed=step)).mean()
            opt.zero_grad()
            loss.backward()
            for ws in frozen:  # Adam never moves an entry whose gradient is always zero
                ws.module.weight.grad.narrow(ws.dim, ws.start, ws.stop - ws.start).zero_()
            opt.step()
    model.eval()
    return model


def probe(n_batches: int = 2) -> list[dict]:
    return [recall_batch(16, seed=1000 + i) for i in range(n_batches)]


def test_planted_head_is_essential(planted_model):
    """The plant is real: the task is solved, and only closing PLANTED breaks it."""
    batch = probe(1)[0]
    with torch.no_grad():
        base = per_sample_loss(planted_model, batch).mean().item()
        assert base < 0.1
        for layer in range(2):
            for head in range(4):
                gates = torch.ones(2, 4)
                gates[layer, head] = 0
                with HeadGates(planted_model, gates):
                    loss = per_sample_loss(planted_model, batch).mean().item()
                if (layer, head) == PLANTED:
                    assert loss > 1.0, loss
                else:
                    assert loss < 0.2, ((layer, head), loss)


@pytest.mark.parametrize("method", ["gradient", "fisher", "alps"])
def test_every_method_ranks_the_planted_head_first(planted_model, method):
    before = {k: v.clone() for k, v in planted_model.state_dict().items()}
    d = LocalizeConfig()
    scores = head_importance(planted_model, probe(), method, alps_steps=d.alps_steps, alps_lr=d.alps_lr)
    assert scores.shape == (2, 4) and bool((scores >= 0).all())
    assert top_heads(scores, 1) == [PLANTED], scores
    # The caller's model is untouched: same weights, same requires_grad flags, still in eval mode.
    after = planted_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in planted_model.parameters())
    assert not planted_model.training


def test_per_sample_gate_gradients_in_one_backward(planted_model):
    """Gradients from one padded batch with per-sample gates == one sample at a time, unpadded."""
    batch = recall_batch(3, seed=7)
    batch["attention_mask"][2, -4:] = 0  # right-pad sample 2: drop SEP+A, score a filler token instead
    batch["loss_mask"][2] = 0
    batch["loss_mask"][2, 7] = 1
    batched = gate_gradients(planted_model, attention_map(planted_model), [batch])  # [3, L, H]
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        alone = {k: v[i : i + 1, :n] for k, v in batch.items()}
        torch.testing.assert_close(
            batched[i],
            gate_gradients(planted_model, attention_map(planted_model), [alone])[0],
            rtol=1e-4,
            atol=1e-7,
        )
    assert not torch.allclose(batched[0], batched[2])


def test_alps_gqa_mapping_uses_the_kv_group(planted_model):
    """Moving only kv group 1's key rows in layer 0 changes the operators of query heads 2 and 3 only."""
    geo = attention_geometry(planted_model)
    attention = attention_map(planted_model)
    base = {m: m.weight.detach().clone() for m in attention.projections}
    attn = planted_model.model.layers[0].self_attn
    try:
        with torch.no_grad():
            attn.k_proj.weight[16:32] += 0.05  # kv group 1 = heads 2, 3 (head_dim 16)
        moved = alps_distances(attention, base) > 0
        expected = torch.zeros(2, 4, dtype=torch.bool)
        expected[0, 2:] = True
        assert torch.equal(moved, expected), moved
        with torch.no_grad():
            attn.o_proj.weight[:, 16:32] += 0.05  # o columns of query head 1 only
        moved = alps_distances(attention, base) > 0
        expected[0, 1] = True
        assert torch.equal(moved, expected), moved
    finally:
        with torch.no_grad():
            for m, w in base.items():
                m.weight.copy_(w)
    # head_params: a query head's operator carries its group's k/v slices.
    assert (
        head_params(planted_model, geo, 0, 3).k.start == 16
        and head_params(planted_model, geo, 0, 1).k.start == 0
    )


def test_per_sample_loss_matches_full_logits(tiny_llama):
    """The LM head applied at target positions only == cross-entropy over the model's full logits."""
    from p2d_ray.models.loading import load_model

    model = load_model(ModelConfig(name_or_path=tiny_llama))
    batch = recall_batch(3, seed=3)
    batch["loss_mask"][1, 4:8] = 1
    batch["attention_mask"][2, -3:] = 0
    batch["loss_mask"][2, -3:] = 0
    batch["loss_mask"][2, 5] = 1
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none"
        )  # [B, T-1]
        m = batch["loss_mask"][:, 1:].float()
        expected = (nll * m).sum(1) / m.sum(1)
        torch.testing.assert_close(per_sample_loss(model, batch), expected, rtol=1e-5, atol=1e-6)


def test_alps_in_bf16_matches_fp32_and_restores(tiny_llama):
    """bf16 (the GPU default): SGD steps far below bf16's resolution still count (fp32 master copies).
    Stepping the bf16 weights directly gives W1 ~100x too small at this lr (measured)."""
    from p2d_ray.models.loading import load_model

    scores = {}
    for dtype in ("bfloat16", "float32"):
        model = load_model(ModelConfig(name_or_path=tiny_llama, dtype=dtype))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scores[dtype] = head_importance(model, [recall_batch(4, seed=5)], "alps", alps_steps=2, alps_lr=1e-5)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(scores["bfloat16"], scores["float32"], rtol=0.1, atol=0)


def test_wasserstein1():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert wasserstein1(a, a.flip(0)) == 0.0  # a permutation is the same distribution
    assert wasserstein1(a, a + 0.5) == pytest.approx(0.5)
    assert wasserstein1(a, torch.tensor([0.0, 0.0, 0.0, 4.0])) == pytest.approx((0 + 1 + 2 + 1) / 4)


def test_selection_count_and_tie_break():
    assert n_selected(8, 0.10) == 1  # at least one head
    assert n_selected(8, 0.25) == 2
    assert n_selected(64, 0.10) == 6
    assert n_selected(64, 0.3, top_k=5) == 5  # top_k overrides top_fraction
    with pytest.raises(ValueError, match=r"localize.top_k=9 exceeds the model's 8 heads"):
        n_selected(8, 0.1, top_k=9)
    scores = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]])
    assert top_heads(scores, 2) == [(0, 1), (0, 2)]  # ties: lower (layer, head) first
    assert top_heads(scores, 4) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    with pytest.raises(ValueError, match="localize.method='random'"):
        head_importance(None, [], "random")


def _probe_rows(n: int) -> list[dict]:
    return [{"id": i, "prompt": f"Q: {i} plus {i + 1}?\nA:", "response": f" {2 * i + 1}"} for i in range(n)]


def test_localize_heads_meta_and_heads_json_round_trip(tiny_llama, tmp_path):
    from p2d_ray.data.io import rows_hash
    from p2d_ray.models.loading import load_model, load_tokenizer, model_fingerprint

    cfg = build_config(
        {"model": {"name_or_path": tiny_llama}},
        [
            "localize.method=alps",
            "localize.alps_steps=3",
            "localize.top_fraction=0.25",
            "localize.batch_size=4",
        ],
    )
    rows = _probe_rows(10)
    model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    heads = localize_heads(model, rows, tok, cfg)
    assert len(heads) == 2  # round(0.25 * 8)
    scores = torch.tensor(heads.meta["scores"])
    assert scores.shape == (2, 4)
    assert list(heads.heads) == sorted(top_heads(scores, 2))
    assert heads.meta["method"] == "alps" and heads.meta["n_probe"] == 10
    assert heads.meta["rows_hash"] == rows_hash(rows)
    assert heads.meta["model_fingerprint"] == model_fingerprint(cfg.model)
    loaded = HeadSet.load(heads.save(tmp_path / "heads.json"))
    assert loaded == heads and loaded.meta == heads.meta
    assert loaded.fingerprint() == heads.fingerprint()
    loaded.check_fits(attention_geometry(model))

    bad = rows[:3] + [{"id": 3, "prompt": "Q", "response": "   "}]
    with pytest.raises(ValueError, match=r"probe set has rows that cannot be used: row 3: empty"):
        localize_heads(model, bad, tok, cfg)


def test_run_localize_stage(tiny_llama, tmp_path):
    from p2d_ray.cli import main
    from p2d_ray.rundir import RunDir, stage_fingerprint

    probe_path = tmp_path / "probe.parquet"
    pq.write_table(pa.Table.from_pylist(_probe_rows(20)), probe_path)
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        f"model.name_or_path={tiny_llama}",
        f"data.probe_path={probe_path}",
        "localize.max_probe_samples=12",
        "localize.top_k=3",
        "localize.method=fisher",
        "localize.torch_threads=1",
    ]
    assert main(["localize", *overrides]) == 0
    heads = HeadSet.load(run_dir / "heads.json")
    assert len(heads) == 3 and heads.meta["method"] == "fisher" and heads.meta["n_probe"] == 12
    assert heads.meta["probe_path"] == str(probe_path)
    png = (run_dir / "heads.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    cfg = build_config({}, overrides)
    record = RunDir(run_dir).stage_record("localize")
    assert record["seconds"] > 0 and record["fingerprint"] == stage_fingerprint(cfg, "localize")
    assert load_config(run_dir / "config.yaml") == cfg

    # Missing columns: one clear error before any model is loaded, and no stage marker.
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "bad.parquet")
    bad_run = tmp_path / "bad_run"
    assert (
        main(
            [
                "localize",
                f"run_dir={bad_run}",
                f"model.name_or_path={tiny_llama}",
                f"data.probe_path={tmp_path / 'bad.parquet'}",
            ]
        )
        == 2
    )
    assert RunDir(bad_run).stage_record("localize") is None


def test_contrastive_scores_and_random_heads_control(tiny_llama):
    """contrast=corpus ranks by probe importance / reference importance; control=random_heads returns
    random heads with the task heads' count per layer, seeded, the task heads kept in the metadata."""
    from p2d_ray.data.formatting import encode_probe, encode_reference, probe_batches
    from p2d_ray.models.loading import load_model, load_tokenizer

    base = {"model": {"name_or_path": tiny_llama}}
    common = ["localize.top_k=3", "localize.batch_size=4"]
    rows = _probe_rows(8)
    reference = [
        {"id": 100 + i, "prompt": f"Tell me a story number {i}.", "response": "Once upon a time."}
        for i in range(6)
    ]
    reference.append({"id": 200, "prompt": "Q", "response": None})  # unusable corpus row: skipped, counted
    cfg = build_config(base, [*common, "localize.contrast=corpus"])
    model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    heads = localize_heads(model, rows, tok, cfg, reference)
    probe = head_importance(
        model, probe_batches(encode_probe(rows, tok, cfg.data), 4, tok.pad_token_id), "gradient"
    )
    ref = head_importance(
        model, probe_batches(encode_reference(reference, tok, cfg.data), 4, tok.pad_token_id), "gradient"
    )
    expected = probe / ref.clamp(min=1e-6 * float(ref.max()) + 1e-12)
    torch.testing.assert_close(torch.tensor(heads.meta["scores"]), expected, rtol=1e-5, atol=0)
    assert list(heads.heads) == sorted(top_heads(expected, 3))
    assert heads.meta["contrast"] == "corpus" and heads.meta["n_reference"] == 6

    task = localize_heads(model, rows, tok, build_config(base, common))
    controls = [
        localize_heads(
            model, rows, tok, build_config({**base, "seed": s}, [*common, "localize.control=random_heads"])
        )
        for s in (1, 1, 2)
    ]
    assert controls[0] == controls[1]  # seeded
    for control in controls:
        assert control.meta["control"] == "random_heads" and control.meta["task_heads"] == [
            list(h) for h in task.heads
        ]
        assert {k: len(v) for k, v in control.by_layer().items()} == {
            k: len(v) for k, v in task.by_layer().items()
        }
        # 4 heads per layer: a layer's task heads are avoided while enough other heads exist
        for layer, hs in control.by_layer().items():
            if len(task.by_layer()[layer]) <= 2:
                assert not set(hs) & set(task.by_layer()[layer])
