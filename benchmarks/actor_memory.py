"""Where a scoring actor's memory goes: one ``ScorerActor`` in a child process, fed the run's own tokenised
blocks, its resident set read after every step.

    flock /tmp/smollm2.lock nice -n 5 .venv/bin/python -m benchmarks.actor_memory --config X.yaml \\
        [--variant NAME:ENV=V,ENV=V:key=value,...] [key=value ...]

The parent plans the run (``plan_score``: needs ``<run_dir>/heads.json``), computes or reuses the probe
gradient, tokenises the corpus with the pipeline's own read + ``tokenize_block`` steps and writes the blocks
to a temporary Arrow file. Each variant is then a fresh child process (so allocator settings such as
``MALLOC_ARENA_MAX`` apply from its start, and nothing of the parent's is counted): it builds the actor as
Ray would (same constructor arguments, ``torch_threads`` from the config) and scores every block, one call
per block, as ONE actor (the real pass splits the blocks over ``score.max_actors`` actors, so this is an
upper bound of a real actor's share). Reported per variant: RSS after imports / after the constructor /
after each call (VmRSS, RssAnon, RssFile), the peak (VmHWM), and seconds per call. Without Ray in the
child, Ray's own worker runtime (~150-250 MB) is not counted; the pipeline's ``score_stats.json`` records
the real actors' peaks (``actors.peak_rss_bytes``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import save_result, uptime


def status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile / RssShmem of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def prepare(args, workdir: Path) -> dict:
    """Plan, probe gradient and tokenised blocks of the run (parent process); written under ``workdir``."""
    import pyarrow as pa

    from p2d_ray.config import load_config
    from p2d_ray.scoring.pipeline import rows_per_block
    from p2d_ray.scoring.plan import plan_score
    from p2d_ray.scoring.shards import ParquetShards
    from p2d_ray.scoring.tokenize import DUP_COL, tokenize_block

    cfg = load_config(args.config, args.overrides)
    plan = plan_score(cfg)
    pg_file = None
    if cfg.score.scorer == "gradient_alignment":
        from p2d_ray.scoring.gradient import FILENAME, ProbeGradient, prepare_probe_gradient

        saved = Path(cfg.run_dir, FILENAME)
        if (
            saved.is_file()
        ):  # memory only: any probe gradient of these heads will do, whatever its fingerprint
            pg = ProbeGradient.load(saved)
        else:
            model_fp = plan.provenance["model_fingerprint"]
            pg = prepare_probe_gradient(cfg, plan.heads, plan.gradient_fingerprint, plan.probe_rows, model_fp)
        pg_file = workdir / "probe_gradient.bin"
        pg_file.write_bytes(pg.to_bytes())
    n_rows = sum(sh.num_rows for sh in plan.shards)
    block_rows = rows_per_block(n_rows, cfg.score)
    d = cfg.data
    source = ParquetShards(
        plan.shards,
        list(range(len(plan.shards))),
        [d.id_column, *plan.text_columns],
        plan.id_type,
        tuple(plan.text_columns),
        block_rows,
        flags={DUP_COL: {}},
        json_columns=(d.messages_column,),
    )
    blocks = []
    for sid, shard in enumerate(plan.shards):
        if args.max_blocks is not None and len(blocks) >= args.max_blocks:
            break
        for block in source._reader(shard, sid, {DUP_COL: None})():
            if args.max_blocks is not None and len(blocks) >= args.max_blocks:
                break
            blocks.append(
                tokenize_block(
                    block, plan.model_json, d.model_dump_json(), plan.fmt, plan.demos, plan.text_columns
                )
            )
    path = workdir / "blocks.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, blocks[0].schema) as writer:
        for b in blocks:
            writer.write_table(b)
    spec = {
        "model_json": plan.model_json,
        "score_json": cfg.score.model_dump_json(),
        "heads_json": plan.heads.to_json() if plan.heads is not None else None,
        "id_column": d.id_column,
        "probe_gradient": str(pg_file) if pg_file else None,
        "blocks": str(path),
        "n_blocks": len(blocks),
        "rows": sum(b.num_rows for b in blocks),
        "corpus_rows": n_rows,
        "block_rows": block_rows,
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    return spec


def child(spec_path: str) -> None:
    """One actor's life in this process: imports, constructor, one call per block; prints a JSON line."""
    t0 = time.perf_counter()
    timeline = {"start": status()}
    import pyarrow as pa
    import torch  # noqa: F401

    from p2d_ray.scoring.actor import ScorerActor

    timeline["imports"] = status()
    spec = json.loads(Path(spec_path).read_text())
    pg = [Path(spec["probe_gradient"]).read_bytes()] if spec["probe_gradient"] else None
    actor = ScorerActor(
        model_json=spec["model_json"],
        score_json=spec["score_json"],
        heads_json=spec["heads_json"],
        id_column=spec["id_column"],
        probe_gradient=pg,
    )
    timeline["constructor"] = status()
    calls = []
    with pa.memory_map(spec["blocks"]) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = pa.Table.from_batches([reader.get_batch(i)])
            t = time.perf_counter()
            actor(batch)
            calls.append({"seconds": time.perf_counter() - t, **status()})
    out = {
        "timeline": timeline,
        "calls": calls,
        "peak_rss_bytes": status()["VmHWM"],
        "after_calls_rss_bytes": calls[-1]["VmRSS"] if calls else None,
        "max_rss_after_call_bytes": max((c["VmRSS"] for c in calls), default=None),
        "score_seconds": sum(c["seconds"] for c in calls),
        "wall_s": time.perf_counter() - t0,
    }
    print("RESULT " + json.dumps(out))


