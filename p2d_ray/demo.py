"""``p2d-ray demo`` (what ``make demo`` runs): the whole P2D pipeline on the offline demo assets, on local Ray.

Uses SmolLM2-135M-Instruct (``smollm2-135m``, converted once by ``make install``) with its chat template on the
demo corpus (300 rows, a planted multi-task mixture; ``data.demo_target=arithmetic|units`` picks the target
task), then runs localise -> score -> select -> train -> evaluate -> report into ``runs/demo`` with demo-sized
knobs, plus the falsification control (the same scorer under random heads of the task heads' per-layer
count, ``runs/demo/random_heads``). It prints the heads found, how clean the selected 10% is (vs the corpus
base rate, perplexity selection and the random-heads control), the held-out quality before/after training,
the AER and the stage times. Everything is also written to the run directory (``demo_summary.json`` holds
the wall times). A rerun resumes: finished stages are skipped. ``model.name_or_path=p2d-demo`` is the fast
smoke path (a 0.9M-parameter Llama built offline).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from p2d_ray.config import P2DConfig, _merge

# Demo-sized knobs, sized so the demo finishes in <= 10 min on 2 CPU cores with SmolLM2 (BENCHMARKS.md): the
# two scoring passes (P2D and its random-heads control) over the corpus dominate. Anything set on the command
# line (`p2d-ray demo train.epochs=2`) wins over these.
DEMO_KNOBS: dict = {
    "run_dir": "runs/demo",
    "model": {"name_or_path": "smollm2-135m"},
    # The model's own chat template, with an empty system message: SmolLM2's default one is ~20 of a demo
    # row's ~67 tokens (every stage's cost scales with tokens; BENCHMARKS.md).
    "data": {"format": "chat", "max_length": 128, "system_prompt": ""},
    "localize": {"max_probe_samples": 32, "batch_size": 8},
    "select": {"fraction": 0.10},
    # Two actors of half a CPU each leave room for the read/format tasks on 2 cores (MEASURED.md).
    "score": {
        "min_actors": 2,
        "max_actors": 2,
        "num_cpus_per_actor": 0.5,
        "batch_size": 16,
        # An actor's peak memory follows its largest micro-batch (the exact scorer's backward keeps every
        # layer's activations, ~1.1 MB per token on SmolLM2): pieces of <= 512 padded tokens keep a SmolLM2
        # actor within 2 x weights + 1.5 GB (BENCHMARKS.md, "Scoring actors' memory").
        "max_batch_tokens": 512,
        "release_memory": True,
    },
    "train": {"epochs": 2, "num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 4, "lr": 1e-3},
    "evaluate": {"n_samples": 32, "num_actors": 2, "batch_size": 16, "max_new_tokens": 32},
    "report": {"timing_steps": 2},
}
CONTROL_DIR = "random_heads"  # <run_dir>/random_heads: the falsification control's localize/score/select
DEMO_RAY_CPUS = 4  # logical CPUs on a 2-core box: fractional actors + read tasks never starve each other


def demo_config(cfg: P2DConfig) -> P2DConfig:
    """The demo knobs under whatever the user set explicitly (``exclude_unset`` keeps only those)."""
    return P2DConfig.model_validate(_merge(DEMO_KNOBS, cfg.model_dump(mode="json", exclude_unset=True)))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _beats(a: float, b: float, n_a: int, n_b: int | None = None) -> int:
    """+1 if rate ``a`` (of ``n_a`` rows) is above rate ``b`` by more than two standard errors of the
    difference, -1 if below by as much, 0 if within noise (``n_b`` None: ``b`` is exact, e.g. a base rate)."""
    var = a * (1 - a) / max(n_a, 1) + (b * (1 - b) / max(n_b, 1) if n_b else 0.0)
    margin = 2 * var**0.5
    return 1 if a - b > margin else -1 if b - a > margin else 0


def _selection_lines(sp: dict, scorer: str, rule: str | None = None) -> list[str]:
    """Whether the selection beat random and the random-heads control, in words, with the numbers.

    Reads report.json's ``selection_precision``: ``selected``, ``base_rate``, ``k``, ``n_corpus``, and when
    present ``perplexity`` and ``random_heads`` (the label rate of the random-heads control's selection of
    the same size)."""
    sel, base, k = sp["selected"], sp["base_rate"], sp["k"]
    ratio = f" ({sel / base:.1f}x random)" if base else ""
    verdict = {1: "better than random", 0: "no better than random (within noise)", -1: "WORSE than random"}
    lines = [
        f"selection ({scorer}{f', {rule}' if rule else ''}): {_pct(sel)} on-task among the {k:,} selected of {sp['n_corpus']:,} rows "
        f"vs {_pct(base)} base rate{ratio} -- {verdict[_beats(sel, base, k)]}"
    ]
    control = sp.get("random_heads")
    if control is not None:
        says = {
            1: "task heads matter",
            0: "task heads do NOT beat random heads (within noise)",
            -1: "random heads select BETTER: the task heads do not matter here",
        }[_beats(sel, control, k, k)]
        lines.append(f"  random-heads control: {_pct(control)} -- {says}")
    if sp.get("perplexity") is not None:
        lines.append(f"  perplexity selection: {_pct(sp['perplexity'])} (a cheap baseline of the same size)")
    return lines


def _training_lines(ev: dict) -> list[str]:
    """Base vs adapted held-out quality, and whether training helped, in words."""
    base, adapted = ev.get("base"), ev.get("adapted")
    lines = [f"held-out evaluation ({ev['n_samples']} samples, response tokens):"]
    for name, v in (("base", base), ("adapted", adapted)):
        if v:
            em = f"  exact match {_pct(v['exact_match'])}" if "exact_match" in v else ""
            lines.append(f"  {name:<8} loss {v['loss']:.4f}  perplexity {v['perplexity']:.3f}{em}")
    if not (base and adapted):
        return lines
    if "exact_match" in base and "exact_match" in adapted:
        b, a = base["exact_match"], adapted["exact_match"]
        verdict = {1: "training helped", 0: "no clear change (within noise)", -1: "training made it WORSE"}[
            _beats(a, b, ev["n_samples"], ev["n_samples"])
        ]
        lines.append(
            f"training: exact match {_pct(b)} -> {_pct(a)} ({100 * (a - b):+.1f} points) -- {verdict}"
        )
    else:
        b, a = base["loss"], adapted["loss"]
        change = (a - b) / b if b else 0.0
        verdict = "no clear change (within 1%)"
        if abs(change) > 0.01:
            verdict = "training helped" if change < 0 else "training made it WORSE"
        lines.append(f"training: held-out loss {b:.4f} -> {a:.4f} ({100 * change:+.1f}%) -- {verdict}")
    return lines


def summary_lines(report: dict, times: dict | None = None, title: str = "P2D demo: summary") -> list[str]:
    """The human-readable summary of a run (the demo's and ``p2d-ray run``'s), from report.json and the wall
    times: the heads, whether the selection beat random and the random-heads control, whether training
    helped, the AER and the stage seconds."""
    lines = ["", "=" * 72, title, "=" * 72]
    heads = report.get("heads") or []
    lines.append(f"task heads ({len(heads)}): " + ", ".join(f"L{layer}.H{h}" for layer, h in heads))
    sp = report.get("selection_precision")
    if sp:
        lines += _selection_lines(sp, report.get("scorer", "p2d"), report.get("select_rule"))
    else:
        lines.append("selection: the corpus has no label column, so its precision cannot be measured here")
    ev = report.get("eval") or {}
    if ev:
        lines += _training_lines(ev)
    a = report.get("aer")
    if a:
        cheaper = "cheaper" if a["aer"] < 1 else "MORE expensive"
        lines.append(
            f"AER ({a['label']}): {a['aer']:.3f} = P2D {a['p2d_seconds']:.1f} s / full fine-tuning "
            f"{a['full_train_seconds']:.1f} s ({a['full_train_steps']} steps on {a['n_full_rows']} rows) -- "
            f"{cheaper} than full fine-tuning on all data"
        )
    stages = "  ".join(f"{k} {v:.1f}s" for k, v in (report.get("stage_seconds") or {}).items())
    lines.append(f"stage seconds: {stages}")
    if times:
        lines.append("wall seconds: " + "  ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    lines.append(
        f"outputs: {report['run_dir']}/ (report.json, aer.png, heads.png, histogram.png, eval.json, subset/, "
        "adapter/)"
    )
    return lines


def control_config(cfg: P2DConfig) -> P2DConfig:
    """The random-heads control of ``cfg``: the same scorer and selection under random heads with the task
    heads' count per layer, in ``<run_dir>/random_heads``."""
    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(Path(cfg.run_dir) / CONTROL_DIR)
    data["localize"]["control"] = "random_heads"
    return P2DConfig.model_validate(data)


