"""Distilled scoring measured offline on an exact run's scores (SmolLM2): fidelity, precision frontier, cost.

    .venv/bin/python -m benchmarks.distill_offline --exact-run runs/h24/arith1000/exact \
        --corpus runs/h24/draw-arithmetic-1000/corpus --out benchmarks/results/distill/offline-arith.json

For the rows the exact run scored (all, or the shards it finished), the truncated forward of scoring/distill.py
(the same functions the bulk pass runs) gives each row's pooled layer-l_f features; then, per seeded sample
of the rows: ridge fitted on the sample's exact scores (fit_regressor), the rest predicted, and the top 10 %
selected from exact (sample) + predicted (rest) scores, with the predicted top r of the corpus taking its exact
scores (the refine pass). Cost: the exact scorer and the truncated forward timed on the same micro-batches,
alternating, in this one process (same load), as seconds per row and as a ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import torch


def _load_and_encode(run: Path, rows: list[dict]):
    """The exact run's config, tokenizer and model (one torch thread, as the sweep's timings assume) and
    ``rows`` encoded as the engine encodes them: ``(cfg, tok, model, enc, pad_id)``."""
    import yaml

    from p2d_ray.config import P2DConfig
    from p2d_ray.data.formatting import encode_row
    from p2d_ray.models.loading import load_model, load_tokenizer

    cfg = P2DConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    torch.set_num_threads(1)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model).eval()
    enc = [encode_row(r, tok, cfg.data, cfg.data.format) for r in rows]
    return cfg, tok, model, enc, tok.pad_token_id if tok.pad_token_id is not None else 0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exact-run", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--layers", nargs="+", type=int, default=[3])
    ap.add_argument("--sample-fractions", nargs="+", type=float, default=[0.1, 0.2, 1 / 3])
    ap.add_argument("--refine", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.15])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--timing-batches", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from p2d_ray.data.formatting import collate
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.report.precision import LABEL
    from p2d_ray.scoring.features import pool_features, truncated_hidden
    from p2d_ray.scoring.gradient import FILENAME, ProbeGradient
    from p2d_ray.scoring.regressor import fit_regressor, spearman, top_recall
    from p2d_ray.scoring.scorers import build_scorer

    run = Path(args.exact_run)
    scores = pads.dataset(str(run / "scores"), format="parquet", ignore_prefixes=["_", "."]).to_table()
    exact = dict(zip(scores.column("id").to_pylist(), scores.column("score").to_pylist(), strict=True))
    corpus = pads.dataset(args.corpus, format="parquet").to_table().to_pylist()
    rows = [r for r in corpus if r["id"] in exact]
    cfg, tok, model, enc, pad = _load_and_encode(run, rows)
    order = np.argsort([-len(e.input_ids) for e in enc], kind="stable")
    bs = cfg.score.batch_size
    feats = {layer: np.zeros((len(rows), 0)) for layer in args.layers}
    for layer in args.layers:
        out = [None] * len(rows)
        with torch.no_grad():
            for s in range(0, len(order), bs):
                idx = order[s : s + bs]
                b = collate([enc[i] for i in idx], pad)
                f = pool_features(
                    truncated_hidden(model, b["input_ids"], b["attention_mask"], layer), b["attention_mask"]
                )
                for j, i in enumerate(idx):
                    out[i] = f[j].numpy()
        feats[layer] = np.stack(out).astype(np.float64)

    # cost: the exact scorer vs the truncated forward on the same micro-batches, alternating
    heads = HeadSet.load(run / "heads.json")
    pg = ProbeGradient.load(run / FILENAME)
    s = cfg.score
    exact_fn = build_scorer(
        s.scorer,
        model,
        heads,
        s.gate_mode,
        s.loss_chunk_tokens,
        probe_gradient=pg,
        alignment_eps=s.alignment_eps,
        alignment_method=s.alignment_method,
        alignment_normalize=s.alignment_normalize,
    )
    t_exact, t_trunc, t_full, n_timed = 0.0, {layer: 0.0 for layer in args.layers}, 0.0, 0
    rng = np.random.default_rng(0)
    for _ in range(args.timing_batches):
        idx = rng.choice(len(rows), size=min(bs, len(rows)), replace=False)
        b = collate([enc[i] for i in idx], pad)
        t = time.perf_counter()
        exact_fn(b)
        t_exact += time.perf_counter() - t
        with torch.no_grad():
            t = time.perf_counter()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            t_full += time.perf_counter() - t
            for layer in args.layers:
                t = time.perf_counter()
                truncated_hidden(model, b["input_ids"], b["attention_mask"], layer)
                t_trunc[layer] += time.perf_counter() - t
        n_timed += len(idx)

    ids = np.array([r["id"] for r in rows])
    y = np.array([exact[i] for i in ids], dtype=np.float64)
    label = np.array([bool(r[LABEL]) for r in rows])
    n = len(rows)
    k = max(1, round(0.1 * n))

    def top_rate(score):
        return float(label[np.lexsort((ids, -score))[:k]].mean())

    result = {
        "rows": n,
        "k": k,
        "exact_precision": top_rate(y),
        "base_rate": float(label.mean()),
        "cost": {
            "rows_timed": n_timed,
            "exact_s_per_row": t_exact / n_timed,
            "plain_forward_s_per_row": t_full / n_timed,
            "exact_forwards_per_row": t_exact / t_full,
            "truncated": {
                str(layer): {
                    "s_per_row": t_trunc[layer] / n_timed,
                    "forwards_per_row": t_trunc[layer] / t_full,
                    "vs_exact": t_trunc[layer] / t_exact,
                }
                for layer in args.layers
            },
        },
        "runs": [],
    }
    for layer in args.layers:
        X = feats[layer]
        for frac in args.sample_fractions:
            m = max(5, int(round(frac * n)))
            for seed in range(args.seeds):
                perm = np.random.default_rng(seed).permutation(n)
                S, R = perm[:m], perm[m:]
                reg, cv = fit_regressor(X[S], y[S], 5, seed, 0.1, 1.5)
                pred = reg.predict(X[R])[0]
                row = {
                    "layer": layer,
                    "sample_fraction": frac,
                    "sample": m,
                    "seed": seed,
                    "kfold": cv,
                    "heldout_spearman": spearman(y[R], pred),
                    "heldout_top_recall": top_recall(y[R], pred, 0.1),
                }
                for r in args.refine:
                    final = y.copy()
                    final[R] = pred
                    band = R[np.argsort(-pred, kind="stable")[: int(round(r * n))]]
                    final[band] = y[band]
                    exact_rows = m + len(band)
                    ratio = result["cost"]["truncated"][str(layer)]["vs_exact"]
                    row[f"precision_refine_{r}"] = top_rate(final)
                    row[f"exact_rows_share_refine_{r}"] = exact_rows / n
                    row[f"cost_vs_exact_refine_{r}"] = exact_rows / n + ratio * (n - m) / n
                result["runs"].append(row)
    summary = []
    for layer in args.layers:
        for frac in args.sample_fractions:
            rs = [r for r in result["runs"] if r["layer"] == layer and r["sample_fraction"] == frac]
            entry = {
                "layer": layer,
                "sample_fraction": frac,
                "sample": rs[0]["sample"],
                "kfold_spearman": float(np.mean([r["kfold"]["spearman"] for r in rs])),
                "heldout_spearman": float(np.mean([r["heldout_spearman"] for r in rs])),
                "heldout_top_recall": float(np.mean([r["heldout_top_recall"] for r in rs])),
            }
            for r in args.refine:
                entry[f"precision_refine_{r}"] = float(np.mean([x[f"precision_refine_{r}"] for x in rs]))
                entry[f"precision_sd_refine_{r}"] = float(np.std([x[f"precision_refine_{r}"] for x in rs]))
                entry[f"cost_vs_exact_refine_{r}"] = float(
                    np.mean([x[f"cost_vs_exact_refine_{r}"] for x in rs])
                )
            summary.append(entry)
    result["summary"] = summary
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {
                "rows": n,
                "exact_precision": result["exact_precision"],
                "cost": result["cost"],
                "summary": summary,
            },
            indent=1,
        )
    )
    return result


# -- cached features + the frontier sweep over several exact runs ------------------------------------------
POOLS = ("mean", "wmean", "logn", "resp_mean", "last")


def run_corpus(run: Path) -> Path:
    """The corpus an exact run scored: ``data.corpus_path``, else the demo's cached corpus of its target."""
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    if data.get("corpus_path"):
        return Path(data["corpus_path"])
    from p2d_ray.assets.synthetic import demo_assets

    return demo_assets(data["demo_target"]).corpus_dir


