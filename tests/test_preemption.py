"""Preemption is a signal, not a crash; training continues from its newest checkpoint; the driver never
loads a model.

- SIGTERM (Kubernetes, Slurm, a spot notice, ``timeout``) to a real ``p2d-ray score``: rc 143, one line,
  nothing left running, and the rerun resumes from the finished shards (Ctrl-C: tests/test_bad_inputs.py).
- Training: a rerun after a failure past ``train.max_failures`` (one line saying how to resume) and a rerun
  after SIGTERM to a real ``p2d-ray train`` continue from the newest complete checkpoint on disk; the
  restart inside a run (FailureConfig) is tests/test_trainer.py.
- The model-free driver: the probe gradient and the baseline's step timing run while model loading is
  refused in this (the driver's) process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_parts

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.training.checkpoints import newest_complete_checkpoint

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], address: str) -> subprocess.Popen:
    """``p2d-ray`` in a real process of its own session, joining the test's Ray (a second local Ray on a
    busy 2-core box can miss Ray's 30 s start-up deadline)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_ADDRESS": address,
    }
    code = "import sys; from p2d_ray.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _heads(model: str, path: Path, heads=((0, 0), (1, 3))) -> None:
    from transformers import AutoConfig

    HeadSet(heads, geometry_from_config(AutoConfig.from_pretrained(model))).save(path)


# -- SIGTERM during scoring ---------------------------------------------------------------------------------
def test_sigterm_during_scoring_is_one_line_and_the_rerun_resumes(ray_local, tiny_llama, tmp_path):
    from test_bad_inputs import _alive_scorer_actors, _wait_for_a_new_scorer_actor

    from p2d_ray.scoring.outputs import ScoreStore

    n_shards = 40
    rows = [{"id": i, "text": f"row {i} " + "word " * 20} for i in range(20 * n_shards)]
    (tmp_path / "c").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c" / "x.parquet", row_group_size=20)
    run = tmp_path / "run"
    _heads(tiny_llama, run / "heads.json")
    args = [
        f"run_dir={run}",
        f"model.name_or_path={tiny_llama}",
        f"data.corpus_path={tmp_path / 'c'}",
        "score.scorer=perplexity",
        "score.batch_size=4",
        "score.bucket_batches=1",
        "score.max_rows_per_block=20",
    ]
    before = {a["ActorID"] for a in _alive_scorer_actors(ray_local)}
    p = _cli(["score", *args], ray_local.get_runtime_context().gcs_address)
    _wait_for_a_new_scorer_actor(ray_local, p, before)
    children = psutil.Process(p.pid).children(recursive=True)
    p.send_signal(signal.SIGTERM)  # to the process alone, as Kubernetes, Slurm and `timeout` send it
    out, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    line = next(x for x in err.splitlines() if "terminated (SIGTERM)" in x)
    assert line.startswith("p2d-ray score: terminated (SIGTERM); ") and line.endswith("rerun to resume"), line
    n_done = int(line.split("; ")[1].split(" of ")[0])
    assert n_done == len(list(ScoreStore(run).done.glob("*.json"))) < n_shards
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [(c.pid, c.name()) for c in alive]
    # The rerun resumes: the finished shards are skipped, every row scored once.
    p = _cli(["score", *args], ray_local.get_runtime_context().gcs_address)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert json.loads(out)["rows_in"] == 20 * n_shards
    stats = json.loads((run / "score_stats.json").read_text())
    assert stats["shards"]["already_done"] == n_done
    ids = pq.read_table(run / "scores").column("id").to_pylist()
    assert sorted(ids) == list(range(20 * n_shards))


# -- training: the newest complete checkpoint, whatever stopped the run ---------------------------------
def _train_run(tmp_path: Path, model: str, n_rows: int = 64):
    run = tmp_path / "run"
    rows = [
        {"id": i, "prompt": f"Q: what is {i % 4} plus {i % 4}?\nA:", "response": f" {2 * (i % 4)} done."}
        for i in range(n_rows)
    ]
    write_parts(run / "subset", pa.Table.from_pylist(rows), 2)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    _heads(model, run / "heads.json")
    overrides = {
        "run_dir": str(run),
        "model.name_or_path": model,
        "data.corpus_path": str(tmp_path / "corpus.parquet"),
        # 64 rows / (2 rows x 2 workers) = 16 steps, a checkpoint after each
        "train.num_workers": 2,
        "train.batch_size": 2,
        "train.checkpoint_every": 1,
        "train.checkpoints_to_keep": 2,
        "train.zero_stage": 2,
    }
    return run, overrides


