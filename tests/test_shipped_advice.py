"""The shipped configs follow what the project measured (issue 26, item 1).

- Every config under ``jobs/configs/`` uses the scorer and localisation RESULTS.md recommends, or says on that
  very line (a comment naming RESULTS.md) why not. RESULTS.md measured ``influence`` at 0.00 top-10 %
  precision on SmolLM2, ``perplexity`` / ``ifd`` / ``icl_attention`` about chance; the four localisations
  within noise of each other; the random-heads control is a control, not a selection.
- The fleet launchers' limits can be reached: a cluster-wide ``max_workers`` below the sum of the worker
  groups' ``max_workers`` leaves a group that can never fill (AWS / GCP had 8 against 4 + 16); the KubeRay
  specs, as Ray's autoscaler reads them, agree with their groups too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from p2d_ray.config import P2DConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
LAUNCHERS = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
KUBERAY = [REPO / "cluster" / "kuberay" / "raycluster.yaml", REPO / "cluster" / "kuberay" / "rayjob.yaml"]

# What RESULTS.md recommends, key by key (section, key) -> the values it does not advise against.
RECOMMENDED = {
    ("score", "scorer"): {"gradient_alignment"},  # Sessions 3-8: the only scorer that selects the task
    ("localize", "method"): {
        "gradient",
        "fisher",
        "alps",
    },  # Sessions 7-8: within noise; gradient the default
    ("localize", "control"): {"none"},  # random heads: the control arm, never a selection
    ("select", "score_column"): {"score"},  # the run's scorer; loss / random columns are baselines
}


def test_the_recommendation_is_the_schema_default():
    """The schema's defaults are the measured recommendation, so a config that leaves a key out follows it."""
    d = P2DConfig()
    for (section, key), allowed in RECOMMENDED.items():
        assert getattr(getattr(d, section), key) in allowed, (section, key)
    results = (REPO / "RESULTS.md").read_text()
    assert "default scorer `gradient_alignment`" in results  # RESULTS.md still says so


def _explained(text: str, key: str, value: str) -> bool:
    """The YAML line setting ``key: value`` carries a comment naming RESULTS.md (why not the recommendation)."""
    line = re.search(rf"^\s*{re.escape(key)}:\s*{re.escape(value)}\b(.*)$", text, re.M)
    return bool(line and "#" in line.group(1) and "RESULTS.md" in line.group(1))


def advised_against(path: Path) -> list[str]:
    """Each key of the config at ``path`` that RESULTS.md advises against, with no reason given on its line."""
    cfg, text = load_config(str(path), []), path.read_text()
    out = []
    for (section, key), allowed in RECOMMENDED.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed and not _explained(text, key, str(value)):
            out.append(f"{section}.{key}={value!r} (recommended: {sorted(allowed)})")
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_uses_the_recommended_scorer_and_localisation(path):
    assert advised_against(path) == [], (
        f"{path.name} picks what RESULTS.md advises against: use the recommendation, or say on that line "
        "why not (a comment naming RESULTS.md)"
    )


def test_the_check_refuses_an_unexplained_baseline_scorer(tmp_path):
    """The configs as shipped before issue 26 (``scorer: influence``, no reason given) fail the check."""
    text = (REPO / "jobs" / "configs" / "qwen2.5-7b-gsm8k.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(re.sub(r"^(\s*)scorer: .*$", r"\1scorer: influence", text, flags=re.M))
    assert advised_against(bad) == ["score.scorer='influence' (recommended: ['gradient_alignment'])"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_cluster_cap_lets_every_group_fill(path):
    cfg = yaml.safe_load(path.read_text())
    groups = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    total = sum(g["max_workers"] for g in groups.values())
    assert cfg["max_workers"] >= total, (
        f"{path.name}: max_workers={cfg['max_workers']} < {total}, the sum of its worker groups' "
        "max_workers: some group can never fill"
    )
    for name, g in groups.items():
        assert g["min_workers"] <= g["max_workers"] <= cfg["max_workers"], name


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_limits_as_the_autoscaler_reads_them(path):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    cr = {
        "metadata": {"name": "p2d-ray", "namespace": doc["metadata"].get("namespace", "default")},
        "spec": spec,
    }
    auto = _derive_autoscaling_config_from_ray_cr(cr)
    groups = {k: v for k, v in auto["available_node_types"].items() if k != "headgroup"}
    assert auto["max_workers"] >= sum(g["max_workers"] for g in groups.values())
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
