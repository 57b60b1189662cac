"""``python -m p2d_ray.assets [NAME ...]``: build (or check) named assets in the cache ahead of time.

``make install`` runs it for ``smollm2-135m`` so the first demo does not spend its time converting the model;
a cluster image or node setup runs the same command (cluster/README.md). Default: ``smollm2-135m``.
"""

from __future__ import annotations

import sys

from p2d_ray.assets import MODEL_NAMES, SMOLLM2, resolve_model


def main(argv: list[str]) -> int:
    names = argv or [SMOLLM2]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        print(f"unknown asset names {unknown}; allowed: {list(MODEL_NAMES)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"{name}: {resolve_model(name)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
