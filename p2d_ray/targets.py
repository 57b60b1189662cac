"""Several named targets in one run (``targets:`` in the config; issue 27).

    <run_dir>/heads.json                          the union of the targets' heads (what the shared pass backprops)
    <run_dir>/scores/, quarantine/, _state/       ONE corpus pass for every target (scoring/targets.py)
    <run_dir>/subset/, selection.json             the combined selection under one budget (round robin)
    <run_dir>/targets/<name>/                      an ordinary run directory per target:
        heads.json, heads.png                     its heads, from the one localize stage (one model load)
        probe_gradient.safetensors                its probe gradient
        scores/                                   its view of the shared pass (``score`` = its score__<name>)
        subset/, selection.json, histogram.png    its own selection (its fraction / top_k, select.rule)

A config without ``targets`` is the single target it always was. :func:`target_config` turns one target into
the single-target config of ``targets/<name>/`` (its probe / held-out set, its selection size, the shared
corpus), so every single-target stage function runs on it unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2d_ray.config import P2DConfig, TargetConfig

TARGETS_DIR = "targets"
LABEL_PREFIX = "is_clean_on_task_"  # the demo corpus's per-target hidden label (read by the report only)


def target_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir, TARGETS_DIR, name)


def target_config(cfg: P2DConfig, t: TargetConfig) -> P2DConfig:
    """The single-target config of target ``t``: run dir ``targets/<name>``, its probe / held-out set and
    column map, its selection size, and the run's corpus (resolved: the demo corpus of ``data.demo_target``
    when no path is set, whatever the target's own demo task)."""
    from p2d_ray.assets.paths import corpus_path

    data = cfg.model_dump(mode="json")
    data["targets"] = []
    data["run_dir"] = str(target_dir(cfg.run_dir, t.name))
    data["data"]["corpus_path"] = corpus_path(cfg)
    data["data"]["probe_path"] = t.probe_path
    data["data"]["demo_target"] = t.demo_task() or cfg.data.demo_target
    if t.probe_column_map:
        data["data"]["probe_column_map"] = t.probe_column_map
    data["evaluate"]["heldout_path"] = t.heldout_path
    if t.fraction is not None or t.top_k is not None:
        data["select"]["fraction"], data["select"]["top_k"] = t.fraction, t.top_k
    data["score"]["strategy"] = "exact"
    return P2DConfig.model_validate(data)


def target_configs(cfg: P2DConfig) -> dict[str, P2DConfig]:
    return {t.name: target_config(cfg, t) for t in cfg.targets}


