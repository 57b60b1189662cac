"""The exact scorer's cost with K targets' heads in one backward vs one target's, in one process (issue 27).

    .venv/bin/python -m benchmarks.targets_inprocess --heads runs/s11/targets/k4 \\
        --json benchmarks/results/targets/inprocess.json

SmolLM2 on one micro-batch of demo corpus rows (chat format, empty system prompt, max_length 128: the demo's
knobs), one torch thread (a scoring actor's), the heads each target's localize found (``<heads>/targets/<name>/
heads.json``). Per variant -- one target (``RowGradients``, what a single-target pass runs), the first two and
all four targets (``MultiRowGradients``) -- the forward + backward + per-row products are timed, the variants
alternating ``--reps`` times (so a changing machine load hits each alike); the median is reported. The probe
directions are seeded random unit vectors in each target's subspace: the cost does not depend on their values.
Also checked: the multi-target pass gives the single-target pass's ``<g_i, G>`` and ``|g_i|`` for its first
target.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="runs/s11/targets/k4")
    p.add_argument("--targets", default="arithmetic,units,capitals,letters")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--feature_layer", type=int, default=3, help="distill_layer: round(30 / 10) on SmolLM2")
    p.add_argument("--json", default="benchmarks/results/targets/inprocess.json")
    args = p.parse_args(argv)

    from p2d_ray.assets import demo_data
    from p2d_ray.config import DataConfig, ModelConfig
    from p2d_ray.data.formatting import collate, encode_row
    from p2d_ray.data.io import read_rows
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.scoring.gradient import MultiRowGradients, ProbeGradient, RowGradients
    from p2d_ray.training.deltas import plan_head_deltas

    torch.set_num_threads(1)
    names = args.targets.split(",")
    mcfg = ModelConfig(name_or_path="smollm2-135m")
    dcfg = DataConfig(format="chat", max_length=128, system_prompt="")
    t = time.perf_counter()
    model, tok = load_model(mcfg), load_tokenizer(mcfg)
    load_s = time.perf_counter() - t
    rows = read_rows(str(demo_data("arithmetic").corpus_dir), args.rows)
    batch = collate([encode_row(r, tok, dcfg, "chat") for r in rows], tok.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    grads = {}
    for n in names:
        heads = HeadSet.load(Path(args.heads, "targets", n, "heads.json"))
        specs = plan_head_deltas(model, heads)
        direction = {s.module_name: torch.randn(s.shape, generator=gen) for s in specs}
        norm = torch.sqrt(sum((v**2).sum() for v in direction.values()))
        meta = {"first_layer": min(layer for layer, _ in heads.heads), "fingerprint": n}
        grads[n] = ProbeGradient(specs, {k: v / norm for k, v in direction.items()}, meta)
    variants = {
        "one": RowGradients(model, grads[names[0]]),
        "k2": MultiRowGradients(model, {n: grads[n] for n in names[:2]}),
        f"k{len(names)}": MultiRowGradients(model, grads),
        # + the pooled layer-l_f features stored for targets added later (what the shared pass now runs)
        f"k{len(names)}+features": MultiRowGradients(model, grads, feature_layer=args.feature_layer),
    }
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    outputs = {}
    for _ in range(args.reps):
        for name, fn in variants.items():
            t = time.perf_counter()
            outputs[name] = fn(batch)
            seconds[name].append(time.perf_counter() - t)
    one = outputs["one"]
    multi = outputs[f"k{len(names)}"]
    result = {
        "rows": args.rows,
        "tokens": int(batch["attention_mask"].sum()),
        "model_load_s": load_s,
        "specs_per_target": {n: len(g.specs) for n, g in grads.items()},
        "first_layer": {n: g.first_layer for n, g in grads.items()},
        "seconds": seconds,
        "median_s": {k: float(np.median(v)) for k, v in seconds.items()},
        "check_dot_max_abs_diff": float((multi[2][0] - one[2]).abs().max()),
        "check_sq_max_rel_diff": float(((multi[3][0] - one[3]).abs() / one[3]).max()),
    }
    base = result["median_s"]["one"]
    result["ratio_to_one"] = {k: v / base for k, v in result["median_s"].items()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
