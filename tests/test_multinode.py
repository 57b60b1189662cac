"""A real two-node Ray cluster on this machine, driven only through the ``ray`` CLI, as users drive theirs,
and the local submit recipe run on it exactly as written.

``ray start --head`` on 127.0.0.1 and a second ``ray start --address`` node, each with its own ports
(all picked free), its own ``--temp-dir`` and 2 logical CPUs; token authentication on with a token of
our own (``RAY_AUTH_TOKEN_PATH``, so ``~/.ray/auth_token`` and everyone else's Ray are untouched). Then the
first line of ``jobs/configs/local_tiny.yaml`` (``RAY_AUTH_MODE=token ray job submit --working-dir .
--runtime-env-json "$(python jobs/runtime_env.py)" -- python jobs/run_pipeline.py --config
jobs/configs/local_tiny.yaml ...``), run by bash from the repository root, with a tiny random Llama and a few
hundred rows, waited for under a deadline, and checked: outputs in the run directory, scoring actors placed on
both nodes (Ray's state API), ``ray job status`` / ``ray job logs`` readable and holding our banners and none
of the third-party noise, the submitter's caches reaching the job through the runtime_env the line builds,
the job API refusing a wrong token. Teardown stops exactly the processes this module started (never ``ray
stop``, which would stop every Ray on the machine): SIGTERM to our two ``ray start --block`` processes, then
anything left among their descendants or carrying our temp dir.

What the test adds to the recipe's line, and why:
- ``RAY_API_SERVER_ADDRESS`` points ``ray job submit`` at this module's head instead of the line's
  ``http://127.0.0.1:8265`` (a shared machine may hold another Ray there); Ray reads it before ``--address``.
- ``RAY_AUTH_TOKEN_PATH``: the cluster's token file, instead of ``~/.ray/auth_token`` (nobody else's token is
  touched). ``RAY_AUTH_MODE`` is NOT set for the submit: the line must set it itself.
- model / data overrides after the line (a tiny random Llama, 400 rows) keep the run within minutes.
The nodes are started WITHOUT P2D_RAY_CACHE / TORCH_EXTENSIONS_DIR, so the job's workers on both nodes can only
get them from the runtime_env the line builds.

(One cluster and one job serve both checks: the recipe and the two-node pipeline were separate modules with a
cluster and a full pipeline job each, ~2 minutes of the suite for the same path.)

The nodes run this repository's virtualenv (``.venv/bin`` first on their PATH), so the job's
``python`` is the same interpreter as the tests'.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from helpers import write_job_inputs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_BIN = str(VENV_BIN / "ray")
RECIPE = REPO / "jobs" / "configs" / "local_tiny.yaml"
GLOG_ERROR = re.compile(r"^\[[^\]]* E \d+ \d+\]|core_worker\.cc.*actor restart", re.M)
# Deadlines guard against a hang, not a speed target: at load 15-18 on this 2-core box two nodes took over
# 240 s to come up, so leave room (the CI limit is 90 minutes).
NODE_START_TIMEOUT_S = 480
JOB_TIMEOUT_S = 1800
N_CORPUS = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_range(width: int) -> int:
    """Start of ``width`` consecutive free ports (Ray workers bind inside [start, start + width))."""
    for _ in range(50):
        start = _free_port()
        if start + width > 65000:
            continue
        try:
            for port in range(start, start + width):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
    raise RuntimeError(f"no {width} consecutive free ports")


class LocalRayCluster:
    """Ray nodes started with ``ray start --block`` in their own sessions, torn down by process."""

    def __init__(self, root: Path, extra_env: dict[str, str]):
        self.root = root
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        # Nothing of the caller's Ray leaks in (RAY_ADDRESS would point the CLI elsewhere).
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(extra_env)
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        )
        self.env = env
        self.gcs_port = self.dashboard_port = 0  # picked when the head starts
        self.procs: list[subprocess.Popen] = []
        self._logs = []

    def _start(self, name: str, args: list[str], num_cpus: int) -> subprocess.Popen:
        workers = _free_range(64)
        cmd = [
            RAY_BIN,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={self.root / name}",
            "--object-store-memory=150000000",
            "--disable-usage-stats",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--min-worker-port={workers}",
            f"--max-worker-port={workers + 63}",
            *args,
        ]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        # Own session: its daemons share its process group, apart from everything else on the machine.
        # RAY_ADDRESS: Ray libraries that look the cluster up themselves (e.g. Ray Train's placement-group
        # cleaner using the state API) would otherwise find several GCS processes on a shared machine.
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}"}
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _start_node(self, kind: str, args, num_cpus: int, n_alive: int, deadline: float, attempts: int = 3):
        """Start a node and wait until ``n_alive`` nodes are up. Ray gives a raylet a fixed 30 s to register
        with the GCS; on a loaded machine that can run out, and ``ray start`` exits. Then the attempt's
        processes are killed and it starts again (fresh temp dir and ports)."""
        for attempt in range(1, attempts + 1):
            name = f"{kind}{attempt}"
            proc = self._start(name, args(), num_cpus)
            try:
                return self.wait_for_nodes(n_alive, deadline, proc)
            except ChildProcessError:
                self.procs.remove(proc)
                for p in self.ours(str(self.root / name)):
                    with contextlib.suppress(psutil.Error):
                        p.kill()
        tail = (self.root / f"{kind}{attempts}.log").read_text()[-2000:]
        raise RuntimeError(f"{kind}: `ray start` failed {attempts} times; last log:\n{tail}")

    def start_head(self, num_cpus: int, deadline: float) -> list[dict]:
        def args():
            self.gcs_port, self.dashboard_port = _free_port(), _free_port()
            return [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={_free_port()}",
            ]

        return self._start_node("head", args, num_cpus, 1, deadline)

    def add_node(self, num_cpus: int, deadline: float) -> list[dict]:
        n_alive = len(self.procs) + 1
        return self._start_node(
            "worker", lambda: [f"--address=127.0.0.1:{self.gcs_port}"], num_cpus, n_alive, deadline
        )

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        """The ``ray`` CLI against this cluster (``--address`` is the job/state API on the dashboard)."""
        return subprocess.run(
            [RAY_BIN, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def state(self, kind: str) -> list[dict]:
        r = self.ray(
            "list", kind, "--address", self.address, "--format", "json", "--detail", "--limit", "10000"
        )
        if r.returncode != 0:
            raise RuntimeError(f"ray list {kind}: {r.stderr[-500:]}")
        out = r.stdout.strip()
        return json.loads(out) if out.startswith("[") else []  # "No resource in the cluster" when empty

    def wait_for_nodes(self, n: int, deadline: float, starting: subprocess.Popen) -> list[dict]:
        """Poll the state API (each poll is one CLI call, ~1-2 s) until ``n`` nodes are alive.
        Raises ChildProcessError if ``starting`` (the node being started) exits meanwhile."""
        last = ""
        while time.monotonic() < deadline:
            if starting.poll() is not None:
                raise ChildProcessError(f"ray start exited with {starting.returncode}")
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}; see {self.root}/*.log")
            try:
                alive = [x for x in self.state("nodes") if x["state"] == "ALIVE"]
            except RuntimeError as err:  # dashboard not up yet
                last = str(err)
                continue
            if len(alive) >= n:
                return alive
        raise TimeoutError(f"{n} Ray nodes not alive within {NODE_START_TIMEOUT_S} s: {last}")

    def ours(self, marker: str | None = None) -> list[psutil.Process]:
        """Live processes this cluster started: descendants of our ``ray start`` processes (job drivers
        run in sessions of their own but stay in the tree) and anything naming or running in our temp dir
        (or only those naming ``marker``, a node's temp dir, when given)."""
        found: dict[int, psutil.Process] = {}
        for p in self.procs if marker is None else []:
            try:
                parent = psutil.Process(p.pid)
                found[parent.pid] = parent
                found.update((c.pid, c) for c in parent.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        marker = marker or str(self.root)
        for proc in psutil.process_iter(["cmdline", "cwd", "uids"]):
            try:
                if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                    continue
                if marker in " ".join(proc.info["cmdline"] or []) or (proc.info["cwd"] or "").startswith(
                    marker
                ):
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)
        return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    @classmethod
    @contextlib.contextmanager
    def in_tempdir(cls, prefix: str, extra_env: dict[str, str]):
        """A cluster rooted in a fresh short directory under /tmp (Ray's Unix sockets live under it and
        socket paths are limited to 107 bytes); on exit its nodes are stopped and the directory removed."""
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        cluster = cls(root, extra_env)
        try:
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)

    def stop(self) -> list[str]:
        """Stop our nodes only; returns descriptions of processes that needed SIGKILL.

        SIGTERM goes to every process of ours at once (each Ray daemon and worker exits on it, and
        `ray start --block` shuts its node down), so teardown does not wait on one process at a time.
        """
        victims = self.ours()
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        # `ray start --block` would drain for up to 30 s; a test cluster has nothing worth draining.
        _, alive = psutil.wait_procs(victims, timeout=10)
        alive += [p for p in self.ours() if p not in alive]
        killed = []
        for p in alive:
            try:
                killed.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        for p in self.procs:
            p.wait(timeout=10)  # reap our direct children
        for log in self._logs:
            log.close()
        return killed


