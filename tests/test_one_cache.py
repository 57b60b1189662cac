"""One cache however p2d-ray is started (issue 26, item 6): ``make`` (what CI runs), ``.venv/bin/p2d-ray`` run
directly and a local ``ray job submit`` resolve the same converted-model cache and the same DeepSpeed op
directory, so each is built once per machine. (Before: the Makefile pointed both at the repository's
``.cache/`` while a direct ``p2d-ray`` used ``~/.cache``, and converted SmolLM2 and built the op again.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = ("P2D_RAY_CACHE", "TORCH_EXTENSIONS_DIR")
# What a p2d-ray process resolves with neither variable set.
RESOLVE = "import json; from p2d_ray.assets.cache import cache_env; print(json.dumps(cache_env()))"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in KEYS and not k.startswith("MAKE")}


@pytest.fixture(scope="module")
def resolved() -> dict[str, str]:
    """What ``p2d-ray`` run directly resolves (a fresh process, neither variable set)."""
    out = subprocess.run(
        [sys.executable, "-c", RESOLVE], env=_clean_env(), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_and_a_direct_p2d_ray_resolve_the_same_caches(resolved):
    env = _clean_env()
    # The environment make gives its recipes (`make demo`, `make test`, the install's conversion and op build).
    probe = "_p2d_env: ; @" + sys.executable + " -c '" + RESOLVE + "'"
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO), f"--eval={probe}", "_p2d_env"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == resolved, "make points the caches somewhere p2d-ray does not look"


def test_a_local_job_gets_the_same_caches(resolved):
    env = _clean_env()
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "runtime_env.py")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    forwarded = json.loads(out.stdout)["env_vars"]
    assert {k: forwarded[k] for k in KEYS} == resolved


def test_the_op_directory_is_the_one_torch_builds_into_unset():
    """With TORCH_EXTENSIONS_DIR unset DeepSpeed builds into torch's default; the forwarded value names it."""
    from torch.utils.cpp_extension import _get_build_directory

    from p2d_ray.assets.cache import torch_extensions_dir

    saved = os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    try:
        name = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op (created by this call if not built)
        assert _get_build_directory(name, False) == os.path.join(torch_extensions_dir(), name)
    finally:
        if saved is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = saved


def test_the_op_is_built_by_this_environments_ninja_whatever_path_says(monkeypatch):
    """A system ninja (1.11 here) and the venv's pinned one (1.13) hash build commands differently, so
    alternating between them rebuilt DeepSpeed's op at every training start (seen: five rebuilds in 25
    minutes of the shared machine's tests, 1-2 min of compiling each). Whatever PATH a process starts with,
    the worker puts this environment's ninja first before DeepSpeed loads anything."""
    from p2d_ray.training.worker import _setup_env  # what every Ray Train worker runs first

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    bindir = os.path.dirname(sys.executable)
    assert os.path.isfile(os.path.join(bindir, "ninja")), "constraints.txt installs ninja into the venv"
    for start in ("/usr/bin:/bin", f"/usr/bin:{bindir}", f"{bindir}:/usr/bin"):
        monkeypatch.setenv("PATH", start)
        _setup_env(use_gpu=False)
        assert shutil.which("ninja") == os.path.join(bindir, "ninja"), os.environ["PATH"]
        assert os.environ["PATH"].split(os.pathsep).count(bindir) <= 2
