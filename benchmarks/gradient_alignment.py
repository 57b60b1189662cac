"""gradient_alignment on SmolLM2: cost in forwards per row (shared lower layers on/off) and selection quality
on a planted two-target mixture with the random-heads control. In one process, no Ray.

    python benchmarks/gradient_alignment.py cost    --model smollm2-135m --rows 64
    python benchmarks/gradient_alignment.py quality --model smollm2-135m --rows 160
    python benchmarks/gradient_alignment.py recompute --rows 48 --repeats 3

``recompute``: the exact scorer as shipped vs with its single LM-head loss chunk checkpointed (recomputed in
backward, as before Session 8), interleaved in one process, at l_min = 0 and 15.

The planted mixture is built here (not the demo generator): two target tasks (arithmetic word sums, list
reversal), corrupted rows of each (wrong answers), and distractor rows (facts, echo answers, chat).
Precision = fraction of clean rows of the target task among the top 10 % by score.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from p2d_ray.config import DataConfig, ModelConfig, build_config
from p2d_ray.data.formatting import collate, encode_row
from p2d_ray.heads.gates import HeadGates
from p2d_ray.heads.headset import HeadSet
from p2d_ray.heads.localize import localize_heads, top_heads
from p2d_ray.models.loading import load_model, load_tokenizer
from p2d_ray.models.loss import sample_loss
from p2d_ray.scoring.gradient import DERIVATIVE_COL, HeadShift, probe_gradient
from p2d_ray.scoring.scorers import alignment_score, build_scorer, influence_score, perplexity_score

WORDS = [
    "cat",
    "dog",
    "fish",
    "bird",
    "tree",
    "river",
    "stone",
    "cloud",
    "apple",
    "lamp",
    "chair",
    "book",
    "road",
    "hill",
    "moon",
    "star",
]
TOPICS = [
    "the ocean",
    "volcanoes",
    "bees",
    "the moon",
    "bread",
    "trains",
    "glaciers",
    "owls",
    "copper",
    "tea",
]


def _arith(rng, clean):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    s = a + b if clean else a + b + rng.choice([-11, -3, 7, 13])
    return {"prompt": f"What is {a} plus {b}?", "response": f"{a} + {b} = {s}. The answer is {s}."}


def _reverse(rng, clean):
    items = rng.sample(WORDS, rng.randint(3, 5))
    out = list(reversed(items)) if clean else rng.sample(items, len(items))
    if not clean and out == list(reversed(items)):
        out = items
    return {"prompt": f"Reverse the order of this list: {', '.join(items)}", "response": ", ".join(out)}


def _distractor(rng):
    kind = rng.randint(0, 2)
    t = rng.choice(TOPICS)
    if kind == 0:
        return {
            "prompt": f"Tell me one fact about {t}.",
            "response": f"Here is a fact about {t}: it is studied by many.",
        }
    if kind == 1:
        q = f"Is {t} interesting?"
        return {"prompt": q, "response": q}  # an answer that repeats the question
    return {"prompt": f"Write a short greeting about {t}.", "response": f"Hello! I hope you enjoy {t} today."}


def mixture(n: int, seed: int = 0) -> list[dict]:
    """20 % clean arithmetic, 20 % clean reversal, 7.5 % corrupted of each, 45 % distractors."""
    rng = random.Random(seed)
    kinds = ["arith"] * 8 + ["reverse"] * 8 + ["arith_bad"] * 3 + ["reverse_bad"] * 3 + ["other"] * 18
    rows = []
    for i in range(n):
        k = kinds[i % len(kinds)]
        if k.startswith("arith"):
            r = _arith(rng, not k.endswith("_bad"))
        elif k.startswith("reverse"):
            r = _reverse(rng, not k.endswith("_bad"))
        else:
            r = _distractor(rng)
        rows.append({"id": i, "kind": k, **r})
    rng.shuffle(rows)
    return rows


def probe(task: str, n: int, seed: int = 100) -> list[dict]:
    rng = random.Random(seed)
    return [(_arith if task == "arith" else _reverse)(rng, True) for _ in range(n)]


def batches(rows, tok, bs=16, max_length=128):
    cfg = DataConfig(max_length=max_length)
    enc = [encode_row(r, tok, cfg, "prompt_response") for r in rows]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    return [
        (order[s : s + bs], collate([enc[i] for i in order[s : s + bs]], tok.pad_token_id))
        for s in range(0, len(order), bs)
    ]


def score_all(fn, bl, n):
    """fn is build_scorer's: it picks inference mode or autograd (exact alignment) itself."""
    out = {}
    for idx, b in bl:
        o = fn(b)
        for j, i in enumerate(idx):
            out[i] = {
                "score": float(o.score[j]),
                "loss": float(o.loss_full[j]),
                **({"deriv": float(o.extra[DERIVATIVE_COL][j])} if o.extra else {}),
            }
    return [out[i] for i in range(n)]


