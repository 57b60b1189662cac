"""Stage 3 side by side: P2D head deltas vs PEFT LoRA (r=16) vs full fine-tuning, same model and batch.

    .venv/bin/python -m benchmarks.training                 # demo model (p2d-demo), in-process + Ray Train
    .venv/bin/python -m benchmarks.training --model tiny    # 2-layer test model, if the demo is not built
    .venv/bin/python -m benchmarks.training --model smollm2 --steps 5 --rounds 2 --trainer-steps 12
    .venv/bin/python -m benchmarks.training --no-trainer    # skip the Ray Train + DeepSpeed pass

Two measurements, both interleaved per round so load on this shared machine hits every adaptation alike:
1. **in-process step time** (``time_train_steps``: same loss, batch and trainable parameters as the trainer,
   torch AdamW, no Ray): each (round, adaptation) runs in a fresh subprocess so its peak RSS belongs to it
   alone (a child that only loads the model gives the baseline RSS).
2. **through the trainer** (``run_train``: Ray Train, 2 CPU workers, DeepSpeed ZeRO-2): steady-state step
   time (each attempt's first step excluded) and the workers' peak RSS.
Heads: 10% of the model's heads (random, fixed seed): step cost depends on how many heads, not which.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq

ADAPTATIONS = ("heads", "lora", "full")


def _config(run_dir: str, model: str, corpus: str, batch_size: int):
    from p2d_ray.config import build_config

    return build_config(
        {"run_dir": run_dir, "model": {"name_or_path": model}, "data": {"corpus_path": corpus}},
        [f"train.batch_size={batch_size}", "train.lora_r=16", "train.lora_alpha=16", "train.torch_threads=1"],
    )


def _setup(workdir: Path, model_choice: str, n_rows: int) -> tuple[str, str, str]:
    """(model path, run dir with heads.json + subset/, corpus file)."""
    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.geometry import geometry_from_config
    from p2d_ray.models.loading import load_config_checked

    if model_choice == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import save_tiny_model

        model = save_tiny_model(workdir / "tiny_model", "llama")
    elif model_choice == "smollm2":  # the real model (its converted safetensors in the cache)
        model = "smollm2-135m"
    elif model_choice == "demo":
        from p2d_ray.assets.demo_model import ensure_demo_model

        model = str(ensure_demo_model())
    else:  # demo-shape: the demo's architecture and tokenizer recipe after 1 pre-training step
        from p2d_ray.assets.demo_model import build_demo_model

        build_demo_model(workdir / "demo_shape", steps=1, n_exact=0)
        model = str(workdir / "demo_shape")
    cfg0 = _config(str(workdir / "run"), model, None, 8)
    corpus = corpus_path(cfg0)  # the demo corpus
    rows = pads.dataset(corpus, format="parquet").head(n_rows)
    run = workdir / "run"
    (run / "subset").mkdir(parents=True, exist_ok=True)
    pq.write_table(rows, run / "subset" / "part-0.parquet")
    pq.write_table(rows, workdir / "corpus.parquet")
    geo = geometry_from_config(load_config_checked(cfg0.model))
    k = max(1, round(0.10 * geo.total_heads))
    import torch

    pick = torch.randperm(geo.total_heads, generator=torch.Generator().manual_seed(0))[:k].tolist()
    HeadSet(tuple(divmod(i, geo.n_heads) for i in pick), geo, {"method": "random-10%"}).save(
        run / "heads.json"
    )
    return model, str(run), str(workdir / "corpus.parquet")


def _child(args) -> None:
    """One measurement in a fresh process; prints one JSON line."""
    from p2d_ray.models.loading import load_model
    from p2d_ray.training.loop import peak_memory_bytes
    from p2d_ray.training.trainer import time_train_steps

    cfg = _config(args.run_dir, args.model_path, args.corpus, args.batch_size)
    if args.child == "load":
        import torch

        load_model(cfg.model)
        out = {"adaptation": "load", "peak_memory_bytes": peak_memory_bytes(torch.device("cpu"))}
    else:
        out = time_train_steps(cfg, args.child, args.steps)
    print(json.dumps(out))


def _run_child(kind: str, model: str, run: str, corpus: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.training",
        "--child",
        kind,
        "--model-path",
        model,
        "--run-dir",
        run,
        "--corpus",
        corpus,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _trainer_pass(model: str, run: str, corpus: str, args) -> dict:
    import ray

    from p2d_ray.training.trainer import run_train

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        for adaptation in ADAPTATIONS:
            cfg = _config(run, model, corpus, args.batch_size)
            cfg = cfg.model_copy(
                update={
                    "train": cfg.train.model_copy(
                        update={
                            "adaptation": adaptation,
                            "num_workers": 2,
                            "zero_stage": 2,
                            "max_steps": args.trainer_steps,
                            "checkpoint_every": 10**6,
                            "torch_threads": 1,
                        }
                    )
                }
            )
            s = run_train(cfg)
            warm = set(s["step_time"]["excluded_first_steps"])
            out[adaptation] = {
                "step_median_s": s["step_time"]["median"],
                "step_min_s": min(t for i, t in enumerate(s["step_seconds"], 1) if i not in warm),
                "fit_seconds": s["fit_seconds"],
                "peak_rss_bytes_max_worker": s["peak_memory_bytes"],
                "trainable_params": s["trainable_params"],
                "steps": s["steps"],
                "loss_first_last": [s["loss_curve"][0], s["loss_curve"][-1]],
            }
    finally:
        ray.shutdown()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=["auto", "demo", "demo-shape", "tiny", "smollm2"],
        default="auto",
        help="auto: the demo model if already built, else demo-shape (same architecture, untrained: step "
        "time and memory do not depend on weight values)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per in-process measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--trainer-steps", type=int, default=12)
    p.add_argument("--no-trainer", action="store_true")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    # internal: one measurement in a subprocess
    p.add_argument("--child", choices=["load", *ADAPTATIONS])
    p.add_argument("--model-path")
    p.add_argument("--run-dir")
    p.add_argument("--corpus")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        _child(args)
        return 0

    if args.model == "auto":
        from p2d_ray.assets.cache import cache_root

        args.model = "demo" if (cache_root() / "demo" / "model" / "meta.json").is_file() else "demo-shape"
    load_start = os.getloadavg()[0]  # other processes on this machine: record how busy it was
    workdir = Path(tempfile.mkdtemp(prefix="p2d-bench-train-"))
    model, run, corpus = _setup(workdir, args.model, n_rows=max(512, (args.steps + 1) * args.batch_size * 2))
    rows: dict[str, list[dict]] = {k: [] for k in ("load", *ADAPTATIONS)}
    for r in range(args.rounds):
        order = ["load", *ADAPTATIONS] if r % 2 == 0 else ["load", *reversed(ADAPTATIONS)]
        for kind in order:
            rows[kind].append(_run_child(kind, model, run, corpus, args))
            print(f"round {r} {kind}: {rows[kind][-1].get('step_seconds', '-')}", file=sys.stderr)
    in_process = {}
    for a in ADAPTATIONS:
        times = [t for x in rows[a] for t in x["step_times"]]
        in_process[a] = {
            "step_median_s": statistics.median(times),
            # On a shared machine the fastest step is the one least disturbed by other processes.
            "step_min_s": min(times),
            "trainable_params": rows[a][0]["trainable_params"],
            "state_bytes": rows[a][0]["state_bytes"],
            "peak_rss_bytes": statistics.median(x["peak_memory_bytes"] for x in rows[a]),
            "tokens_per_step": rows[a][0]["tokens_per_step"],
        }
    for a in ADAPTATIONS:
        for k in ("median", "min"):
            in_process[a][f"{k}_vs_full"] = in_process[a][f"step_{k}_s"] / in_process["full"][f"step_{k}_s"]
    result = {
        "model": {
            "demo": "p2d-demo",
            "demo-shape": "p2d-demo architecture + tokenizer, 1 pre-training step (demo not built yet)",
            "tiny": "tiny 2-layer llama (tests/conftest.py)",
            "smollm2": "SmolLM2-135M-Instruct (30 layers x 9 heads, 135 M parameters)",
        }[args.model],
        "model_path": model,
        "batch_size": args.batch_size,
        "heads": json.loads(Path(run, "heads.json").read_text())["heads"],
        "rounds": args.rounds,
        "steps_per_measurement": args.steps,
        "in_process": in_process,
        "load_only_peak_rss_bytes": statistics.median(x["peak_memory_bytes"] for x in rows["load"]),
        "loadavg_1min_start": load_start,
    }
    if not args.no_trainer:
        result["trainer"] = _trainer_pass(model, run, corpus, args)
    result["loadavg_1min_end"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
