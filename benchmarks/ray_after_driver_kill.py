"""How long a local Ray's processes outlive a driver killed with SIGKILL (issue 25 item 6; README).

A child process starts a local Ray the way every p2d-ray command does (``runtime.ensure_ray``) and is then
SIGKILLed; this script watches the processes of that Ray session (found by the session directory in their
command line, plus the child's own children) and prints when each one is gone. It only watches: it stops
nothing but its own child, and never runs ``ray stop``.

    .venv/bin/python benchmarks/ray_after_driver_kill.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import time, ray
from p2d_ray.runtime import ensure_ray
ensure_ray()
print(ray._private.worker.global_worker.node.get_session_dir_path(), flush=True)
time.sleep(3600)
"""


def session_processes(session: str, extra: set[int]) -> dict[int, str]:
    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if cmd and (session in cmd or p.pid in extra):
            out[p.pid] = cmd[:120]
    return out


def main(limit_s: float = 240.0) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env)
    session = os.path.basename(child.stdout.readline().strip())
    time.sleep(5)  # let the agents and idle workers come up
    alive = session_processes(session, {c.pid for c in psutil.Process(child.pid).children(recursive=True)})
    print(f"{session}: {len(alive)} processes; SIGKILL to the driver (pid {child.pid})", flush=True)
    t0 = time.monotonic()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    while alive and time.monotonic() - t0 < limit_s:
        time.sleep(0.5)
        for pid in list(alive):
            try:
                gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                print(f"{time.monotonic() - t0:6.1f} s  gone: {alive.pop(pid)}", flush=True)
    print(f"still alive after {limit_s:.0f} s: {alive or 'none'}")


if __name__ == "__main__":
    main()
