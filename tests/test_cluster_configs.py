"""Cluster launcher YAMLs, KubeRay manifests, the job runtime env and the job entrypoints, checked offline.

The launcher YAMLs go through the autoscaler JSON schema that ships inside Ray and then through the same
``prepare_config`` + ``validate_config`` that ``ray up`` runs; the RayCluster / RayJob specs go through
Ray's own KubeRay translation (``_derive_autoscaling_config_from_ray_cr``), which is what the in-tree
autoscaler reads from the custom resource. No cloud account or Kubernetes cluster is needed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from p2d_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
IMAGE_IN_DOCKERFILE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _head_type(cfg: dict) -> dict:
    return cfg["available_node_types"][cfg["head_node_type"]]


# -- launcher YAMLs (ray up) ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_schema_and_ray_up_config_checks(path):
    cfg = _load(path)
    jsonschema.validate(cfg, json.loads(RAY_SCHEMA.read_text()))
    # What `ray up` does before touching the cloud: merge provider defaults, then validate again.
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] == cfg["head_node_type"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_cpu_head_runs_no_work_and_gpu_groups_scale_from_zero(path):
    cfg = _load(path)
    head = _head_type(cfg)
    assert head["resources"] == {"CPU": 0}, "the head must advertise no CPUs so no task or actor lands there"
    assert "GPU" not in head["resources"]
    assert all("--num-cpus=0" in c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers, "no worker groups"
    for name, group in workers.items():
        assert group["resources"].get("GPU", 0) >= 1, f"{name} is not a GPU group"
        assert group["min_workers"] == 0, f"{name} must scale from zero"
        assert group["max_workers"] >= 1
    assert cfg["idle_timeout_minutes"] > 0
    # One group must hold ZeRO-2 across 8 GPUs (train.num_workers=8 in the shipped configs).
    assert max(g["resources"]["GPU"] for g in workers.values()) == 8


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_keeps_dashboard_private_and_token_auth_on(path):
    cfg = _load(path)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in ray_starts), "token auth must be on for every node"
    head_start = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in path.read_text()
    # Ray creates a security group admitting SSH + intra-cluster traffic; we add no public ingress rules.
    assert "IpPermissions" not in json.dumps(cfg["provider"])
    # The token travels from the user's machine (never from this file) to the nodes.
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_installs_our_package_on_the_pinned_ray_image(path):
    cfg = _load(path)
    assert cfg["docker"]["image"] == IMAGE_IN_DOCKERFILE, "image Ray version must match the pinned ray"
    assert cfg["file_mounts"]["/home/ray/p2d-ray"] == "."
    assert any(
        "-c /home/ray/p2d-ray/constraints.txt" in c and "/home/ray/p2d-ray" in c
        for c in cfg["setup_commands"]
    )
    for junk in (".venv", ".cache", "runs", ".git"):
        assert junk in cfg["rsync_exclude"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_mounts_the_shared_run_directory_on_every_node(path):
    cfg = _load(path)
    assert "-v /mnt/p2d:/mnt/p2d" in cfg["docker"]["run_options"]
    for name, node_type in cfg["available_node_types"].items():
        # A node type's own initialization_commands replace the global ones (Ray's node-type override).
        commands = node_type.get("initialization_commands", cfg.get("initialization_commands", []))
        assert any("mount" in c and "/mnt/p2d" in c for c in commands), name
    for config in ("qwen2.5-7b-gsm8k.yaml", "llama3-8b-dialogsum.yaml"):
        assert load_config(REPO / "jobs" / "configs" / config).run_dir.startswith("/mnt/p2d/")


def test_dockerfile_builds_on_the_pinned_ray_and_copies_no_local_state():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM {IMAGE_IN_DOCKERFILE}" in text
    copies = " ".join(line for line in text.splitlines() if line.startswith("COPY"))
    for junk in (".venv", ".cache", "runs", " . "):
        assert junk not in copies
    assert "-c constraints.txt" in text


# -- KubeRay -------------------------------------------------------------------------------------------
def _cluster_specs():
    rc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    rj = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    return {"raycluster": (rc, rc["spec"]), "rayjob": (rj, rj["spec"]["rayClusterSpec"])}


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_kuberay_cluster_spec_fields_we_rely_on(kind):
    doc, spec = _cluster_specs()[kind]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster": "RayCluster", "rayjob": "RayJob"}[kind]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["serviceType"] == "ClusterIP"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert (
            container["resources"]["limits"]["nvidia.com/gpu"]
            == container["resources"]["requests"]["nvidia.com/gpu"]
        )
    for group in [head, *spec["workerGroupSpecs"]]:
        pod = group["template"]
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "p2d-ray"  # NetworkPolicy selector
        assert pod["spec"]["containers"][0]["image"].endswith("p2d-ray:0.1.0")


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_kuberay_spec_as_rays_autoscaler_reads_it(kind):
    doc, spec = _cluster_specs()[kind]
    cr = {"metadata": {"name": "p2d-ray", "namespace": doc["metadata"]["namespace"]}, "spec": spec}
    auto = _derive_autoscaling_config_from_ray_cr(cr)  # runs Ray's validate_config inside
    head = auto["available_node_types"]["headgroup"]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    gpu_groups = [t for name, t in auto["available_node_types"].items() if name != "headgroup"]
    assert gpu_groups and all(t["min_workers"] == 0 and t["resources"]["GPU"] == 8 for t in gpu_groups)
    assert auto["idle_timeout_minutes"] == 10.0


def test_raycluster_dashboard_only_through_port_forward():
    _, spec = _cluster_specs()["raycluster"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayjob_runs_a_shipped_entrypoint_and_config_and_cleans_up():
    rj = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "SidecarMode"
    args = spec["entrypoint"].split()
    assert args[0] == "python"
    in_image = "/home/ray/p2d-ray/"  # WORKDIR of cluster/Dockerfile, which copies jobs/
    script, config = args[1], args[args.index("--config") + 1]
    assert (REPO / script.removeprefix(in_image)).is_file()
    cfg = load_config(REPO / config.removeprefix(in_image))
    assert cfg.train.num_workers <= 8 * spec["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= set(ray.runtime_env.RuntimeEnv.known_fields)


def test_networkpolicy_selects_the_ray_pods_and_opens_only_the_job_api_to_the_operator():
    pol = _load(CLUSTER / "kuberay" / "networkpolicy.yaml")
    assert pol["kind"] == "NetworkPolicy"
    assert pol["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "p2d-ray"}
    rules = pol["spec"]["ingress"]
    from_operator = [r for r in rules if "namespaceSelector" in r["from"][0]]
    assert [p["port"] for r in from_operator for p in r["ports"]] == [8265]


def test_nothing_is_exposed_publicly_and_no_credentials_are_shipped():
    files = [p for d in ("cluster", "jobs") for p in (REPO / d).rglob("*") if p.is_file()]
    files = [p for p in files if "__pycache__" not in p.parts]
    assert len(files) >= 10
    secret_patterns = {
        "aws key id": r"AKIA[0-9A-Z]{16}",
        "aws secret": r"(?i)aws_secret_access_key\s*[:=]",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        "hf token": r"hf_[A-Za-z0-9]{30,}",
        "literal ray token": r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9+/=_-]{16,}",  # $(...) lookups are fine
        "password": r"(?i)password\s*[:=]",
    }
    for path in files:
        text = path.read_text()
        for what, pattern in secret_patterns.items():
            assert not re.search(pattern, text), f"{what} in {path.relative_to(REPO)}"
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(text):
                dumped = json.dumps(doc)
                assert '"LoadBalancer"' not in dumped and '"NodePort"' not in dumped, path
                assert not (isinstance(doc, dict) and doc.get("kind") in ("Ingress", "Service")), path
                assert "0.0.0.0/0" not in dumped, path


# -- job runtime env and entrypoints -------------------------------------------------------------------
def test_runtime_env_upload_leaves_local_state_behind(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = _load(REPO / "jobs" / "runtime_env.yaml")
    assert set(env) <= set(ray.runtime_env.RuntimeEnv.known_fields)
    assert "working_dir" not in env, "--working-dir . sets it on the command line"
    assert "HF_HUB_OFFLINE" not in env.get("env_vars", {}), "real runs download hub models on the workers"
    # Build the very zip `ray job submit --working-dir .` would upload (ignoring .gitignore on purpose:
    # our excludes alone must keep local state out).
    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    top = {n.split("/")[0] for n in names}
    assert not top & {".venv", ".cache", "runs", ".git"}
    assert not any("__pycache__" in n for n in names)
    assert {"p2d_ray/__init__.py", "jobs/_entry.py", "jobs/run_pipeline.py", "pyproject.toml"} <= set(names)
    assert pkg.stat().st_size < 20 * 2**20


SHIPPED_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_opens_with_its_exact_submit_command(path):
    first = path.read_text().splitlines()[0]
    # Token auth: `ray job submit` sends the token only when RAY_AUTH_MODE=token is set for it.
    assert first.startswith("# RAY_AUTH_MODE=token ray job submit --address ")
    # The runtime env: the file (clusters), or the file plus this machine's caches (local).
    assert any(
        f"--working-dir . {env} --" in first
        for env in (
            "--runtime-env jobs/runtime_env.yaml",
            '--runtime-env-json "$(python jobs/runtime_env.py)"',
        )
    )
    assert f"--config jobs/configs/{path.name}" in first
    script = re.search(r"python (jobs/\S+\.py)", first).group(1)
    assert (REPO / script).is_file()
    load_config(path)  # and it validates


@pytest.mark.parametrize("name", ["qwen2.5-7b-gsm8k.yaml", "llama3-8b-dialogsum.yaml"])
def test_real_configs_use_bf16_gpu_actors_and_zero2_on_8_gpus(name):
    cfg = load_config(REPO / "jobs" / "configs" / name)
    assert "/" in cfg.model.name_or_path and not cfg.model.name_or_path.startswith(("/", "."))  # hub id
    assert cfg.model.dtype == "bfloat16" and cfg.model.device == "cuda"
    assert cfg.score.num_gpus_per_actor >= 1 and cfg.score.max_actors > 1
    assert (cfg.train.use_gpu, cfg.train.num_workers, cfg.train.zero_stage) == (True, 8, 2)
    assert cfg.data.corpus_path.startswith("s3://") and cfg.train.storage_path.startswith("s3://")
    assert cfg.run_dir.startswith("/mnt/")  # the shared filesystem every stage hands files through


def _run_entry(script: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


def test_entrypoint_without_a_cluster_refuses_to_start_its_own_ray():
    r = _run_entry("score.py", "--config", "jobs/configs/local_tiny.yaml")
    assert r.returncode != 0
    assert "RAY_ADDRESS is not set" in r.stderr and "ray job submit" in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_entrypoint_reports_config_problems_before_connecting():
    r = _run_entry(
        "train.py",
        "--config",
        "jobs/configs/local_tiny.yaml",
        "train.zero_stagee=2",
        "score.batch_size=0",
        env_extra={"RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert r.returncode == 2
    assert "train.zero_stagee: unknown key" in r.stderr and "score.batch_size" in r.stderr
    r = _run_entry(
        "train.py",
        "--config",
        "jobs/configs/local_tiny.yaml",
        "--stages",
        "train,fit",
        env_extra={"RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert r.returncode == 2 and "'fit'" in r.stderr