def precision(rows, values, task, frac=0.10, descending=True):
    k = max(1, round(frac * len(rows)))
    order = sorted(range(len(rows)), key=lambda i: -values[i] if descending else values[i])
    return sum(rows[i]["kind"] == task for i in order[:k]) / k


def setup(args):
    """(tokenizer, model, mixture rows, their batches, config) for ``--model`` and ``--rows``."""
    cfg_model = ModelConfig(name_or_path=args.model)
    tok, model = load_tokenizer(cfg_model), load_model(cfg_model)
    rows = mixture(args.rows)
    return (
        tok,
        model,
        rows,
        batches(rows, tok),
        build_config({"model": {"name_or_path": args.model}, "seed": 0}),
    )


def quality(args):
    tok, model, rows, bl, cfg = setup(args)
    results = {}
    for task in args.tasks:
        prows = probe(task, args.probe_rows)
        t0 = time.perf_counter()
        task_heads = localize_heads(model, prows, tok, cfg)
        head_sets = {"task": task_heads} | {f"random_s{s}": task_heads.random_like(s) for s in args.seeds}
        for name, heads in head_sets.items():
            pg = probe_gradient(
                model, heads, [b for _, b in batches(prows, tok, 8)], {"fingerprint": "bench"}
            )
            fn = build_scorer(
                "gradient_alignment",
                model,
                heads,
                probe_gradient=pg,
                alignment_eps=args.eps,
                alignment_method=args.method,
                alignment_normalize=args.normalize,
            )
            t1 = time.perf_counter()
            s = score_all(fn, bl, len(rows))
            r = {
                "l_min": pg.first_layer,
                "n_heads": len(heads),
                "precision_score": precision(rows, [x["score"] for x in s], task),
                "precision_raw_derivative": precision(rows, [x["deriv"] for x in s], task),
                "precision_low_loss": precision(rows, [x["loss"] for x in s], task, descending=False),
                "score_s": round(time.perf_counter() - t1, 1),
            }
            results[f"{task}/{name}"] = r
            print(task, name, json.dumps(r), flush=True)
        print(task, "localize+all", round(time.perf_counter() - t0, 1), "s", flush=True)
    base = {t: sum(r["kind"] == t for r in rows) / len(rows) for t in ("arith", "reverse")}
    print(json.dumps({"base_rate": base, "results": results}, indent=1))


def at_or_above(task: HeadSet, min_layer: int) -> HeadSet:
    """The same number of heads as ``task``, the best-scoring ones at or above ``min_layer``."""
    if not min_layer:
        return task
    scores = torch.tensor(task.meta["scores"])
    scores[:min_layer] = -float("inf")
    return HeadSet(tuple(top_heads(scores, len(task))), task.geometry)