def cached_features(run: Path, layers: list[int], cache: Path, corpus: Path | None = None) -> dict:
    """Pooled residual-stream features of every row the exact run scored, at each of ``layers``, from ONE
    forward that stops at max(layers) (hooks on the lower layers capture theirs). Cached per (run, layer) as
    ``<cache>/L<layer>.npz`` (ids + one array per pooling in POOLS); a layer already cached is not
    recomputed. Pools: the engine's mean / position-weighted mean / log length (pool_features), the mean over
    the response tokens (loss mask) and the last real token's state. Returns {layer: {pool: [n, .]}, "ids",
    "y" (exact score), "label"}."""

    from p2d_ray.report.precision import LABEL

    scores = pads.dataset(str(run / "scores"), format="parquet", ignore_prefixes=["_", "."]).to_table()
    ok = np.isfinite(np.asarray(scores.column("score").to_numpy(zero_copy_only=False), dtype=np.float64))
    exact = {
        i: v
        for i, v, o in zip(
            scores.column("id").to_pylist(), scores.column("score").to_pylist(), ok, strict=True
        )
        if o
    }
    corpus = corpus or run_corpus(run)
    rows = [r for r in pads.dataset(str(corpus), format="parquet").to_table().to_pylist() if r["id"] in exact]
    ids = np.array([r["id"] for r in rows])
    out = {
        "ids": ids,
        "y": np.array([exact[i] for i in ids], dtype=np.float64),
        "label": np.array([bool(r[LABEL]) for r in rows]),
    }
    if rows and "task" in rows[0]:  # for the oracle: rows of the target task, any quality
        target = {r["task"] for r in rows if r[LABEL]}
        out["on_task"] = np.array([r["task"] in target for r in rows])
    if "loss_full" in scores.column_names:  # the full model's response loss: what one plain forward gives
        lf = dict(zip(scores.column("id").to_pylist(), scores.column("loss_full").to_pylist(), strict=True))
        v = np.array([lf[i] if lf[i] is not None else np.nan for i in ids], dtype=np.float64)
        v = np.where(np.isfinite(v), v, np.nanmedian(v))
        out["loss"] = np.stack([v, np.log(np.maximum(v, 1e-6))], axis=1)
    cache.mkdir(parents=True, exist_ok=True)
    todo = [layer for layer in layers if not (cache / f"L{layer}.npz").is_file()]
    if todo:
        from p2d_ray.data.formatting import collate
        from p2d_ray.models.geometry import decoder_layers
        from p2d_ray.scoring.features import pool_features, truncated_hidden

        cfg, tok, model, enc, pad = _load_and_encode(run, rows)
        order = np.argsort([-len(e.input_ids) for e in enc], kind="stable")
        got: dict = {layer: {p: [None] * len(rows) for p in POOLS} for layer in todo}
        seen: dict = {}
        hooks = [
            decoder_layers(model)[layer - 1].register_forward_hook(
                lambda m, a, o, layer=layer: seen.__setitem__(layer, o[0] if isinstance(o, tuple) else o)
            )
            for layer in todo
        ]
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for s in range(0, len(order), cfg.score.batch_size):
                    idx = order[s : s + cfg.score.batch_size]
                    b = collate([enc[i] for i in idx], pad)
                    mask = b["attention_mask"]
                    truncated_hidden(model, b["input_ids"], mask, max(todo))
                    lm = b["loss_mask"].to(torch.float32)
                    last = mask.sum(1) - 1
                    for layer in todo:
                        h = seen[layer].to(torch.float32)
                        f = pool_features(h, mask).numpy()
                        e = h.shape[-1]
                        resp = ((h * lm[..., None]).sum(1) / lm.sum(1).clamp(min=1)[:, None]).numpy()
                        lt = h[torch.arange(len(idx)), last].numpy()
                        for j, i in enumerate(idx):
                            got[layer]["mean"][i] = f[j, :e]
                            got[layer]["wmean"][i] = f[j, e : 2 * e]
                            got[layer]["logn"][i] = f[j, 2 * e :]
                            got[layer]["resp_mean"][i] = resp[j]
                            got[layer]["last"][i] = lt[j]
        finally:
            for h in hooks:
                h.remove()
        print(
            f"features {run}: {len(rows)} rows, layers {todo}, {time.perf_counter() - t0:.0f} s", flush=True
        )
        for layer in todo:
            tmp = cache / f".L{layer}.tmp.npz"
            np.savez(tmp, ids=ids, **{p: np.stack(v).astype(np.float32) for p, v in got[layer].items()})
            tmp.replace(cache / f"L{layer}.npz")
    for layer in layers:
        z = np.load(cache / f"L{layer}.npz")
        if not np.array_equal(z["ids"], ids):
            raise RuntimeError(f"{cache}/L{layer}.npz: other rows than the run's scores; delete it")
        out[layer] = {p: z[p].astype(np.float64) for p in POOLS}
    return out


