"""What the ``ray job submit`` entrypoints share: parse ``--config`` + ``key=value``, connect, run stages.

The entrypoints run as the *driver* of a Ray job. ``ray job submit`` sets ``RAY_ADDRESS`` for the driver,
so ``ray.init(address=RAY_ADDRESS)`` joins the cluster the job was submitted to; an entrypoint never
starts a Ray of its own (that would silently run a fleet-sized job on one node). Without ``RAY_ADDRESS``
it stops with a message pointing at ``p2d-ray`` (local runs) or ``ray job submit`` (clusters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The job's working directory (uploaded by --working-dir) holds p2d_ray/: import that copy, not an older one
# that may be installed in the cluster image, so the code that runs is the code that was submitted.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from p2d_ray.stages import STAGES  # noqa: E402  (after the path fix above)


def connect():
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``); never start a new one."""
    import ray

    from p2d_ray.runtime import ensure_ray

    if not os.environ.get("RAY_ADDRESS"):
        raise SystemExit(
            "RAY_ADDRESS is not set: this entrypoint runs as a Ray job. Submit it with\n"
            "  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python "
            f"jobs/{Path(sys.argv[0]).name} --config ...\n"
            "or run locally with `p2d-ray run --config ...`."
        )
    ensure_ray()  # RAY_ADDRESS is set: joins that cluster (or fails), with the one runtime_env
    return ray


def localize_on_a_worker(cfg) -> dict | None:
    """Stage 1 is plain torch in the calling process. The driver of a job sits on the head, which has no
    GPU (and no CPUs to offer), so run it as a Ray task sized like one scoring actor instead: it lands on
    a GPU node and writes heads.json to the shared run directory. None when it is already done."""
    import ray

    from p2d_ray.heads.localize import run_localize
    from p2d_ray.rundir import RunDir, stage_fingerprint

    if RunDir(cfg.run_dir).is_done("localize", stage_fingerprint(cfg, "localize")):
        return None
    task = ray.remote(num_cpus=cfg.score.num_cpus_per_actor, num_gpus=cfg.score.num_gpus_per_actor)(
        run_localize
    )
    return ray.get(task.remote(cfg))


def main(stages: tuple[str, ...], description: str, argv: list[str] | None = None) -> int:
    """Run ``stages`` (any already finished with the same config are skipped) and print their results.

    The report (timings, AER) follows only when the whole pipeline ran (``run_pipeline.py``).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", "-c", required=True, help="YAML config, e.g. jobs/configs/local_tiny.yaml"
    )
    parser.add_argument(
        "--stages", default=",".join(stages), help=f"comma-separated (default {','.join(stages)})"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. score.max_actors=16")
    args = parser.parse_args(argv)

    from p2d_ray.pipeline import run_pipeline

    chosen = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        print(f"--stages: unknown {unknown or chosen}; allowed {list(STAGES)}", file=sys.stderr)
        return 2

    def pipeline(cfg) -> dict:
        localized = localize_on_a_worker(cfg) if "localize" in chosen else None
        result = run_pipeline(cfg, chosen, report=set(chosen) == set(STAGES))
        if localized is not None:
            result["localize"] = localized
        return result

    return run_job(args.config, args.overrides, pipeline)


def run_job(config: str, overrides: list[str], work) -> int:
    """Validate the config, join the cluster, run ``work(cfg)`` and print its result as JSON (None: nothing).

    Exit code 2 with one clear line for a bad config or bad input found up front by a stage (it shows in
    `ray job logs`, and the job status is failed); 0 otherwise.
    """
    from p2d_ray.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    connect()
    try:
        result = work(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=1, default=str))
    return 0
