"""``p2d-ray`` command line: thin; every command is a config plus one stage function.

    p2d-ray demo                                   the whole pipeline on the offline demo assets
    p2d-ray localize --config X.yaml [key=value …]   Stage 1
    p2d-ray score    --config X.yaml [key=value …]   Stage 2 (Ray Data)
    p2d-ray select   --config X.yaml [key=value …]
    p2d-ray train    --config X.yaml [key=value …]   Stage 3 (Ray Train + DeepSpeed)
    p2d-ray evaluate --config X.yaml [key=value …]   held-out loss / exact match, base vs adapted
    p2d-ray report   --config X.yaml [key=value …]   report.json (timings, AER) + aer.png
    p2d-ray run      --config X.yaml [key=value …]   all stages + report, skipping the finished ones
    p2d-ray validate --config X.yaml [key=value …]   check config, model, heads and corpus; no Ray, no GPU
    p2d-ray compare  --config X.yaml [key=value …]   selectors x adaptations x seeds -> results table
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from p2d_ray.config import ConfigError, load_config

# command -> "module:function"; each function takes the validated P2DConfig and returns a JSON-able dict.
COMMANDS = {
    "localize": "p2d_ray.heads.localize:run_localize",
    "score": "p2d_ray.scoring.pipeline:run_score",
    "select": "p2d_ray.scoring.select:run_select",
    "train": "p2d_ray.training.trainer:run_train",
    "evaluate": "p2d_ray.eval.evaluate:run_evaluate",
    "report": "p2d_ray.report.report:run_report",
    "run": "p2d_ray.pipeline:run_pipeline",
    "validate": "p2d_ray.validate:run_validate",
    "compare": "p2d_ray.compare:run_compare",
    "demo": "p2d_ray.demo:run_demo",
}


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2d-ray", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--config", "-c", default=None, help="YAML config (defaults are the demo's)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. score.batch_size=32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"p2d-ray {args.command}: {err}", file=sys.stderr)
        return 2
    rc, result = _run_guarded(args.command, _resolve(COMMANDS[args.command]), cfg)
    if rc != 0:
        return rc
    if result is not None and args.command not in ("demo", "compare"):  # these print their own summary
        print(json.dumps(result, indent=1, default=str))
    return 0


# -- error and interrupt handling (one place, so every command behaves the same) ----------------------
PREFLIGHT = {s: (s,) for s in ("localize", "score", "select", "train", "evaluate")}  # `run`: pipeline.py


def _progress(cfg) -> str:
    """'N of M shards done, ' from the scores directory, when a scoring pass was under way."""
    try:
        from p2d_ray.scoring.outputs import ScoreStore
        from p2d_ray.scoring.shards import Shard

        store = ScoreStore(cfg.run_dir)
        manifest = store.read_manifest()
        if manifest is None:
            return ""
        shards = [Shard(**d) for d in manifest["shards"]]
        done = sum(store.marker(sh, manifest["fingerprint"]) is not None for sh in shards)
        return f"{done} of {len(shards)} shards done, "
    except Exception:  # progress is a courtesy: never let it mask the interrupt
        return ""


def _run_guarded(command: str, func, cfg) -> tuple[int, object]:
    """Run ``func(cfg)`` for ``command`` after checking every input it reads; returns (exit code, result).

    Bad input (ValueError, FileNotFoundError): one message naming the problem, rc 2. A bad environment
    (RuntimeError): one message, rc 1. Ctrl-C: "interrupted; N of M shards done, rerun to resume", rc 130,
    and a Ray this command started is shut down (no orphan workers). ``P2D_RAY_DEBUG=1`` re-raises instead.
    """
    import os

    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    debug = os.environ.get("P2D_RAY_DEBUG") == "1"
    try:
        from p2d_ray.validate import preflight

        preflight(cfg, PREFLIGHT.get(command, ()))
        return 0, func(cfg)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"p2d-ray {command}: interrupted; {_progress(cfg)}rerun to resume", file=sys.stderr)
        if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        return 130, None
    except (ValueError, FileNotFoundError) as err:
        if debug:
            raise
        # Bad user input found up front: one clear message, no traceback from deep inside Ray.
        print(f"p2d-ray {command}: error: {err}", file=sys.stderr)
        return 2, None
    except RuntimeError as err:
        if debug:
            raise
        print(f"p2d-ray {command}: error: {err} (P2D_RAY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1, None


if __name__ == "__main__":
    sys.exit(main())
