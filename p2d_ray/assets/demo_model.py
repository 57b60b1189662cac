"""The offline demo model: a tiny Llama pre-trained by our own plain-torch loop on the demo mixture.

No network here or in CI, so the project makes its own model. ``build_demo_model`` trains a byte-level BPE
tokenizer on the mixture, builds a ``LlamaForCausalLM`` from a ``LlamaConfig`` (GQA: 8 query heads share
4 key/value heads), and pre-trains it briefly (next-token loss on every token of prompt+response, AdamW,
linear warm-up then cosine decay, fixed seed, fixed thread count) so its attention heads mean something.
``ensure_demo_model`` builds the fixed recipe once under ``$P2D_RAY_CACHE/demo/model`` (locked, atomic;
``meta.json`` records the recipe hash, so a changed recipe rebuilds) and returns the cached path after.

The pre-training mixture is a fresh draw of the corpus generator (another seed), not the corpus rows
themselves: the model knows the distribution but has not memorised the rows Stage 2 will score.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from p2d_ray.assets.cache import build_once, cache_root
from p2d_ray.assets.synthetic import RECIPE_VERSION, generate_corpus, generate_heldout
from p2d_ray.assets.tokenizer import build_tokenizer
from p2d_ray.config import DataConfig
from p2d_ray.data.answers import exact_match
from p2d_ray.data.formatting import collate, encode_row

PRETRAIN_SEED = 100  # corpus generator seed of the pre-training mixture (the demo corpus uses 0)
PRETRAIN_ID_START = 50_000_000

# The fixed recipe behind ensure_demo_model(); bump MODEL_RECIPE_VERSION when the training code changes.
MODEL_RECIPE_VERSION = 1
# Measured here (build_cpu_seconds in meta.json): ~115 CPU-s, i.e. ~2 min on an idle core. lr 6e-3 beat
# 3e-3 and 1.2e-2 on held-out arithmetic loss at this budget. One thread: on a shared 2-core box two
# OpenMP threads ran 5x slower than one whenever other processes competed for the cores.
DEMO_RECIPE = dict(
    steps=500,
    batch_size=32,
    lr=6e-3,
    warmup=30,
    weight_decay=0.01,
    seed=0,
    n_train_rows=20_000,
    vocab_size=768,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    head_dim=16,
    hidden_size=128,
    intermediate_size=344,
    threads=1,
    n_eval=200,  # held-out arithmetic rows for the before/after response loss
    n_exact=50,  # held-out problems for the greedy `#### answer` exact-match count
)


def _encode_all(rows: list[dict], tok) -> list:
    cfg = DataConfig()
    return [encode_row(r, tok, cfg, "prompt_response") for r in rows]


def _lm_loss(model, batch: dict, on: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and token count. ``on="all"``: every real token (pre-training);
    ``on="target"``: response tokens only (held-out evaluation)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    keep = batch["attention_mask"] if on == "all" else batch["loss_mask"]
    keep = keep[:, 1:].bool()  # token t is predicted from position t-1
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1][keep].float(), batch["input_ids"][:, 1:][keep], reduction="sum"
    )
    return nll, keep.sum()


@torch.no_grad()
def mean_loss(model, tok, rows: list[dict], on: str = "target", batch_size: int = 50) -> float:
    """Mean per-token loss over ``rows``: on the responses (``on="target"``, the prompt is context) or on
    every token (``on="all"``, the pre-training objective)."""
    was_training = model.training
    model.eval()
    enc = _encode_all(rows, tok)
    total, count = 0.0, 0
    for i in range(0, len(enc), batch_size):
        nll, n = _lm_loss(model, collate(enc[i : i + batch_size], tok.pad_token_id), on=on)
        total, count = total + nll.item(), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def greedy_exact_match(model, tok, rows: list[dict], max_new_tokens: int = 32) -> int:
    """How many rows' ``#### <answer>`` the model reproduces by greedy decoding from the prompt alone."""
    model.eval()
    right = 0
    for row in rows:
        ids = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        right += exact_match(text, row["response"])
    return right


def _length_bucketed_batches(lengths: list[int], batch_size: int, steps: int, gen: torch.Generator):
    """``steps`` batches of row indices: each epoch is a fresh permutation cut into pools of 16 batches,
    each pool sorted by length before it is split, and the batches shuffled. Rows of similar length share a
    batch, so right-padding wastes little compute (rows run 10-70 tokens)."""
    out: list[list[int]] = []
    while len(out) < steps:
        order = torch.randperm(len(lengths), generator=gen).tolist()
        pool = batch_size * 16
        epoch = []
        for p in range(0, len(order) - batch_size + 1, pool):
            chunk = sorted(order[p : p + pool], key=lengths.__getitem__)
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        out += [epoch[i] for i in torch.randperm(len(epoch), generator=gen).tolist()]
    return out[:steps]


