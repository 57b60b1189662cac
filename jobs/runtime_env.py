"""Print a local job's runtime environment as JSON: ``jobs/runtime_env.yaml`` plus this machine's caches.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json "$(python jobs/runtime_env.py)" -- python jobs/run_pipeline.py --config ...

A job's processes (its driver, the scoring actors, the Ray Train workers) inherit the environment of the
``ray start`` that launched their node, not of the shell that submits. The variables below are what the
project reads; they travel in the job's ``runtime_env`` so every process of the job sees them. The caches
default to this machine's (``~/.cache/p2d-ray`` and torch's extensions directory, what ``make install`` and
``p2d-ray`` use too), so a local job reuses the converted model and DeepSpeed's pre-built op.

For a cluster use ``--runtime-env jobs/runtime_env.yaml`` as is: the nodes have their own paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Read by p2d-ray (caches), DeepSpeed (its JIT-built ops) and Hugging Face (offline mode, hub cache).
FORWARD = ("P2D_RAY_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")


def _defaults() -> dict[str, str]:
    """The caches every p2d-ray process on this machine resolves when the variables are unset."""
    from p2d_ray.assets.cache import cache_env

    return cache_env()


def local_runtime_env(environ: dict[str, str] | None = None) -> dict:
    """``jobs/runtime_env.yaml`` with the submitting machine's values of ``FORWARD`` added to its env_vars."""
    environ = os.environ if environ is None else environ
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    forwarded = {**_defaults(), **{k: environ[k] for k in FORWARD if environ.get(k)}}
    env["env_vars"] = {**env.get("env_vars", {}), **forwarded}
    return env


if __name__ == "__main__":
    print(json.dumps(local_runtime_env()))
