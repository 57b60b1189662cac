"""Quality within the target task (issue 29): compare a row's loss with the probe's, offline, on scored runs.

The shipped ``relevance_then_quality`` ranks the relevance band by the row's own loss (``loss_full``). A loss
is low on an easy task whatever the row's quality, so where the band reaches an easier task (unseen capitals
at 3,000 rows: antonyms, median loss 0.47 against 2.2) its rows displace the target's. The probe set is clean
rows of the target task: its rows' losses, measured exactly as ``loss_full`` is, say what a clean row of THIS
task costs. This script measures quality terms built on that reference against the shipped rule.

    # 1. the probe losses of every run (one model load; cached under --cache, keyed by the probe rows)
    .venv/bin/python -m benchmarks.probe_typicality losses --runs RUN... --cache runs/s13/h29/probe_losses
    # 2. the rules on the written scores (no model): clean and on-task precision of the top 10 %
    .venv/bin/python -m benchmarks.probe_typicality evaluate --runs RUN... --cache runs/s13/h29/probe_losses \\
        --out benchmarks/results/probe_typicality/NAME

Each run is a finished exact ``gradient_alignment`` score stage (``config.yaml`` names its probe; ``scores/``
hold ``score`` and ``loss_full``). The probe losses come from the engine's own functions: the probe rows as the
probe gradient reads them (``read_rows`` of ``data.probe_path``, the first ``score.alignment_probe_rows``),
``encode_probe`` / ``probe_batches`` (the format, chat template and response-only mask the scorer uses) and
``scoring.gradient.probe_row_losses`` (the mean over response tokens of ``models.loss``). ``losses`` also
re-computes the first corpus rows' losses this way and reports the largest difference to their ``loss_full``.
Labels (read here only): ``is_clean_on_task`` or, in a multi-target corpus, ``is_clean_on_task_<target>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CHECK_ROWS = 16


def _cfg(run_dir: str):
    from p2d_ray.config import load_config

    return load_config(Path(run_dir, "config.yaml"))


def _probe_rows(cfg) -> list[dict]:
    from p2d_ray.assets.paths import probe_path
    from p2d_ray.data.io import read_rows

    return read_rows(
        probe_path(cfg),
        cfg.score.alignment_probe_rows,
        "data.probe_path",
        cfg.data,
        cfg.data.probe_column_map,
    )


def _key(cfg, rows: list[dict]) -> str:
    """Cache key: the probe rows, how they are encoded, and the model."""
    import hashlib

    from p2d_ray.data.io import rows_hash

    payload = {
        "rows": rows_hash(rows),
        "data": cfg.data.model_dump(mode="json", exclude={"corpus_path", "probe_path", "corpus_config"}),
        "model": cfg.model.model_dump(mode="json", exclude={"device"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _model(cfg, models: dict) -> tuple:
    """(tokenizer, model, pad id) for the run's model, loaded once per model across the runs (``models``)."""
    from p2d_ray.models.loading import load_model, load_tokenizer

    key = cfg.model.model_dump_json()
    if key not in models:
        models[key] = (load_tokenizer(cfg.model), load_model(cfg.model))
    tok, model = models[key]
    return tok, model, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def cmd_losses(runs: list[str], cache: str) -> None:
    import pyarrow.dataset as pads
    import torch

    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.data.formatting import collate, encode_probe, encode_row, probe_batches, resolve_format
    from p2d_ray.scoring.gradient import probe_row_losses

    torch.set_num_threads(1)
    Path(cache).mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple] = {}
    for run in runs:
        cfg = _cfg(run)
        rows = _probe_rows(cfg)
        path = Path(cache, f"{_key(cfg, rows)}.json")
        if path.is_file():
            print(f"{run}: cached {path}")
            continue
        tok, model, pad = _model(cfg, models)
        chunk = cfg.score.loss_chunk_tokens
        batches = probe_batches(encode_probe(rows, tok, cfg.data), cfg.localize.batch_size, pad)
        losses = probe_row_losses(model, batches, chunk)
        # the check: the same functions on the first scored corpus rows reproduce their loss_full
        scores = pads.dataset(str(Path(run, "scores")), format="parquet", ignore_prefixes=["_", "."])
        head = scores.head(CHECK_ROWS, columns=["id", "loss_full"]).to_pylist()
        corpus = pads.dataset(corpus_path(cfg), format="parquet").to_table()
        by_id = {
            r["id"]: r for r in corpus.filter(pads.field("id").isin([h["id"] for h in head])).to_pylist()
        }
        fmt = resolve_format(cfg.data, corpus.column_names)
        enc = [encode_row(by_id[h["id"]], tok, cfg.data, fmt) for h in head]
        mine = probe_row_losses(model, [collate(enc, pad)], chunk)
        diff = float(np.max(np.abs(np.array(mine) - [h["loss_full"] for h in head])))
        rec = {
            "run": run,
            "probe": rows[0].get("task"),
            "n": len(losses),
            "losses": losses,
            "check_rows": len(head),
            "check_max_abs_diff_vs_loss_full": diff,
        }
        path.write_text(json.dumps(rec, indent=1))
        print(
            f"{run}: {len(losses)} probe rows, median loss {np.median(losses):.3f}, check |diff| {diff:.2e}"
        )


