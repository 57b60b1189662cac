"""``p2d-ray run`` through the CLI on a tiny model and corpus: every stage and the report; a rerun skips
every stage; a changed select fraction reruns select and everything after it, nothing before."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import write_parts

from p2d_ray.cli import main
from p2d_ray.rundir import STAGES, RunDir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    return f"{a} plus {b}?\n", f"{a} + {b} = {a + b}. #### {a + b}"


def _rows(n: int, start: int, seed: int, noisy: bool) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        clean = not noisy or i % 2 == 0
        prompt, response = (
            _arith(rng) if clean else ("zq xw?\n", "".join(rng.choice("abc#!") for _ in range(12)))
        )
        rows.append({"id": start + i, "prompt": prompt, "response": response, "is_clean_on_task": clean})
    return rows


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("e2e")
    # two files of two row groups: four shards
    write_parts(root / "corpus", pa.Table.from_pylist(_rows(96, 0, 0, noisy=True)), 2, row_group_size=24)
    pq.write_table(pa.Table.from_pylist(_rows(8, 1000, 1, noisy=False)), root / "probe.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(8, 2000, 2, noisy=False)), root / "heldout.parquet")
    config = {
        "run_dir": str(root / "run"),
        "model": {"name_or_path": tiny_llama},
        "data": {
            "probe_path": str(root / "probe.parquet"),
            "corpus_path": str(root / "corpus"),
            "max_length": 64,
        },
        "localize": {"top_k": 2, "max_probe_samples": 8},
        "score": {"batch_size": 16, "min_actors": 1, "max_actors": 1},
        "select": {"fraction": 0.25},
        "train": {"num_workers": 1, "batch_size": 4, "max_steps": 2, "checkpoint_every": 100},
        "evaluate": {
            "heldout_path": str(root / "heldout.parquet"),
            "n_samples": 8,
            "max_new_tokens": 4,
            "batch_size": 2,
            "num_actors": 2,
        },
        "report": {"timing_steps": 1},
    }
    (root / "p2d.yaml").write_text(yaml.safe_dump(config))
    return root


def _run(capsys, *args) -> dict:
    rc = main(["run", *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    # stdout is the JSON result alone (`p2d-ray run > out; jq . out`): the summary for people is on stderr.
    assert "p2d-ray run: summary" in captured.err
    return json.loads(captured.out)


def _records(run: RunDir) -> dict:
    return {s: run.stage_record(s) for s in (*STAGES, "report")}


def test_run_resume_and_partial_rerun(ray_local, project, capsys):
    cfg_path = str(project / "p2d.yaml")
    run = RunDir(project / "run")

    first = _run(capsys, "--config", cfg_path)
    assert list(first) == [*STAGES, "report"]
    assert not any(r.get("skipped") for r in first.values())
    for p in (
        "heads.json",
        "heads.png",
        "scores",
        "subset",
        "adapter/manifest.json",
        "eval.json",
        "eval_samples.parquet",
        "report.json",
        "aer.png",
        "config.yaml",
    ):
        assert run.path(p).exists(), p
    report = json.loads(run.path("report.json").read_text())
    assert set(report["stage_seconds"]) == set(STAGES)
    assert report["aer"]["label"] == "estimated" and report["aer"]["aer"] > 0
    assert report["aer"]["n_full_rows"] == 96 and report["aer"]["n_subset_rows"] == 24
    assert report["eval"]["variants"] == ["base", "adapted"] and report["eval"]["exact_match"] is True
    assert report["eval"] == json.loads(run.path("eval.json").read_text())
    assert report["eval"]["adapted"]["loss"] != report["eval"]["base"]["loss"]  # the adapter was applied
    samples = pq.read_table(run.path("eval_samples.parquet")).to_pylist()  # joined back from 2 actors
    assert [s["id"] for s in samples] == list(range(2000, 2008))
    assert all(isinstance(s["prediction_adapted"], str) for s in samples)
    assert 0 <= report["selection_precision"]["selected"] <= 1
    assert report["selection_precision"]["base_rate"] == pytest.approx(0.5)
    before = _records(run)

    # Same config: every stage and the report are skipped, nothing is re-recorded.
    again = _run(capsys, "--config", cfg_path)
    assert all(again[s]["skipped"] for s in (*STAGES, "report"))
    assert _records(run) == before

    # A changed select fraction: localize and score are kept, select onwards rerun.
    changed = _run(capsys, "--config", cfg_path, "select.fraction=0.5")
    assert changed["localize"]["skipped"] and changed["score"]["skipped"]
    assert not any(changed[s].get("skipped") for s in ("select", "train", "evaluate", "report"))
    after = _records(run)
    assert after["localize"] == before["localize"] and after["score"] == before["score"]
    for s in ("select", "train", "evaluate", "report"):
        assert after[s]["fingerprint"] != before[s]["fingerprint"], s
    report = json.loads(run.path("report.json").read_text())
    assert report["aer"]["n_subset_rows"] == 48


def test_compare_runs_every_selector_on_equal_terms_and_resumes(project, capsys):
    """`p2d-ray compare`: random heads, random and IFD selections of the same size, each trained and
    evaluated; the random-heads cell trains heads with the task heads' layer spread; a rerun trains nothing."""
    from p2d_ray.compare import aggregate

    args = [
        "compare",
        "--config",
        str(project / "p2d.yaml"),
        f"run_dir={project / 'cmp'}",
        "compare.selectors=[random_heads,random,ifd]",
        "compare.adaptations=[heads]",
        "compare.seeds=[3]",
        "compare.lr={heads: 0.01}",
    ]
    assert main(args) == 0
    root = project / "cmp" / "compare"
    result = json.loads((root / "results.json").read_text())
    cells = {c["selector"]: c for c in result["cells"]}
    assert set(cells) == {"random_heads", "random", "ifd"}
    task = json.loads((root / "sources" / "task" / "heads.json").read_text())
    control = json.loads((root / "sources" / "random_heads_s3" / "heads.json").read_text())
    assert control["task_heads"] == task["heads"] and control["heads"] != task["heads"]
    assert sorted(h[0] for h in control["heads"]) == sorted(h[0] for h in task["heads"])
    assert cells["random_heads"]["heads"] == control["heads"]  # the control trains its own heads
    assert cells["random"]["heads"] == cells["ifd"]["heads"] == task["heads"]
    for sel in ("random_heads_s3", "random_s3", "ifd"):
        selection = json.loads((root / "select" / sel / "selection.json").read_text())
        assert selection["n_selected"] == 24  # the same budget: 25% of 96 rows
    for c in result["cells"]:
        assert c["loss"] > 0 and c["aer"] > 0 and 0 <= c["precision"] <= 1 and c["train_steps"] == 2
        assert c["seconds"]["train"] > 0 and c["seconds"]["select"] > 0
    assert cells["random"]["seconds"]["score"] == 0  # random selection needs no model
    assert result["base_eval"]["loss"] > 0 and (root / "aer.png").stat().st_size > 0
    assert "| ifd | heads |" in (root / "RESULTS.md").read_text()

    before = {p: p.stat().st_mtime for p in root.glob("cells/*/*/*/stages/*.json")}
    assert len(before) == 3
    capsys.readouterr()
    assert main(args) == 0
    assert {p: p.stat().st_mtime for p in root.glob("cells/*/*/*/stages/*.json")} == before
    rerun = capsys.readouterr()  # stdout is the JSON result alone, the table for people is on stderr
    assert len(json.loads(rerun.out)["cells"]) == 3 and "| ifd | heads |" in rerun.err

    rows = [{**result["cells"][0], "seed": s, "loss": v} for s, v in ((0, 1.0), (1, 3.0))]
    (entry,) = aggregate(rows)
    assert entry["loss"] == 2.0 and entry["loss_std"] == pytest.approx(2**0.5) and entry["n_seeds"] == 2
