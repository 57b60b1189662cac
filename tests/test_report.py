"""AER arithmetic (measured vs estimated, labels), selection precision, report.json and aer.png.

The report reads only files, so a run directory is laid out here by hand with known timings, scores and
labels; the estimated denominator is timed for real (full fine-tuning steps through Ray Train + DeepSpeed on a tiny
Llama).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2d_ray.baseline import (
    _timing_key,
    baseline_config,
    epochs_trained,
    estimate_full_seconds,
    full_train_steps,
    run_baseline,
)
from p2d_ray.config import TrainConfig, build_config
from p2d_ray.models.loading import load_model
from p2d_ray.report.aer import aer
from p2d_ray.report.plot import plot_aer, quality_of
from p2d_ray.report.precision import selection_precision
from p2d_ray.report.report import run_report
from p2d_ray.rundir import RunDir

TIMES = {"localize": 1.0, "score": 2.0, "select": 0.5, "train": 6.5, "evaluate": 100.0}


# -- arithmetic ------------------------------------------------------------------------------------------
def test_aer_sums_the_p2d_stages_only():
    a = aer(TIMES, 40.0, "estimated", full_train_steps=80)
    assert a["aer"] == pytest.approx(10.0 / 40.0)  # evaluate is not a cost of adaptation
    assert a["p2d_seconds"] == pytest.approx(10.0)
    assert a["label"] == "estimated" and a["full_train_steps"] == 80
    assert set(a["p2d_stage_seconds"]) == {"localize", "score", "select", "train"}
    assert aer(TIMES, 10.0, "measured")["aer"] == pytest.approx(1.0)


def test_aer_rejects_bad_inputs():
    with pytest.raises(ValueError, match="train"):
        aer({k: v for k, v in TIMES.items() if k != "train"}, 40.0, "estimated")
    with pytest.raises(ValueError, match="label"):
        aer(TIMES, 40.0, "guessed")
    with pytest.raises(ValueError, match="> 0"):
        aer(TIMES, 0.0, "measured")
    with pytest.raises(ValueError, match="step_seconds"):
        estimate_full_seconds(0.0, 10)


def test_full_train_steps_match_the_subset_epochs():
    t = TrainConfig(batch_size=4, num_workers=2, epochs=2)  # global batch 8
    # subset: 20 rows -> 3 steps per epoch, 6 steps in 2 epochs; full: 100 rows -> 13 per epoch -> 26
    assert epochs_trained(20, 6, t) == pytest.approx(2.0)
    assert full_train_steps(100, 20, 6, t) == 26
    # max_steps stopped the subset run after 3 of its 6 steps: full fine-tuning gets one epoch, too
    assert full_train_steps(100, 20, 3, t.model_copy(update={"max_steps": 3})) == 13
    assert estimate_full_seconds(0.5, 26) == pytest.approx(13.0)


def test_baseline_config_is_full_finetuning_on_the_corpus(tmp_path):
    _write(tmp_path / "corpus" / "part-0.parquet", [{"id": 0, "text": "a corpus the baseline trains on"}])
    cfg = build_config(
        {},
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.corpus_path={tmp_path / 'corpus'}",
            "train.batch_size=4",
            "train.num_workers=2",
            "report.full_baseline=true",
        ],
    )
    b = baseline_config(cfg, n_steps=26, n_full_rows=100)
    assert b.train.adaptation == "full" and b.train.max_steps == 26 and b.train.epochs == 2
    assert b.run_dir == str(tmp_path / "run" / "full_baseline")
    assert b.data.corpus_path == str(tmp_path / "corpus") and b.report.full_baseline is False


# -- precision and plot ------------------------------------------------------------------------------------
def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def labelled(tmp_path):
    """40 rows, 10 clean (ids 0-9). Scores rank ids 0-3 top; loss_full ranks ids 36-39 lowest (noise that
    is easy to predict: perplexity selection's failure mode)."""
    rows = [
        {"id": i, "prompt": f"q{i}\n", "response": f"#### {i}", "is_clean_on_task": i < 10} for i in range(40)
    ]
    _write(tmp_path / "corpus" / "part-0.parquet", rows)
    scores = [{"id": i, "score": float(40 - i), "loss_full": float(40 - i) / 10} for i in range(40)]
    _write(tmp_path / "run" / "scores" / "s-0.parquet", scores)
    (tmp_path / "run" / "scores" / "_done").mkdir()  # resume markers must not be read as data
    subset = [r for r in rows if r["id"] in (0, 1, 2, 30)]  # 3 of 4 clean
    _write(tmp_path / "run" / "subset" / "part-0.parquet", subset)
    return tmp_path


def test_selection_precision(labelled):
    p = selection_precision(
        str(labelled / "corpus"), str(labelled / "run" / "subset"), str(labelled / "run" / "scores")
    )
    assert p["k"] == 4 and p["n_corpus"] == 40
    assert p["selected"] == pytest.approx(0.75)
    assert p["base_rate"] == pytest.approx(0.25)
    assert p["perplexity"] == pytest.approx(0.0)  # lowest loss_full: ids 36..39, none clean


def test_selection_precision_unlabelled_corpus(tmp_path):
    _write(tmp_path / "c" / "a.parquet", [{"id": 1, "text": "x"}])
    _write(tmp_path / "s" / "a.parquet", [{"id": 1, "text": "x"}])
    assert selection_precision(str(tmp_path / "c"), str(tmp_path / "s"), str(tmp_path / "s")) is None


def test_plot_and_quality(tmp_path):
    ev = {
        "base": {"loss": 2.0, "perplexity": 7.4, "exact_match": 0.1},
        "adapted": {"loss": 1.0, "perplexity": 2.7, "exact_match": 0.4},
    }
    assert quality_of(ev, "adapted") == (0.4, "held-out exact match (higher is better)")
    assert quality_of({"adapted": {"loss": 1.0, "perplexity": 2.7}})[0] == pytest.approx(2.7)
    assert quality_of(ev, "missing") is None
    pts = [
        {
            "variant": "heads x influence 10%",
            "aer": 0.3,
            "aer_label": "estimated",
            "quality": 0.4,
            "quality_name": "em",
        }
    ]
    png = plot_aer(pts, tmp_path / "aer.png", base_quality=0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="share one axis"):
        plot_aer(pts + [{**pts[0], "quality_name": "ppl"}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one"):
        plot_aer([], tmp_path / "x.png")


# -- the report step ------------------------------------------------------------------------------------------
def _lay_out_run(root, tiny_llama):
    run = RunDir(root / "run")
    for stage, s in TIMES.items():
        run.record_stage(stage, s, "fp")
    run.heads_json.write_text(json.dumps({"heads": [[0, 1], [1, 2]]}))
    run.path("train_summary.json").write_text(json.dumps({"steps": 1, "rows": 4}))
    run.path("selection.json").write_text(json.dumps({"rule": {"name": "relevance_then_quality"}}))
    run.path("eval.json").write_text(
        json.dumps(
            {
                "n_samples": 4,
                "base": {"loss": 3.0, "perplexity": 20.1, "exact_match": 0.25, "n_correct": 1},
                "adapted": {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.5, "n_correct": 2},
            }
        )
    )
    return build_config(
        {},
        [
            f"run_dir={run.root}",
            f"model.name_or_path={tiny_llama}",
            f"data.corpus_path={root / 'corpus'}",
            "train.batch_size=4",
            "train.max_steps=1",
            "report.timing_steps=2",
            "score.scorer=influence",  # names the variant ("heads x influence 10%")
        ],
    )


def test_report_estimated(labelled, tiny_llama):
    cfg = _lay_out_run(labelled, tiny_llama)
    # A sibling variant that measured its full baseline: its point and the full fine-tuning point are plotted.
    sibling = labelled / "lora_run"
    sibling.mkdir()
    (sibling / "report.json").write_text(
        json.dumps(
            {
                "variant": "lora x perplexity 10%",
                "aer": {"aer": 0.6, "label": "measured"},
                "eval": {"adapted": {"loss": 2.5, "perplexity": 12.2, "exact_match": 0.3}},
                "full_baseline_eval": {"adapted": {"loss": 1.5, "perplexity": 4.5, "exact_match": 0.45}},
            }
        )
    )
    # A timing run left behind by an earlier version: Ray Train would reload its checkpoint list.
    timing = labelled / "run" / "full_baseline_timing"
    (timing / "train" / "full-stale").mkdir(parents=True)
    (timing / "train" / "full-stale" / "checkpoint_manager_snapshot.json").write_text("{}")
    run_baseline(cfg)  # the AER denominator is a stage of its own; the report only reads its output
    report = run_report(cfg)

    saved = json.loads((labelled / "run" / "report.json").read_text())
    assert saved["aer"] == report["aer"]
    assert saved["select_rule"] == "relevance_then_quality"  # what the selection applied, for the summary
    a = report["aer"]
    full = json.loads((labelled / "run" / "full_baseline.json").read_text())
    # subset: 4 rows, 1 step (max_steps) = 1 epoch; full: 40 rows / batch 4 = 10 steps
    assert a["label"] == "estimated" and a["full_train_steps"] == 10 and a["n_full_rows"] == 40
    assert a["n_subset_rows"] == 4 and a["subset_train_steps"] == 1
    assert a["full_step_seconds"] > 0 and a["timing_steps"] == 2
    # The step was timed through the trainer (Ray Train + DeepSpeed, all weights trained, one warm-up step
    # left out), and the timing run saved no weights: no DeepSpeed shard, no export.
    assert full["timed_by"] == "trainer-min" and len(full["full_step_times"]) == 3
    n_params = sum(p.numel() for p in load_model(cfg.model).parameters())
    assert full["full_trainable_params"] == n_params
    saved_files = [p.name for p in (labelled / "run" / "full_baseline_timing").rglob("*") if p.is_file()]
    assert not [n for n in saved_files if n.endswith((".pt", ".safetensors", ".bin"))], saved_files
    assert a["full_train_seconds"] == pytest.approx(10 * a["full_step_seconds"])
    assert a["aer"] == pytest.approx(10.0 / a["full_train_seconds"])
    assert full["full_train_seconds"] == pytest.approx(a["full_train_seconds"])
    assert report["stage_seconds"] == {**TIMES, "baseline": report["stage_seconds"]["baseline"]}
    assert report["selection_precision"]["selected"] == pytest.approx(0.75)
    assert report["eval"]["adapted"]["exact_match"] == 0.5
    assert report["heads"] == [[0, 1], [1, 2]]
    assert sorted(report["variants_plotted"]) == sorted(
        ["heads x influence 10%", "lora x perplexity 10%", "full x all data"]
    )
    assert (labelled / "run" / "aer.png").read_bytes()[:4] == b"\x89PNG"

    # Each timing run starts fresh (the stale run is gone, one Ray Train run in its storage), on (2 timed +
    # 1 warm-up) global batches of 4 rows drawn from the corpus.
    assert not (timing / "train" / "full-stale").exists()
    assert len([p for p in (timing / "train").iterdir() if p.is_dir()]) == 1
    assert pq.read_table(timing / "rows").num_rows == 12

    # Rebuilding the baseline reuses the timed steps (same inputs).
    run_baseline(cfg)
    again = run_report(cfg)
    assert again["aer"]["full_step_seconds"] == a["full_step_seconds"]
    # Another subset (another selection fraction: 2 steps, so 2 epochs of the corpus) reuses the timed step.
    (labelled / "run" / "train_summary.json").write_text(json.dumps({"steps": 2, "rows": 4}))
    other = run_baseline(cfg)
    assert other["full_train_steps"] == 20 and other["full_step_seconds"] == a["full_step_seconds"]

    # What the timed step depends on: the trainer's shape re-times it; the step budget, checkpointing and
    # tracking do not (the timing run itself is the one above).
    def train_with(**update):
        return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})

    assert _timing_key(train_with(batch_size=2)) != _timing_key(cfg)
    assert _timing_key(train_with(num_workers=2)) != _timing_key(cfg)
    assert _timing_key(train_with(max_steps=7, epochs=3, checkpoint_every=2, tensorboard=False)) == (
        _timing_key(cfg)
    )


def test_report_needs_the_stages(labelled, tiny_llama):
    cfg = _lay_out_run(labelled, tiny_llama)
    (labelled / "run" / "stages" / "train.json").unlink()
    with pytest.raises(ValueError, match=r"\['train'\] have not run"):
        run_report(cfg)
    assert not (labelled / "run" / "report.json").exists()


def test_report_only_reads_the_baseline_it_is_given(labelled, tiny_llama):
    """The report computes nothing expensive: without full_baseline.json it stops (naming the baseline
    stage) and leaves the run dir untouched; with one written by hand it reports exactly those numbers."""
    cfg = _lay_out_run(labelled, tiny_llama)
    run = labelled / "run"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(ValueError, match="p2d-ray baseline"):
        run_report(cfg)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing trained, timed or written

    recipe = {"adaptation": "full", "epochs": 1.0, "batch_size": 4, "lr": 1e-3, "steps": 10}
    (run / "full_baseline.json").write_text(
        json.dumps(
            {
                "key": "k",
                "label": "measured",
                "full_train_seconds": 20.0,
                "n_full_rows": 40,
                "full_train_steps": 10,
                "recipe": recipe,
                "baseline_eval": {"adapted": {"loss": 1.5, "perplexity": 4.5, "exact_match": 0.45}},
            }
        )
    )
    report = run_report(cfg)
    a = report["aer"]
    assert a["label"] == "measured" and a["full_train_seconds"] == 20.0 and a["aer"] == pytest.approx(0.5)
    assert a["recipe"] == recipe and a["full_train_steps"] == 10
    assert report["full_baseline_eval"]["adapted"]["exact_match"] == 0.45
    assert not (run / "full_baseline").exists()  # the report never runs the baseline itself


def test_baseline_states_the_p2d_recipe(labelled, tiny_llama):
    """full_baseline.json: the same recipe as the P2D training run (epochs it made, batch, lr, steps)."""
    cfg = _lay_out_run(labelled, tiny_llama)
    full = run_baseline(cfg)
    r = full["recipe"]
    assert full["label"] == "estimated"
    assert r["adaptation"] == "full" and r["same_as"] == "heads"
    # the P2D run made 1 step over 4 rows at global batch 4 = 1 epoch; the full run: 40 rows -> 10 steps
    assert r["epochs"] == pytest.approx(1.0) and r["steps"] == full["full_train_steps"] == 10
    assert (r["batch_size"], r["global_batch"], r["lr"]) == (4, 4, cfg.train.lr)
    assert RunDir(cfg.run_dir).stage_record("baseline")["seconds"] > 0
