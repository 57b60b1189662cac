"""The one way to start Ray: ``ensure_ray`` joins the Ray named by RAY_ADDRESS (never starting its own) and
hands the forwarded environment to that cluster's workers through the runtime_env."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from p2d_ray.runtime import FORWARDED_ENV, worker_env

REPO = Path(__file__).resolve().parents[1]

# A Ray that is already running: started by another process, which waits until we close its stdin.
HOLDER = textwrap.dedent(
    """
    import sys, ray
    ray.init(num_cpus=1, include_dashboard=False)
    ctx = ray.get_runtime_context()
    print(ray.get_runtime_context().gcs_address, ray.nodes()[0]["NodeID"], flush=True)
    sys.stdin.read()
    ray.shutdown()
    """
)

JOINER = textwrap.dedent(
    """
    import json, os, ray
    from p2d_ray.runtime import ensure_ray

    started = ensure_ray()

    @ray.remote(num_cpus=0.1)
    def env_of_worker():
        return os.environ.get("P2D_RAY_CACHE")

    print(json.dumps({
        "started": started,
        "again": ensure_ray(),
        "gcs": ray.get_runtime_context().gcs_address,
        "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
        "worker_cache": ray.get(env_of_worker.remote()),
    }), flush=True)
    """
)


def test_worker_env_forwards_the_list_and_leaves_the_jobs_own_variables(monkeypatch):
    monkeypatch.setenv("P2D_RAY_CACHE", "/x/cache")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("SOME_SECRET", "never forwarded")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = worker_env()
    assert env["P2D_RAY_CACHE"] == "/x/cache" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert set(env) <= set(FORWARDED_ENV)
    # Inside a submitted job, variables its runtime_env already sets are not set twice (Ray refuses that).
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps({"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "0"}}}),
    )
    assert "TOKENIZERS_PARALLELISM" not in worker_env() and worker_env()["P2D_RAY_CACHE"] == "/x/cache"


@pytest.mark.ray
def test_ensure_ray_joins_an_existing_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Token authentication on, with a token of our own (everyone else's Ray and ~/.ray stay untouched).
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env.update(
        PYTHONPATH=str(REPO),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
    )
    env.pop("P2D_RAY_CACHE", None)  # the holder's workers would otherwise inherit it without runtime_env
    # Ray gives a raylet a fixed 30 s to register; on a loaded machine that can run out: start again.
    for _ in range(3):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        first = holder.stdout.readline().split()
        if len(first) == 2:
            break
        holder.wait(timeout=120)
    try:
        gcs, node = first
        joined = subprocess.run(
            [sys.executable, "-c", JOINER],
            env={**env, "RAY_ADDRESS": gcs, "P2D_RAY_CACHE": str(tmp_path / "cache")},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert joined.returncode == 0, joined.stderr[-3000:]
        out = json.loads(joined.stdout.strip().splitlines()[-1])
    finally:
        holder.stdin.close()  # the holder shuts its Ray down and exits
        holder.wait(timeout=120)
    assert out["started"] is True and out["again"] is False  # joined once; a second call is a no-op
    assert out["gcs"] == gcs and out["nodes"] == [node]  # the existing Ray: no second node was started
    assert out["worker_cache"] == str(tmp_path / "cache")  # forwarded through the runtime_env
