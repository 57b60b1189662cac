"""One corpus holding the rows of several target tasks from two generators, for issue 27's K-target passes.

    .venv/bin/python -m benchmarks.targets_corpus --rows 2000 --out runs/s14/k4dist/data

Half the rows are a draw of the demo mixture (``p2d_ray/assets/synthetic.py``: arithmetic and units word
problems plus instruction / dialogue / noise rows, its own shares), the other half a draw of
``benchmarks/unseen_mixture.py`` (capitals and letters plus antonyms / plurals / chat, its own shares). The
two halves are shuffled together (seeded) and renumbered ``0..N-1``. Every row carries one hidden label per
target, ``is_clean_on_task_<target>`` (read only by reports): true for a clean row of that task, false for
every other row (so a target's rows are ~8 % of the corpus, its corrupted rows ~6 %, and the other three
targets' rows are off-task for it). Each target's probe and held-out set are its own generator's, drawn
disjoint from the prompts of that generator's half (``<out>/<target>/probe.parquet``, ``heldout.parquet``).
Written once (``<out>`` renamed into place), deterministic in ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections import Counter
from pathlib import Path

DEMO = ("arithmetic", "units")
UNSEEN = ("capitals", "letters")
TARGETS = DEMO + UNSEEN
COLUMNS = ["task", "quality", "prompt", "response"]


def write_targets_corpus(out: Path, n_rows: int, seed: int = 0) -> dict:
    import pyarrow.parquet as pq

    from benchmarks.unseen_mixture import _write_corpus, write_mixture_targets
    from p2d_ray.assets.synthetic import generate_heldout, generate_probe
    from p2d_ray.assets.synthetic import write_targets_corpus as demo_corpus

    n_demo = n_rows // 2
    halves = out / "_halves"
    demo_corpus(halves / "demo", list(DEMO), seed_offset=seed, n_rows=n_demo)
    write_mixture_targets(halves / "unseen", list(UNSEEN), n_rows - n_demo, seed=seed)
    demo = pq.read_table(halves / "demo" / "corpus").sort_by("id")
    unseen = pq.read_table(halves / "unseen" / "corpus").sort_by("id")
    rows = []
    for table in (demo, unseen):
        for r in table.select(
            COLUMNS + [c for c in table.column_names if c.startswith("is_clean")]
        ).to_pylist():
            rows.append(
                {
                    **{c: r[c] for c in COLUMNS},
                    **{f"is_clean_on_task_{t}": bool(r.get(f"is_clean_on_task_{t}")) for t in TARGETS},
                }
            )
    random.Random(f"targets-corpus-{seed}").shuffle(rows)
    rows = [{"id": i, **r} for i, r in enumerate(rows)]
    _write_corpus(out, rows)
    used = demo.column("prompt").to_pylist()
    for t in DEMO:  # the demo's probe / held-out draw, disjoint from the demo half's prompts
        (out / t).mkdir()
        probe = generate_probe(used, seed=1 + seed, target=t)
        heldout = generate_heldout(used + probe.column("prompt").to_pylist(), seed=2 + seed, target=t)
        pq.write_table(probe, out / t / "probe.parquet")
        pq.write_table(heldout, out / t / "heldout.parquet")
    for t in UNSEEN:  # unseen_mixture's own per-target sets (disjoint from its half's prompts)
        shutil.copytree(halves / "unseen" / t, out / t)
    shutil.rmtree(halves)
    return {
        "n_corpus": len(rows),
        "targets": list(TARGETS),
        **{f"n_clean_on_task_{t}": sum(r[f"is_clean_on_task_{t}"] for r in rows) for t in TARGETS},
        **{f"n_probe_{t}": pq.read_metadata(out / t / "probe.parquet").num_rows for t in TARGETS},
        "tasks": dict(sorted(Counter(r["task"] for r in rows).items())),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / TARGETS[-1] / "heldout.parquet").is_file():
        print(f"{out}: already written")
        return json.loads((out / "meta.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = write_targets_corpus(tmp, args.rows, args.seed)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(out)
    print(json.dumps(meta))
    return meta


if __name__ == "__main__":
    main()
