"""A run's selection by score source (issue 24): clean / on-task precision of the picked rows, overall and per
``score_source`` (exact, refined, distilled), read from the run's scores and subset and the corpus's labels.

    .venv/bin/python -m benchmarks.selection_by_source RUN_DIR CORPUS_DIR [--label is_clean_on_task]
"""

from __future__ import annotations

import argparse

import pyarrow.dataset as ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("corpus")
    ap.add_argument("--label", default="is_clean_on_task")
    ap.add_argument("--task", default="arithmetic", help="the target's value of the corpus's `task` column")
    a = ap.parse_args()
    scores = ds.dataset(f"{a.run_dir}/scores").to_table(columns=["id", "score_source"]).to_pandas()
    corpus = ds.dataset(a.corpus).to_table(columns=["id", "task", a.label]).to_pandas()
    df = scores.merge(corpus, on="id")
    picked = set(ds.dataset(f"{a.run_dir}/subset").to_table(columns=["id"])["id"].to_pylist())
    s = df[df.id.isin(picked)]
    print(
        f"{a.run_dir}: {len(s)} picked, clean {s[a.label].mean():.3f}, on-task {(s.task == a.task).mean():.3f}"
    )
    print(s.groupby("score_source")[a.label].agg(["count", "mean"]).to_string())
    print("score_source in the corpus:", df.score_source.value_counts().to_dict())


if __name__ == "__main__":
    main()