# -- localize ------------------------------------------------------------------------------------------
def run_localize_targets(cfg: P2DConfig) -> dict:
    """``p2d-ray localize`` with targets: one model load, every target's heads (``targets/<name>/heads.json``
    and ``heads.png``) and their union in ``<run_dir>/heads.json``."""
    import torch

    from p2d_ray.assets.paths import corpus_parquet, probe_path
    from p2d_ray.data.columns import warn_unread
    from p2d_ray.data.formatting import resolve_format
    from p2d_ray.data.io import read_rows, read_table
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.heads.heatmap import save_heatmap
    from p2d_ray.heads.localize import localize_heads
    from p2d_ray.models.loading import load_model, load_tokenizer, model_fingerprint
    from p2d_ray.progress import stage_summary
    from p2d_ray.rundir import RunDir, stage_fingerprint
    from p2d_ray.runtime import available_cpus

    run = RunDir(cfg.run_dir)
    tcfgs = target_configs(cfg)
    paths = {}
    for name, tcfg in tcfgs.items():  # every probe's columns checked before the model loads
        path = probe_path(tcfg)
        names = read_table(
            path, f"targets.{name}.probe_path", tcfg.data, tcfg.data.probe_column_map
        ).column_names
        warn_unread(tcfg.data, resolve_format(tcfg.data, names), names, f"probe set {path} (target {name})")
        paths[name] = path
    cfg.save(run.path("config.yaml"))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.localize.torch_threads or available_cpus())
    t0 = time.perf_counter()
    out = {}
    try:
        with run.timed("localize", stage_fingerprint(cfg, "localize")):
            reference = None
            if cfg.localize.contrast == "corpus":
                reference = read_rows(corpus_parquet(cfg), limit=cfg.localize.contrast_samples)
            tokenizer = model = None
            found = {}
            for name, tcfg in tcfgs.items():
                trun = RunDir(tcfg.run_dir)
                if trun.is_done("localize", stage_fingerprint(tcfg, "localize")):  # e.g. a target added later
                    found[name] = HeadSet.load(trun.heads_json)
                    out[name] = {
                        "heads": [list(h) for h in found[name].heads],
                        "heads_json": str(trun.heads_json),
                        "heatmap": str(trun.path("heads.png")),
                        "skipped": True,
                    }
                    continue
                if model is None:
                    tokenizer, model = (
                        load_tokenizer(cfg.model),
                        load_model(cfg.model),
                    )  # once for every target
                t = time.perf_counter()
                rows = read_rows(
                    paths[name],
                    cfg.localize.max_probe_samples,
                    "data.probe_path",
                    tcfg.data,
                    tcfg.data.probe_column_map,
                )
                heads = localize_heads(model, rows, tokenizer, tcfg, reference)
                heads.meta.update(probe_path=paths[name], target=name)
                heads.save(trun.heads_json)
                png = save_heatmap(
                    torch.tensor(heads.meta["scores"]),
                    heads.heads,
                    trun.path("heads.png"),
                    f"target {name}: {cfg.localize.method} head importance ({len(heads)} of "
                    f"{heads.geometry.total_heads} kept)",
                    model=cfg.model.name_or_path,
                    probe=paths[name],
                )
                tcfg.save(trun.path("config.yaml"))
                trun.record_stage("localize", time.perf_counter() - t, stage_fingerprint(tcfg, "localize"))
                found[name] = heads
                out[name] = {
                    "heads": [list(h) for h in heads.heads],
                    "heads_json": str(trun.heads_json),
                    "heatmap": str(png),
                }
            first = next(iter(found.values()))
            later = {t.name for t in cfg.targets if t.later}  # scored from stored features: not in the pass
            union = HeadSet(
                tuple(h for n, hs in found.items() if n not in later for h in hs.heads),
                first.geometry,
                {
                    "method": cfg.localize.method,
                    "union_of_targets": {n: [list(h) for h in hs.heads] for n, hs in found.items()},
                    "model": cfg.model.name_or_path,
                    "model_fingerprint": model_fingerprint(cfg.model),
                },
            )
            union.save(run.heads_json)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    stage_summary(
        "localize",
        seconds,
        f"{run.heads_json} (union: {len(union)} heads) and targets/<name>/heads.json, heads.png for "
        + ", ".join(f"{n} ({len(h)} heads)" for n, h in found.items()),
    )
    return {
        "targets": out,
        "n_heads": len(union),
        "heads": [list(h) for h in union.heads],
        "seconds": seconds,
        "heads_json": str(run.heads_json),
    }


