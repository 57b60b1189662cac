"""A fleet job with the recommended scorer (issue 26, item 1): gradient_alignment's probe gradient is a model
load and a backward, which a job's driver on the GPU-less head cannot do; the job computes it first in a Ray
task sized like one scoring actor, and the score stage then finds it in the run directory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoConfig

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.scoring.gradient import FILENAME, ProbeGradient, prepare_probe_gradient
from p2d_ray.scoring.plan import plan_score

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def _entry():
    spec = importlib.util.spec_from_file_location("jobs_entry", REPO / "jobs" / "_entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_computes_the_probe_gradient_on_a_worker_and_score_reuses_it(ray_local, tiny_llama, tmp_path):
    rows = [{"id": i, "prompt": f"What is {i} plus 2? ", "response": f"{i + 2}"} for i in range(24)]
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "a.parquet")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("\n".join(json.dumps(r) for r in rows[:6]))
    run_dir = tmp_path / "run"
    geometry = geometry_from_config(AutoConfig.from_pretrained(tiny_llama))
    HeadSet(((1, 0), (1, 3)), geometry).save(run_dir / "heads.json")
    cfg = build_config(
        {
            "run_dir": str(run_dir),
            "model": {"name_or_path": tiny_llama},
            "data": {"corpus_path": str(tmp_path / "corpus"), "probe_path": str(probe), "max_length": 32},
            "score": {"scorer": "gradient_alignment", "batch_size": 8, "min_actors": 1, "max_actors": 1},
        }
    )
    _entry().probe_gradient_on_a_worker(cfg)
    path = run_dir / FILENAME
    plan = plan_score(cfg)
    assert ProbeGradient.load(path).fingerprint == plan.gradient_fingerprint
    before = path.stat().st_mtime_ns
    # What the score stage's driver calls before its pass (scoring.pipeline._start_pass): the file is reused.
    model_fp = plan.provenance["model_fingerprint"]
    pg = prepare_probe_gradient(cfg, plan.heads, plan.gradient_fingerprint, plan.probe_rows, model_fp)
    assert pg.fingerprint == plan.gradient_fingerprint
    assert path.stat().st_mtime_ns == before, "the score stage would compute the probe gradient again"