def _band_rows(run_dir: str, cfg, factor: float) -> list[dict]:
    """The corpus rows of the run's relevance band (the first ``ceil(factor * k)`` rows by score), ids kept."""
    import pyarrow.dataset as pads

    from p2d_ray.assets.paths import corpus_path

    scores = pads.dataset(str(Path(run_dir, "scores")), format="parquet", ignore_prefixes=["_", "."])
    t = scores.to_table(columns=["id", "score"])
    ids, rel = t.column("id").to_numpy(), t.column("score").to_numpy()
    k = max(1, int(np.floor(0.1 * len(ids) + 0.5)))
    band = ids[np.lexsort((ids, -rel))[: int(np.ceil(factor * k))]]
    corpus = pads.dataset(corpus_path(cfg), format="parquet")
    return corpus.to_table(filter=pads.field("id").isin(band.tolist())).to_pylist()


def cmd_forwards(runs: list[str], cache: str, factor: float, full: bool) -> None:
    """Per run, for the band rows and the probe rows: the response's loss alone (IFD's denominator, with the
    ``ifd`` scorer's own ``response_alone``) and, with ``full``, the largest per-token loss of the response
    given the prompt (a generic answer-confidence proxy: the row's most surprising response token)."""
    import torch

    from p2d_ray.data.formatting import collate, encode_probe, encode_row, resolve_format
    from p2d_ray.models.loss import sample_loss
    from p2d_ray.scoring.scorers import response_alone

    torch.set_num_threads(1)
    out_dir = Path(cache, "forwards")
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple] = {}
    for run in runs:
        cfg = _cfg(run)
        probe = _probe_rows(cfg)
        path = out_dir / f"{Path(run).as_posix().replace('/', '+')}-{'full' if full else 'alone'}.json"
        if path.is_file():
            print(f"{run}: cached {path}")
            continue
        tok, model, pad = _model(cfg, models)
        bos = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
        chunk = cfg.score.loss_chunk_tokens
        band = _band_rows(run, cfg, factor)
        fmt = resolve_format(cfg.data, list(band[0].keys()))
        sets = {
            "band": ([r["id"] for r in band], [encode_row(r, tok, cfg.data, fmt) for r in band]),
            "probe": (list(range(len(probe))), encode_probe(probe, tok, cfg.data)),
        }
        rec = {"run": run, "factor": factor}
        for name, (ids, enc) in sets.items():
            order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
            vals: dict = {}
            with torch.no_grad():
                for s in range(0, len(order), 16):
                    idx = order[s : s + 16]
                    b = collate([enc[i] for i in idx], pad)
                    if full:
                        loss = sample_loss(model, b["input_ids"], b["attention_mask"], b["loss_mask"], chunk)
                        per = loss.per_token(b["input_ids"].shape[1])
                        v = per.max(dim=1).values
                    else:
                        v = sample_loss(
                            model,
                            **response_alone(b["input_ids"], b["loss_mask"], bos, pad),
                            chunk_tokens=chunk,
                        ).mean
                    for i, x in zip(idx, v.tolist(), strict=True):
                        vals[str(ids[i])] = x
            rec[name] = vals
        path.write_text(json.dumps(rec))
        print(f"{run}: {len(band)} band rows, {len(probe)} probe rows -> {path}")