# -- select --------------------------------------------------------------------------------------------
def _rankings(cfg: P2DConfig, per: dict[str, dict]) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The shared scores (id + every score__<t>) and per target its ranking as row positions: its own
    selection first (by its score), then every other row by its score (ties by id). Scores of different
    targets are never compared."""
    from p2d_ray.scoring.outputs import ScoreStore
    from p2d_ray.scoring.shards import Shard
    from p2d_ray.scoring.targets import score_col

    store = ScoreStore(cfg.run_dir)
    manifest = store.read_manifest()
    shards = [Shard(**d) for d in manifest["shards"]]
    idc = cfg.data.id_column
    ids = pa.concat_tables([pq.read_table(f, columns=[idc]) for f in store.score_files(shards)]).column(0)
    table = pa.table({idc: ids.combine_chunks()})
    for t in cfg.targets:  # each target's view (a target added later has no column in the shared files)
        view = pq.read_table(target_dir(cfg.run_dir, t.name) / "scores", columns=[idc, "score"])
        at = pc.index_in(table.column(idc), value_set=view.column(idc).combine_chunks())
        table = table.append_column(score_col(t.name), view.column("score").take(at))
    ids = table.column(idc)
    order = {}
    for t in cfg.targets:
        picked = pq.read_table(per[t.name]["subset_dir"], columns=[cfg.data.id_column]).column(0)
        chosen = pc.is_in(ids, value_set=picked.combine_chunks()).to_numpy(zero_copy_only=False)
        score = pc.fill_null(table.column(score_col(t.name)).cast(pa.float64()), -np.inf).to_numpy(
            zero_copy_only=False
        )
        score = np.where(np.isnan(score), -np.inf, score)
        id_rank = pc.rank(ids, sort_keys="ascending", tiebreaker="first").to_numpy(zero_copy_only=False)
        order[t.name] = np.lexsort((id_rank, -score, ~chosen))  # chosen first, then score desc, then id
    return table, order


def combined_selection(cfg: P2DConfig, per: dict[str, dict]) -> dict:
    """One budget (``select.fraction`` / ``top_k`` of the scored corpus) over every target: round robin over
    the targets' rankings (each target's own selection first), a row claimed once; written as
    ``<run_dir>/subset/`` (full corpus rows + ``p2d_target``, the target whose turn took it, + every
    ``score__<t>``) and ``selection.json``."""
    import shutil

    from p2d_ray.rundir import RunDir
    from p2d_ray.scoring.outputs import ScoreStore
    from p2d_ray.scoring.select import total_k
    from p2d_ray.scoring.shards import Shard, read_shard

    run = RunDir(cfg.run_dir)
    table, order = _rankings(cfg, per)
    n = table.num_rows
    budget = total_k(n, cfg.select.fraction, cfg.select.top_k)
    owner = np.full(n, -1, dtype=np.int64)
    cursor = dict.fromkeys(order, 0)
    names = [t.name for t in cfg.targets]
    taken = 0
    while taken < budget:
        for k, name in enumerate(names):
            if taken == budget:
                break
            o, c = order[name], cursor[name]
            while c < n and owner[o[c]] >= 0:
                c += 1
            cursor[name] = c + 1
            if c < n:
                owner[o[c]], taken = k, taken + 1
    picked = np.flatnonzero(owner >= 0)
    pick_ids = table.column(cfg.data.id_column).take(pa.array(picked)).combine_chunks()
    pick_owner = pa.array([names[i] for i in owner[picked]], pa.string())
    extra = table.select(table.column_names[1:]).take(pa.array(picked))
    if run.subset.exists():
        shutil.rmtree(run.subset)
    run.subset.mkdir(parents=True)
    store = ScoreStore(cfg.run_dir)
    shards = [Shard(**d) for d in store.read_manifest()["shards"]]
    written = 0
    for sh in shards:
        sids = pq.read_table(store.score_path(sh), columns=[cfg.data.id_column]).column(0).combine_chunks()
        chosen = sids.filter(pc.is_in(sids, value_set=pick_ids))
        if not len(chosen):
            continue
        corpus = read_shard(sh, None)
        # an id's scored row is its FIRST row in the row group (a later duplicate was quarantined)
        rows = pc.index_in(chosen, value_set=corpus.column(cfg.data.id_column).combine_chunks())
        at = pc.index_in(chosen, value_set=pick_ids)
        order = np.argsort(rows.to_numpy(zero_copy_only=False), kind="stable")
        rows, at = rows.take(pa.array(order)), at.take(pa.array(order))
        part = corpus.take(rows).append_column("p2d_target", pick_owner.take(at))
        for c in extra.column_names:
            part = part.append_column(c, extra.column(c).take(at))
        pq.write_table(part, run.subset / f"{sh.key}.parquet")
        written += part.num_rows
    if written != len(picked):
        raise RuntimeError(f"combined selection wrote {written} rows but picked {len(picked)}")
    counts = {name: int((owner == k).sum()) for k, name in enumerate(names)}
    also = {
        name: int(np.isin(pick_ids.to_numpy(zero_copy_only=False), _ids(per[name]["subset_dir"], cfg)).sum())
        for name in names
    }
    return {
        "rule": "round_robin",
        "budget": budget,
        "n_scored": n,
        "n_selected": len(picked),
        "taken_per_target": counts,
        "in_each_targets_own_selection": also,
        "subset_dir": str(run.subset),
    }


def _ids(subset_dir: str, cfg: P2DConfig) -> np.ndarray:
    return pq.read_table(subset_dir, columns=[cfg.data.id_column]).column(0).to_numpy(zero_copy_only=False)


def run_select_targets(cfg: P2DConfig) -> dict:
    """``p2d-ray select`` with targets: each target's own selection (``targets/<name>/subset/``, its
    fraction / top_k, select.rule on its own scores) and the combined one under one budget."""
    from p2d_ray.progress import stage_summary
    from p2d_ray.rundir import RunDir, stage_fingerprint
    from p2d_ray.scoring.select import select_subset

    run = RunDir(cfg.run_dir)
    t0 = time.perf_counter()
    with run.timed("select", stage_fingerprint(cfg, "select")):
        cfg.save(run.path("config.yaml"))
        per = {}
        for name, tcfg in target_configs(cfg).items():
            trun = RunDir(tcfg.run_dir)
            t = time.perf_counter()
            per[name] = select_subset(tcfg)
            tcfg.save(trun.path("config.yaml"))
            trun.record_stage("select", time.perf_counter() - t, stage_fingerprint(tcfg, "select"))
        combined = combined_selection(cfg, per)
        out = {
            "targets": {
                n: {
                    k: p[k]
                    for k in ("n_selected", "n_scored", "threshold", "subset_dir", "fraction", "top_k")
                }
                for n, p in per.items()
            },
            "combined": combined,
            "n_selected": combined["n_selected"],
            "n_scored": combined["n_scored"],
            "subset_dir": combined["subset_dir"],
        }
        run.path("selection.json").write_text(json.dumps(out, indent=1, default=str))
    stage_summary(
        "select",
        time.perf_counter() - t0,
        ", ".join(f"{n}: {p['n_selected']:,}" for n, p in per.items())
        + f" rows per target; combined {combined['n_selected']:,} of {combined['n_scored']:,} in {run.subset}",
    )
    return out


# -- report --------------------------------------------------------------------------------------------
def target_precision(cfg: P2DConfig) -> dict[str, dict | None]:
    """Per target, the label rate of its selection (``is_clean_on_task_<name>`` when the corpus has it, else
    ``is_clean_on_task`` for a one-target corpus; None without a label): read by the report only."""
    from p2d_ray.report.precision import selection_precision
    from p2d_ray.rundir import RunDir

    out = {}
    for name, tcfg in target_configs(cfg).items():
        trun = RunDir(tcfg.run_dir)
        corpus = tcfg.data.corpus_path
        out[name] = selection_precision(
            corpus, str(trun.subset), str(trun.scores), cfg.data.id_column, f"{LABEL_PREFIX}{name}"
        )
    return out


def target_lines(cfg: P2DConfig, precision: dict[str, dict | None], sel: dict) -> list[str]:
    """One line per target: its heads, its selection and, where the corpus has its label, its precision."""
    from p2d_ray.heads.headset import HeadSet

    lines = []
    for name, tcfg in target_configs(cfg).items():
        heads = HeadSet.load(Path(tcfg.run_dir, "heads.json"))
        p = precision.get(name)
        n_sel = sel["targets"][name]["n_selected"]
        if p is None:
            what = f"{n_sel:,} rows selected (no is_clean_on_task_{name} label to measure)"
        else:
            ratio = f", {p['selected'] / p['base_rate']:.1f}x" if p["base_rate"] else ""
            what = (
                f"{100 * p['selected']:.1f}% clean on-task among its {p['k']:,} selected "
                f"(base rate {100 * p['base_rate']:.1f}%{ratio})"
            )
        lines.append(f"target {name}: {len(heads)} heads; {what} -> {Path(tcfg.run_dir, 'subset')}")
    c = sel["combined"]
    lines.append(
        f"combined selection: {c['n_selected']:,} rows under one budget (round robin: "
        + ", ".join(f"{n} {k}" for n, k in c["taken_per_target"].items())
        + f") -> {c['subset_dir']}"
    )
    return lines


def run_demo_targets(cfg: P2DConfig) -> dict:
    """``p2d-ray demo --targets a,b``: localize (one model load), ONE scoring pass and a selection per target
    plus the combined one, on the demo corpus carrying ``is_clean_on_task_<target>`` (read here only, for the
    report lines); one line per target."""
    from p2d_ray.demo import DEMO_RAY_CPUS
    from p2d_ray.pipeline import run_pipeline
    from p2d_ray.runtime import ensure_ray

    t0 = time.perf_counter()
    names = [t.name for t in cfg.targets]
    print(f"p2d-ray demo: targets {', '.join(names)} in one pass; run dir {cfg.run_dir}", flush=True)
    started = ensure_ray(DEMO_RAY_CPUS)
    try:
        results = run_pipeline(cfg, stages=("localize", "score", "select"), report=False)
    finally:
        if started:
            import ray

            ray.shutdown()
    sel = results["select"]
    if sel.get("skipped"):
        sel = json.loads(Path(cfg.run_dir, "selection.json").read_text())
    precision = target_precision(cfg)
    stats = json.loads(Path(cfg.run_dir, "score_stats.json").read_text())
    lines = ["", "=" * 72, f"P2D demo, {len(names)} targets in one corpus pass: summary", "=" * 72]
    lines += target_lines(cfg, precision, sel)
    pass_s = stats["wall_s"].get("score_pass")
    if pass_s:
        lines.append(
            f"one scoring pass for all {len(names)} targets: {pass_s:.1f} s ({stats['rows_per_s']:.2f} rows/s)"
        )
    wall = time.perf_counter() - t0
    lines.append(f"wall seconds: {wall:.1f}; outputs: {cfg.run_dir}/ (targets/<name>/, subset/, scores/)")
    print("\n".join(lines), flush=True)
    out = {"targets": precision, "selection": sel, "wall_seconds": wall}
    Path(cfg.run_dir, "demo_summary.json").write_text(json.dumps(out, indent=1, default=str))
    return out


# -- p2d-ray run: the shared stages once, then train / evaluate per target -----------------------------------
SHARED_STAGES = ("localize", "score", "select")
PER_TARGET_STAGES = ("train", "evaluate")


def tag_adapter(tcfg: P2DConfig, name: str) -> None:
    """Name the target in its adapter: ``adapter/manifest.json`` gets ``target`` (and its probe set), and the
    PEFT adapter's model card (``adapter/peft/README.md``) is rewritten to say which target it is for."""
    from p2d_ray.assets.paths import probe_path
    from p2d_ray.rundir import RunDir
    from p2d_ray.training.export import read_manifest, write_manifest
    from p2d_ray.training.model_card import write_model_card

    adapter = RunDir(tcfg.run_dir).adapter
    if not (adapter / "manifest.json").is_file():
        return
    manifest = read_manifest(adapter)
    if manifest.get("target") != name:
        write_manifest(adapter, **{**manifest, "target": name, "target_probe": probe_path(tcfg)})
    write_model_card(tcfg)


