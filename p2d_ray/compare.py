"""``p2d-ray compare``: does P2D pick better data? Every selector x adaptation x seed on equal terms.

Everything runs through the same stage functions as ``p2d-ray run`` (so it runs on local Ray here and
unchanged on a cluster), in ``<run_dir>/compare/``:

    sources/<name>/        localize + score, once per scoring source (resumable like `p2d-ray run`)
        task               score.scorer under the localised task heads     -> p2d (and random: ids only)
        task_contrastive   the same, localize.contrast=corpus              -> p2d_contrastive
        random_heads_s<k>  score.scorer under random heads (seed k)        -> random_heads
        perplexity         ungated loss                                    -> perplexity, perplexity_high
        ifd                IFD                                             -> ifd
    select/<selector>[_s<k>]/   scores -> subset (symlinked scores; seeded selectors once per seed)
    cells/<selector>/<adaptation>/s<k>/   subset -> train (seed k) -> adapter
    results.json, RESULTS.md table, aer.png

Evaluation loads up to ``compare.eval_variants_per_pass`` trained cells (plus the base model) into each
evaluation actor, so the held-out set is tokenised once per pass and not once per cell.

Cost accounting (the AER numerator) per cell: localise (only if the selector or the adaptation uses
heads) + score (0 for ``random``, which reads ids only) + select + train, over full fine-tuning of all
corpus rows for the same epochs (estimated from timed steps, as in ``p2d-ray report``). ``aer_compute``
replaces the train wall time (which includes Ray Train start-up) by median step time x steps, and the
denominator by the timed full steps' median x steps: the same basis on both sides.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from p2d_ray.config import P2DConfig
from p2d_ray.progress import Progress, stage_summary
from p2d_ray.rundir import RunDir

HEAD_SELECTORS = {"p2d", "p2d_contrastive", "random_heads"}
SEEDED_SELECTORS = {"random", "random_heads"}


# -- the plan: which source, selection and heads each selector uses ---------------------------------
def source_of(selector: str, seed: int) -> str:
    return {
        "p2d": "task",
        "p2d_contrastive": "task_contrastive",
        "random_heads": f"random_heads_s{seed}",
        "ifd": "ifd",
        "random": "task",  # reads the ids only: any scored source will do, and task is always scored
    }.get(selector, "perplexity")


def heads_source(selector: str, seed: int) -> str:
    """Whose heads.json an adaptation=heads cell trains: the selector's own heads, else the task heads."""
    return source_of(selector, seed) if selector in HEAD_SELECTORS else "task"


def selection_name(selector: str, seed: int) -> str:
    return f"{selector}_s{seed}" if selector in SEEDED_SELECTORS else selector


def _derive(cfg: P2DConfig, run_dir: Path, **sections) -> P2DConfig:
    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return P2DConfig.model_validate(data)


def source_config(cfg: P2DConfig, root: Path, name: str) -> tuple[P2DConfig, tuple[str, ...]]:
    """(config, stages) of a scoring source."""
    run_dir = root / "sources" / name
    if name == "task":
        return _derive(cfg, run_dir, score={"scorer": cfg.score.scorer}), ("localize", "score")
    if name == "task_contrastive":
        derived = _derive(cfg, run_dir, score={"scorer": cfg.score.scorer}, localize={"contrast": "corpus"})
        return derived, ("localize", "score")
    if name.startswith("random_heads_s"):
        seed = int(name.removeprefix("random_heads_s"))
        derived = _derive(
            cfg, run_dir, seed=seed, score={"scorer": cfg.score.scorer}, localize={"control": "random_heads"}
        )
        return derived, ("localize", "score")
    if name in ("perplexity", "ifd"):
        return _derive(cfg, run_dir, score={"scorer": name}), ("score",)
    raise ValueError(f"unknown scoring source {name!r}")