def cmd_probe_relevance(runs: list[str], cache: str) -> None:
    """Per run: each probe row's relevance as the scorer computes a corpus row's (``RowGradients`` with the
    run's own probe gradient), left-one-out: the cosine with the mean gradient of the OTHER probe rows, so
    that it compares with a corpus row's (which is not in ``G``). ``G = gbar / |gbar|`` with ``|gbar|`` in the
    gradient's meta, so ``<g_i, n gbar - g_i> = n |gbar| d_i - |g_i|^2`` and
    ``|n gbar - g_i|^2 = n^2 |gbar|^2 - 2 n |gbar| d_i + |g_i|^2``. Checked on the first corpus rows: their
    recomputed cosine against the written ``score``."""
    import pyarrow.dataset as pads
    import torch

    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.data.formatting import collate, encode_probe, encode_row, probe_batches, resolve_format
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.scoring.gradient import ProbeGradient, RowGradients

    torch.set_num_threads(1)
    out_dir = Path(cache, "relevance")
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple] = {}
    for run in runs:
        path = out_dir / f"{Path(run).as_posix().replace('/', '+')}.json"
        if path.is_file():
            print(f"{run}: cached {path}")
            continue
        cfg = _cfg(run)
        tok, model, pad = _model(cfg, models)
        chunk = cfg.score.loss_chunk_tokens
        pg = ProbeGradient.load(Path(run, "probe_gradient.safetensors"))
        assert pg.meta["heads_fingerprint"] == HeadSet.load(Path(run, "heads.json")).fingerprint()
        rg = RowGradients(model, pg)
        rows = _probe_rows(cfg)
        d, sq = [], []
        for b in probe_batches(encode_probe(rows, tok, cfg.data), cfg.localize.batch_size, pad):
            _, _, dot, s2 = rg(b, chunk)
            d += dot.double().tolist()
            sq += s2.double().tolist()
        d, sq = np.array(d), np.array(sq)
        n, gbar = pg.meta["n_probe"], pg.meta["grad_norm"]
        assert n == len(d)
        loo = (n * gbar * d - sq) / np.sqrt(
            sq * np.maximum(n * n * gbar * gbar - 2 * n * gbar * d + sq, 1e-30)
        )
        scores = pads.dataset(str(Path(run, "scores")), format="parquet", ignore_prefixes=["_", "."])
        head = scores.head(8, columns=["id", "score"]).to_pylist()
        corpus = pads.dataset(corpus_path(cfg), format="parquet").to_table()
        by_id = {
            r["id"]: r for r in corpus.filter(pads.field("id").isin([h["id"] for h in head])).to_pylist()
        }
        fmt = resolve_format(cfg.data, corpus.column_names)
        _, _, dot, s2 = rg(
            collate([encode_row(by_id[h["id"]], tok, cfg.data, fmt) for h in head], pad), chunk
        )
        cos = (dot / s2.sqrt()).double().numpy()
        diff = float(np.max(np.abs(cos - [h["score"] for h in head])))
        rec = {"run": run, "cos_in": (d / np.sqrt(sq)).tolist(), "cos_loo": loo.tolist(), "check": diff}
        path.write_text(json.dumps(rec))
        print(
            f"{run}: probe LOO cosine median {np.median(loo):.3f} (in-G {np.median(d / np.sqrt(sq)):.3f}); "
            f"corpus check |diff| {diff:.1e}"
        )