def run_control(cfg: P2DConfig) -> dict | None:
    """Score and select under random heads for the control; its selection precision (None for a corpus
    without the hidden label). The random heads are drawn from the main run's task heads (same count per
    layer, ``HeadSet.random_like`` seeded by the run seed, as ``localize.control=random_heads`` does), so the
    control does not pay for a second localisation."""
    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.pipeline import run_pipeline
    from p2d_ray.report.precision import selection_precision
    from p2d_ray.rundir import RunDir

    ctl = control_config(cfg)
    run = RunDir(ctl.run_dir)
    task = HeadSet.load(RunDir(cfg.run_dir).heads_json)
    control = task.random_like(ctl.seed)
    control.meta.update(task.meta, method="random", control="random_heads", seed=ctl.seed)
    control.meta["task_heads"] = [list(h) for h in task.heads]
    previous = HeadSet.load(run.heads_json) if run.heads_json.is_file() else None
    if previous is None or previous.heads != control.heads:
        shutil.rmtree(run.root, ignore_errors=True)  # other heads: nothing downstream of the old ones holds
        control.save(run.heads_json)
    run_pipeline(ctl, stages=("score", "select"), report=False)
    return selection_precision(corpus_path(ctl), str(run.subset), str(run.scores), ctl.data.id_column)


