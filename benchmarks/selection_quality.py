"""Selection quality of every scorer on the demo corpus with SmolLM2, with the random-heads control.

    .venv/bin/python -m benchmarks.selection_quality --targets arithmetic units --out benchmarks/results/selection_quality

For each target task of the demo corpus (``data.demo_target``): localise the task heads once (the demo's
settings: gradient, 32 probe rows), then score the whole corpus with each scorer through the engine
(``run_pipeline`` stages score + select on local Ray, the demo's actor pool) and report the precision of the
top 10 % (the fraction of clean on-task rows, read from the hidden label by ``report/precision.py`` only).
Scorers that use heads also run under random heads with the task heads' count per layer
(``HeadSet.random_like``, seeds ``--control-seeds``): the falsification control. ``random`` is the engine's
seeded uniform selection (score_column=random) over the same rows. Writes ``results.json`` and ``table.md``.

``--corpus-seeds 0 1 2`` repeats everything on independent draws of the mixture (corpus, probe and held-out
set; seed 0 is the demo's own data), so a precision comes with its spread over data, not only over control
heads. ``--set key=value`` applies config overrides to every run (e.g. ``score.alignment_method=forward``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa

HEAD_SCORERS = ("gradient_alignment", "icl_attention", "influence")
PLAIN_SCORERS = ("perplexity", "ifd")


def _cfg(base: dict, run_dir: Path, **sections):
    from p2d_ray.config import P2DConfig, _merge

    return P2DConfig.model_validate(_merge(base, {"run_dir": str(run_dir), **sections}))


def _data(target: str, seed: int, work: Path, data_dirs: dict | None = None) -> dict:
    """The ``data`` section for one draw of the mixture: the demo's cached assets for seed 0, else a draw
    written once under ``work`` (same generator, seeds offset by ``seed``); or a labelled data directory of
    ``--data`` (``corpus/`` + ``probe.parquet``, e.g. written by ``benchmarks.unseen_mixture``)."""
    if data_dirs and target in data_dirs:
        root = Path(data_dirs[target])
        return {"corpus_path": str(root / "corpus"), "probe_path": str(root / "probe.parquet")}
    if seed == 0:
        return {"demo_target": target}
    from p2d_ray.assets.synthetic import write_demo_data

    root = work / target / f"data-s{seed}"
    if not (root / "probe.parquet").is_file():
        tmp = root.with_name(root.name + ".tmp")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        write_demo_data(tmp, target, seed_offset=seed)
        tmp.rename(root)
    return {
        "corpus_path": str(root / "corpus"),
        "probe_path": str(root / "probe.parquet"),
        "demo_target": target,
    }


def _precision(cfg) -> dict:
    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.report.precision import selection_precision
    from p2d_ray.rundir import RunDir

    run = RunDir(cfg.run_dir)
    return selection_precision(corpus_path(cfg), str(run.subset), str(run.scores), cfg.data.id_column)


def _alternative_precision(cfg) -> float | None:
    """The same run ranked by the other normalisation, from its own columns: an ``exact`` run (cosine) also
    holds ``d_i / L_i`` (``alignment_normalize=loss``); a ``central`` run also holds the forward estimate
    ``(L+ - L) / eps / L`` (``alignment_method=forward``). Returns the clean on-task share of that ranking's top
    k, with ``report/precision.py``'s own helpers (the hidden label, joined on id; ties by id)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.report.precision import LABEL, label_rate, lowest_ids
    from p2d_ray.rundir import RunDir

    run, idc = RunDir(cfg.run_dir), cfg.data.id_column
    scores = pads.dataset(str(run.scores), format="parquet", ignore_prefixes=["_", "."]).to_table()
    loss = pc.max_element_wise(scores.column("loss_full"), 1e-8)
    if cfg.score.alignment_method == "exact":
        alt = pc.divide(scores.column("directional_derivative"), loss)
    elif cfg.score.alignment_method == "central":
        alt = pc.divide(
            pc.divide(
                pc.subtract(scores.column("loss_plus"), scores.column("loss_full")), cfg.score.alignment_eps
            ),
            loss,
        )
    else:
        return None
    k = json.loads(run.path("selection.json").read_text())["n_selected"]
    top = lowest_ids(pa.table({idc: scores.column(idc), "neg": pc.negate(alt)}), "neg", k, idc)
    labels = pads.dataset(corpus_path(cfg), format="parquet").to_table(columns=[idc, LABEL])
    return label_rate(labels, top, idc)


