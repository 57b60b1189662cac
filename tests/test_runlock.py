"""One writer per run directory (issue 25): the lock every writing command takes (``p2d_ray/runlock.py``).

The holders here are real processes (a second writer is another process in real life); the command
refused is the real CLI, in-process. No Ray, no model: ``select`` is the cheapest writing command, and it
is refused (or not) before it reads anything.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from p2d_ray import runlock
from p2d_ray.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys; from p2d_ray import runlock\n"
    "try:\n"
    "    runlock.acquire(sys.argv[1], 'score')\n"
    "except runlock.RunDirLocked:\n"
    "    print('refused', flush=True); sys.exit(0)\n"
    "print('held', flush=True); sys.stdin.read(); runlock.release(sys.argv[1])\n"
)


def _holder(run: Path) -> subprocess.Popen:
    """A process that takes ``run`` and holds it until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _select(run: Path) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = cli_main(["select", f"run_dir={run}"])
    return rc, err.getvalue()


def _one_line(err: str, needle: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if needle in x]
    assert len(lines) == 1, err
    return lines[0]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_writer_is_refused_naming_the_holder_until_it_is_done(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = json.loads((run / runlock.LOCK_NAME).read_text())
        assert (
            lock["pid"] == holder.pid and lock["host"] == socket.gethostname() and lock["command"] == "score"
        )
        assert lock["started_at"] and "argv" in lock
        rc, err = _select(run)
        assert rc == 2
        line = _one_line(err, "is in use by")
        assert f"pid {holder.pid} on {socket.gethostname()}" in line and "p2d-ray score" in line
    finally:
        holder.communicate("", timeout=60)
    assert not (run / runlock.LOCK_NAME).exists()  # released when the holder was done
    rc, err = _select(run)  # now select itself runs (and finds no scores)
    assert rc == 2 and "is in use" not in err and "run `p2d-ray score` first" in err
    assert not (run / runlock.LOCK_NAME).exists()  # released after a failed command too


def test_exactly_one_of_racing_writers_gets_the_lock(tmp_path):
    """O_CREAT | O_EXCL: of four processes taking one run directory at once, exactly one holds it."""
    run = tmp_path / "run"
    procs = [_holder(run) for _ in range(4)]
    try:
        answers = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        for p in procs:
            p.communicate("", timeout=60)
    assert answers == ["held", "refused", "refused", "refused"]


@pytest.mark.parametrize("why", ["pid_gone", "pid_reused"])
def test_stale_lock_on_this_host_is_taken_over(tmp_path, why):
    """A SIGKILLed run leaves its lock; the pid is gone (or now another process, with another start
    time): the next command takes it over, says so in one line, and releases it at its end."""
    run = tmp_path / "run"
    run.mkdir()
    pid, start = (_dead_pid(), 0.0) if why == "pid_gone" else (os.getpid(), 12345.0)
    stale = {"host": socket.gethostname(), "pid": pid, "pid_start": start, "command": "score", "token": "x"}
    (run / runlock.LOCK_NAME).write_text(json.dumps(stale))
    rc, err = _select(run)
    line = _one_line(err, "took over the stale lock")
    assert f"pid {pid} on {socket.gethostname()}" in line
    assert rc == 2 and "run `p2d-ray score` first" in err  # the command itself ran
    assert not (run / runlock.LOCK_NAME).exists()


def test_another_hosts_lock_is_refused_with_how_to_clear_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = {"host": "train-node-7", "pid": 4242, "command": "run", "started_at": "2026-12-06T04:00:00Z"}
    (run / runlock.LOCK_NAME).write_text(json.dumps(other))
    rc, err = _select(run)
    assert rc == 2
    line = _one_line(err, "train-node-7")
    assert "pid 4242" in line and f"delete {run / runlock.LOCK_NAME}" in line
    assert (run / runlock.LOCK_NAME).exists()  # never someone else's to remove


def test_nested_takes_in_one_process_and_read_only_commands(tmp_path):
    """``run`` -> stages, a job -> stages: the same process takes its run directory again without refusing
    itself; ``validate`` and ``--print-config`` take no lock."""
    run = tmp_path / "run"
    with runlock.holding(run, "run"):
        with runlock.holding(run, "score"):
            assert (run / runlock.LOCK_NAME).exists()
        assert (run / runlock.LOCK_NAME).exists()
    assert not (run / runlock.LOCK_NAME).exists()
    assert runlock.run_dir_of(type("C", (), {"run_dir": str(run)})(), "validate") is None
