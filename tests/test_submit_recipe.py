"""The local submit recipe works as written: the first line of ``jobs/configs/local_tiny.yaml``, run by bash
from the repository root against a real ``ray start --head`` node with token authentication.

What the test adds to the line, and why:
- ``RAY_API_SERVER_ADDRESS`` points ``ray job submit`` at this test's node instead of the line's
  ``http://127.0.0.1:8265`` (a shared machine may hold another Ray there); Ray reads it before ``--address``.
- ``RAY_AUTH_TOKEN_PATH``: the node's token file, instead of ``~/.ray/auth_token`` (nobody else's token is
  touched). ``RAY_AUTH_MODE`` is NOT set for the submit: the line must set it itself.
- model / data overrides after the line (a tiny random Llama, 200 rows) keep the run within minutes; the
  demo model and 20k-row demo corpus of the recipe take ~6 minutes on an idle 2-core machine.
The node is started WITHOUT P2D_RAY_CACHE / TORCH_EXTENSIONS_DIR, so the job can only get them from the
runtime_env the line builds. Then: the job succeeded, its outputs exist, ``ray job logs`` has our banners,
the submitter's caches, and none of the third-party noise (cursor codes, progress blocks, core_worker
E-lines).
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pyarrow.parquet as pq
import pytest
from helpers import write_job_inputs
from test_multinode import NODE_START_TIMEOUT_S, REPO, LocalRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RECIPE = REPO / "jobs" / "configs" / "local_tiny.yaml"
# A guard against a hang, not a speed target: ~4 min on a quiet 2-core machine, >15 min at load 50.
JOB_TIMEOUT_S = 1800
N_CORPUS = 200
GLOG_ERROR = re.compile(r"^\[[^\]]* E \d+ \d+\]|core_worker\.cc.*actor restart", re.M)


@pytest.fixture(scope="module")
def node():
    with LocalRayCluster.in_tempdir("p2drc-", {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}) as cluster:
        for key in ("P2D_RAY_CACHE", "TORCH_EXTENSIONS_DIR"):  # only the job's runtime_env may bring them
            cluster.env.pop(key, None)
        cluster.start_head(num_cpus=4, deadline=time.monotonic() + NODE_START_TIMEOUT_S)
        yield cluster


@pytest.fixture(scope="module")
def submitted(node, tmp_path_factory):
    data = tmp_path_factory.mktemp("recipe")
    model = write_job_inputs(data, N_CORPUS, n_files=1, n_probe=16, n_heldout=8)
    run_dir = data / "run"

    line = RECIPE.read_text().splitlines()[0].removeprefix("# ")
    assert line.startswith("RAY_AUTH_MODE=token ray job submit ") and "run_dir=/tmp/p2d-tiny" in line
    overrides = [
        f"run_dir={run_dir}",  # after the line's own run_dir: the last one wins
        f"model.name_or_path={model}",
        f"data.corpus_path={data / 'corpus'}",
        f"data.probe_path={data / 'probe.parquet'}",
        f"evaluate.heldout_path={data / 'heldout.parquet'}",
        # the tiny model's tokenizer is byte-level: the demo mixture's rows are up to ~170 tokens there, so the
        # recipe's max_length=128 (sized for p2d-demo's BPE) would cut held-out answers off (no_target_tokens)
        "data.max_length=256",
        "report.timing_steps=1",
    ]
    cache = data / "cache"  # the submitter's caches: the job must report these
    from p2d_ray.assets.cache import torch_extensions_dir

    ext = torch_extensions_dir()  # the machine's DeepSpeed op cache, what every p2d-ray process resolves
    env = {k: v for k, v in node.env.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_API_SERVER_ADDRESS=node.address, P2D_RAY_CACHE=str(cache), TORCH_EXTENSIONS_DIR=ext)
    try:
        submit = subprocess.run(
            ["bash", "-c", line + " " + " ".join(overrides)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        node.ray(
            "job",
            "stop",
            "--address",
            node.address,
            "--no-wait",
            *re.findall(r"Job '([^']+)'", str(err.stdout)),
        )
        pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s:\n{(err.stdout or b'')[-3000:]}")
    m = re.search(r"Job '([^']+)' submitted successfully", submit.stdout + submit.stderr)
    assert m, (submit.stdout + submit.stderr)[-3000:]
    logs = node.ray("job", "logs", "--address", node.address, m.group(1))
    status = node.ray("job", "status", "--address", node.address, m.group(1))
    return {
        "run_dir": run_dir,
        "logs": logs.stdout,
        "status": status.stdout + status.stderr,
        "cache": cache,
        "ext": ext,
        "submit": submit,
    }


def test_recipe_runs_the_pipeline_as_written(submitted):
    assert "succeeded" in submitted["status"], submitted["status"] + submitted["logs"][-3000:]
    run = submitted["run_dir"]
    assert (run / "heads.json").is_file() and (run / "report.json").is_file()
    summary = json.loads((run / "score_summary.json").read_text())
    assert summary["rows_in"] == N_CORPUS and pq.read_table(run / "scores").num_rows == summary["rows_scored"]
    assert (run / "adapter" / "peft" / "README.md").is_file()


def test_job_sees_the_submitters_caches_through_runtime_env(submitted):
    logs = submitted["logs"]
    assert f"P2D_RAY_CACHE={submitted['cache']}" in logs, logs[:2000]
    assert f"TORCH_EXTENSIONS_DIR={submitted['ext']}" in logs


def test_job_logs_hold_our_banners_and_no_third_party_noise(submitted):
    logs = submitted["logs"]
    for stage in ("localize", "score", "select", "train", "evaluate", "report"):
        assert f"[p2d-ray] stage {stage}: start" in logs, stage
        assert re.search(rf"\[p2d-ray\] stage {stage}: done in \d+\.\d s, wrote ", logs), stage
    assert re.search(r"stage score: done in .* wrote scores/ \(\d+ rows\)", logs)
    # tqdm / progress-bar output: carriage returns, cursor movement, line erasing, bar glyphs.
    for code in ("\r", "\x1b[A", "\x1b[2K", "%|"):
        assert code not in logs, f"progress-bar output {code!r} in the job log"
    assert "Execution plan of Dataset" not in logs  # Ray Data's INFO lines
    assert not GLOG_ERROR.search(logs), GLOG_ERROR.search(logs).group(0)
    assert "selection (" in logs and "training:" in logs  # the summary read for the user
    assert len(logs.splitlines()) < 150, logs