# the exact gradient_alignment SmolLM2 runs on disk the sweep uses (name -> run dir; the corpus from its config)
RUNS = {
    "arith1000": "runs/h24/arith1000/exact",
    "arith-d0": "runs/m29/d0/arithmetic/gradient_alignment/task",
    "arith-d1": "runs/m29/d1/arithmetic/s1/gradient_alignment/task",
    "arith-d2": "runs/m29/d2/arithmetic/s2/gradient_alignment/task",
    "units-d0": "runs/m29/d0/units/gradient_alignment/task",
    "units-d1": "runs/m29/d1/units/s1/gradient_alignment/task",
    "units-d2": "runs/m29/d2/units/s2/gradient_alignment/task",
    "capitals": "runs/m29/u/capitals/gradient_alignment/task",
    "letters": "runs/m29/u/letters/gradient_alignment/task",
}
# a larger exact run when present (runs/h24/exact3000.sh: the 3,000-row arithmetic draw); not in the default set
EXTRA_RUNS = {"arith3000": "runs/h24/arith3000/exact"}
LAYERS = (1, 2, 3, 4, 6, 9, 12, 15)
CACHE = Path("runs/h24/features")


def features_main(argv=None) -> None:
    """Cache the features of the RUNS (one SmolLM2 forward to max(layers) per row; run under the lock)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    ap.add_argument("--layers", nargs="+", type=int, default=list(LAYERS))
    ap.add_argument("--timing-batches", type=int, default=6)
    args = ap.parse_args(argv)
    for name in args.runs:
        cached_features(Path({**RUNS, **EXTRA_RUNS}[name]), args.layers, CACHE / name)
    if args.timing_batches:
        t = time_truncated(Path(RUNS["arith1000"]), args.layers, args.timing_batches)
        (CACHE / "timing.json").write_text(json.dumps(t, indent=1))
        print(json.dumps(t), flush=True)


def time_truncated(run: Path, layers: list[int], batches: int) -> dict:
    """Seconds per row of the truncated forward to each layer and of the plain forward, on the same seeded
    micro-batches of the run's corpus, alternating (same load), one torch thread: forwards per row."""

    from p2d_ray.data.formatting import collate
    from p2d_ray.scoring.features import truncated_hidden

    rows = pads.dataset(str(run_corpus(run)), format="parquet").to_table().to_pylist()
    cfg, tok, model, enc, pad = _load_and_encode(run, rows)
    rng = np.random.default_rng(0)
    full, trunc, n = 0.0, {layer: 0.0 for layer in layers}, 0
    with torch.no_grad():
        for _ in range(batches):
            idx = rng.choice(len(rows), size=cfg.score.batch_size, replace=False)
            b = collate([enc[i] for i in idx], pad)
            t = time.perf_counter()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            full += time.perf_counter() - t
            for layer in layers:
                t = time.perf_counter()
                truncated_hidden(model, b["input_ids"], b["attention_mask"], layer)
                trunc[layer] += time.perf_counter() - t
            n += len(idx)
    return {
        "rows_timed": n,
        "plain_forward_s_per_row": full / n,
        "forwards_per_row": {str(layer): trunc[layer] / full for layer in layers},
    }


