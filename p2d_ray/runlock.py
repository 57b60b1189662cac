"""One writer per run directory: ``<run_dir>/.p2d-ray.lock``, taken by every command that writes there.

Two commands on one run directory corrupt each other (issue 25: the second replaced the first's scores
manifest, and both scored every row). So a command that writes (localize, score, select, train, evaluate,
baseline, report, run, compare, demo) first creates the lock file with ``O_CREAT | O_EXCL``: the create
either makes the file or fails because it exists, atomically, on a local filesystem and on NFSv3+ / EFS (the
NFS server performs an exclusive create as one operation; NFSv2 did not, and is not supported). The file
holds the holder's host, pid, process start time, command and start time (JSON). A second command:

- finds a live holder (same host, that pid still running, started when the lock says): refused, one line
  naming the holder;
- finds a stale one (same host, the pid gone or now another process): takes it over and says so. A run
  killed with SIGKILL, a crashed node that comes back, a power cut: none leaves the directory stuck;
- finds another host's lock: refused, since whether that process lives cannot be checked from here; the
  line names the holder and how to clear the lock (delete the file once that run is surely gone).

The lock is released (the file deleted, only if it is still ours) when the command ends: normally, on an
error, on Ctrl-C and on SIGTERM (both raise KeyboardInterrupt in the CLI, see ``runtime.sigterm_as_interrupt``).
It is the driver's: Ray workers write shard files under the run directory on the driver's behalf and never
take it. Nested takes in one process (``p2d-ray run`` -> stages, a job entrypoint -> stages) are counted, not
refused. Read-only commands (``validate``, ``--print-config``, ``--help``) take no lock.

Taking the lock is also the writability check: a run directory that cannot be created or written (read-only
filesystem, no permission, a path under a file) fails here, in one line, before any stage starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".p2d-ray.lock"
WRITERS = ("localize", "score", "select", "train", "evaluate", "baseline", "report", "run", "compare", "demo")

_held: dict[str, list] = {}  # resolved run dir -> [count, token]: this process's locks (re-entrant)


class RunDirLocked(ValueError):
    """Another command holds the run directory (a ValueError: the CLI prints it as one line, rc 2)."""


def _process_start(pid: int) -> float | None:
    """The process's start time (seconds since the epoch), or None when it does not exist."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil missing, or no such process / no access
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return -1.0  # exists, owned by someone else
        return -1.0


def _alive(holder: dict) -> bool:
    """The holder's process still runs on this host (a reused pid with another start time does not)."""
    started = _process_start(int(holder.get("pid", -1)))
    if started is None:
        return False
    recorded = holder.get("pid_start")
    return started < 0 or recorded is None or abs(started - float(recorded)) < 1.0


def describe(holder: dict) -> str:
    when = holder.get("started_at", "?")
    return f"`p2d-ray {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {when})"


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def _writable_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and parents) or raise ValueError naming why it cannot be a run directory."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"run_dir={str(run_dir)!r} exists and is not a directory") from None
    except NotADirectoryError:
        raise ValueError(f"run_dir={str(run_dir)!r} is under a file, not a directory") from None
    except OSError as err:
        raise ValueError(f"run_dir={str(run_dir)!r} cannot be created: {err.strerror or err}") from None
    if not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} exists and is not a directory")


def _create(path: Path, holder: dict) -> bool:
    """Atomically create the lock file with ``holder``; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as err:  # read-only filesystem, no permission: the run directory is not writable
        raise ValueError(f"run_dir={str(path.parent)!r} is not writable: {err.strerror or err}") from None
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {}  # being written this instant, or garbage: treated as held (see acquire)


def acquire(run_dir: str | Path, command: str, *, quiet: bool = False) -> None:
    """Take ``run_dir`` for ``command`` (re-entrant within a process). Raises :class:`RunDirLocked` when
    another live command holds it, ValueError when the directory is not writable."""
    if "://" in str(run_dir):  # not a filesystem path: the pre-flight refuses such a run_dir
        return
    run_dir = Path(run_dir)
    _writable_dir(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        _held[key][0] += 1
        return
    path = lock_path(run_dir)
    me = os.getpid()
    holder = {
        "host": socket.gethostname(),
        "pid": me,
        "pid_start": _process_start(me),
        "command": command,
        "argv": sys.argv[1:][:20],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token": f"{socket.gethostname()}:{me}:{time.time_ns()}",
    }
    for _ in range(20):
        if _create(path, holder):
            _held[key] = [1, holder["token"]]
            return
        other = _read(path)
        if other is None:  # released between our create and our read: try again
            continue
        if not other:  # half-written by a command taking it right now
            time.sleep(0.05)
            other = _read(path)
            if other is None:
                continue
            if not other:
                raise RunDirLocked(
                    f"run_dir {run_dir} is locked ({path} is not a lock this version reads); delete it if no command is running there"
                )
        if other.get("host") != holder["host"]:
            raise RunDirLocked(
                f"run_dir {run_dir} is in use by {describe(other)}; this host cannot check that process. "
                f"Wait for it to finish, or, if it is gone, delete {path}"
            )
        if _alive(other):
            raise RunDirLocked(
                f"run_dir {run_dir} is in use by {describe(other)}; one command writes a run directory at a "
                f"time: wait for it to finish, stop it, or choose another run_dir"
            )
        if _break_stale(path, other) and not quiet:
            print(
                f"p2d-ray {command}: took over the stale lock of {describe(other)}, which is no longer running",
                file=sys.stderr,
                flush=True,
            )
    raise RunDirLocked(f"run_dir {run_dir}: could not take {path} (other commands keep taking it)")


def _break_stale(path: Path, stale: dict) -> bool:
    """Remove a stale lock, exactly once among commands racing to: the stale file is renamed to a name of
    our own (one rename of it succeeds), then checked to be the stale lock we read and not a fresh one
    another command created meanwhile (put back if it is)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # someone else removed it: retry the create
    got = _read(aside)
    if got is not None and got.get("token") != stale.get("token"):
        # A fresh lock taken in between: hand it back (link without replacing, so a third never loses).
        with contextlib.suppress(OSError):
            os.link(aside, path)
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return False
    with contextlib.suppress(OSError):
        os.unlink(aside)
    return True


def release(run_dir: str | Path) -> None:
    """Drop one take of ``run_dir``; the last one deletes the lock file if it is still ours."""
    key = str(Path(run_dir).resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] > 0:
        return
    del _held[key]
    path = lock_path(run_dir)
    current = _read(path)
    if current and current.get("token") == entry[1]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def holding(run_dir: str | Path, command: str):
    """``with holding(run_dir, "score"):`` -- the run directory is ours inside (see the module docstring)."""
    acquire(run_dir, command)
    try:
        yield
    finally:
        release(run_dir)


def run_dir_of(cfg, command: str) -> str | None:
    """The run directory ``command`` writes (the demo's own), or None for a read-only command."""
    if command not in WRITERS or "://" in str(cfg.run_dir):  # a remote run_dir: refused by the pre-flight
        return None
    if command == "demo":
        from p2d_ray.demo import demo_config

        return str(demo_config(cfg).run_dir)
    return str(cfg.run_dir)
