"""The project cache (``$P2D_RAY_CACHE``) and :func:`build_once`: every offline asset (demo corpus, demo
models, the converted real model) is built there at most once, atomically, under a file lock."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

# The cache's own record of a build (recipe, its hash, timings): beside what was built, never part of it, so a
# rebuild of the same recipe is the same model to everything that fingerprints it (models/loading.py).
META_FILE = "meta.json"


def cache_root() -> Path:
    """``$P2D_RAY_CACHE``, else ``~/.cache/p2d-ray``: one cache per machine, however p2d-ray is started
    (``make``, ``.venv/bin/p2d-ray``, a Ray job on this machine), so each asset is built once."""
    return Path(os.environ.get("P2D_RAY_CACHE") or Path.home() / ".cache" / "p2d-ray")


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops land: ``$TORCH_EXTENSIONS_DIR``, else torch's own per-machine default
    (``~/.cache/torch_extensions/py311_cpu``, as ``torch.utils.cpp_extension`` names it)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    v = torch.version
    accel = f"rocm{v.hip.replace('.', '')}" if v.hip else f"cu{v.cuda.replace('.', '')}" if v.cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{py}_{accel}")


def use_this_environments_ninja() -> None:
    """Put the ``ninja`` installed beside this interpreter (constraints.txt pins it) first on ``PATH``, so
    torch's JIT build of DeepSpeed's ops runs the same ninja in every process. Why: a machine may also have a
    system ninja (here 1.11 in /usr/bin beside the venv's 1.13), and the two versions hash build commands
    differently, so each one reads the other's ``.ninja_log`` as a changed command and rebuilds the op:
    1-2 minutes of compiling at every training start whose PATH differs from the last one (a shell with the
    venv activated, a Ray node started from it, ``.venv/bin/p2d-ray`` without it). A no-op where the
    environment has no ninja of its own."""
    import sys

    bindir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bindir, "ninja")):
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


def cache_env() -> dict[str, str]:
    """The two build caches as environment variables (what a job's runtime_env forwards)."""
    return {"P2D_RAY_CACHE": str(cache_root()), "TORCH_EXTENSIONS_DIR": torch_extensions_dir()}


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _is_built(target: Path, digest: str) -> bool:
    try:
        return json.loads((target / META_FILE).read_text()).get("recipe_hash") == digest
    except (OSError, ValueError):
        return False


@contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (blocks until free; released when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, recipe: dict, build: Callable[[Path], dict | None]) -> Path:
    """Make ``target`` hold the output of ``build(tmp_dir)`` for ``recipe``, building at most once.

    Fast path: ``target/meta.json`` records the same recipe hash -> return. Otherwise, under the lock
    ``<target>.lock``: check again (another process may have just built it), build into a temporary
    sibling directory, write ``meta.json`` (recipe, its hash, and whatever dict ``build`` returned), and
    rename it over ``target``. A stale build (other recipe) is replaced; a crashed build leaves only a
    temporary directory that the next build removes.
    """
    target = Path(target)
    digest = recipe_hash(recipe)
    if _is_built(target, digest):
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if _is_built(target, digest):
            return target
        tmp = target.with_name(f".{target.name}.tmp")
        old = target.with_name(f".{target.name}.old")
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        info = build(tmp) or {}
        meta = {"recipe_hash": digest, "recipe": recipe, **info}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    return target