def run_demo(cfg: P2DConfig) -> dict:
    """Run the demo end to end; prints a summary and returns the report (plus wall times)."""
    from p2d_ray.assets import demo_data, resolve_model
    from p2d_ray.pipeline import run_pipeline

    cfg = demo_config(cfg)
    if cfg.targets:  # `p2d-ray demo --targets arithmetic,units`: all targets in one pass (p2d_ray/targets.py)
        from p2d_ray.targets import run_demo_targets

        return run_demo_targets(cfg)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"p2d-ray demo: run dir {cfg.run_dir}", flush=True)
    print(
        f"building (or reusing) the demo corpus (target {cfg.data.demo_target}) and the model ...", flush=True
    )
    t = time.perf_counter()
    assets = demo_data(cfg.data.demo_target)
    times["assets"] = time.perf_counter() - t
    t = time.perf_counter()
    model_dir = resolve_model(cfg.model.name_or_path)
    times["model"] = time.perf_counter() - t
    print(f"  corpus {assets.corpus_dir}\n  model  {cfg.model.name_or_path}: {model_dir}", flush=True)

    t = time.perf_counter()
    from p2d_ray.runtime import ensure_ray

    started = ensure_ray(DEMO_RAY_CPUS)
    times["ray_init"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        results = run_pipeline(cfg)
        times["pipeline"] = time.perf_counter() - t
        t = time.perf_counter()
        control = run_control(cfg)
        times["random_heads_control"] = time.perf_counter() - t
    finally:
        if started:
            import ray

            ray.shutdown()
    times["total"] = time.perf_counter() - t0
    report = results["report"]
    if report.get("skipped"):
        report = json.loads(Path(cfg.run_dir, "report.json").read_text())
    if control is not None and report.get("selection_precision"):
        report["selection_precision"]["random_heads"] = control["selected"]
    skipped = [s for s, r in results.items() if isinstance(r, dict) and r.get("skipped")]
    if skipped:
        print(f"(resumed: skipped finished stages {skipped}; delete {cfg.run_dir} to start over)")
    print("\n".join(summary_lines(report, times)), flush=True)
    Path(cfg.run_dir, "demo_summary.json").write_text(
        json.dumps(
            {
                "wall_seconds": times,
                "skipped": skipped,
                "report": str(Path(cfg.run_dir, "report.json")),
                "selection_precision": report.get("selection_precision"),
            },
            indent=1,
        )
    )
    return {**report, "wall_seconds": times}
