"""What the ``ray job submit`` entrypoints share: parse ``--config`` + ``key=value``, connect, run stages.

The entrypoints run as the *driver* of a Ray job. ``ray job submit`` sets ``RAY_ADDRESS`` for the driver,
so ``ray.init(address=RAY_ADDRESS)`` joins the cluster the job was submitted to; an entrypoint never
starts a Ray of its own (that would silently run a fleet-sized job on one node). Without ``RAY_ADDRESS``
it stops with a message pointing at ``p2d-ray`` (local runs) or ``ray job submit`` (clusters).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# The job's working directory (uploaded by --working-dir) holds p2d_ray/: import that copy, not an older one
# that may be installed in the cluster image, so the code that runs is the code that was submitted.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from p2d_ray.stages import STAGES  # noqa: E402  (after the path fix above)


def connect(verbose: bool = False):
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``); never start a new one.

    ``verbose=False`` keeps the workers' own output (library warnings, DeepSpeed and Ray Train chatter)
    out of the driver's, i.e. out of ``ray job logs``: errors still reach the driver as exceptions, and the
    full worker logs stay in the session's log directory on each node."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit(
            "RAY_ADDRESS is not set: this entrypoint runs as a Ray job. Submit it with\n"
            "  RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python "
            f"jobs/{Path(sys.argv[0]).name} --config ...\n"
            "or run locally with `p2d-ray run --config ...`."
        )
    if not verbose:
        # This driver's C++ core worker logs an E-level line per Ray Data actor pool ("constructor arguments
        # in the object store ... actor restart will fail"): Ray Data's own warning, not a failure of the
        # job. Quiet it for this process only (workers keep their levels); --verbose keeps every line.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    from p2d_ray.runtime import ensure_ray

    # RAY_ADDRESS is set: ensure_ray joins that cluster (or fails), with the one runtime_env.
    # Not verbose: Ray's own INFO lines (connection banners in terminal colours) stay out too.
    ensure_ray(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    if not verbose:
        import ray.data  # noqa: F401 - configures its loggers on import; then keep its INFO lines out

        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def banner(stage: str, text: str) -> None:
    """Our one line per stage event in ``ray job logs``: ``[p2d-ray] stage score: start``."""
    print(f"[p2d-ray] stage {stage}: {text}", flush=True)


def progress(cfg) -> str:
    """'N of M shards done, ' when a scoring pass was under way (the command line's own courtesy line)."""
    from p2d_ray.cli import _progress

    return _progress(cfg)


def describe_outputs(cfg, stage: str) -> str:
    """``scores/ (2,000 rows)``: what a finished stage wrote, Parquet directories with their row counts."""
    import pyarrow.dataset as pads

    from p2d_ray.pipeline import stage_outputs
    from p2d_ray.rundir import RunDir

    parts = []
    for path in stage_outputs(RunDir(cfg.run_dir), stage):
        if path.is_dir() and any(path.glob("*.parquet")):
            rows = pads.dataset(str(path), format="parquet", ignore_prefixes=["_", "."]).count_rows()
            parts.append(f"{path.name}/ ({rows:,} rows)")
        else:
            parts.append(path.name + ("/" if path.is_dir() else ""))
    return ", ".join(parts)


def lost_nodes() -> dict[str, str]:
    """Nodes of the cluster that died unexpectedly (a lost spot node, a crashed raylet): id -> Ray's reason.
    Nodes the autoscaler removed when idle are not lost."""
    import ray

    try:
        # DeathReason 2: UNEXPECTED_TERMINATION in Ray's NodeDeathInfo (1 is an expected one: idle, SIGTERM)
        return {
            n["NodeID"]: n.get("DeathReasonMessage") or "" for n in ray.nodes() if n.get("DeathReason") == 2
        }
    except Exception:  # a courtesy line: never fail a stage over it
        return {}


def run_stage(cfg, stage: str, work) -> dict | None:
    """``work()`` between a start banner and a done (or skipped) banner; returns its result."""
    import time

    banner(stage, "start")
    t0 = time.perf_counter()
    lost_before = lost_nodes()
    result = work()
    lost = {k: v for k, v in lost_nodes().items() if k not in lost_before}
    if lost:  # a spot node gone: Ray Data redid its blocks, Ray Train restarted from a checkpoint
        why = "; ".join(sorted(set(lost.values())))
        banner(
            stage, f"{len(lost)} node(s) lost during the stage ({why}); their work was redone on the others"
        )
    if isinstance(result, dict) and result.get("skipped"):
        banner(stage, "skipped (finished earlier with this config)")
    else:
        banner(stage, f"done in {time.perf_counter() - t0:.1f} s, wrote {describe_outputs(cfg, stage)}")
    return result


def localize_on_a_worker(cfg) -> dict | None:
    """Stage 1 is plain torch in the calling process. The driver of a job sits on the head, which has no
    GPU (and no CPUs to offer), so run it as a Ray task sized like one scoring actor instead: it lands on
    a GPU node and writes heads.json to the shared run directory. None when it is already done."""
    import ray

    from p2d_ray.heads.localize import run_localize
    from p2d_ray.pipeline import is_done
    from p2d_ray.rundir import RunDir, stage_fingerprint

    if is_done(RunDir(cfg.run_dir), "localize", stage_fingerprint(cfg, "localize")):
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
    parser.add_argument(
        "--verbose", action="store_true", help="also stream every worker's output into the job's log"
    )
    args = parser.parse_args(argv)

    from p2d_ray.pipeline import is_done, run_pipeline
    from p2d_ray.rundir import RunDir, stage_fingerprint

    chosen = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        print(f"--stages: unknown {unknown or chosen}; allowed {list(STAGES)}", file=sys.stderr)
        return 2

    def pipeline(cfg) -> dict:
        if "train" in chosen:  # a missing or broken tracker: one line before any stage runs
            from p2d_ray.training.tracking import check_tracking

            check_tracking(cfg)
        run = RunDir(cfg.run_dir)
        results: dict = {}
        for stage in STAGES:  # in pipeline order, whatever order --stages lists them in
            if stage not in chosen:
                continue
            if stage == "localize" and not is_done(run, stage, stage_fingerprint(cfg, stage)):
                work = lambda: localize_on_a_worker(cfg)  # noqa: E731
            else:
                work = lambda stage=stage: run_pipeline(cfg, (stage,), report=False)[stage]  # noqa: E731
            results[stage] = run_stage(cfg, stage, work)
        if set(chosen) == set(STAGES):  # the report follows only the whole pipeline
            results["report"] = run_stage(cfg, "report", lambda: run_pipeline(cfg, (), report=True)["report"])
        return results

    def one_writer(cfg) -> dict:
        """The job's driver holds the run directory, as the CLI does (p2d_ray/runlock.py); Ray tasks it starts
        (Stage 1, the probe gradient) write there on its behalf."""
        from p2d_ray.runlock import holding

        with holding(cfg.run_dir, "job --stages " + ",".join(chosen)):
            return pipeline(cfg)

    return run_job(args.config, args.overrides, one_writer, verbose=args.verbose)


def run_job(config: str, overrides: list[str], work, verbose: bool = False) -> int:
    """Validate the config, join the cluster, run ``work(cfg)`` and print its result as JSON (None: nothing).

    Exit code 2 with one clear line for a bad config or bad input found up front by a stage (it shows in
    `ray job logs`, and the job status is failed); 1 with one line for a failure Ray could not recover
    from (it says how to resume); 130 / 143 with one line after Ctrl-C / SIGTERM (``ray job stop``); 0
    otherwise.
    """
    from p2d_ray.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    from p2d_ray.runtime import interrupt_exit, sigterm_as_interrupt

    # `ray job stop`, a drained node, Kubernetes and Slurm send SIGTERM: it ends the job like Ctrl-C.
    with sigterm_as_interrupt():
        try:
            connect(verbose)
            caches = ", ".join(
                f"{k}={os.environ.get(k, '(unset)')}" for k in ("P2D_RAY_CACHE", "TORCH_EXTENSIONS_DIR")
            )
            print(f"[p2d-ray] job: run_dir={cfg.run_dir}, {caches}", flush=True)
            result = work(cfg)
        except KeyboardInterrupt as err:
            rc, what = interrupt_exit(err)
            print(f"[p2d-ray] job: {what}; {progress(cfg)}submit the same job again to resume", flush=True)
            return rc
        except (ValueError, FileNotFoundError) as err:
            if os.environ.get("P2D_RAY_DEBUG") == "1":
                raise
            print(f"error: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:  # e.g. training lost workers past train.max_failures: says how to resume
            if os.environ.get("P2D_RAY_DEBUG") == "1":
                raise
            print(
                f"[p2d-ray] job: error: {err} (P2D_RAY_DEBUG=1 shows the traceback)",
                file=sys.stderr,
                flush=True,
            )
            return 1
        except Exception as err:  # Ray gave up (e.g. a task's inputs lost with a node): one line, resumable
            import ray.exceptions

            if not isinstance(err, ray.exceptions.RayError) or os.environ.get("P2D_RAY_DEBUG") == "1":
                raise
            lines = [x.strip() for x in str(err).splitlines() if x.strip()]
            cause = (lines[-1] if lines else type(err).__name__)[:300]
            print(
                f"[p2d-ray] job: failed in Ray ({type(err).__name__}: {cause}); {progress(cfg)}submit the same "
                "job again to resume (P2D_RAY_DEBUG=1 shows the traceback)",
                file=sys.stderr,
                flush=True,
            )
            return 1
    if result is not None:
        # One line: the stages' results for scripts; the summary below (a full pipeline) is for people.
        print("[p2d-ray] result: " + json.dumps(result, default=str), flush=True)
    report = result.get("report") if isinstance(result, dict) else None
    if report:
        from p2d_ray.demo import summary_lines

        if report.get("skipped"):
            report = json.loads(Path(cfg.run_dir, "report.json").read_text())
        print("\n".join(summary_lines(report, title=f"p2d-ray job: summary ({cfg.run_dir})")), flush=True)
    return 0