# cost terms in forward-equivalents per row (BENCHMARKS.md "Distilled scoring"): the exact scorer (measured in
# Session 10, same process, alternating) and the truncated forward to layer l over the plain forward, measured by
# `features` (time_truncated: 6 micro-batches of 16 rows of the 1,000-row draw, alternating, one thread, Session 11;
# runs/h24/features/timing.json)
EXACT_FWD = 2.59
TRUNC_FWD = {1: 0.028, 2: 0.052, 3: 0.077, 4: 0.105, 6: 0.162, 9: 0.250, 12: 0.310, 15: 0.388}


def trunc_cost(layer: int) -> float:
    if layer in TRUNC_FWD:
        return TRUNC_FWD[layer]
    return 0.026 * layer  # between / beyond the measured layers: ~linear in l


def forwards_per_row(n_rows: int, sample: int, audit: int, refine: float, layers_cost: float) -> float:
    """F = s (f_s + f_a + r) + (truncated forwards of the non-sample rows), per corpus row."""
    fs, fa = sample / n_rows, audit / n_rows
    return EXACT_FWD * (fs + fa + refine) + layers_cost * (1 - fs - fa)


def _zscore(Xs: np.ndarray, *Xo: np.ndarray) -> list[np.ndarray]:
    mean, std = Xs.mean(0), Xs.std(0)
    std[std < 1e-8] = 1.0
    return [(X - mean) / std for X in (Xs, *Xo)]


def _target(y: np.ndarray, kind: str) -> np.ndarray:
    """The regression target on the sample: z (z-scored score), rank (Gaussianised ranks), top<q> (1 for
    the sample's top q %, else 0: a least-squares top-band classifier)."""
    if kind == "z":
        return (y - y.mean()) / (y.std() or 1.0)
    r = np.argsort(np.argsort(y, kind="stable"), kind="stable")
    if kind == "rank":
        return torch.special.ndtri(torch.as_tensor((r + 0.5) / len(y))).numpy()
    q = float(kind[3:]) / 100
    t = (r >= len(y) * (1 - q)).astype(np.float64)
    return t - t.mean()