def run_pipeline_targets(cfg: P2DConfig, stages: tuple[str, ...], report: bool = True) -> dict:
    """``p2d-ray run`` with targets: localize / score / select once for every target (one model load, one
    corpus pass), then train and evaluate per target in its own run dir (one head adapter per target, named
    in its PEFT model card), then ``targets_report.json``: one row per target. ``baseline`` and the
    single-target report do not apply to a multi-target run and are skipped (said on stderr)."""
    import sys

    from p2d_ray.pipeline import run_stage
    from p2d_ray.rundir import RunDir
    from p2d_ray.validate import preflight

    shared = tuple(s for s in stages if s in SHARED_STAGES)
    per = tuple(s for s in stages if s in PER_TARGET_STAGES)
    left = [s for s in stages if s not in shared + per]
    if left:
        print(
            f"targets: {left} run per single target only; skipped for the {len(cfg.targets)} targets",
            file=sys.stderr,
            flush=True,
        )
    run = RunDir(cfg.run_dir)
    from p2d_ray.rundir import stage_fingerprint

    pending = [s for s in shared if not run.is_done(s, stage_fingerprint(cfg, s))]
    for tcfg in target_configs(
        cfg
    ).values():  # every target's inputs (its probe, held-out set), before any work
        trun = RunDir(tcfg.run_dir)
        mine = pending + [s for s in per if not trun.is_done(s, stage_fingerprint(tcfg, s))]
        preflight(tcfg, mine)
    cfg.save(run.path("config.yaml"))
    results: dict = {s: run_stage(cfg, s) for s in shared}
    results["targets"] = {}
    for name, tcfg in target_configs(cfg).items():
        done = {}
        for stage in per:
            print(f"target {name}:", file=sys.stderr, flush=True)
            done[stage] = run_stage(tcfg, stage)
            if stage == "train":
                tag_adapter(tcfg, name)
        results["targets"][name] = done
    if report:
        results["report"] = targets_report(cfg)
    return results


