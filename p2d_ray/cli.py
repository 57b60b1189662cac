"""``p2d-ray`` command line: thin; every command is a config plus one stage function.

    p2d-ray demo                                   the whole pipeline on the offline demo assets
    p2d-ray localize --config X.yaml [key=value …]   Stage 1
    p2d-ray score    --config X.yaml [key=value …]   Stage 2 (Ray Data)
    p2d-ray select   --config X.yaml [key=value …]
    p2d-ray train    --config X.yaml [key=value …]   Stage 3 (Ray Train + DeepSpeed)
    p2d-ray evaluate --config X.yaml [key=value …]   held-out loss / exact match, base vs adapted
    p2d-ray baseline --config X.yaml [key=value …]   AER denominator: full fine-tuning (estimated/measured)
    p2d-ray report   --config X.yaml [key=value …]   report.json (timings, AER) + aer.png
    p2d-ray run      --config X.yaml [key=value …]   all stages + report, skipping the finished ones
    p2d-ray validate --config X.yaml [key=value …]   check config, model, heads and corpus; no Ray, no GPU
    p2d-ray compare  --config X.yaml [key=value …]   selectors x adaptations x seeds -> results table
"""

from __future__ import annotations

import argparse
import json
import sys

from p2d_ray.config import ConfigError, load_config
from p2d_ray.pipeline import COMMANDS
from p2d_ray.pipeline import resolve as _resolve


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
    try:
        result = _resolve(COMMANDS[args.command])(cfg)
    except (ValueError, FileNotFoundError) as err:
        # Bad user input found up front: one clear message, no traceback from deep inside Ray.
        print(f"p2d-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    if result is not None and args.command not in ("demo", "compare"):  # these print their own summary
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