def load(run_dir: str, cache: str) -> dict:
    """The run's scores with labels, the target and its probe losses."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from p2d_ray.assets.paths import corpus_path

    cfg = _cfg(run_dir)
    rows = _probe_rows(cfg)
    probe = json.loads(Path(cache, f"{_key(cfg, rows)}.json").read_text())
    target = rows[0]["task"]
    scores = pads.dataset(str(Path(run_dir, "scores")), format="parquet", ignore_prefixes=["_", "."])
    scores = scores.to_table(columns=["id", "score", "loss_full"])
    corpus = pads.dataset(corpus_path(cfg), format="parquet").to_table()
    label = "is_clean_on_task" if "is_clean_on_task" in corpus.column_names else f"is_clean_on_task_{target}"
    idx = pc.index_in(scores.column("id"), value_set=corpus.column("id")).to_numpy(zero_copy_only=False)
    task = np.array(corpus.column("task").to_pylist(), dtype=object)[idx]
    return {
        "run": run_dir,
        "target": target,
        "id": scores.column("id").to_numpy(zero_copy_only=False),
        "score": scores.column("score").to_numpy(zero_copy_only=False).astype(float),
        "loss_full": scores.column("loss_full").to_numpy(zero_copy_only=False).astype(float),
        "clean": corpus.column(label).to_numpy(zero_copy_only=False)[idx].astype(bool),
        "on_task": task == target,
        "task": task,
        "quality": np.array(corpus.column("quality").to_pylist(), dtype=object)[idx]
        if "quality" in corpus.column_names
        else np.full(len(idx), None, dtype=object),
        "probe_losses": np.asarray(probe["losses"], float),
        **_forwards(run_dir, cache, scores.column("id").to_pylist()),
    }


def _forwards(run_dir: str, cache: str, ids: list) -> dict:
    """The ``forwards`` values of the run, by row (NaN outside the band) and for the probe, where computed."""
    out = {}
    rel = Path(cache, "relevance", f"{Path(run_dir).as_posix().replace('/', '+')}.json")
    if rel.is_file():
        out["probe_cos_loo"] = np.array(json.loads(rel.read_text())["cos_loo"], float)
    for kind, name in (("alone", "alone"), ("full", "maxtok")):
        path = Path(cache, "forwards", f"{Path(run_dir).as_posix().replace('/', '+')}-{kind}.json")
        if path.is_file():
            rec = json.loads(path.read_text())
            out[name] = np.array([rec["band"].get(str(i), np.nan) for i in ids], float)
            out[f"probe_{name}"] = np.array(list(rec["probe"].values()), float)
    return out


# -- quality terms (lower = better), from the row's loss and the probe's losses ----------------------------
def robust_z(loss: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """``(log L - median log L_probe) / (1.4826 MAD)``: where a row's loss sits among the clean task rows'."""
    lp = np.log(np.maximum(probe, 1e-6))
    m = np.median(lp)
    s = 1.4826 * np.median(np.abs(lp - m))
    if not s > 0:
        s = max(float(np.std(lp)), 1e-3)
    return (np.log(np.maximum(loss, 1e-6)) - m) / s


def kde_nll(loss: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """``-log`` of a Gaussian KDE (Silverman's bandwidth) of the probe's log losses at the row's log loss."""
    lp = np.log(np.maximum(probe, 1e-6))
    x = np.log(np.maximum(loss, 1e-6))
    n = len(lp)
    iqr = np.subtract(*np.percentile(lp, [75, 25]))
    h = 0.9 * min(np.std(lp), iqr / 1.34 if iqr > 0 else np.inf) * n**-0.2
    h = max(h, 1e-3)
    d = (x[:, None] - lp[None, :]) / h
    return -np.log(np.exp(-0.5 * d**2).mean(axis=1) + 1e-300)


def relevance_residual(run: dict) -> np.ndarray:
    """How much less relevant a row is than a clean row of the task with its loss: the probe rows' left-one-out
    relevance regressed on their log loss (least squares, a line), the row's residual over the probe's
    robust residual spread. Within a task the cosine rises with the loss; a row of an easier task sits below
    the line at its own loss."""
    x, y = np.log(np.maximum(run["probe_losses"], 1e-6)), run["probe_cos_loo"]
    b, a = np.polyfit(x, y, 1)
    res = y - (a + b * x)
    s = 1.4826 * np.median(np.abs(res - np.median(res)))
    s = s if s > 0 else max(float(np.std(res)), 1e-6)
    return (run["score"] - (a + b * np.log(np.maximum(run["loss_full"], 1e-6)))) / s


def quality(run: dict, form: str, **p) -> np.ndarray:
    loss, probe = run["loss_full"], run["probe_losses"]
    if form == "loss":
        return loss
    z = robust_z(loss, probe)
    if form == "abs_z":  # two-sided typicality
        return np.abs(z)
    if form == "asym_z":  # easier than the task's clean rows weighs ``easy`` times a harder one
        return np.where(z < 0, -p["easy"] * z, z)
    if form == "kde":
        return kde_nll(loss, probe)
    if form == "ifd":  # the response's loss given the prompt over alone: low = the prompt explains it
        return loss / run["alone"]
    if form == "ifd_abs_z":
        return np.abs(robust_z(loss / run["alone"], probe / run["probe_alone"]))
    if form == "maxtok":  # the most surprising response token (lower = more confident answer)
        return run["maxtok"]
    if form == "maxtok_abs_z":
        return np.abs(robust_z(run["maxtok"], run["probe_maxtok"]))
    if form == "loss_gate":  # the loss, but a row far easier than every clean row of the task goes last
        return np.where(z < -p["c"], np.inf, loss)
    raise ValueError(form)


def select(run: dict, k: int, rule: dict) -> np.ndarray:
    """The picked ids: relevance alone, or the product's band + rank sum on the given quality term.
    ``gate``: band rows whose |z| (or z < -c for ``gate_side: easy``) exceeds ``gate`` are dropped from the
    band before the re-rank (they keep their relevance rank after it)."""
    from p2d_ray.scoring.quality import pick_in_band

    rel, ids = run["score"], run["id"]
    if rule["rule"] == "relevance":
        return ids[np.lexsort((ids, -rel))[:k]]
    q = quality(run, rule["form"], **rule.get("params", {}))
    q = np.where(np.isinf(q), np.nanmax(q[np.isfinite(q)]) * 10 + 1, q)
    cand = np.arange(len(ids))
    if (
        rule.get("resid") is not None
    ):  # out of the band: rows far less relevant than a clean row of their loss
        z = relevance_residual(run)
        keep = np.flatnonzero(z >= -rule["resid"])
        cand = keep if len(keep) >= k else np.lexsort((ids, -rel))[:k]
    if rule.get("floor") is not None:  # the band holds only rows as relevant as the probe's own rows
        floor = np.percentile(run["probe_cos_loo"], rule["floor"])
        keep = np.flatnonzero(rel >= floor)
        cand = keep if len(keep) >= k else np.lexsort((ids, -rel))[:k]
    pick, _ = pick_in_band(
        rel[cand],
        q[cand],
        ids[cand],
        k,
        rule["band_factor"],
        rule.get("guard", 0.5),
        quality_weight=rule.get("weight", 1.0),
    )
    return ids[cand][pick]


def rules() -> dict[str, dict]:
    base = {"rule": "relevance_then_quality", "band_factor": 1.5, "guard": 0.5, "weight": 1.0}
    out = {"relevance": {"rule": "relevance"}, "shipped (loss)": {**base, "form": "loss"}}
    for bf in (1.5, 2.0):
        for w in (0.5, 1.0, 2.0):
            tag = f"{bf}x w{w}"
            r = {**base, "band_factor": bf, "weight": w}
            out[f"abs_z {tag}"] = {**r, "form": "abs_z"}
            out[f"kde {tag}"] = {**r, "form": "kde"}
            for e in (2.0, 4.0):
                out[f"asym_z e{e} {tag}"] = {**r, "form": "asym_z", "params": {"easy": e}}
            for f in ("ifd", "ifd_abs_z", "maxtok", "maxtok_abs_z"):
                out[f"{f} {tag}"] = {**r, "form": f}
            for c in (1.5, 2.0, 3.0):
                out[f"resid c{c} {tag}"] = {**r, "form": "loss", "resid": c}
            for fl in (5, 10, 25):
                out[f"floor p{fl} {tag}"] = {**r, "form": "loss", "floor": fl}
            for c in (2.0, 3.0, 4.0):
                out[f"loss_gate c{c} {tag}"] = {**r, "form": "loss_gate", "params": {"c": c}}
    return out


def evaluate(run: dict, rules_: dict, fraction: float = 0.10) -> dict:
    n = len(run["id"])
    k = max(1, int(np.floor(fraction * n + 0.5)))
    res = {}
    for name, rule in rules_.items():
        need = {"ifd": "alone", "ifd_abs_z": "alone", "maxtok": "maxtok", "maxtok_abs_z": "maxtok"}
        if need.get(rule.get("form")) and need[rule["form"]] not in run:
            continue
        if (rule.get("floor") is not None or rule.get("resid") is not None) and "probe_cos_loo" not in run:
            continue
        mask = np.isin(run["id"], select(run, k, rule))
        res[name] = {"clean": float(run["clean"][mask].mean()), "on_task": float(run["on_task"][mask].mean())}
    return res


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(a random ``pos`` value > a random ``neg`` value), ties half."""
    if len(pos) == 0 or len(neg) == 0:
        return None
    a = np.concatenate([pos, neg])
    order = a.argsort(kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    _, inv = np.unique(a, return_inverse=True)
    ranks = (np.bincount(inv, weights=ranks) / np.bincount(inv))[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def describe(run: dict) -> dict:
    """Where the rows of each kind sit against the probe: median z of clean / corrupted target rows and of
    off-task rows in the relevance band (1.5 k)."""
    n = len(run["id"])
    k = max(1, int(np.floor(0.1 * n + 0.5)))
    band = np.lexsort((run["id"], -run["score"]))[: int(np.ceil(1.5 * k))]
    z = robust_z(run["loss_full"], run["probe_losses"])
    out = {
        "probe_loss_p5_p25_p50_p75_p95": [
            float(v) for v in np.percentile(run["probe_losses"], [5, 25, 50, 75, 95])
        ],
        "probe_median_loss": float(np.median(run["probe_losses"])),
        "off_task_band_loss_median": float(np.median(run["loss_full"][band][~run["on_task"][band]]))
        if (~run["on_task"][band]).any()
        else None,
    }
    # can a term tell a clean target row from a corrupted one at all? AUC (1 = always, 0.5 = chance) over
    # every target row (loss) and over the 2x band (the terms computed there only)
    on, cl = run["on_task"], run["clean"]
    out["auc_loss_all_target_rows"] = _auc(-run["loss_full"][cl], -run["loss_full"][on & ~cl])
    for kind in sorted({q for q in run["quality"][on & ~cl] if q is not None}):
        bad = on & (run["quality"] == kind)
        out[f"auc_loss_all_target_rows_{kind}"] = _auc(-run["loss_full"][cl], -run["loss_full"][bad])
    terms = {"loss": run["loss_full"]}
    if "alone" in run:
        terms["ifd"] = run["loss_full"] / run["alone"]
    if "maxtok" in run:
        terms["maxtok"] = run["maxtok"]
    m = np.isfinite(run["alone"]) if "alone" in run else np.zeros(len(cl), bool)
    for name, v in terms.items():
        out[f"auc_{name}_band2x"] = _auc(-v[m & cl], -v[m & on & ~cl]) if m.any() else None
    for name, m in (
        ("clean", run["clean"]),
        ("corrupt", run["on_task"] & ~run["clean"]),
        ("off_task", ~run["on_task"]),
    ):
        mb = m[band]
        out[name] = {
            "band_rows": int(mb.sum()),
            "z_median": float(np.median(z[band][mb])) if mb.any() else None,
            "z_q10_q90": [float(v) for v in np.percentile(z[band][mb], [10, 90])] if mb.any() else None,
        }
    return out


def summarize(table: dict, names: list[str]) -> list[str]:
    lines = []
    runs = list(table)
    for name in names:
        if any(name not in table[r]["rules"] for r in runs):
            continue
        clean = [table[r]["rules"][name]["clean"] for r in runs]
        d = [table[r]["rules"][name]["on_task"] - table[r]["rules"]["relevance"]["on_task"] for r in runs]
        lines.append(
            f"{name:28s} clean mean {np.mean(clean):.3f} worst {np.min(clean):.3f} | on-task vs relevance "
            f"worst {np.min(d):+.3f} sum {np.sum(d):+.3f} | " + " ".join(f"{c:.2f}" for c in clean)
        )
    return lines


def cmd_evaluate(runs: list[str], cache: str, out: str | None, only: list[str] | None) -> None:
    rules_ = rules()
    if only:
        rules_ = {k: v for k, v in rules_.items() if k in only or k in ("relevance", "shipped (loss)")}
    table = {}
    for r in runs:
        run = load(r, cache)
        table[r] = {"target": run["target"], "describe": describe(run), "rules": evaluate(run, rules_)}
        d = table[r]["describe"]
        print(
            f"{r} [{run['target']}] probe median loss {d['probe_median_loss']:.2f}; band z medians: "
            + ", ".join(
                f"{c} {d[c]['z_median'] if d[c]['z_median'] is None else round(d[c]['z_median'], 2)} "
                f"(n={d[c]['band_rows']})"
                for c in ("clean", "corrupt", "off_task")
            )
        )
    lines = summarize(table, list(rules_))
    print("\n".join(lines))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "results.json").write_text(
            json.dumps({"runs": table, "rules": rules_}, indent=1, default=str)
        )
        Path(out, "summary.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("losses", "forwards", "relevance", "evaluate"))
    ap.add_argument("--band", type=float, default=2.0, help="forwards: the band's rows, x k")
    ap.add_argument("--full", action="store_true", help="forwards: max token loss instead of the alone loss")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--cache", default="runs/s13/h29/probe_losses")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--only", nargs="*", default=None, help="evaluate: these rule names (and the two baselines)"
    )
    args = ap.parse_args()
    if args.command == "losses":
        cmd_losses(args.runs, args.cache)
    elif args.command == "relevance":
        cmd_probe_relevance(args.runs, args.cache)
    elif args.command == "forwards":
        cmd_forwards(args.runs, args.cache, args.band, args.full)
    else:
        cmd_evaluate(args.runs, args.cache, args.out, args.only)


if __name__ == "__main__":
    main()