@pytest.fixture(scope="module")
def cluster():
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    with LocalRayCluster.in_tempdir("p2dmn-", env) as c:
        for key in ("P2D_RAY_CACHE", "TORCH_EXTENSIONS_DIR"):  # only the job's runtime_env may bring them
            c.env.pop(key, None)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        c.start_head(num_cpus=2, deadline=deadline)
        c.nodes = c.add_node(num_cpus=2, deadline=deadline)
        yield c


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    """The recipe's first line, as written, plus overrides; bash waits for the job (the line has no
    --no-wait). Returns the run dir, the job id, its logs and status, and the submitter's caches."""
    data = tmp_path_factory.mktemp("multinode_data")
    # 2 files x 2 row groups: 4 shards to spread over the actors
    model = write_job_inputs(data, N_CORPUS, n_files=2, n_probe=32, n_heldout=16)
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
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_API_SERVER_ADDRESS=cluster.address, P2D_RAY_CACHE=str(cache), TORCH_EXTENSIONS_DIR=ext)
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
        ids = re.findall(r"Job '([^']+)'", str(err.stdout))
        cluster.ray("job", "stop", "--address", cluster.address, "--no-wait", *ids)
        done = {p.stem: json.loads(p.read_text())["seconds"] for p in (run_dir / "stages").glob("*.json")}
        pytest.fail(
            f"job did not finish within {JOB_TIMEOUT_S} s; stages done (s): {done}; last output:\n"
            f"{(err.stdout or b'')[-3000:]}"
        )
    m = re.search(r"Job '([^']+)' submitted successfully", submit.stdout + submit.stderr)
    assert m, (submit.stdout + submit.stderr)[-3000:]
    logs = cluster.ray("job", "logs", "--address", cluster.address, m.group(1))
    return {"run_dir": run_dir, "id": m.group(1), "logs": logs.stdout, "cache": cache, "ext": ext}


