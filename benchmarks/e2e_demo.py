"""End to end: the demo's wall time per stage and its AER, as a new user gets them.

    .venv/bin/python -m benchmarks.e2e_demo              # fresh clone: empty caches (demo data + model
                                                         # build) and a new run dir
    .venv/bin/python -m benchmarks.e2e_demo --warm       # project caches (.cache/), new run dir

A fresh clone's ``make demo`` first installs (pip, then DeepSpeed's CPU comm op pre-built into
TORCH_EXTENSIONS_DIR, see the Makefile): the fresh mode repeats that op build into its empty cache, timed
and reported separately as part of the install, then runs ``p2d-ray demo`` in a subprocess exactly as
``make demo`` does, and prints the demo's
own wall times (``demo_summary.json``), the stage records behind the AER (``report.json``) and the load
average before and after: this machine is shared, so an absolute time means little without it.
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

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--warm", action="store_true", help="reuse the project caches under .cache/")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="p2d-e2e-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cache = REPO / ".cache" if args.warm else work / "cache"
    env.update(P2D_RAY_CACHE=str(cache / "p2d-ray"), TORCH_EXTENSIONS_DIR=str(cache / "torch_extensions"))
    run_dir = work / "run"
    if not args.warm:  # the install step of the Makefile, into the fresh cache
        t0 = time.perf_counter()
        build = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
        subprocess.run(
            [sys.executable, "-c", build],
            env=dict(env, DS_ACCELERATOR="cpu"),
            check=True,
            capture_output=True,
        )
        print(f"install step (DeepSpeed CPU comm op build): {time.perf_counter() - t0:.1f} s")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    cmd = [str(REPO / ".venv" / "bin" / "p2d-ray"), "demo", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    load1 = os.getloadavg()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"demo failed with exit code {proc.returncode}")
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    a = report["aer"]
    print(f"caches: {'warm (.cache/)' if args.warm else 'fresh (empty)'}; run dir {run_dir}")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (1 min); 2 cores")
    print(f"process wall time: {total:.1f} s")
    print("\n| part | seconds |\n|---|---:|")
    for k, v in summary["wall_seconds"].items():
        print(f"| demo: {k} | {v:.1f} |")
    for k, v in report["stage_seconds"].items():
        print(f"| stage: {k} | {v:.1f} |")
    print(
        f"\nAER ({a['label']}) = {a['aer']:.3f}: P2D {a['p2d_seconds']:.1f} s (localize + score + select + train) "
        f"/ full fine-tuning {a['full_train_seconds']:.1f} s = {a['full_train_steps']} steps x "
        f"{a.get('full_step_seconds', float('nan')):.3f} s on {a['n_full_rows']} rows"
    )
    sp = report.get("selection_precision") or {}
    if sp:
        print(
            f"selection precision: P2D {sp['selected']:.3f}, perplexity {sp.get('perplexity', float('nan')):.3f}, "
            f"base rate {sp['base_rate']:.3f} (k={sp['k']})"
        )
    ev = report.get("eval") or {}
    for name in ("base", "adapted"):
        if name in ev:
            print(f"eval {name}: loss {ev[name]['loss']:.4f}, exact match {ev[name].get('exact_match')}")


if __name__ == "__main__":
    main()