def targets_report(cfg: P2DConfig) -> dict:
    """``<run_dir>/targets_report.json``: one row per target -- its selection precision where its label
    exists, its held-out gain (adapted vs base), and its cost: its share of the shared localize + score
    seconds (split evenly: one model load, one pass) plus its own select / train / evaluate seconds."""
    from p2d_ray.rundir import RunDir

    run = RunDir(cfg.run_dir)
    shared = {s: (run.stage_record(s) or {}).get("seconds") for s in ("localize", "score")}
    k = len(cfg.targets)
    precision = target_precision(cfg)
    rows = {}
    for name, tcfg in target_configs(cfg).items():
        trun = RunDir(tcfg.run_dir)
        own = {s: (trun.stage_record(s) or {}).get("seconds") for s in ("select", "train", "evaluate")}
        ev = json.loads(trun.path("eval.json").read_text()) if trun.path("eval.json").is_file() else {}
        gain = None
        if ev.get("base") and ev.get("adapted"):
            gain = {"loss": ev["adapted"]["loss"] - ev["base"]["loss"]}
            if "exact_match" in ev["base"] and "exact_match" in ev["adapted"]:
                gain["exact_match"] = ev["adapted"]["exact_match"] - ev["base"]["exact_match"]
        shared_share = sum(v for v in shared.values() if v) / k
        rows[name] = {
            "precision": (precision[name] or {}).get("selected"),
            "base_rate": (precision[name] or {}).get("base_rate"),
            "heldout_gain": gain,
            "seconds": {"shared_share": shared_share, **own},
            "adapter": str(trun.adapter) if trun.adapter.is_dir() else None,
        }
    out = {"targets": rows, "shared_seconds": shared, "n_targets": k}
    run.path("targets_report.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def report_lines(report: dict, title: str) -> list[str]:
    """``targets_report.json`` for a person: one line per target."""
    lines = ["", "=" * 72, title, "=" * 72]
    for name, r in report["targets"].items():
        prec = (
            "precision n/a (no label)" if r["precision"] is None else f"precision {100 * r['precision']:.1f}%"
        )
        gain = r["heldout_gain"] or {}
        g = "held-out gain n/a" if not gain else f"held-out loss {gain['loss']:+.4f}"
        if "exact_match" in gain:
            g += f", exact match {100 * gain['exact_match']:+.1f} points"
        cost = sum(v for v in r["seconds"].values() if v)
        lines.append(
            f"target {name}: {prec}; {g}; {cost:.1f} s (shared share {r['seconds']['shared_share']:.1f} s)"
        )
    return lines
