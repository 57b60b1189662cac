"""The synthetic demo corpus: deterministic, correctly labelled for either target, sharded, built once under
a lock, and without a surface feature that gives the on-task rows away."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from p2d_ray.assets import demo_data
from p2d_ray.assets.cache import build_once, file_lock
from p2d_ray.assets.synthetic import (
    LABEL,
    MIXTURE,
    N_CORPUS,
    N_HELDOUT,
    N_PROBE,
    N_SHARDS,
    SCHEMA,
    TARGETS,
    generate_corpus,
    generate_heldout,
    generate_probe,
)
from p2d_ray.data.io import read_table

STEP = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)\.")
FINAL = re.compile(r"#### (-?\d+)$")


def solution_is_consistent(response: str) -> bool:
    """Independent check of a worked solution: every ``a op b = c.`` step is true arithmetic, each step
    starts from the previous result, and ``#### n`` repeats the last result."""
    steps = STEP.findall(response)
    final = FINAL.search(response)
    if not steps or not final:
        return False
    prev = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        true = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        if true != c or (prev is not None and prev not in (a, b)):
            return False
        prev = c
    return int(final.group(1)) == prev


def units_answer(prompt: str) -> int:
    """The right conversion, computed here from the prompt and a table of facts written independently."""
    facts = {("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24, ("weeks", "days"): 7,
             ("years", "months"): 12, ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000,
             ("feet", "inches"): 12, ("dozens", "items"): 12, ("liters", "milliliters"): 1000}  # fmt: skip
    n, big = re.search(r"(\d+) (\w+)", prompt).groups()  # "<n> <larger unit>" in every template
    (small,) = [b for a, b in facts if a == big and re.search(rf"\b{b}\b", prompt)]
    return int(n) * facts[(big, small)]


def instruction_answer(prompt: str) -> str:
    """What a correct answer to an instruction prompt is, computed here from the prompt text."""
    op, arg = prompt.strip().split(": ", 1)
    arg = arg.split(".")[0]  # numeric instructions add a sentence about the answer format
    items = arg.split(", ")
    return {
        "Reverse the word": lambda: arg[::-1],
        "Write the word in capitals": lambda: arg.upper(),
        "Sort the list": lambda: ", ".join(str(n) for n in sorted(int(x) for x in items)),
        "Largest number in": lambda: f"#### {max(int(x) for x in items)}",
        "Smallest number in": lambda: f"#### {min(int(x) for x in items)}",
        "Last item of": lambda: items[-1],
        "Count the items in": lambda: f"#### {len(items)}",
    }[op]()


def is_right(r: dict) -> bool:
    if r["task"] == "arithmetic":
        return solution_is_consistent(r["response"])
    if r["task"] == "units":
        return FINAL.search(r["response"]) is not None and int(FINAL.search(r["response"]).group(1)) == (
            units_answer(r["prompt"])
        )
    return r["response"] == instruction_answer(r["prompt"])


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(4000, seed=0)


def test_same_seed_same_table_other_seed_differs(corpus):
    assert generate_corpus(4000, seed=0).equals(corpus)
    other = generate_corpus(4000, seed=1)
    assert other.schema == corpus.schema
    assert other.column("prompt").to_pylist() != corpus.column("prompt").to_pylist()
    assert generate_probe().equals(generate_probe())


def test_schema_rows_ids_and_mixture(corpus):
    assert corpus.schema == SCHEMA
    assert corpus.num_rows == 4000
    ids = corpus.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    counts = Counter(
        zip(corpus.column("task").to_pylist(), corpus.column("quality").to_pylist(), strict=True)
    )
    assert counts == {k: round(share * 4000) for k, share in MIXTURE.items()}
    assert sum(corpus.column(LABEL).to_pylist()) == 640  # 16%: a top-10% pick can be all clean
    lengths = [len(r["prompt"]) + len(r["response"]) for r in corpus.to_pylist()]
    assert sum(n < 160 for n in lengths) >= 0.95 * len(lengths)  # short rows keep real-model scoring fast


@pytest.mark.parametrize("target", TARGETS)
def test_labels_match_content_for_either_target(target):
    table = generate_corpus(2000, seed=0, target=target)
    seen = Counter()
    for r in table.to_pylist():
        assert r[LABEL] == (r["task"] == target and r["quality"] == "clean"), r
        if r["task"] in ("arithmetic", "units", "instruction") and r["quality"] != "shuffled":
            assert is_right(r) == (r["quality"] == "clean"), r
        seen[r["quality"]] += 1
    assert set(seen) == {"clean", "wrong_answer", "shuffled", "noise"}


def test_no_surface_feature_separates_on_task_rows(corpus):
    """The answer format and row length are shared: wrong and shuffled rows of the target look alike, and
    other tasks (and noise) use the same ``####`` format, so neither marks the clean on-task rows."""
    rows = corpus.to_pylist()
    on = [r for r in rows if r[LABEL]]
    off = [r for r in rows if not r[LABEL]]
    with_format = [r for r in off if "####" in r["response"]]
    assert len(with_format) > len(on)  # most "#### n" rows are not clean on-task rows
    assert {r["task"] for r in with_format} >= {"arithmetic", "units", "instruction", "noise"}
    mean = lambda rs: sum(len(r["prompt"]) + len(r["response"]) for r in rs) / len(rs)  # noqa: E731
    assert 0.6 < mean(on) / mean(off) < 1.6
    # The target's wrong-answer rows share its prompt templates (same opening words).
    opening = lambda rs: {r["prompt"].split()[0] for r in rs}  # noqa: E731
    wrong = [r for r in rows if r["task"] == "arithmetic" and r["quality"] == "wrong_answer"]
    assert opening(wrong) == opening(on)


@pytest.mark.parametrize("target", TARGETS)
def test_probe_and_heldout_are_clean_target_rows_and_disjoint(corpus, target):
    used = corpus.column("prompt").to_pylist()
    probe = generate_probe(used, target=target)
    heldout = generate_heldout(used + probe.column("prompt").to_pylist(), target=target)
    assert (probe.num_rows, heldout.num_rows) == (N_PROBE, N_HELDOUT)
    for t in (probe, heldout):
        assert t.schema == SCHEMA
        assert all(t.column(LABEL).to_pylist())
        assert set(t.column("task").to_pylist()) == {target}
        assert all(is_right(r) for r in t.to_pylist())
    sets = [set(t.column("prompt").to_pylist()) for t in (corpus, probe, heldout)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    ids = [set(t.column("id").to_pylist()) for t in (corpus, probe, heldout)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_bad_row_count_or_target_is_a_value_error():
    with pytest.raises(ValueError, match="n_rows"):
        generate_corpus(0)
    with pytest.raises(ValueError, match="dialogue.*allowed"):
        generate_corpus(10, target="dialogue")


def test_demo_assets_built_once_under_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("P2D_RAY_CACHE", str(tmp_path))
    assets = demo_data("units")
    assert assets.root == tmp_path / "demo" / "data-units"
    shards = sorted(assets.corpus_dir.glob("*.parquet"))
    assert len(shards) == N_SHARDS
    assert all(pq.ParquetFile(s).metadata.num_row_groups >= 3 for s in shards)  # splittable by row group
    corpus = read_table(str(assets.corpus_dir))
    probe, heldout = read_table(str(assets.probe_path)), read_table(str(assets.heldout_path))
    assert corpus.num_rows == N_CORPUS and corpus.schema == SCHEMA
    assert len(set(corpus.column("id").to_pylist())) == corpus.num_rows
    assert (probe.num_rows, heldout.num_rows) == (N_PROBE, N_HELDOUT)
    assert set(probe.column("task").to_pylist()) == {"units"}
    assert not set(corpus.column("id").to_pylist()) & set(heldout.column("id").to_pylist())
    assert not set(corpus.column("prompt").to_pylist()) & set(heldout.column("prompt").to_pylist())

    stamps = {p: p.stat().st_mtime_ns for p in [assets.root / "meta.json", *shards]}
    again = demo_data("units")
    assert again == assets
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # served from cache, not rebuilt
    assert json.loads((assets.root / "meta.json").read_text())["n_clean_on_task"] == round(0.16 * N_CORPUS)
    # The other target: the same rows, labelled for it.
    other = read_table(str(demo_data("arithmetic").corpus_dir))
    assert other.column("prompt").to_pylist() == corpus.column("prompt").to_pylist()
    assert other.column(LABEL).to_pylist() != corpus.column(LABEL).to_pylist()


def _writer(calls: list):
    def build(out: Path) -> dict:
        calls.append(out)
        (out / "payload.txt").write_text(f"build {len(calls)}")
        return {"n": len(calls)}

    return build


def test_build_once_reuses_and_rebuilds_on_recipe_change(tmp_path):
    calls: list = []
    target = tmp_path / "thing"
    build_once(target, {"v": 1}, _writer(calls))
    build_once(target, {"v": 1}, _writer(calls))
    assert len(calls) == 1
    build_once(target, {"v": 2}, _writer(calls))  # a changed recipe replaces the stale build
    assert len(calls) == 2
    assert (target / "payload.txt").read_text() == "build 2"
    assert json.loads((target / "meta.json").read_text())["recipe"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing", "thing.lock"]  # no temp dirs left


def test_failed_build_keeps_the_previous_one(tmp_path):
    calls: list = []
    target = tmp_path / "thing"
    build_once(target, {"v": 1}, _writer(calls))

    def broken(out: Path):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(target, {"v": 2}, broken)
    assert (target / "payload.txt").read_text() == "build 1" and not (target / "half.txt").exists()
    build_once(target, {"v": 2}, _writer(calls))
    assert (target / "payload.txt").read_text() == "build 2"


def test_concurrent_caller_waits_for_the_builder_instead_of_building(tmp_path):
    """A second process asking for the same build while the first holds the lock must block, then find
    the finished build and not build again."""
    target, log = tmp_path / "thing", tmp_path / "log.txt"
    child_code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from p2d_ray.assets.cache import build_once
        def build(out):
            with open({str(log)!r}, "a") as f:
                f.write("child\\n")
        print("ready", flush=True)
        build_once(Path({str(target)!r}), {{"v": 1}}, build)
    """)
    with file_lock(target.with_name("thing.lock")):
        child = subprocess.Popen(
            [sys.executable, "-c", child_code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        assert child.stdout.readline().strip() == "ready"
        # The child cannot get past the lock while we hold it. (Waiting here can only make a broken lock
        # look fine on a very slow machine, never make a working lock fail.)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
        # We are "the first process": finish the build while the child is blocked on the lock.
        tmp = tmp_path / ".thing.tmp"
        tmp.mkdir()
        from p2d_ray.assets.cache import recipe_hash

        (tmp / "meta.json").write_text(json.dumps({"recipe_hash": recipe_hash({"v": 1})}))
        tmp.rename(target)
    assert child.wait(timeout=60) == 0
    assert not log.exists()
