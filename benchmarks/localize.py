"""Stage 1 side by side: wall time of each localisation method on the same model and probe set.

    .venv/bin/python -m benchmarks.localize                  # demo model (p2d-demo), demo probe set
    .venv/bin/python -m benchmarks.localize --model tiny     # 2-layer test model, if the demo is not built

The methods run interleaved per round (gradient, fisher, alps, gradient, ...) so load on this shared machine
hits each alike; the table reports the median over rounds and the ratio to ``gradient``. ``gradient`` and
``fisher`` share one computation (the same per-sample gate gradients, one forward + backward over the probe
set), so their ratio is ~1 by construction; ``alps`` costs ``alps_steps`` minibatch forward+backward+SGD
steps plus the W1 distances. Also printed: how much the methods' selected head sets agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("gradient", "fisher", "alps")


def _model_path(choice: str, workdir: Path) -> str:
    if choice == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import save_tiny_model

        return save_tiny_model(workdir / "tiny_model", "llama")
    if choice == "demo":
        from p2d_ray.assets.demo_model import ensure_demo_model

        return str(ensure_demo_model())
    return choice


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo | tiny | a local model path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 = every core here)")
    parser.add_argument(
        "overrides", nargs="*", help="config key=value overrides, e.g. localize.alps_steps=10"
    )
    args = parser.parse_args(argv)

    from p2d_ray.assets.paths import probe_path
    from p2d_ray.config import build_config
    from p2d_ray.data.formatting import encode_probe, probe_batches
    from p2d_ray.data.io import read_rows
    from p2d_ray.heads.localize import head_importance, n_selected, top_heads
    from p2d_ray.models.geometry import attention_geometry
    from p2d_ray.models.loading import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = _model_path(args.model, Path(tmp))
        cfg = build_config({"model": {"name_or_path": model_path}}, args.overrides)
        rows = read_rows(probe_path(cfg), limit=cfg.localize.max_probe_samples)
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model)
        geo = attention_geometry(model)
        batches = probe_batches(encode_probe(rows, tok, cfg.data), cfg.localize.batch_size, tok.pad_token_id)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        loc = cfg.localize

        def run(method: str) -> tuple[float, float, torch.Tensor]:
            t0, c0 = time.perf_counter(), time.process_time()
            scores = head_importance(model, batches, method, alps_steps=loc.alps_steps, alps_lr=loc.alps_lr)
            return time.perf_counter() - t0, time.process_time() - c0, scores

        run("gradient")  # warm-up: first-call allocations and kernel selection
        seconds: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}  # less sensitive to other users' load
        scores: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for method in METHODS:
                s, c, scores[method] = run(method)
                seconds[method].append(s)
                cpu[method].append(c)

    count = n_selected(geo.total_heads, loc.top_fraction, loc.top_k)
    chosen = {m: set(top_heads(scores[m], count)) for m in METHODS}
    base = statistics.median(seconds["gradient"])
    base_cpu = statistics.median(cpu["gradient"])
    print(
        f"model {args.model} ({geo.family}, {geo.n_layers} layers x {geo.n_heads} heads, {geo.n_kv_heads} kv heads), "
        f"{len(rows)} probe rows / {n_tokens} tokens, batch {loc.batch_size}, alps_steps {loc.alps_steps}, "
        f"torch threads {args.threads}, median of {args.rounds} interleaved rounds\n"
    )
    print("| method | wall s (median) | wall ratio to gradient | CPU s (median) | CPU ratio | heads kept |")
    print("|---|---|---|---|---|---|")
    for m in METHODS:
        med, med_cpu = statistics.median(seconds[m]), statistics.median(cpu[m])
        heads = ", ".join(f"({layer},{head})" for layer, head in sorted(chosen[m]))
        print(f"| {m} | {med:.2f} | {med / base:.2f} | {med_cpu:.2f} | {med_cpu / base_cpu:.2f} | {heads} |")
    print()
    for i, a in enumerate(METHODS):
        for b in METHODS[i + 1 :]:
            print(f"overlap {a}/{b}: {len(chosen[a] & chosen[b])} of {count}")


if __name__ == "__main__":
    main()
