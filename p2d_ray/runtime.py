"""The one place that joins or starts Ray, and the one list of environment every Ray worker gets.

    ensure_ray()  ->  RAY_ADDRESS set (``ray job submit``, a cluster)  : join that cluster
                      otherwise                                          : start a local Ray

Every stage (score, select, train, evaluate), the demo and the ``ray job submit`` entrypoints call it. The
variables in :data:`FORWARDED_ENV` travel to every worker through the job's ``runtime_env`` (never by hand
through a task's arguments): the project cache (demo assets, converted models), the DeepSpeed op cache,
the Hugging Face offline switches.
"""

from __future__ import annotations

import json
import os

# Environment the workers need, forwarded from the driver when set. Why each one:
FORWARDED_ENV = (
    "P2D_RAY_CACHE",  # where the demo assets / converted models live: workers must read the same cache
    "TORCH_EXTENSIONS_DIR",  # DeepSpeed's JIT-built comm op, compiled once and reused (MEASURED.md)
    "HF_HOME",  # the Hugging Face cache the driver resolved models from
    "HF_HUB_OFFLINE",  # no network: never try to download in a worker either
    "TOKENIZERS_PARALLELISM",  # tokenizers' own thread pool fights Ray's workers for cores
    "P2D_RAY_VERBOSE",  # --verbose: workers show their own chatter too (transformers load bars)
)


def _job_env_keys() -> set[str]:
    """Variables the submitted job's runtime_env already sets (``ray job submit --runtime-env``): Ray refuses
    to merge a driver's runtime_env that sets the same variable again, and the job's value already arrives."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def worker_env() -> dict[str, str]:
    """The ``runtime_env["env_vars"]`` every worker of this driver gets: the forwarded variables that are set."""
    skip = _job_env_keys()
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in skip}


def ensure_ray(num_cpus: int | None = None, **init_kwargs) -> bool:
    """Join the cluster in ``RAY_ADDRESS``, or start a local Ray; no-op when Ray is already initialised.

    Args:
        num_cpus: local Ray only: at least this many logical CPUs (e.g. two 0.5-CPU actors plus read tasks
            on a 2-core box would starve each other at 2, MEASURED.md); default the machine's cores.
        init_kwargs: more ``ray.init`` arguments (e.g. ``log_to_driver``, ``logging_level``).
    Returns:
        True when this call started or joined Ray (the caller may ``ray.shutdown()`` it), False when Ray
        was already up.
    """
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": worker_env()}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # address given: ray.init connects or fails; it never starts a local instance on a cluster's behalf.
        ray.init(address=address, runtime_env=runtime_env, **init_kwargs)
    else:
        cpus = max(os.cpu_count() or 1, num_cpus or 0)
        # No dashboard on a local Ray: nothing listens on a port the user did not ask for. Without it the
        # State API is down, so Ray Train's placement-group cleaner (a safety net for a crashed controller,
        # idle here: the placement groups die with this local Ray) would warn every second of every
        # training; the setup hook quiets that one logger in every worker process.
        runtime_env["worker_process_setup_hook"] = "p2d_ray.runtime.quiet_local_workers"
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, **init_kwargs)
    return True


# Ray Train's placement-group cleaner: polls the State API every second and warns when it is unavailable.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_workers() -> None:
    """``worker_process_setup_hook`` of a local Ray (see :func:`ensure_ray`); ``--verbose`` keeps it all."""
    import logging

    from p2d_ray.progress import verbose

    if not verbose():
        logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's or Ray's share), for the
    single-process stages' torch threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