def _pretrain(
    model,
    train: list,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    seed: int,
) -> list[list]:
    """AdamW pre-training of ``model`` on the encoded rows ``train`` for ``steps`` length-bucketed batches
    (linear warm-up, cosine decay to 10 % of ``lr``). Returns the loss curve: ``[step, mean loss]`` over
    ~10 % windows."""
    # No weight decay on norms (1-D params): decaying RMSNorm gains toward 0 only hurts.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10% of lr
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    batches = _length_bucketed_batches([len(e.input_ids) for e in train], batch_size, steps, gen)
    curve, window, window_n = [], 0.0, 0
    every = max(1, steps // 10)
    model.train()
    for step, idx in enumerate(batches):
        batch = collate([train[i] for i in idx], pad_id)
        nll, n = _lm_loss(model, batch, on="all")
        loss = nll / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window, window_n = window + loss.item(), window_n + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append([step + 1, round(window / window_n, 4)])
            window, window_n = 0.0, 0
    return curve


def build_demo_model(
    out_dir: str | Path,
    *,
    steps: int = DEMO_RECIPE["steps"],
    batch_size: int = DEMO_RECIPE["batch_size"],
    lr: float = DEMO_RECIPE["lr"],
    warmup: int = DEMO_RECIPE["warmup"],
    weight_decay: float = DEMO_RECIPE["weight_decay"],
    seed: int = DEMO_RECIPE["seed"],
    n_train_rows: int = DEMO_RECIPE["n_train_rows"],
    vocab_size: int = DEMO_RECIPE["vocab_size"],
    n_layers: int = DEMO_RECIPE["n_layers"],
    n_heads: int = DEMO_RECIPE["n_heads"],
    n_kv_heads: int = DEMO_RECIPE["n_kv_heads"],
    head_dim: int = DEMO_RECIPE["head_dim"],
    hidden_size: int = DEMO_RECIPE["hidden_size"],
    intermediate_size: int = DEMO_RECIPE["intermediate_size"],
    threads: int = DEMO_RECIPE["threads"],
    n_eval: int = DEMO_RECIPE["n_eval"],
    n_exact: int = DEMO_RECIPE["n_exact"],
) -> dict:
    """Train the tokenizer and pre-train a tiny Llama; save both (safetensors) into ``out_dir``.

    Returns build statistics: seconds, the training-loss curve (mean per token over ~10% windows), the
    loss on ``n_eval`` fixed rows of the training mixture and on the responses of ``n_eval`` held-out
    arithmetic problems before/after, and the greedy ``####`` exact-match count on
    ``n_exact`` held-out problems (0 skips decoding).
    """
    if steps < 1 or batch_size < 1 or n_train_rows < batch_size:
        raise ValueError(
            f"need steps >= 1 and n_train_rows >= batch_size >= 1; got steps={steps}, "
            f"batch_size={batch_size}, n_train_rows={n_train_rows}"
        )
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    t0, cpu0 = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # deliberate: Ray and OMP defaults differ from run to run
    try:
        rows = generate_corpus(n_train_rows, PRETRAIN_SEED, PRETRAIN_ID_START).to_pylist()
        tok = build_tokenizer([r["prompt"] + r["response"] for r in rows], vocab_size)
        train = _encode_all(rows, tok)
        heldout = generate_heldout(n_rows=max(n_eval, n_exact)).to_pylist()

        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        # Fixed rows of the training mixture (all tokens) and held-out arithmetic (responses), before/after.
        mixture = rows[:n_eval]
        mix_before, loss_before = (
            mean_loss(model, tok, mixture, "all"),
            mean_loss(model, tok, heldout[:n_eval]),
        )

        curve = _pretrain(model, train, tok.pad_token_id, steps, batch_size, lr, warmup, weight_decay, seed)
        train_seconds = time.perf_counter() - t0

        mix_after, loss_after = mean_loss(model, tok, mixture, "all"), mean_loss(model, tok, heldout[:n_eval])
        exact = greedy_exact_match(model, tok, heldout[:n_exact]) if n_exact else None
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    finally:
        torch.set_num_threads(prev_threads)
    return {
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
        # CPU seconds of this process: with threads=1 this is the wall time on an idle machine.
        "build_cpu_seconds": round(time.process_time() - cpu0, 1),
        "n_params": sum(p.numel() for p in model.parameters()),
        "loss_curve": curve,
        "mixture_loss_before": round(mix_before, 4),
        "mixture_loss_after": round(mix_after, 4),
        "heldout_arithmetic_loss_before": round(loss_before, 4),
        "heldout_arithmetic_loss_after": round(loss_after, 4),
        "n_heldout_loss": min(n_eval, len(heldout)),
        "greedy_exact_match": exact,
        "n_exact_match": n_exact,
    }


# The benchmark model ("p2d-bench", RESULTS.md): the demo architecture pre-trained 8x longer (~15 CPU-min),
# so that it does more of the arithmetic task than the demo model's 2-minute recipe. Built only when asked.
BENCH_RECIPE = {**DEMO_RECIPE, "steps": 4000, "warmup": 200, "lr": 3e-3}


def ensure_demo_model(cache_dir: str | Path | None = None, bench: bool = False) -> Path:
    """The demo model directory (config.json, model.safetensors, tokenizer files, meta.json), built with
    :data:`DEMO_RECIPE` (``bench``: :data:`BENCH_RECIPE`) on first use under ``<cache>/demo/model[-bench]``
    and reused afterwards."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    spec = BENCH_RECIPE if bench else DEMO_RECIPE
    recipe = {"model_version": MODEL_RECIPE_VERSION, "data_version": RECIPE_VERSION, **spec}
    name = "model-bench" if bench else "model"
    return build_once(root / "demo" / name, recipe, lambda tmp: build_demo_model(tmp, **spec))
