"""The one place that joins or starts Ray, and the one list of environment every Ray worker gets.

    ensure_ray()  ->  RAY_ADDRESS set (``ray job submit``, a cluster)  : join that cluster
                      otherwise                                          : start a local Ray

Every stage (score, select, train, evaluate), the demo and the ``ray job submit`` entrypoints call it. The
variables in :data:`FORWARDED_ENV` travel to every worker through the job's ``runtime_env`` (never by hand
through a task's arguments): the project cache (demo assets, converted models), the DeepSpeed op cache,
the Hugging Face offline switches.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading

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
    # Ray's core worker installs a C++ SIGTERM handler in ray.init (it dumps a stack and aborts: rc -6);
    # a Python handler the caller installed (sigterm_as_interrupt) is put back after it.
    on_term = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    runtime_env = {"env_vars": worker_env()}
    quiet = not _verbose()
    if quiet:  # Ray's INFO banners and its token-auth notice stay off the console (--verbose keeps them)
        import logging

        init_kwargs.setdefault("logging_level", logging.WARNING)
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
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
    if callable(on_term):
        signal.signal(signal.SIGTERM, on_term)
    if quiet:
        console_worker_output()
    return True


# The one-line notice ray.init logs on every start with token authentication on (Ray >= 2.52).
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Worker output the console keeps without --verbose: our own progress lines (training's, from rank 0).
CONSOLE_LINE = re.compile(r"^(\[p2d-ray\] |(localize|score|select|train|evaluate|baseline|report): )")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _verbose() -> bool:
    from p2d_ray.progress import verbose

    return verbose()


def console_line(line: str) -> str | None:
    """What the console shows of one worker output line without --verbose: our own progress lines, without
    Ray's ``(RayTrainWorker pid=...)`` prefix or colour codes; None for the rest (DeepSpeed's op-build line,
    library warnings, Ray Train's chatter), which stays in Ray's session logs (``/tmp/ray/session_latest/logs``)."""
    plain = ANSI.sub("", line)
    return plain if CONSOLE_LINE.match(plain) else None


def console_worker_output() -> None:
    """Replace Ray's printer of forwarded worker output (every line, prefixed, coloured) with one that prints
    :func:`console_line`'s lines only. No-op when worker output is not forwarded (``log_to_driver=False``)."""
    import sys

    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return

    def show(data: dict) -> None:
        for line in data.get("lines", []):
            kept = console_line(line)
            if kept is not None:
                print(kept, file=sys.stderr, flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("p2d_console", show)


# -- SIGTERM is a signal, not a crash ----------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, Slurm, a spot notice, ``timeout``, ``ray job stop``), raised like Ctrl-C so every
    command and job entrypoint ends the same way: one line, a Ray it started shut down, a rerun resumes."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame):
    # One-shot: a second SIGTERM while shutting down takes the default action (the process ends).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside: SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread; no-op elsewhere.
    :func:`ensure_ray` keeps the handler across ``ray.init``."""
    if not _main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def interrupt_exit(err: BaseException) -> tuple[int, str]:
    """``(exit code, what happened)`` for an interrupt: 143 and "terminated (SIGTERM)", or 130 and
    "interrupted" (Ctrl-C), the shell's conventions (128 + signal number)."""
    if isinstance(err, Terminated):
        return 128 + signal.SIGTERM, "terminated (SIGTERM)"
    return 128 + signal.SIGINT, "interrupted"


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


# -- model weights never load in the driver ----------------------------------------------------------------
# A job's driver runs on the head node, which in every shipped cluster config has no GPU and little memory:
# every step that loads a model runs as a Ray task sized like the workers that would hold that model.
def scoring_worker(cfg) -> dict:
    """Ray task options of one scoring actor (``score.num_cpus_per_actor`` / ``num_gpus_per_actor``)."""
    return {"num_cpus": cfg.score.num_cpus_per_actor, "num_gpus": cfg.score.num_gpus_per_actor}


def on_a_worker(options: dict, func, *args, num_returns: int = 1, **kwargs):
    """``func(*args, **kwargs)`` as a Ray task with ``options`` (:func:`scoring_worker`); starts or joins
    Ray first. Returns the task's ObjectRef(s), not the value, so a large result can go on to other
    workers without passing through the driver."""
    import ray

    ensure_ray()
    task = ray.remote(max_retries=0, num_returns=num_returns, **options)(func)
    return task.remote(*args, **kwargs)


def worker_result(ref):
    """``ray.get(ref)``, re-raising the task's own exception (e.g. the ValueError naming a bad input) rather
    than Ray's wrapper with the worker's traceback, so commands report it in one line as any other."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
