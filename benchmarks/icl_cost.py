"""icl_attention's cost against one plain forward over the same candidates, side by side in one process.

    .venv/bin/python -m benchmarks.icl_cost --model smollm2-135m \
        --heads runs/x/heads.json --rows 64 --rounds 3

The same ``--rows`` demo-corpus rows (chat format), torch threads 1 (as a scoring actor), interleaved round by
round; median seconds per method:

- ``plain``: ``perplexity`` (one forward + LM head on the response tokens), micro-batches of 16 rows sorted by
  length (the actor's bucketing);
- ``icl``: ``icl_attention`` at n_d=8, n_q=2, one repeat, metric ``likelihood`` (full forward + LM head on the
  query answers), 2 contexts per micro-batch;
- ``icl_attn_only``: the same with metric ``none`` (the forward stops after the highest task-head layer).

Prints one JSON line: seconds, the ratios to ``plain`` and the token counts (context tokens / row tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def _synthetic():
    from p2d_ray.assets import synthetic

    return synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads", required=True, help="heads.json for the model (e.g. from p2d-ray localize)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from p2d_ray.config import DataConfig, ModelConfig, ScoreConfig
    from p2d_ray.data.formatting import collate, encode_row
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.scoring.icl import build_icl_scorer, to_segment
    from p2d_ray.scoring.scorers import build_scorer

    torch.set_num_threads(1)
    syn = _synthetic()
    corpus = syn.generate_corpus(args.rows, 0).to_pylist()
    probe = syn.generate_probe([r["prompt"] for r in corpus]).to_pylist()
    mcfg = ModelConfig(name_or_path=args.model)
    tok, model = load_tokenizer(mcfg), load_model(mcfg)
    heads = HeadSet.load(args.heads)
    data = DataConfig(format="chat", max_length=256)
    enc = [encode_row(r, tok, data, "chat") for r in corpus]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i].input_ids))
    batches = [collate([enc[i] for i in order[s : s + 16]], tok.pad_token_id) for s in range(0, len(enc), 16)]
    plain = build_scorer("perplexity", model)
    segs = [to_segment(np.array(e.input_ids), np.array(e.loss_mask), tok.bos_token_id) for e in enc]
    groups = np.zeros((len(segs), 2), dtype=np.int64)
    scorers = {}
    for metric, name in (("likelihood", "icl"), ("none", "icl_attn_only")):
        cfg = ScoreConfig(scorer="icl_attention", icl_metric=metric, batch_size=16)
        scorers[name] = build_icl_scorer(model, heads, cfg, tok, data.model_dump_json(), "chat", probe)
    runs = {
        "plain": lambda: [plain(b) for b in batches],
        **{k: (lambda s=s: s.score_rows(segs, groups)) for k, s in scorers.items()},
    }
    secs: dict[str, list[float]] = {k: [] for k in runs}
    runs["plain"]()  # warm-up
    for _ in range(args.rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            secs[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in secs.items()}
    sc = scorers["icl"]
    from p2d_ray.scoring.icl import plan_contexts

    ctx_tokens = sum(len(sc._assemble(c, segs)[0]) for c in plan_contexts(groups, 8, 2, 1, 0, len(sc.probe)))
    print(
        json.dumps(
            {
                "rows": len(enc),
                "heads": len(heads),
                "highest_head_layer": max(h[0] for h in heads.heads),
                "layers": model.config.num_hidden_layers,
                "median_s": med,
                "ratio_to_plain": {k: med[k] / med["plain"] for k in med},
                "row_tokens": sum(len(e.input_ids) for e in enc),
                "context_tokens": ctx_tokens,
                "all_s": secs,
            }
        )
    )


if __name__ == "__main__":
    main()