def select_config(cfg: P2DConfig, root: Path, selector: str, seed: int) -> P2DConfig:
    column, ascending = {
        "random": ("random", False),
        "perplexity": ("score", True),
        "perplexity_high": ("score", False),
    }.get(selector, ("score", False))
    # Derived from the source's config: the stage fingerprints then chain through the source's localize and
    # score sections, so a re-scored source invalidates its selections and their cells.
    source = source_config(cfg, root, source_of(selector, seed))[0]
    return _derive(
        source,
        root / "select" / selection_name(selector, seed),
        # A deterministic selector's one selection serves every seed: keep the source's seed, or each
        # seed's run would redo (and overwrite) it.
        seed=seed if selector in SEEDED_SELECTORS else source.seed,
        select={"score_column": column, "ascending": ascending},
    )


def cell_config(cfg: P2DConfig, root: Path, selector: str, adaptation: str, seed: int) -> P2DConfig:
    train = {"adaptation": adaptation, "seed": seed, "lr": cfg.compare.lr.get(adaptation, cfg.train.lr)}
    selection = select_config(cfg, root, selector, seed)
    return _derive(selection, root / "cells" / selector / adaptation / f"s{seed}", seed=seed, train=train)


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (relative, so a copied compare directory stays valid)."""
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def _timing(run_dir: Path, stage: str) -> float:
    return RunDir(run_dir).timings().get(stage, 0.0)


# -- the runner ----------------------------------------------------------------------------------------
def run_compare(cfg: P2DConfig) -> dict:
    """Run (or resume) the whole grid and write ``results.json``, ``RESULTS.md`` and ``aer.png``."""
    from p2d_ray.pipeline import run_pipeline

    cmp = cfg.compare
    root = Path(cfg.run_dir) / "compare"
    root.mkdir(parents=True, exist_ok=True)
    cfg.save(root / "config.yaml")
    t_start = time.perf_counter()

    # 1. Scoring sources (localize + score), each resumable; the task heads are always needed for training.
    sources = {"task"} | {source_of(s, k) for s in cmp.selectors for k in cmp.seeds}
    n_sel = len(cmp.selectors) * len(cmp.seeds)
    bar = Progress("compare", len(sources) + n_sel * (1 + len(cmp.adaptations)), unit="stages")
    for name in sorted(sources):
        src_cfg, stages = source_config(cfg, root, name)
        run_pipeline(src_cfg, stages, report=False)
        bar.update(1)

    # 2. Selections (deterministic selectors once, seeded ones per seed).
    selections: dict[tuple[str, int], Path] = {}
    for selector in cmp.selectors:
        for seed in cmp.seeds:
            sel_cfg = select_config(cfg, root, selector, seed)
            sel_dir = Path(sel_cfg.run_dir)
            src_dir = Path(source_config(cfg, root, source_of(selector, seed))[0].run_dir)
            _link(RunDir(src_dir).scores, RunDir(sel_dir).scores)
            if (src_dir / "heads.json").exists():
                _link(src_dir / "heads.json", RunDir(sel_dir).heads_json)
            run_pipeline(sel_cfg, ("select",), report=False)
            selections[selector, seed] = sel_dir
            bar.update(1)

    # 3. Training cells.
    cells = []
    for selector in cmp.selectors:
        for adaptation in cmp.adaptations:
            for seed in cmp.seeds:
                c = cell_config(cfg, root, selector, adaptation, seed)
                run = RunDir(c.run_dir)
                _link(RunDir(selections[selector, seed]).subset, run.subset)
                heads_dir = Path(source_config(cfg, root, heads_source(selector, seed))[0].run_dir)
                _link(RunDir(heads_dir).heads_json, run.heads_json)
                run_pipeline(c, ("train",), report=False)
                cells.append({"selector": selector, "adaptation": adaptation, "seed": seed, "cfg": c})
                bar.update(1)
    bar.close()

    # 4. Held-out evaluation, several cells per pass.
    evaluation = evaluate_cells(cfg, root, cells)

    # 5. Costs, precision, table.
    full = full_finetune_seconds(cfg, root, cells)
    rows = [cell_row(root, cell, evaluation, full) for cell in cells]
    table = aggregate(rows)
    result = {
        "config": str(root / "config.yaml"),
        "selectors": cmp.selectors,
        "adaptations": cmp.adaptations,
        "seeds": cmp.seeds,
        "full_finetune": full,
        "base_eval": evaluation.get("base"),
        "cells": rows,
        "table": table,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (root / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (root / "RESULTS.md").write_text(markdown_table(table, evaluation.get("base")))
    print(markdown_table(table, evaluation.get("base")))
    plot_compare(table, evaluation.get("base"), root / "aer.png")
    result["plot"] = str(root / "aer.png")
    stage_summary("compare", result["wall_seconds"], f"{root / 'results.json'}, RESULTS.md, aer.png")
    return result


def evaluate_cells(cfg: P2DConfig, root: Path, cells: list[dict]) -> dict:
    """``{variant: summary}`` for the base model and every cell, cached in ``eval_cache.json`` by the
    cell's adapter manifest (a retrained cell is evaluated again)."""
    from p2d_ray.eval.evaluate import BASE, evaluate_on_ray, read_heldout, summarize

    cache_path = root / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    key_fields = cfg.model_dump(mode="json", include={"evaluate", "model", "data"})
    eval_key = json.dumps(key_fields, sort_keys=True)
    if cache.get("key") != eval_key:
        cache = {"key": eval_key, "variants": {}}

    def name(cell):
        return f"{cell['selector']}.{cell['adaptation']}.s{cell['seed']}"

    def stamp(cell):
        return (RunDir(cell["cfg"].run_dir).adapter / "manifest.json").read_text()

    todo = [c for c in cells if cache["variants"].get(name(c), {}).get("stamp") != stamp(c)]
    need_base = BASE not in cache["variants"]
    if todo or need_base:
        table, fmt, answers = read_heldout(cfg)
        step = cfg.compare.eval_variants_per_pass
        groups = [todo[i : i + step] for i in range(0, len(todo), step)] or [[]]
        for i, group in enumerate(groups):
            variants = {name(c): c["cfg"].run_dir for c in group}
            if need_base and i == 0:
                variants = {BASE: None, **variants}
            t0 = time.perf_counter()
            samples = evaluate_on_ray(cfg, table, fmt, answers, variants)
            seconds = (time.perf_counter() - t0) / max(len(variants), 1)
            summary = summarize(samples, variants, answers)
            for c in group:
                cache["variants"][name(c)] = {**summary[name(c)], "stamp": stamp(c), "seconds": seconds}
            if BASE in variants:
                cache["variants"][BASE] = {**summary[BASE], "seconds": seconds}
            cache_path.write_text(json.dumps(cache, indent=1))
    out = {name(c): cache["variants"][name(c)] for c in cells}
    out["base"] = cache["variants"][BASE]
    return out


