"""Shared lower layers, the probe gradient and the gradient-alignment scorer on tiny real models.

No Ray here: the Ray pipeline test is in test_scoring_pipeline.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_model
from transformers import AutoModelForCausalLM

from p2d_ray.config import DataConfig, ModelConfig
from p2d_ray.data.formatting import collate, encode_row
from p2d_ray.heads.gates import gated_forward
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry, head_params, slice_weight
from p2d_ray.models.loading import load_tokenizer
from p2d_ray.models.loss import hidden_states, loss_from_hidden
from p2d_ray.models.shared_lower import SharedLowerLayers
from p2d_ray.scoring.gradient import (
    DERIVATIVE_COL,
    HeadShift,
    ProbeGradient,
    probe_gradient,
    probe_row_losses,
)
from p2d_ray.scoring.scorers import alignment_score, build_scorer, influence_score

ROWS = [
    ("Q: what is 2 plus 3? ", "A: 5. #### 5"),
    ("Summarise: the cat sat on the mat all day long. ", "A cat sat."),
    ("", "plain text without a prompt, a little longer than the others to force padding"),
    ("Name a colour. ", "Blue"),
]
PROBE = [("Q: what is 1 plus 1? ", "A: 2. #### 2"), ("Q: what is 4 plus 3? ", "A: 7. #### 7")]


def _batch(tok, rows):
    cfg = DataConfig(max_length=256)
    enc = [encode_row({"prompt": p, "response": r}, tok, cfg, "prompt_response") for p, r in rows]
    return collate(enc, tok.pad_token_id)


def _row_losses(model, batch) -> torch.Tensor:
    """Each row's mean response loss [B] from a plain full forward (the reference)."""
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return loss_from_hidden(model, hidden, batch["input_ids"], batch["loss_mask"]).mean