def _job_status(cluster, job_id: str, env=None) -> subprocess.CompletedProcess:
    return cluster.ray(
        "job",
        "status",
        "--address",
        cluster.address,
        "--log-style",
        "record",
        "--log-color",
        "false",
        job_id,
        env=env,
    )


def _parse_status(text: str, job_id: str) -> str | None:
    """`ray job status` prints "Job 'X' succeeded" / "Job 'X' failed" / "Job 'X' was stopped", or
    "Status for job 'X': RUNNING" for non-terminal states."""
    m = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", text)
    if m:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
    m = re.search(rf"Status for job '{job_id}': (\w+)", text)
    return m.group(1) if m else None


def test_pipeline_job_succeeds_with_its_outputs(cluster, job):
    status = _job_status(cluster, job["id"])
    text = status.stdout + status.stderr
    assert status.returncode == 0, text[-1000:]
    assert _parse_status(text, job["id"]) == "SUCCEEDED", text[-500:] + job["logs"][-4000:]

    run = job["run_dir"]
    heads = json.loads((run / "heads.json").read_text())
    assert heads["heads"] and heads["geometry"]["n_heads"] == 4
    scores = pq.read_table(run / "scores")
    summary = json.loads((run / "score_summary.json").read_text())
    # Every corpus row is accounted for: scored or quarantined with a reason, none lost between nodes.
    assert summary["rows_in"] == N_CORPUS == summary["rows_scored"] + summary["rows_quarantined"]
    assert (
        scores.num_rows == summary["rows_scored"]
        and len(set(scores.column("id").to_pylist())) == scores.num_rows
    )
    for stage in ("localize", "score", "select", "train", "evaluate"):
        assert json.loads((run / "stages" / f"{stage}.json").read_text())["seconds"] > 0, stage
    assert pq.read_table(run / "subset").num_rows > 0
    assert (run / "adapter").is_dir() and any((run / "adapter").iterdir())
    assert "adapted" in (run / "eval.json").read_text()
    assert (run / "report.json").is_file()
    assert (run / "adapter" / "peft" / "README.md").is_file()