def write_table(results: list[dict], out: Path) -> None:
    """``table.md`` from ``results.json``'s rows."""
    lines = [
        "| target | corpus seed | scorer | heads | top-10% precision | same run, other normalisation (exact: d/L; central: forward) | base rate "
        "| k / n | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fwd = r.get("alternative_precision")
        lines.append(
            f"| {r['target']} | {r['corpus_seed']} | {r['scorer']} | {r['heads']} | {r['precision']:.2f} | "
            f"{'' if fwd is None else f'{fwd:.2f}'} | {r['base_rate']:.2f} | "
            f"{r['k']} / {r['n']} | {r.get('seconds', '')} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")


def _with_heads(cfg, heads) -> None:
    """Place ``heads`` as the run's heads.json (a control run scores under them; no localisation)."""
    from p2d_ray.rundir import RunDir

    run = RunDir(cfg.run_dir)
    if not run.heads_json.is_file():
        heads.save(run.heads_json)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["arithmetic", "units"])
    ap.add_argument("--scorers", nargs="+", default=[*HEAD_SCORERS, *PLAIN_SCORERS])
    ap.add_argument(
        "--control-seeds", nargs="*", type=int, default=[0, 1, 2], help="none: no random-heads control"
    )
    ap.add_argument(
        "--control-seeds-other", type=int, default=1, help="control seeds for non-default scorers"
    )
    ap.add_argument("--work", default="runs/selection_quality")
    ap.add_argument("--out", default="benchmarks/results/selection_quality")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--corpus-seeds", nargs="+", type=int, default=[0], help="draws of the mixture (0: the demo's)"
    )
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run"
    )
    ap.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="DIR",
        help="labelled data dirs (corpus/ + probe.parquet, e.g. benchmarks.unseen_mixture) instead of --targets",
    )
    args = ap.parse_args()
    data_dirs = {Path(d).name: d for d in args.data}
    if data_dirs:
        args.targets, args.corpus_seeds = list(data_dirs), [0]

    from p2d_ray.config import _merge, parse_overrides
    from p2d_ray.demo import DEMO_KNOBS, DEMO_RAY_CPUS
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.pipeline import run_pipeline
    from p2d_ray.rundir import RunDir
    from p2d_ray.runtime import ensure_ray

    ensure_ray(num_cpus=DEMO_RAY_CPUS)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for target, cseed in [(t, c) for c in args.corpus_seeds for t in args.targets]:
        base = {k: v for k, v in DEMO_KNOBS.items() if k != "run_dir"}
        base = _merge(
            base, {"model": {"name_or_path": args.model}, "data": _data(target, cseed, work, data_dirs)}
        )
        base = _merge(base, parse_overrides(args.set))
        here = work / target if cseed == 0 else work / target / f"s{cseed}"
        loc = _cfg(base, here / "localize")
        t = time.perf_counter()
        run_pipeline(loc, stages=("localize",), report=False)
        task_heads = HeadSet.load(RunDir(loc.run_dir).heads_json)
        print(f"[{target} s{cseed}] heads {task_heads.heads} ({time.perf_counter() - t:.0f} s)", flush=True)
        for scorer in args.scorers:
            head_sets = [("task", task_heads)] if scorer in HEAD_SCORERS else [("none", task_heads)]
            if scorer in HEAD_SCORERS:
                seeds = (
                    args.control_seeds
                    if scorer == args.scorers[0]
                    else args.control_seeds[: args.control_seeds_other]
                )
                head_sets += [(f"random_s{s}", task_heads.random_like(s)) for s in seeds]
            for name, heads in head_sets:
                cfg = _cfg(base, here / scorer / name, score={**base["score"], "scorer": scorer})
                _with_heads(cfg, heads)
                t = time.perf_counter()
                run_pipeline(cfg, stages=("score", "select"), report=False)
                sp = _precision(cfg)
                row = {
                    "target": target,
                    "corpus_seed": cseed,
                    "scorer": scorer,
                    "heads": name,
                    "precision": sp["selected"],
                    "base_rate": sp["base_rate"],
                    "k": sp["k"],
                    "n": sp["n_corpus"],
                    "perplexity_precision": sp.get("perplexity"),
                    "seconds": round(time.perf_counter() - t, 1),
                    "alternative_precision": _alternative_precision(cfg)
                    if scorer == "gradient_alignment"
                    else None,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))
        # The engine's seeded uniform selection over the same rows (reads ids only).
        src = here / args.scorers[-1] / ("none" if args.scorers[-1] not in HEAD_SCORERS else "task")
        for seed in args.control_seeds:
            cfg = _cfg(base, here / "random" / f"s{seed}", seed=seed, select={"score_column": "random"})
            run = RunDir(cfg.run_dir)
            if not run.scores.exists():
                run.root.mkdir(parents=True, exist_ok=True)
                run.scores.symlink_to(RunDir(str(src)).scores.resolve())
            run_pipeline(cfg, stages=("select",), report=False)
            sp = _precision(cfg)
            results.append(
                {
                    "target": target,
                    "corpus_seed": cseed,
                    "scorer": "random",
                    "heads": f"s{seed}",
                    "precision": sp["selected"],
                    "base_rate": sp["base_rate"],
                    "k": sp["k"],
                    "n": sp["n_corpus"],
                }
            )
        (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
