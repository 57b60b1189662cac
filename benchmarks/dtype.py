"""fp32 vs bf16 forward on this CPU (SmolLM2): speed and agreement of per-row losses, side by side.

    .venv/bin/python -m benchmarks.dtype                      # 128 short rows, batch 16, 1 torch thread
    .venv/bin/python -m benchmarks.dtype --rows 64 --threads 2

The same length-sorted batches go through the model loaded in fp32 and in bf16, interleaved batch by
batch (load on this shared machine hits both alike), timed in process CPU seconds. Per-row losses and
scores come from the ``influence`` scorer (10% of the heads gated; ``loss_full`` is what ``perplexity``
scores). Agreement: absolute differences, Spearman rank correlation (selection uses ranks) and the overlap
of the top 10% by influence score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import save_result, uptime

SMOLLM2 = "smollm2-135m"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from benchmarks.score_scale import write_corpus
    from p2d_ray.config import DataConfig, ModelConfig
    from p2d_ray.data.formatting import collate, encode_row
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.geometry import attention_geometry
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.scoring.scorers import build_scorer

    torch.set_num_threads(args.threads)
    import tempfile

    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="p2d-bench-dtype-"))
    write_corpus(work / "c", args.rows, args.rows)
    rows = pq.read_table(work / "c").to_pylist()
    tok = load_tokenizer(ModelConfig(name_or_path=args.model))
    enc = sorted(
        (encode_row(r, tok, DataConfig(), "prompt_response") for r in rows), key=lambda e: len(e.input_ids)
    )
    batches = [
        collate(enc[i : i + args.batch_size], tok.pad_token_id) for i in range(0, len(enc), args.batch_size)
    ]
    models = {d: load_model(ModelConfig(name_or_path=args.model, dtype=d)) for d in ("float32", "bfloat16")}
    geo = attention_geometry(models["float32"])
    k = max(1, round(0.10 * geo.total_heads))  # 10% of the heads, fixed: cost and noise, not which heads
    heads = HeadSet(tuple(divmod(i * 7 % geo.total_heads, geo.n_heads) for i in range(k)), geo)
    scorers = {d: build_scorer("influence", m, heads) for d, m in models.items()}
    cpu = dict.fromkeys(models, 0.0)
    losses = {d: [] for d in models}
    scores = {d: [] for d in models}
    with torch.inference_mode():
        for f in scorers.values():  # warm-up (oneDNN kernels, allocator)
            f(batches[0])
        for r in range(args.rounds):
            for j, b in enumerate(batches):
                for d in list(models)[(r + j) % 2 :] + list(models)[: (r + j) % 2]:
                    c = time.process_time()
                    out = scorers[d](b)
                    cpu[d] += time.process_time() - c
                    if r == 0:
                        losses[d].append(out.loss_full.float())
                        scores[d].append(out.score.float())
    a, b = (torch.cat(losses[d]).numpy() for d in ("float32", "bfloat16"))
    sa, sb = (torch.cat(scores[d]).numpy() for d in ("float32", "bfloat16"))
    diff = np.abs(a - b)

    def spearman(x, y):
        return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])

    top = max(1, len(sa) // 10)  # what selection keeps: the top 10% by influence score
    top_overlap = len(set(np.argsort(-sa)[:top]) & set(np.argsort(-sb)[:top])) / top
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches)) * args.rounds
    out = {
        "rows": len(enc),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "cpu_s": cpu,
        "tokens_per_cpu_s": {d: tokens / s for d, s in cpu.items()},
        "bf16_speedup": cpu["float32"] / cpu["bfloat16"],
        "loss_abs_diff_max": float(diff.max()),
        "loss_abs_diff_median": float(np.median(diff)),
        "loss_fp32_median": float(np.median(a)),
        "spearman_loss_fp32_bf16": spearman(a, b),
        "influence_score_fp32_median_abs": float(np.median(np.abs(sa))),
        "influence_score_abs_diff_median": float(np.median(np.abs(sa - sb))),
        "spearman_influence_fp32_bf16": spearman(sa, sb),
        "top10pct_overlap_influence": top_overlap,
        "uptime": uptime(),
    }
    return save_result("dtype", out)


if __name__ == "__main__":
    main()