def _model(tmp_path_factory, family, **kw):
    # 3 layers so that a head set starting at layer 1 or 2 really skips layers; init 0.3 so that shifting
    # or gating heads moves the loss far above the tolerances.
    path = save_tiny_model(
        tmp_path_factory.mktemp(family), family, num_hidden_layers=3, initializer_range=0.3, **kw
    )
    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(ModelConfig(name_or_path=path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model(tmp_path_factory, "llama")


def _perturb_from(model, first: int, scale: float = 0.05):
    """Add noise to every weight of layers >= first; returns the undo function."""
    from p2d_ray.models.geometry import decoder_layers

    saved = []
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in decoder_layers(model)[first:]:
            for p in layer.parameters():
                saved.append((p, p.clone()))
                p.add_(scale * torch.randn(p.shape, generator=gen))

    def undo():
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)

    return undo


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("first", [0, 2])
def test_shared_lower_layers_equal_full_forwards(tmp_path_factory, family, first):
    kw = {} if family == "gpt2" else {"num_hidden_layers": 3}
    first = min(first, 1) if family == "gpt2" else first  # the tiny gpt2 has 2 layers
    path = save_tiny_model(tmp_path_factory.mktemp(family), family, **kw)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(ModelConfig(name_or_path=path))
    batch = _batch(tok, ROWS)
    ids, am = batch["input_ids"], batch["attention_mask"]
    assert (am == 0).any(), "the batch must contain padding"
    shared = SharedLowerLayers(model, first)
    assert shared.wired == (family != "gpt2")  # gpt2 falls back to full forwards
    with torch.no_grad():
        full = shared.full(ids, am)
        torch.testing.assert_close(full, hidden_states(model, ids, am), rtol=0, atol=1e-6)
        undo = _perturb_from(model, first)
        try:
            expected = hidden_states(model, ids, am)
            got = shared.rerun()
        finally:
            undo()
    real = am.bool()
    assert (expected[real] - full[real]).abs().max() > 1e-3, "the perturbation must change the output"
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_influence_with_shared_layers_matches_full_forwards(llama, mode):
    model, tok = llama
    heads = HeadSet(((1, 1), (2, 0), (2, 3)), attention_geometry(model))  # lowest gated layer 1 of 3
    batch = _batch(tok, ROWS)
    with torch.no_grad():
        full = _row_losses(model, batch)
        logits = gated_forward(model, batch["input_ids"], batch["attention_mask"], heads.gates_off(), mode)
        logp = torch.log_softmax(logits.float(), -1)[:, :-1]
        nll = -logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        m = batch["loss_mask"][:, 1:].float()
        gated = (nll * m).sum(1) / m.sum(1)
        out = influence_score(model, batch, heads, mode, chunk_tokens=16, fused=False)
    assert (gated - full).abs().min() > 1e-3
    torch.testing.assert_close(out.loss_full, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss_gated, gated, rtol=0, atol=1e-5)


def _probe_gradient(model, tok, heads):
    return probe_gradient(model, heads, [_batch(tok, PROBE)], {"fingerprint": "test"}, chunk_tokens=16)


def test_probe_gradient_is_the_unit_gradient_of_the_heads_slices(llama):
    model, tok = llama
    geo = attention_geometry(model)
    heads = HeadSet(((1, 0), (1, 1), (2, 3)), geo)  # heads 0 and 1 share kv group 0 (GQA)
    pg = _probe_gradient(model, tok, heads)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert not any("head_delta" in n for n, _ in model.named_modules()), "deltas must be removed"
    # Reference: plain autograd on the full weights, mean over probe rows of each row's mean loss.
    batch = _batch(tok, PROBE)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    loss = _row_losses(model, batch).mean()
    model.zero_grad()
    loss.backward()
    # Collect each head's slices' gradient once (GQA group shared by heads 0 and 1 counted once).
    seen, ref = set(), []
    for layer, head in heads:
        hp = head_params(model, geo, layer, head)
        for ws in (hp.q, hp.k, hp.v, hp.o):
            key = (id(ws.module), ws.dim, ws.start)
            if key not in seen:
                seen.add(key)
                ref.append(slice_weight(ws, ws.module.weight.grad).flatten())
    for p, f in zip(params, flags, strict=True):
        p.grad = None
        p.requires_grad_(f)
    ref = torch.cat(ref)
    got = torch.cat([g.flatten() for g in pg.direction.values()])
    assert got.numel() == ref.numel()
    assert abs(float(got.norm()) - 1.0) < 1e-5
    torch.testing.assert_close(float(ref.norm()), pg.meta["grad_norm"], rtol=1e-4, atol=0)
    # Same multiset of entries (the layouts are grouped differently): compare sorted values.
    torch.testing.assert_close(got.sort().values, (ref / ref.norm()).sort().values, rtol=0, atol=1e-6)
    assert pg.first_layer == 1
    # Round trip through bytes (what ships to the actors) and a wrong format is refused.
    back = ProbeGradient.from_bytes(pg.to_bytes())
    assert back.meta == pg.meta and [s.to_json() for s in back.specs] == [s.to_json() for s in pg.specs]
    for k in pg.direction:
        assert torch.equal(back.direction[k], pg.direction[k])
    with pytest.raises(ValueError, match="format"):
        from safetensors.torch import save

        ProbeGradient.from_bytes(save({"x": torch.zeros(1)}, {"p2d": "{}"}))


def _autograd_derivative(model, batch, pg, norms: list | None = None):
    """Per-row ``<grad L_i, G>`` by one backward per row (the reference the scorer avoids); appends each
    row's ``|g_i|`` in the head subspace to ``norms`` if given."""
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    out = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        ws = [modules[s.module_name].weight for s in pg.specs]
        for w in ws:
            w.requires_grad_(True)
        loss = _row_losses(model, row).sum()
        grads = torch.autograd.grad(loss, ws)
        for w in ws:
            w.requires_grad_(False)
        total, sq = 0.0, 0.0
        for s, g in zip(pg.specs, grads, strict=True):
            if isinstance(modules[s.module_name], Conv1D):  # [in, out] -> the [out, in] layout of Δ
                g = g.T
            idx = torch.tensor(s.index)
            sl = g.index_select(0 if s.axis == "rows" else 1, idx)
            total += float((sl.double() * pg.direction[s.module_name].double()).sum())
            sq += float((sl.double() ** 2).sum())
        out.append(total)
        if norms is not None:
            norms.append(sq**0.5)
    return torch.tensor(out, dtype=torch.float64)


def test_directional_derivative_matches_autograd_and_weights_restored(llama):
    model, tok = llama
    # fp64 weights; the losses themselves are fp32 (loss_from_hidden), so eps must stay well above the
    # fp32 rounding of a loss (~1e-7 * L / eps): at 1e-4 the rounding dominates, at 1e-2 the truncation.
    model = model.double()
    try:
        heads = HeadSet(((1, 0), (2, 3)), attention_geometry(model))
        pg = _probe_gradient(model, tok, heads)
        batch = _batch(tok, ROWS)
        ref = _autograd_derivative(model, batch, pg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        shift = HeadShift(model, pg)
        with torch.no_grad():
            central = alignment_score(model, batch, shift, pg.first_layer, 1e-2, "central", 16, "loss")
            forward = alignment_score(model, batch, shift, pg.first_layer, 1e-2, "forward", 16, "loss")
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} not restored exactly"
        assert ref.abs().max() > 1e-2
        c, f = central.extra[DERIVATIVE_COL].double(), forward.extra[DERIVATIVE_COL].double()
        print("central err", (c - ref).abs().tolist(), "forward err", (f - ref).abs().tolist())
        torch.testing.assert_close(c, ref, rtol=0, atol=2e-4)
        torch.testing.assert_close(f, ref, rtol=0, atol=2e-2)
        assert (c - ref).abs().max() < (f - ref).abs().max(), "central must beat forward (O(eps^2) vs O(eps))"
        torch.testing.assert_close(central.score, central.extra[DERIVATIVE_COL] / central.loss_full)
        # The shifted losses beside d_i: a central run also carries the forward estimate (L+ - L) / eps.
        assert "loss_minus" not in forward.extra
        torch.testing.assert_close(central.extra["loss_plus"], forward.extra["loss_plus"], rtol=0, atol=0)
        torch.testing.assert_close(
            (central.extra["loss_plus"] - central.loss_full) / 1e-2, forward.extra[DERIVATIVE_COL]
        )
        torch.testing.assert_close(
            (central.extra["loss_plus"] - central.extra["loss_minus"]) / 2e-2, central.extra[DERIVATIVE_COL]
        )
    finally:
        model.float()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("first", [0, 1])
def test_exact_alignment_equals_per_row_autograd(tmp_path_factory, family, first):
    """``exact``: one batched backward gives every row's <g_i, G> and |g_i| as one backward per row does
    (GQA groups in llama / qwen2 (q/k/v biases), gpt2's fused Conv1D c_attn), leaves no gradient behind,
    and matches the central difference; the cosine is d_i / |g_i|."""
    kw = {"num_key_value_heads": 2} if family != "gpt2" else {}
    model, tok = _model(tmp_path_factory, family, **kw)
    model = model.double()
    geo = attention_geometry(model)
    heads = HeadSet(((first, 0), (first, 1), (2, geo.n_heads - 1)), geo)
    pg = _probe_gradient(model, tok, heads)
    batch = _batch(tok, ROWS)
    norms: list[float] = []
    ref = _autograd_derivative(model, batch, pg, norms)
    flags = [p.requires_grad for p in model.parameters()]
    fn = build_scorer("gradient_alignment", model, heads, chunk_tokens=16, probe_gradient=pg)  # exact, cosine
    out = fn(batch)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(out.extra[DERIVATIVE_COL].double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        out.extra["grad_norm"].double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(out.score, out.extra[DERIVATIVE_COL] / out.extra["grad_norm"])
    torch.testing.assert_close(
        out.loss_full.double(), _row_losses(model, batch).double(), rtol=1e-5, atol=1e-6
    )
    with torch.no_grad():
        central = alignment_score(
            model, batch, HeadShift(model, pg), pg.first_layer, 1e-2, "central", 16, "loss"
        )
    # O(eps^2) truncation at this model's large weights (init 0.3): agreement, not equality
    torch.testing.assert_close(central.extra[DERIVATIVE_COL].double(), ref, rtol=2e-2, atol=1e-3)
    with pytest.raises(ValueError, match="cosine needs"):
        build_scorer("gradient_alignment", model, heads, probe_gradient=pg, alignment_method="central")


def test_a_probe_like_row_scores_above_random_tokens(llama):
    """Sign convention: high score = the row's gradient points where the probe's does."""
    model, tok = llama
    heads = HeadSet(((1, 0), (1, 2), (2, 3)), attention_geometry(model))
    pg = _probe_gradient(model, tok, heads)
    fn = build_scorer("gradient_alignment", model, heads, chunk_tokens=16, probe_gradient=pg)
    gen = torch.Generator().manual_seed(0)
    noise = "".join(chr(int(c)) for c in torch.randint(33, 126, (40,), generator=gen))
    out = fn(_batch(tok, [PROBE[0], PROBE[1], (noise[:20], noise[20:])]))
    assert float(out.extra[DERIVATIVE_COL][0]) > 0 and float(out.extra[DERIVATIVE_COL][1]) > 0
    assert float(out.score[:2].min()) > float(out.score[2])
    with pytest.raises(ValueError, match="other heads"):
        build_scorer("gradient_alignment", model, HeadSet(((0, 0),), heads.geometry), probe_gradient=pg)
    with pytest.raises(ValueError, match="probe gradient"):
        build_scorer("gradient_alignment", model, heads)


def test_probe_row_losses_are_the_scores_loss_full(llama):
    """The probe rows' own losses (issue 29's reference for what a clean task row costs) are measured as a
    corpus row's ``loss_full`` is: the exact scorer on the same rows gives the same numbers."""
    model, tok = llama
    heads = HeadSet(((1, 0), (2, 3)), attention_geometry(model))
    pg = _probe_gradient(model, tok, heads)
    batch = _batch(tok, PROBE + ROWS)
    losses = probe_row_losses(model, [batch], chunk_tokens=16)
    out = build_scorer("gradient_alignment", model, heads, chunk_tokens=16, probe_gradient=pg)(batch)
    torch.testing.assert_close(torch.tensor(losses), out.loss_full.float(), rtol=0, atol=1e-5)