def test_training_reruns_resume_from_the_newest_checkpoint(ray_local, tiny_llama, tmp_path):
    """1. A worker lost past max_failures=0: one line naming the newest checkpoint and how to resume.
    2. The rerun (a real ``p2d-ray train``) continues from exactly that checkpoint; SIGTERM once a newer
       checkpoint is on disk: rc 143, one line. 3. The rerun after SIGTERM continues from the newest
       complete checkpoint on disk and finishes; the summary records both resumes."""
    import p2d_ray.training.trainer as trainer

    run, o = _train_run(tmp_path, tiny_llama)
    cfg = build_config({}, [f"{k}={v}" for k, v in o.items()])
    root = f"{run / 'train'}/{trainer.TrainInputs(cfg).run_name(cfg)}"

    # 1. The last rank is killed after step 3 (checkpoints 1, 2, 3 on disk); no restart allowed.
    with pytest.raises(RuntimeError) as failed:
        trainer.fit(cfg, fail_at_step=3, fail_kill=True)
    message = str(failed.value)
    assert "\n" not in message and "rerun the same command to resume" in message, message
    # Step 3's checkpoint is complete unless the kill caught the other rank still uploading it.
    newest = newest_complete_checkpoint(root, 2)
    assert newest is not None and newest[0] in (2, 3), newest
    assert f"the newest complete checkpoint is step {newest[0]} ({newest[1]})" in message, message

    # 2. The rerun as a user runs it; SIGTERM as soon as it has saved a checkpoint of its own (step 4+).
    args = ["train", *[f"{k}={v}" for k, v in o.items()]]
    p = _cli(args, ray_local.get_runtime_context().gcs_address)
    deadline = time.monotonic() + 600
    while (newest_complete_checkpoint(root, 2) or (0,))[0] < 4:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint past step 3"
        time.sleep(0.2)  # polling the run's storage, not timing
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-3000:]
    # Our own output carries no traceback. Lines Ray forwards from its actors ("(PlacementGroupCleaner
    # pid=...) Traceback ...": Ray Train's cleaner thread losing its controller) are Ray's, not ours.
    own = [x for x in err.splitlines() if not re.match(r"(\x1b\[\d+m)?\(", x)]
    assert not any("Traceback" in x for x in own), err[-3000:]
    assert "p2d-ray train: terminated (SIGTERM); rerun to resume" in own, err[-3000:]
    at_stop = newest_complete_checkpoint(root, 2)[0]
    assert 4 <= at_stop < 16

    # 3. The rerun continues from the newest complete checkpoint the stopped run left.
    summary = trainer.run_train(cfg)
    assert summary["steps"] == 16 and len(summary["loss_curve"]) == 16
    assert [r["from_step"] for r in summary["resumes"]] == [newest[0], at_stop], summary["resumes"]
    assert summary["resumed_from_step"] == at_stop
    assert summary["ranks_identical"] is True


# -- the driver never loads a model ---------------------------------------------------------------------
@pytest.fixture
def no_model_in_this_process(monkeypatch):
    """Refuse loading model weights in this process (the driver) while the test runs; Ray's workers are
    other processes and load as usual. Returns the list of refused loads (a stage might swallow the error)."""
    from transformers import PreTrainedModel

    refused: list[str] = []

    def refuse(cls, name, *args, **kwargs):
        refused.append(str(name))
        raise AssertionError(f"the driver loaded model weights: {name}")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    return refused


def test_driver_never_loads_model_weights(ray_local, tiny_llama, tmp_path, no_model_in_this_process):
    """Stage 1 (as the jobs run it), the probe gradient and the baseline's timed full fine-tuning steps,
    with model loading refused in the driver: each runs on a worker, and the outputs are there."""
    sys.path.insert(0, str(REPO / "jobs"))
    from _entry import localize_on_a_worker

    from p2d_ray.baseline import full_baseline
    from p2d_ray.scoring.gradient import FILENAME
    from p2d_ray.scoring.pipeline import run_score

    rows = [
        {"id": i, "prompt": f"What is {i} plus {i % 7}? ", "response": f"It is {i + i % 7}. #### {i + i % 7}"}
        for i in range(40)
    ]
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "a.parquet", row_group_size=20)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("\n".join(json.dumps({**r, "id": 1000 + r["id"]}) for r in rows[:8]))
    cfg = build_config(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name_or_path": tiny_llama},
            "data": {"corpus_path": str(tmp_path / "corpus"), "probe_path": str(probe), "max_length": 64},
            "localize": {"max_probe_samples": 8},
            "score": {"scorer": "gradient_alignment", "min_actors": 1, "max_actors": 1, "batch_size": 8},
            "train": {"batch_size": 2},
            "report": {"timing_steps": 1},
        }
    )
    localize_on_a_worker(cfg)
    assert HeadSet.load(tmp_path / "run" / "heads.json")
    out = run_score(cfg)
    assert out["rows_in"] == 40 and (tmp_path / "run" / FILENAME).is_file()
    timed = full_baseline(cfg, n_full_rows=40, n_subset_rows=8, subset_steps=2)
    assert timed["full_step_seconds"] > 0 and timed["full_trainable_params"] > 0
    assert no_model_in_this_process == []