def test_scoring_actors_ran_on_both_nodes(cluster, job):
    node_ids = {n["node_id"] for n in cluster.nodes}
    assert len(node_ids) == 2
    actors = cluster.state("actors")
    # Ray Data's pool actors are named after the callable class: "MapWorker(MapBatches(ScorerActor))".
    scorers = [a for a in actors if "ScorerActor" in a["class_name"] + (a.get("repr_name") or "")]
    assert len(scorers) >= 2, [(a["class_name"], a.get("repr_name")) for a in actors]
    assert {a["node_id"] for a in scorers} == node_ids, "scoring actors did not spread over both nodes"


def test_job_status_and_logs_are_readable(cluster, job):
    logs = cluster.ray("job", "logs", "--address", cluster.address, job["id"])
    assert logs.returncode == 0
    # The driver printed the pipeline's result dict (one key per stage) into the job's log.
    for stage in ('"localize"', '"score"', '"train"', '"evaluate"'):
        assert stage in logs.stdout
    listed = cluster.ray("job", "list", "--address", cluster.address)
    assert job["id"] in listed.stdout


def test_job_sees_the_submitters_caches_through_runtime_env(job):
    logs = job["logs"]
    assert f"P2D_RAY_CACHE={job['cache']}" in logs, logs[:2000]
    assert f"TORCH_EXTENSIONS_DIR={job['ext']}" in logs


def test_job_logs_hold_our_banners_and_no_third_party_noise(job):
    logs = job["logs"]
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


def test_job_api_refuses_a_wrong_token(cluster, job):
    wrong = cluster.root / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    r = _job_status(cluster, job["id"], env={**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert r.returncode != 0
    assert _parse_status(r.stdout + r.stderr, job["id"]) is None
    assert "auth" in (r.stdout + r.stderr).lower()


def test_teardown_stops_only_our_nodes(cluster, job):
    """Last test of the module: stop the cluster here and check nothing of it survives (the fixture's own
    stop() is then a no-op). Other Ray instances on the machine are not looked at, let alone touched."""
    ours = cluster.ours()
    assert len(ours) >= 4, "expected at least gcs, raylets and dashboard processes"
    cluster.stop()
    assert cluster.ours() == []
    assert all(p.poll() is not None for p in cluster.procs)