def _kernels(kind: str, Zs: np.ndarray, Zr: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(name, K_ss, K_rs)]: linear, or RBF at 1/3, 1, 3 x the inverse median squared distance."""
    if kind == "linear":
        return [("lin", Zs @ Zs.T, Zr @ Zs.T)]
    sq_s = (Zs * Zs).sum(1)
    Dss = np.maximum(sq_s[:, None] + sq_s[None] - 2 * Zs @ Zs.T, 0)
    Drs = np.maximum((Zr * Zr).sum(1)[:, None] + sq_s[None] - 2 * Zr @ Zs.T, 0)
    med = float(np.median(Dss[np.triu_indices(len(Zs), 1)])) or 1.0
    return [(f"g{g}", np.exp(-Dss * g / med), np.exp(-Drs * g / med)) for g in (1 / 3, 1.0, 3.0)]


KR_ALPHAS = np.logspace(-3, 3, 13)


def kernel_ridge(K: np.ndarray, Kr: np.ndarray, t: np.ndarray, y: np.ndarray, seed: int, folds: int = 5):
    """Kernel ridge (dual) with strength alpha x mean(diag K); k-fold out-of-fold predictions for every
    alpha from one eigendecomposition per fold. Returns [(alpha, oof [n], pred_rest [m])]."""
    n = len(t)
    scale = float(np.mean(np.diag(K))) or 1.0
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    oof = np.zeros((len(KR_ALPHAS), n))
    for f in range(folds):
        tr, te = fold_of != f, fold_of == f
        w, U = np.linalg.eigh(K[np.ix_(tr, tr)])
        Ut = U.T @ t[tr]
        Kte = K[np.ix_(te, tr)] @ U
        for i, a in enumerate(KR_ALPHAS):
            oof[i, te] = Kte @ (Ut / (np.maximum(w, 0) + a * scale))
    w, U = np.linalg.eigh(K)
    Ut, KrU = U.T @ t, Kr @ U
    return [(a, oof[i], KrU @ (Ut / (np.maximum(w, 0) + a * scale))) for i, a in enumerate(KR_ALPHAS)]


def _objective(kind: str, y: np.ndarray, oof: np.ndarray) -> float:
    """spearman: k-fold Spearman (the engine's choice); top: the share of the sample's exact top 10 %
    within the out-of-fold top 20 % (what a refine band needs), Spearman breaking ties."""
    from p2d_ray.scoring.regressor import spearman

    rho = spearman(y, oof)
    if kind == "spearman":
        return rho
    k = max(1, round(0.1 * len(y)))
    hit = len(set(np.argsort(-y)[:k]) & set(np.argsort(-oof)[: 2 * k])) / k
    return hit + 1e-3 * rho


def fit_predict(spec: dict, feats: dict, S: np.ndarray, R: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """One regressor spec -> predictions for the rows R, fitted on S (exact scores y[S]).
    spec: layers (list), pools (list of POOLS), kernel (linear | rbf), target (z | rank | top<q>),
    objective (spearman | top). Several layers: each layer's z-scored features, kernels summed."""
    Ks = Kr = None
    for layer in spec["layers"]:
        blocks = [feats["loss"] if p == "loss" else feats[layer][p] for p in spec["pools"]]
        X = np.concatenate(blocks, axis=1)
        Zs, Zr = _zscore(X[S], X[R])
        kernel = spec["kernel"]
        if kernel.startswith("b"):  # block-balanced: each pool's z-scored block weighs the same in the kernel
            w = np.concatenate([np.full(b.shape[1], 1 / np.sqrt(b.shape[1])) for b in blocks])
            Zs, Zr, kernel = Zs * w, Zr * w, kernel[1:]
        ks = _kernels(kernel, Zs, Zr)
        if Ks is None:
            Ks, Kr = [k[1] for k in ks], [k[2] for k in ks]
        else:
            Ks, Kr = (
                [a + k[1] for a, k in zip(Ks, ks, strict=True)],
                [a + k[2] for a, k in zip(Kr, ks, strict=True)],
            )
    t = _target(y[S], spec["target"])
    best = None
    for K, KR in zip(Ks, Kr, strict=True):
        for _, oof, pred in kernel_ridge(K, KR, t, y[S], seed):
            obj = _objective(spec["objective"], y[S], oof)
            if best is None or obj > best[0]:
                best = (obj, oof, pred)
    return {"pred": best[2], "oof": best[1]}


def _precision(final: np.ndarray, ids: np.ndarray, label: np.ndarray, k: int) -> float:
    return float(label[np.lexsort((ids, -final))[:k]].mean())


def _units(fit: dict, spec: dict, ys: np.ndarray) -> np.ndarray:
    """Predictions in the exact score's units, so exact and predicted rows mix in one ranking as the engine
    writes them: a z target as the engine maps it back; a rank / class target by the least-squares line
    from its out-of-fold predictions to the sample's exact scores (shrunk as ridge's are)."""
    if spec["target"] == "z":
        return fit["pred"] * ys.std() + ys.mean()
    o = fit["oof"]
    b = float(np.cov(o, ys)[0, 1] / (o.var() or 1.0))
    return ys.mean() + b * (fit["pred"] - o.mean())


AUTO_Q = (0.7, 0.8, 0.9)


def evaluate(data: dict, spec: dict, sample_fraction: float, refines, seeds: int, cascade=None) -> list[dict]:
    """Per seed: sample S, predict the rest R, then per refine band r (share of the corpus) the top 10 %
    precision of exact (S + band) + predicted (rest) scores. ``cascade`` = (spec2, c): the stage-1 top c of
    the corpus re-predicted by spec2 (its features: a second truncated forward), ranked above the other
    rows; the band is the top r of that order."""
    from p2d_ray.scoring.regressor import spearman, top_recall

    y, ids, label = data["y"], data["ids"], data["label"]
    n = len(y)
    k = max(1, round(0.1 * n))
    m = max(10, int(round(sample_fraction * n)))
    out = []
    for seed in range(seeds):
        perm = np.random.default_rng(seed).permutation(n)
        S, R = perm[:m], perm[m:]
        if spec.get("oracle"):  # a perfect detector of the target task that knows nothing else
            noise = np.random.default_rng(seed + 100).random(len(R))
            pred = data["on_task"][R] + noise * 1e-3
            oof = None
        else:
            fit = fit_predict(spec, data, S, R, y, seed)
            pred, oof = _units(fit, spec, y[S]), fit["oof"]
        rank_key = pred.copy()
        if cascade is not None:
            spec2, c = cascade
            cand = np.argsort(-pred, kind="stable")[: int(round(c * n))]
            p2 = _units(fit_predict(spec2, data, S, R[cand], y, seed), spec2, y[S])
            pred[cand] = p2
            rank_key[cand] = p2 + (rank_key.max() - p2.min() + 1.0)  # candidates first, by stage 2
        row = {
            "seed": seed,
            "sample": m,
            "heldout_spearman": spearman(y[R], pred),
            "heldout_top_recall": top_recall(y[R], pred, 0.1),
        }
        order = np.argsort(-rank_key, kind="stable")
        top_exact = set(np.argsort(-y)[:k].tolist())
        for r in refines:
            final = y.copy()
            final[R] = pred
            band = R[order[: int(round(r * n))]]
            final[band] = y[band]
            row[f"p{r}"] = _precision(final, ids, label, k)
            # the same on the rows the regressor never saw alone (the sample's share -> 0, as at 2 % of a large
            # corpus): top 10 % of R by predicted scores with R's predicted top r re-scored exactly, against
            # the top 10 % of R by exact scores
            kr = max(1, round(0.1 * len(R)))
            fr = pred.copy()
            bandr = order[: int(round(r * len(R)))]
            fr[bandr] = y[R][bandr]
            row[f"b{r}"] = _precision(fr, ids[R], label[R], kr) - _precision(y[R], ids[R], label[R], kr)
            # the exact top 10 % that ends up scored exactly (sample or band)
            row[f"recall{r}"] = len(top_exact & (set(S.tolist()) | set(band.tolist()))) / k
        if oof is not None and cascade is None:
            # a band sized from the sample: the smallest share of the sample's out-of-fold ranking that holds a
            # share q of the sample's exact top 10 %, applied to R
            ks = max(1, round(0.1 * len(S)))
            pos = np.sort(np.argsort(np.argsort(-oof, kind="stable"), kind="stable")[np.argsort(-y[S])[:ks]])
            for q in AUTO_Q:
                r_auto = (pos[int(np.ceil(q * ks)) - 1] + 1) / len(S)
                fr = pred.copy()
                bandr = order[: int(round(r_auto * len(R)))]
                fr[bandr] = y[R][bandr]
                kr = max(1, round(0.1 * len(R)))
                row[f"bauto{q}"] = _precision(fr, ids[R], label[R], kr) - _precision(
                    y[R], ids[R], label[R], kr
                )
                row[f"rauto{q}"] = r_auto
        out.append(row)
    return out


def parse_spec(text: str) -> dict:
    """``layers/pools/kernel/target/objective``, e.g. ``3/mean,wmean,logn/linear/z/spearman`` (the engine's
    ridge at layer 3), ``3+6/...`` (several layers, kernels summed)."""
    if text == "oracle_task":
        return {"oracle": True, "layers": [1], "pools": [], "kernel": "", "target": "z", "objective": ""}
    layers, pools, kernel, target, objective = text.split("/")
    return {
        "layers": [int(x) for x in layers.split("+")],
        "pools": pools.split(","),
        "kernel": kernel,
        "target": target,
        "objective": objective,
    }


def spec_cost(text: str) -> float:
    """Truncated-forward cost per non-sample row of a spec, ``A>B@c`` a cascade: A for every row, B (its
    own forward, from the embeddings again) for the stage-1 top c of the corpus."""
    if text == "oracle_task":
        return 0.0
    if ">" in text:
        a, rest = text.split(">")
        b, c = rest.split("@")
        return spec_cost(a) + float(c) * spec_cost(b)
    spec = parse_spec(text)
    if "loss" in spec["pools"]:  # the response loss: a whole forward (the exact scorer's loss_full)
        return 1.0
    return trunc_cost(max(spec["layers"]))


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


_P, _A = "mean,wmean,logn", "mean,wmean,logn,resp_mean,last"
_RIDGE3 = f"3/{_P}/linear/z/spearman"  # the engine's regressor at its default layer
# the specs of the Session 11 frontier (RESULTS.md / BENCHMARKS.md), by --preset
PRESETS = {
    "layers": ["oracle_task", *(f"{layer}/{_P}/linear/z/spearman" for layer in LAYERS)],
    "regressors": [
        f"3/{_A}/linear/z/spearman",
        "3/resp_mean,last,logn/linear/z/spearman",
        f"3/{_P}/blinear/z/spearman",
        f"3/{_A}/blinear/z/spearman",
        f"3/{_P}/rbf/z/spearman",
        f"3/{_A}/brbf/z/spearman",
        f"3/{_P}/linear/rank/spearman",
        f"3/{_P}/linear/top20/spearman",
        f"3/{_P}/linear/z/top",
        f"3/{_P}/rbf/z/top",
        f"6/{_P}/rbf/z/spearman",
        f"6/{_A}/blinear/z/spearman",
        f"15/{_A}/blinear/z/spearman",
        f"15/{_P}/rbf/z/spearman",
        f"2+6/{_P}/linear/z/spearman",
        f"3+9/{_P}/linear/z/spearman",
        f"3+15/{_P}/linear/z/spearman",
    ],
    "cascade": [
        f"{_RIDGE3}>9/{_P}/linear/z/spearman@0.3",
        f"{_RIDGE3}>15/{_P}/linear/z/spearman@0.3",
        f"{_RIDGE3}>15/{_A}/blinear/z/spearman@0.3",
        f"{_RIDGE3}>15/{_P}/rbf/z/spearman@0.2",
        f"{_RIDGE3}>3/{_P},loss/blinear/z/spearman@0.2",
    ],
}


def sweep_main(argv=None) -> None:
    """The frontier: every spec x sample share x refine band on every run of RUNS (cached features), top-10 %
    clean on-task precision (mean over seeds) against the run's exact precision, and forwards per row at
    100,000 rows (2 % sample, 200 audit rows)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    ap.add_argument("--specs", nargs="+", default=None, help="default: the engine's ridge at layer 3")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the specs of a Session 11 sweep")
    ap.add_argument("--sample-fractions", nargs="+", type=float, default=[0.1, 0.2, 1 / 3])
    ap.add_argument(
        "--refine", nargs="+", type=float, default=[0.0, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3]
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    args.specs = (args.specs or []) + (PRESETS[args.preset] if args.preset else [])
    args.specs = args.specs or [_RIDGE3]
    layers = sorted(
        {
            int(x)
            for t in args.specs
            if t != "oracle_task"
            for part in t.replace(">", " ").split()
            for x in part.split("/")[0].split("+")
        }
    ) or [1]
    data = {
        name: cached_features(Path({**RUNS, **EXTRA_RUNS}[name]), layers, CACHE / name) for name in args.runs
    }
    exact = {
        name: _precision(d["y"], d["ids"], d["label"], max(1, round(0.1 * len(d["y"]))))
        for name, d in data.items()
    }
    results = {"exact_precision": exact, "rows": {n: len(d["y"]) for n, d in data.items()}, "configs": []}
    for text in args.specs:
        if ">" in text:
            a, rest = text.split(">")
            b, c = rest.split("@")
            spec, cascade = parse_spec(a), (parse_spec(b), float(c))
        else:
            spec, cascade = parse_spec(text), None
        for frac in args.sample_fractions:
            t0 = time.perf_counter()
            per_run = {
                name: evaluate(d, spec, frac, args.refine, args.seeds, cascade) for name, d in data.items()
            }
            entry = {"spec": text, "sample_fraction": frac, "fit_s": time.perf_counter() - t0, "runs": {}}
            for name, rows in per_run.items():
                entry["runs"][name] = {
                    "sample": rows[0]["sample"],
                    "heldout_spearman": float(np.mean([r["heldout_spearman"] for r in rows])),
                    "heldout_top_recall": float(np.mean([r["heldout_top_recall"] for r in rows])),
                    **{f"p{r}": float(np.mean([x[f"p{r}"] for x in rows])) for r in args.refine},
                    **{f"sd{r}": float(np.std([x[f"p{r}"] for x in rows])) for r in args.refine},
                    **{f"recall{r}": float(np.mean([x[f"recall{r}"] for x in rows])) for r in args.refine},
                    **{f"bulk_delta{r}": float(np.mean([x[f"b{r}"] for x in rows])) for r in args.refine},
                    **{
                        f"{key}{q}": float(np.mean([x[f"{key}{q}"] for x in rows]))
                        for q in AUTO_Q
                        for key in ("bauto", "rauto")
                        if f"bauto{q}" in rows[0]
                    },
                }
            for r in args.refine:
                deltas = [entry["runs"][n][f"p{r}"] - exact[n] for n in data]
                entry[f"delta{r}"] = float(np.mean(deltas))
                entry[f"worst{r}"] = float(np.min(deltas))
                entry[f"recall{r}"] = float(np.mean([entry["runs"][n][f"recall{r}"] for n in data]))
                bd = [entry["runs"][n][f"bulk_delta{r}"] for n in data]
                entry[f"bulk_delta{r}"], entry[f"bulk_worst{r}"] = float(np.mean(bd)), float(np.min(bd))
                entry[f"F100k_{r}"] = forwards_per_row(100_000, 2000, 200, r, spec_cost(text))
            for q in AUTO_Q:
                if f"bauto{q}" in next(iter(entry["runs"].values())):
                    ba = [entry["runs"][n][f"bauto{q}"] for n in data]
                    ra = [entry["runs"][n][f"rauto{q}"] for n in data]
                    entry[f"auto{q}"] = {
                        "bulk_delta": float(np.mean(ba)),
                        "bulk_worst": float(np.min(ba)),
                        "refine_mean": float(np.mean(ra)),
                        "refine_max": float(np.max(ra)),
                        "F100k": forwards_per_row(100_000, 2000, 200, float(np.mean(ra)), spec_cost(text)),
                    }
                    print(f"   auto q={q}: {entry[f'auto{q}']}", flush=True)
            entry["heldout_spearman"] = float(
                np.mean([v["heldout_spearman"] for v in entry["runs"].values()])
            )
            entry["heldout_top_recall"] = float(
                np.mean([v["heldout_top_recall"] for v in entry["runs"].values()])
            )
            results["configs"].append(entry)
            print(
                f"{text:48s} s={frac:.2f} rho={entry['heldout_spearman']:.2f} rec={entry['heldout_top_recall']:.2f} "
                + " ".join(
                    f"r{r}:{entry[f'bulk_delta{r}']:+.3f}/{entry[f'bulk_worst{r}']:+.2f}" for r in args.refine
                )
                + f" ({entry['fit_s']:.0f}s)",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_rounded(results)))


def table_main(argv=None) -> None:
    """Markdown of a sweep's JSON: one row per spec x sample share (bulk precision minus exact, mean / worst
    over the runs, per refine band, and F at 100,000 rows), then the Pareto frontier over all points."""
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    args = ap.parse_args(argv)
    configs = [c for p in args.results for c in json.loads(Path(p).read_text())["configs"]]
    refines = sorted(
        {float(k[len("bulk_delta") :]) for c in configs for k in c if k.startswith("bulk_delta")}
    )
    head = "| spec | sample | held-out Spearman | top-10 % recall | " + " | ".join(
        f"r={r:g}" for r in refines
    )
    print(head + " |\n|" + "---|" * (4 + len(refines)))
    for c in configs:
        cells = [
            f"{c[f'bulk_delta{r}']:+.3f} / {c[f'bulk_worst{r}']:+.2f} ({c[f'F100k_{r}']:.2f})"
            for r in refines
        ]
        print(
            f"| `{c['spec']}` | {c['sample_fraction']:.2f} | {c['heldout_spearman']:.2f} | "
            f"{c['heldout_top_recall']:.2f} | " + " | ".join(cells) + " |"
        )
    points = sorted(
        (
            (c[f"F100k_{r}"], c[f"bulk_delta{r}"], c[f"bulk_worst{r}"], c["spec"], c["sample_fraction"], r)
            for c in configs
            for r in refines
        ),
        key=lambda p: (p[0], -p[1]),
    )
    print("\nPareto frontier (F at 100,000 rows, mean bulk delta, worst run, spec, sample share, refine):")
    best = -np.inf
    for p in points:
        if p[1] > best + 1e-9:
            best = p[1]
            print(f"| {p[0]:.3f} | {p[1]:+.3f} | {p[2]:+.2f} | `{p[3]}` | {p[4]:.2f} | {p[5]:g} |")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["features"]:
        features_main(sys.argv[2:])
    elif sys.argv[1:2] == ["sweep"]:
        sweep_main(sys.argv[2:])
    elif sys.argv[1:2] == ["table"]:
        table_main(sys.argv[2:])
    else:
        main()