def full_finetune_seconds(cfg: P2DConfig, root: Path, cells: list[dict]) -> dict:
    """The AER denominator (full fine-tuning on all rows, same epochs), estimated from timed steps once."""
    from p2d_ray.baseline import count_rows, full_baseline

    first = cells[0]["cfg"]
    summary = json.loads(RunDir(first.run_dir).path("train_summary.json").read_text())
    n_full = count_rows(RunDir(root / "sources" / "task").scores)
    base = _derive(cfg, root, report={"full_baseline": False})
    return full_baseline(base, n_full, summary["rows"], summary["steps"])


def _precision(cfg: P2DConfig, sel_dir: Path) -> float | None:
    """The hidden label's rate in the selection (None for an unlabelled corpus): read by report/ only."""
    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.report.precision import selection_precision

    run = RunDir(sel_dir)
    p = selection_precision(corpus_path(cfg), str(run.subset), str(run.scores), cfg.data.id_column)
    return p["selected"] if p else None


def cell_row(root: Path, cell: dict, evaluation: dict, full: dict) -> dict:
    selector, adaptation, seed = cell["selector"], cell["adaptation"], cell["seed"]
    src = root / "sources" / source_of(selector, seed)
    sel_dir = root / "select" / selection_name(selector, seed)
    cell_dir = Path(cell["cfg"].run_dir)
    uses_heads = selector in HEAD_SELECTORS or adaptation == "heads"
    heads_dir = root / "sources" / heads_source(selector, seed)
    summary = json.loads((cell_dir / "train_summary.json").read_text())
    seconds = {
        "localize": _timing(heads_dir, "localize") if uses_heads else 0.0,
        "score": 0.0 if selector == "random" else _timing(src, "score"),
        "select": _timing(sel_dir, "select"),
        "train": _timing(cell_dir, "train"),
    }
    median = (summary.get("step_time") or {}).get("median")
    train_compute = median * summary["steps"] if median else None
    ev = evaluation[f"{selector}.{adaptation}.s{seed}"]
    denom = full["full_train_seconds"]
    # aer_compute divides step compute by step compute: the cells' median step x steps over the full
    # step's median x steps (the estimate's own denominator takes the fastest full step).
    full_median = full.get("full_step_median_seconds")
    denom_compute = full_median * full["full_train_steps"] if full_median else denom
    return {
        "selector": selector,
        "adaptation": adaptation,
        "seed": seed,
        "precision": _precision(cell["cfg"], sel_dir),
        "loss": ev["loss"],
        "exact_match": ev.get("exact_match"),
        "seconds": seconds,
        "train_steps": summary["steps"],
        "aer": sum(seconds.values()) / denom,
        "aer_compute": (
            (sum(seconds.values()) - seconds["train"] + train_compute) / denom_compute
            if train_compute
            else None
        ),
        "heads": summary.get("heads"),
    }


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per selector x adaptation: mean and std over seeds."""
    out = []
    keys = list(dict.fromkeys((r["selector"], r["adaptation"]) for r in rows))
    for selector, adaptation in keys:
        group = [r for r in rows if r["selector"] == selector and r["adaptation"] == adaptation]
        entry = {"selector": selector, "adaptation": adaptation, "n_seeds": len(group)}
        for metric in ("loss", "exact_match", "precision", "aer", "aer_compute"):
            entry[metric], entry[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        for stage in ("localize", "score", "select", "train"):
            entry[f"t_{stage}"] = statistics.fmean(r["seconds"][stage] for r in group)
        out.append(entry)
    return out


def _fmt(mean, std, digits=3, pct=False):
    if mean is None:
        return "n/a"
    if pct:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(table: list[dict], base: dict | None) -> str:
    lines = [
        "| selector | adaptation | held-out loss ↓ | exact match % | clean on-task in selection % "
        "| t localise / score / select / train (s) | AER | AER (compute) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        times = " / ".join(f"{e[f't_{s}']:.0f}" for s in ("localize", "score", "select", "train"))
        lines.append(
            f"| {e['selector']} | {e['adaptation']} | {_fmt(e['loss'], e['loss_std'])} "
            f"| {_fmt(e['exact_match'], e['exact_match_std'], pct=True)} "
            f"| {_fmt(e['precision'], e['precision_std'], pct=True)} | {times} "
            f"| {_fmt(e['aer'], e['aer_std'], 2)} | {_fmt(e['aer_compute'], e['aer_compute_std'], 2)} |"
        )
    if base:
        em = f", exact match {100 * base['exact_match']:.1f}%" if "exact_match" in base else ""
        lines.append(f"\nBase model (no training): held-out loss {base['loss']:.3f}{em}.")
    lines.append("Mean ± std over seeds; ↓ lower is better.")
    return "\n".join(lines) + "\n"


def plot_compare(table: list[dict], base: dict | None, path: Path) -> Path:
    """The paper's Figure 1 form: held-out loss (lower is better) against AER, one point per
    selector x adaptation (mean over seeds, error bar = std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"heads": "o", "lora": "s", "full": "^"}
    for i, e in enumerate(table):
        ax.errorbar(
            e["aer"],
            e["loss"],
            yerr=e["loss_std"],
            xerr=e["aer_std"],
            fmt=markers.get(e["adaptation"], "o"),
            color=f"C{i % 10}",
            label=f"{e['selector']} × {e['adaptation']}",
            capsize=2,
        )
    if base:
        ax.axhline(base["loss"], color="grey", linestyle="--", linewidth=1, label="base model")
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("AER (selection + training time / full fine-tuning on all data, estimated)")
    ax.set_ylabel("held-out task loss (lower is better)")
    ax.legend(fontsize=6, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    ax.set_title("Quality vs AER per selector × adaptation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