def run_variant(spec_path: Path, name: str, env: dict, overrides: dict) -> dict:
    """A child process with ``env`` added and ``overrides`` (score keys) applied to the actor's config."""
    spec = json.loads(spec_path.read_text())
    if overrides:
        score = json.loads(spec["score_json"]) | overrides
        spec["score_json"] = json.dumps(score)
        spec_path = spec_path.with_name(f"spec-{name}.json")
        spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.actor_memory", "--child", str(spec_path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"variant {name} failed: {proc.stderr[-2000:]}")
    return {"env": env, "overrides": overrides, **json.loads(line[len("RESULT ") :])}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``NAME:ENV=V,ENV=V:key=value,key=value`` (either part may be empty) -> (name, env, score overrides)."""
    import yaml

    name, _, rest = text.partition(":")
    env_part, _, over_part = rest.partition(":")
    env = dict(kv.split("=", 1) for kv in env_part.split(",") if kv)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in over_part.split(",") if kv)}
    return name, env, overrides


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--variant", action="append", default=[], help="NAME:ENV=V,...:score_key=value,...")
    p.add_argument("--repeat", type=int, default=1, help="runs of each variant, interleaved")
    p.add_argument("--name", default="actor_memory", help="benchmarks/results/<name>.json")
    p.add_argument("--max-blocks", type=int, default=None, help="score only the first N blocks")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    variants = [parse_variant(v) for v in args.variant] or [("default", {}, {})]
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare(args, Path(tmp))
        results: dict[str, list] = {name: [] for name, _, _ in variants}
        for _ in range(args.repeat):
            for name, env, overrides in variants:
                results[name].append(run_variant(Path(tmp, "spec.json"), name, env, overrides))
    summary = {
        name: {
            "peak_rss_bytes": [r["peak_rss_bytes"] for r in runs],
            "constructor_rss_bytes": [r["timeline"]["constructor"]["VmRSS"] for r in runs],
            "imports_rss_bytes": [r["timeline"]["imports"]["VmRSS"] for r in runs],
            "max_rss_after_call_bytes": [r["max_rss_after_call_bytes"] for r in runs],
            "score_seconds": [round(r["score_seconds"], 2) for r in runs],
        }
        for name, runs in results.items()
    }
    out = {
        "config": args.config,
        "overrides": args.overrides,
        "rows": spec["rows"],
        "blocks": spec["n_blocks"],
        "block_rows": spec["block_rows"],
        "load": uptime(),
        "summary": summary,
        "runs": results,
    }
    return save_result(args.name, out)


if __name__ == "__main__":
    main()