def cost(args):
    tok, model, rows, bl, cfg = setup(args)
    prows = probe("arith", args.probe_rows)
    heads = at_or_above(localize_heads(model, prows, tok, cfg), args.min_layer)
    pg = probe_gradient(model, heads, [b for _, b in batches(prows, tok, 8)], {"fingerprint": "bench"})
    shift = HeadShift(model, pg)
    L, lmin = heads.geometry.n_layers, pg.first_layer
    off = heads.gates_off()

    def influence_unshared(b):  # the pre-sharing two full forwards
        full = sample_loss(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        with HeadGates(model, off, "zero") as hg:
            hg.attention_mask = b["attention_mask"]
            sample_loss(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        return full

    fns = {
        "perplexity": lambda b: perplexity_score(model, b),
        "influence_shared": lambda b: influence_score(model, b, heads, "zero"),
        "influence_unshared": influence_unshared,
        "alignment_central_shared": lambda b: alignment_score(
            model, b, shift, lmin, args.eps, "central", 1024, "loss"
        ),
        "alignment_central_unshared": lambda b: alignment_score(
            model, b, shift, 0, args.eps, "central", 1024, "loss"
        ),
        "alignment_forward_shared": lambda b: alignment_score(
            model, b, shift, lmin, args.eps, "forward", 1024, "loss"
        ),
    }
    exact = build_scorer("gradient_alignment", model, heads, probe_gradient=pg)  # exact + cosine (autograd)
    best = {k: float("inf") for k in fns}
    cpu = {k: float("inf") for k in fns}
    fns["alignment_exact_shared"] = exact
    best["alignment_exact_shared"] = cpu["alignment_exact_shared"] = float("inf")
    for _ in range(args.repeats):  # interleaved so load changes hit every variant alike
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            with torch.inference_mode(k != "alignment_exact_shared"):
                for _, b in bl:
                    fn(b)
            best[k] = min(best[k], time.perf_counter() - t)
            cpu[k] = min(cpu[k], time.process_time() - c)
    ppl, ppl_cpu = best["perplexity"], cpu["perplexity"]
    print(
        json.dumps(
            {
                "rows": len(rows),
                "L": L,
                "l_min": lmin,
                "heads": len(heads),
                "bound_central": 1 + 2 * (L - lmin) / L,
                "bound_forward": 1 + (L - lmin) / L,
                "bound_exact": 1 + (L - lmin) / L,
                "seconds": {k: round(v, 2) for k, v in best.items()},
                "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                "forwards_per_row_wall": {k: round(v / ppl, 2) for k, v in best.items()},
                "forwards_per_row_cpu": {k: round(v / ppl_cpu, 2) for k, v in cpu.items()},
            },
            indent=1,
        )
    )


def recompute(args):
    import inspect
    import textwrap

    import p2d_ray.models.loss as loss_module
    import p2d_ray.scoring.gradient as gradient_module

    # The previous loss_from_hidden: every chunk checkpointed, even a single one.
    src = textwrap.dedent(inspect.getsource(loss_module.loss_from_hidden))
    condition = " and h.shape[0] > chunk_tokens"
    if condition not in src:  # the shipped rule changed: this comparison no longer means what it says
        raise SystemExit(f"loss_from_hidden no longer has {condition.strip()!r}; update this benchmark")
    src = src.replace(condition, "").replace("def loss_from_hidden", "def always_checkpointed")
    ns = dict(vars(loss_module))
    exec(src, ns)
    variants = {"checkpointed": ns["always_checkpointed"], "shipped": loss_module.loss_from_hidden}
    tok, model, rows, bl, cfg = setup(args)
    prows = probe("arith", args.probe_rows)
    task = localize_heads(model, prows, tok, cfg)
    for min_layer in (0, 15):
        heads = at_or_above(task, min_layer)
        pg = probe_gradient(model, heads, [b for _, b in batches(prows, tok, 8)], {"fingerprint": "bench"})
        exact = build_scorer("gradient_alignment", model, heads, probe_gradient=pg)
        cpu = {"perplexity": float("inf"), **{k: float("inf") for k in variants}}
        try:
            for _ in range(args.repeats):  # interleaved, CPU seconds, best of repeats
                for k in cpu:
                    gradient_module.loss_from_hidden = variants.get(k, variants["shipped"])
                    c = time.process_time()
                    with torch.inference_mode(k == "perplexity"):
                        for _, b in bl:
                            perplexity_score(model, b) if k == "perplexity" else exact(b)
                    cpu[k] = min(cpu[k], time.process_time() - c)
        finally:
            gradient_module.loss_from_hidden = variants["shipped"]
        print(
            json.dumps(
                {
                    "l_min": pg.first_layer,
                    "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                    "forwards_per_row": {k: round(v / cpu["perplexity"], 2) for k, v in cpu.items()},
                    "shipped_over_checkpointed": round(cpu["shipped"] / cpu["checkpointed"], 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["cost", "quality", "recompute"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=160)
    p.add_argument("--probe-rows", type=int, default=32)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--method", default="exact")
    p.add_argument("--normalize", default="cosine")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--min-layer", type=int, default=0, help="cost: keep only heads at or above this layer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", nargs="+", default=["arith", "reverse"], choices=["arith", "reverse"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    {"cost": cost, "quality": quality, "recompute": recompute}[a.what](a)
