"""Per-sample costs of Stage 2 on this machine, the inputs to SCALING.md's projections.

    .venv/bin/python -m benchmarks.scaling_costs                 # demo model (p2d-demo), demo corpus
    .venv/bin/python -m benchmarks.scaling_costs --model tiny    # 2-layer test model

In one process, without Ray (Ray's own overhead is measured by the scoring benchmarks): tokenising rows
with the scoring path's batched tokenizer, and scoring length-bucketed micro-batches with the real scorers
(influence fused = one forward of the batch stacked twice, influence as two forwards, perplexity = one
forward). Scorers run interleaved per round so machine load hits each alike; medians are reported. The
achieved FLOP rate uses the standard count forward ~= 2 * params * tokens, over the padded tokens the
model actually processed, so it can be compared with a GPU's peak for an MFU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SCORERS = (
    ("influence (fused)", "influence", True, 2),
    ("influence (2 passes)", "influence", False, 2),
    ("perplexity", "perplexity", True, 1),
)


def _model_path(choice: str, workdir: Path) -> str:
    if choice == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import save_tiny_model

        return save_tiny_model(workdir / "tiny", "llama")
    from p2d_ray.assets.demo_model import ensure_demo_model

    return str(ensure_demo_model())


def _matmul_params(model) -> int:
    """Parameters that cost 2 FLOPs per token in a forward: everything but the input embedding lookup
    (the LM head counts, tied or not)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - emb.numel() + (head.numel() if head.data_ptr() == emb.data_ptr() else 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("demo", "tiny"), default="demo")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a scoring actor's torch_threads)")
    ap.add_argument("--concat", type=int, default=1, help="join this many corpus rows into one (longer rows)")
    args = ap.parse_args(argv)

    from p2d_ray.assets.synthetic import demo_assets
    from p2d_ray.config import DataConfig, ModelConfig
    from p2d_ray.data.formatting import collate, resolve_format
    from p2d_ray.data.io import read_table
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.geometry import attention_geometry
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.scoring.scorers import build_scorer
    from p2d_ray.scoring.tokenize import BatchedTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="p2d-scaling-"))
    mcfg = ModelConfig(name_or_path=_model_path(args.model, workdir), device="cpu", dtype="float32")
    data = DataConfig(max_length=512)
    table = read_table(str(demo_assets().corpus_dir)).slice(0, args.rows * args.concat)
    fmt = resolve_format(data, table.column_names)
    parts = table.select([data.prompt_column, data.response_column]).to_pylist()
    rows = [  # --concat k: k demo rows in one (prompt, response), for realistic lengths
        {
            data.prompt_column: parts[i][data.prompt_column],
            data.response_column: "\n".join(
                r[data.prompt_column] + r[data.response_column] for r in parts[i : i + args.concat]
            )[len(parts[i][data.prompt_column]) :],
        }
        for i in range(0, len(parts), args.concat)
    ]

    tok = load_tokenizer(mcfg)
    model = load_model(mcfg)
    geo = attention_geometry(model)
    n_heads = max(1, round(0.1 * geo.total_heads))  # P2D's ~10 %: which heads does not change the cost
    heads = HeadSet(tuple((i % geo.n_layers, (i * 7) % geo.n_heads) for i in range(n_heads)), geo)
    params = _matmul_params(model)
    shutil.rmtree(workdir, ignore_errors=True)  # the tiny model, if any, is loaded by now

    tok_s = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        encoded = BatchedTokenizer(tok).encode_rows(rows, data, fmt, [])
        tok_s.append((time.perf_counter() - t0) / len(rows))
    encoded = [e for e in encoded if not isinstance(e, str)]
    encoded.sort(key=lambda e: -len(e.input_ids))  # the actor's length bucketing, over the whole set
    batches = [
        collate(encoded[i : i + args.batch_size], tok.pad_token_id)
        for i in range(0, len(encoded), args.batch_size)
    ]
    real = sum(len(e.input_ids) for e in encoded)
    padded = sum(b["input_ids"].numel() for b in batches)

    timings = {name: [] for name, *_ in SCORERS}
    fns = {
        name: build_scorer(scorer, model, heads, "zero", 1024, fused) for name, scorer, fused, _ in SCORERS
    }
    for b in batches[:2]:  # warm-up
        for fn in fns.values():
            fn(b)
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            timings[name].append(time.perf_counter() - t0)

    n = len(encoded)
    print(
        f"model {args.model}: {geo.family} {geo.n_layers}x{geo.n_heads} heads, {params / 1e6:.2f} M matmul "
        f"params ({2 * params / 1e6:.1f} MFLOP/token forward); {n} rows, {real / n:.1f} tokens/row "
        f"({padded / n:.1f} padded), batch {args.batch_size}, torch threads {args.threads}"
    )
    print(f"tokenise (batched, scoring path): {1e6 * statistics.median(tok_s):.0f} us/row")
    print(f"{'scorer':<22}{'ms/row':>9}{'rows/s':>9}{'GFLOP/s':>10}{'vs fused':>10}")
    base = statistics.median(timings[SCORERS[0][0]])
    for name, _, _, passes in SCORERS:
        t = statistics.median(timings[name])
        gflops = passes * 2 * params * padded / t / 1e9
        print(f"{name:<22}{1e3 * t / n:>9.2f}{n / t:>9.1f}{gflops:>10.2f}{t / base:>10.2f}")


if __name__ == "__main__":
    main()
