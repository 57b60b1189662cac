"""Quality within the target task (issue 29) from a CONTRASTIVE probe direction, offline, on scored runs.

The shipped ``relevance_then_quality`` re-ranks the relevance band (1.5 k, guard 0.5) by a rank sum of the
relevance percentile and the ``loss_full`` percentile. This script measures a quality term that is not a loss:
a "mismatched" probe built from the probe itself (row i's prompt with row (i+1 mod n)'s response: a wrong
answer of this very task, no knowledge of any generator) gives ``g_mis``, the mean head-subspace loss gradient
computed exactly as the probe gradient ``g_clean`` is (``scoring.gradient.probe_gradient``, the run's heads,
the engine's encoding). For each row of the run's 2x relevance band, with ``g_r`` its head-subspace gradient
(``MultiRowGradients``, the exact scorer's pass, with the two directions as two targets):

    q1 = cos(g_r, g_clean) - cos(g_r, g_mis)        q2 = cos(g_r, g_clean - g_mis)        (higher = cleaner)

    # 1. per run (one model load): g_clean, g_mis, the band rows' q1 / q2 -> <cache>/<run>.parquet + .json
    .venv/bin/python -m benchmarks.contrastive_quality compute --runs RUN... --cache runs/s16/h29/contrastive
    # 2. the rules on the cached columns (no model): clean and on-task precision of the top 10 %
    .venv/bin/python -m benchmarks.contrastive_quality evaluate --runs RUN... --cache runs/s16/h29/contrastive \\
        --out benchmarks/results/contrastive_quality/NAME

Each run is a finished exact ``gradient_alignment`` score stage (``config.yaml``, ``heads.json``,
``probe_gradient.safetensors``, ``scores/`` with ``score`` and ``loss_full``). ``compute`` checks that
(a) its recomputed ``g_clean`` is the run's saved probe gradient (cosine of the directions) and (b) the band
rows' cosine with it reproduces the run's ``score`` column (largest |difference|, in the .json).

Rules (``evaluate``): relevance; the shipped rule (``scoring.quality.select_ids``, quality ``loss_full``);
q1 / q2 in place of the loss (``select_ids`` with ``-q`` as the quality column: lowest = cleanest); a
three-term rank sum relevance + w_loss * loss + w_q * q on the product's band (``band_size`` / ``guard_cut`` /
``_pct``; with w_q = 0 it is checked to pick what ``pick_in_band`` picks). Labels, read here only:
``is_clean_on_task`` (precision) and the corpus's ``quality`` column (the AUC diagnosis: clean vs
wrong_answer vs shuffled among the on-task rows of the 2x band).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.probe_typicality import _auc, _cfg, _probe_rows  # run config, probe rows, AUC (ties half)
from p2d_ray.scoring.select import total_k  # the selection's k: fraction x n, rounded half up

FRACTION = 0.10
CHECK_ROWS = 8


def mismatched(rows: list[dict], data) -> list[dict]:
    """Row i's prompt with row (i+1 mod n)'s response: the probe task's own wrong answers."""
    n = len(rows)
    out = []
    for i, row in enumerate(rows):
        nxt = rows[(i + 1) % n]
        if data.prompt_column in row and data.response_column in row:
            out.append({**row, data.response_column: nxt[data.response_column]})
        elif data.messages_column in row:
            from p2d_ray.data.formatting import row_chat

            turns, _ = row_chat(row, data)
            _, answer = row_chat(nxt, data)
            out.append({**row, data.messages_column: turns + [{"role": "assistant", "content": answer}]})
        else:
            raise ValueError("mismatched probe: plain-text rows have no prompt/response to pair")
    return out


def _key(run: str) -> str:
    return Path(run).as_posix().strip("/").replace("/", "+")


def _label(run: str) -> str:
    """``arithmetic/s1`` for ``.../arithmetic/s1/gradient_alignment/task`` (seed 0: ``arithmetic/s0``)."""
    parts = [p for p in Path(run).parts if p not in ("gradient_alignment", "task")]
    if parts[-1][:1] == "s" and parts[-1][1:].isdigit():
        return f"{parts[-2]}/{parts[-1]}"
    return f"{parts[-1]}/s0"


def _gradient(rows: list[dict], cfg, tok, model, heads, pad: int):
    """The mean head-subspace gradient of ``rows``, as the engine computes the probe gradient."""
    from p2d_ray.data.formatting import encode_probe, probe_batches
    from p2d_ray.scoring.gradient import probe_gradient

    batches = probe_batches(encode_probe(rows, tok, cfg.data), cfg.localize.batch_size, pad)
    return probe_gradient(model, heads, batches, {"fingerprint": "offline"}, cfg.score.loss_chunk_tokens)


def cmd_compute(runs: list[str], cache: str, factor: float, threads: int) -> None:
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import torch

    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.data.formatting import collate, encode_row, resolve_format
    from p2d_ray.data.io import rows_hash
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.models.loading import load_model, load_tokenizer
    from p2d_ray.scoring.gradient import MultiRowGradients, ProbeGradient

    torch.set_num_threads(threads)
    Path(cache).mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple] = {}
    for run in runs:
        out = Path(cache, f"{_key(run)}.parquet")
        if out.is_file():
            print(f"{run}: cached {out}")
            continue
        t0 = time.perf_counter()
        cfg = _cfg(run)
        mkey = cfg.model.model_dump_json()
        if mkey not in models:
            models[mkey] = (load_tokenizer(cfg.model), load_model(cfg.model))
        tok, model = models[mkey]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        chunk = cfg.score.loss_chunk_tokens
        heads = HeadSet.load(Path(run, "heads.json"))
        saved = ProbeGradient.load(Path(run, "probe_gradient.safetensors"))
        assert saved.meta["heads_fingerprint"] == heads.fingerprint()
        rows = _probe_rows(cfg)
        assert saved.meta["probe_hash"] == rows_hash(rows), "probe rows differ from the run's"
        mis = mismatched(rows, cfg.data)
        same = sum(
            r[cfg.data.response_column] == m[cfg.data.response_column]
            for r, m in zip(rows, mis, strict=True)
            if cfg.data.response_column in r
        )

        g_clean, g_mis = (_gradient(rs, cfg, tok, model, heads, pad) for rs in (rows, mis))
        t_probe = time.perf_counter() - t0

        def dot(a, b):
            return float(sum((a.direction[m].double() * b.direction[m].double()).sum() for m in a.direction))

        cos_saved = dot(g_clean, saved)
        cos_cm = dot(g_clean, g_mis)
        nc, nm = g_clean.meta["grad_norm"], g_mis.meta["grad_norm"]
        # the contrast's unit direction D = (g_clean - g_mis) / |g_clean - g_mis|, as a third "target"
        diff = {m: nc * g_clean.direction[m] - nm * g_mis.direction[m] for m in g_clean.direction}
        nd = float(torch.sqrt(sum((v.double() ** 2).sum() for v in diff.values())))
        g_diff = ProbeGradient(g_clean.specs, {m: v / nd for m, v in diff.items()}, dict(g_clean.meta))
        mg = MultiRowGradients(model, {"clean": g_clean, "mis": g_mis, "diff": g_diff})

        # the 2x relevance band (rank order of the written score, ties by id), read from the corpus by id
        scores = pads.dataset(str(Path(run, "scores")), format="parquet", ignore_prefixes=["_", "."])
        st = scores.to_table(columns=["id", "score", "loss_full"])
        ids, rel = st.column("id").to_numpy(), st.column("score").to_numpy()
        k = total_k(len(ids), FRACTION, None)
        band_idx = np.lexsort((ids, -rel))[: int(np.ceil(factor * k))]
        band_ids = ids[band_idx].tolist()
        corpus = pads.dataset(corpus_path(cfg), format="parquet")
        by_id = {r["id"]: r for r in corpus.to_table(filter=pads.field("id").isin(band_ids)).to_pylist()}
        fmt = resolve_format(cfg.data, corpus.schema.names)
        enc = [encode_row(by_id[i], tok, cfg.data, fmt) for i in band_ids]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
        cols = {c: np.full(len(enc), np.nan) for c in ("loss", "cos_clean", "cos_mis", "cos_diff")}
        for s in range(0, len(order), 8):
            idx = order[s : s + 8]
            loss, _, d, sq, _ = mg(collate([enc[i] for i in idx], pad), chunk)
            norm = sq[0].double().sqrt()
            for j, name in enumerate(("cos_clean", "cos_mis", "cos_diff")):
                cols[name][idx] = (d[j].double() / norm).numpy()
            cols["loss"][idx] = loss.double().numpy()
        score_b, loss_b = rel[band_idx], st.column("loss_full").to_numpy()[band_idx]
        check_score = float(np.max(np.abs(cols["cos_clean"] - score_b)))
        check_loss = float(np.max(np.abs(cols["loss"] - loss_b)))
        table = pa.table(
            {
                "id": band_ids,
                "score": score_b,
                "loss_full": loss_b,
                "cos_clean": cols["cos_clean"],
                "cos_mis": cols["cos_mis"],
                "q1": cols["cos_clean"] - cols["cos_mis"],
                "q2": cols["cos_diff"],
            }
        )
        pq.write_table(table, out)
        rec = {
            "run": run,
            "n_probe": len(rows),
            "mismatched_pairs_with_same_response": int(same),
            "band_factor": factor,
            "band_rows": len(band_ids),
            "cos_recomputed_vs_saved_probe_gradient": cos_saved,
            "cos_g_clean_g_mis": cos_cm,
            "norm_g_clean": nc,
            "norm_g_mis": nm,
            "check_max_abs_cos_minus_score": check_score,
            "check_max_abs_loss_minus_loss_full": check_loss,
            "seconds_probe_gradients": round(t_probe, 1),
            "seconds_total": round(time.perf_counter() - t0, 1),
        }
        Path(cache, f"{_key(run)}.json").write_text(json.dumps(rec, indent=1))
        print(json.dumps(rec), flush=True)


def load(run_dir: str, cache: str) -> dict:
    """The run's scores (all rows) with labels, q1 / q2 on the 2x band (NaN elsewhere)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from p2d_ray.assets.paths import corpus_path

    cfg = _cfg(run_dir)
    target = _probe_rows(cfg)[0]["task"]
    scores = pads.dataset(str(Path(run_dir, "scores")), format="parquet", ignore_prefixes=["_", "."])
    scores = scores.to_table(columns=["id", "score", "loss_full"])
    corpus = pads.dataset(corpus_path(cfg), format="parquet").to_table()
    label = "is_clean_on_task" if "is_clean_on_task" in corpus.column_names else f"is_clean_on_task_{target}"
    idx = pc.index_in(scores.column("id"), value_set=corpus.column("id")).to_numpy(zero_copy_only=False)
    task = np.array(corpus.column("task").to_pylist(), dtype=object)[idx]
    ids = scores.column("id").to_numpy(zero_copy_only=False)
    band = pq.read_table(Path(cache, f"{_key(run_dir)}.parquet")).to_pydict()
    pos = {i: j for j, i in enumerate(band["id"])}
    run = {
        "run": run_dir,
        "target": target,
        "id": ids,
        "score": scores.column("score").to_numpy(zero_copy_only=False).astype(float),
        "loss_full": scores.column("loss_full").to_numpy(zero_copy_only=False).astype(float),
        "clean": corpus.column(label).to_numpy(zero_copy_only=False)[idx].astype(bool),
        "on_task": task == target,
        "quality": np.array(corpus.column("quality").to_pylist(), dtype=object)[idx],
        "meta": json.loads(Path(cache, f"{_key(run_dir)}.json").read_text()),
    }
    for c in ("q1", "q2", "cos_mis"):
        run[c] = np.array([band[c][pos[i]] if i in pos else np.nan for i in ids.tolist()], float)
        run[f"neg_{c}"] = -run[c]  # the product's quality column: lowest = best
    return run


def three_term(run: dict, k: int, w_loss: float, w_q: float, q: str, band_factor=1.5, guard=0.5):
    """relevance pct + w_loss * loss pct + w_q * (-q) pct on the product's band (size, guard, percentiles)."""
    from p2d_ray.scoring.quality import _pct, band_size, guard_cut

    rel, ids = run["score"], run["id"]
    order = np.lexsort((ids, -rel))
    band = order[: band_size(k, len(ids), band_factor)]
    band = band[: guard_cut(rel[band], k, guard)]
    rel_pct = np.arange(len(band)) / max(len(band) - 1, 1)
    qv = run[f"neg_{q}"][band]
    assert np.isfinite(qv).all(), "the cached band is smaller than the rule's band"
    s = rel_pct + w_loss * _pct(run["loss_full"][band]) + w_q * _pct(qv)
    return ids[band[np.lexsort((np.arange(len(band)), s))[:k]]]


def rules() -> dict[str, dict]:
    out = {"relevance": {"rule": "relevance"}}
    base = {"rule": "relevance_then_quality", "band_factor": 1.5, "guard": 0.5, "quality_weight": 1.0}
    out["shipped (loss)"] = {**base, "quality_column": "loss_full"}
    for q in ("q1", "q2"):
        for w in (1.0, 0.5, 2.0):
            out[f"{q} w{w}"] = {**base, "quality_column": f"neg_{q}", "quality_weight": w}
        for wl, wq in ((1.0, 1.0), (1.0, 0.5), (0.5, 0.5), (0.5, 1.0)):
            out[f"rel+{wl}loss+{wq}{q}"] = {"rule": "three", "q": q, "w_loss": wl, "w_q": wq}
    return out


def select(run: dict, k: int, rule: dict) -> np.ndarray:
    from p2d_ray.scoring.quality import select_ids

    if rule["rule"] == "three":
        return three_term(run, k, rule["w_loss"], rule["w_q"], rule["q"])
    params = {key: v for key, v in rule.items() if key != "rule"}
    return select_ids(run, k, rule["rule"], **params)[0]


def describe(run: dict) -> dict:
    """AUC (higher term = cleaner) among the on-task rows of the 2x band: clean vs each corruption."""
    m = np.isfinite(run["q1"]) & run["on_task"]
    terms = {
        "q1": run["q1"],
        "q2": run["q2"],
        "-loss_full": -run["loss_full"],
        "score": run["score"],
        "-cos_mis": -run["cos_mis"],
    }
    cl = m & run["clean"]
    out = {"band2x_on_task": int(m.sum()), "band2x_clean": int(cl.sum())}
    for kind in sorted({q for q in run["quality"][m & ~run["clean"]] if q is not None}):
        bad = m & (run["quality"] == kind)
        out[f"n_{kind}"] = int(bad.sum())
        for name, v in terms.items():
            out[f"auc_{name}_clean_vs_{kind}"] = _auc(v[cl], v[bad])
    from p2d_ray.scoring.quality import _pct

    for a, b in (("q1", "score"), ("q1", "-loss_full"), ("q2", "score"), ("q2", "-loss_full")):
        # Spearman: the Pearson correlation of the percentile ranks
        out[f"spearman_{a}_{b}"] = float(np.corrcoef(_pct(terms[a][m]), _pct(terms[b][m]))[0, 1])
    for name, v in terms.items():
        out[f"auc_{name}_clean_vs_corrupt"] = _auc(v[cl], v[m & ~run["clean"]])
    return out


def evaluate(run: dict, rules_: dict) -> dict:
    from p2d_ray.scoring.quality import pick_in_band

    k = total_k(len(run["id"]), FRACTION, None)
    # the three-term rule with w_q = 0 is the shipped rule: a check of three_term against the product
    pick, _ = pick_in_band(run["score"], run["loss_full"], run["id"], k, 1.5, 0.5, quality_weight=1.0)
    assert set(run["id"][pick]) == set(three_term(run, k, 1.0, 0.0, "q1"))
    res = {}
    for name, rule in rules_.items():
        mask = np.isin(run["id"], select(run, k, rule))
        assert mask.sum() == k
        res[name] = {"clean": float(run["clean"][mask].mean()), "on_task": float(run["on_task"][mask].mean())}
    return res


def cmd_evaluate(runs: list[str], cache: str, out: str | None) -> None:
    rules_ = rules()
    table = {}
    for r in runs:
        run = load(r, cache)
        table[r] = {
            "target": run["target"],
            "meta": run["meta"],
            "describe": describe(run),
            "rules": evaluate(run, rules_),
        }
    names = list(rules_)
    hdr = "| rule | " + " | ".join(_label(r) for r in runs)
    lines = [
        f"runs: {', '.join(runs)}",
        "",
        hdr + " | mean clean | worst clean | mean on-task |",
        "|---" * (len(runs) + 4) + "|",
    ]
    for name in names:
        c = [table[r]["rules"][name]["clean"] for r in runs]
        o = [table[r]["rules"][name]["on_task"] for r in runs]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{a:.2f} ({b:.2f})" for a, b in zip(c, o, strict=True))
            + f" | {np.mean(c):.3f} | {np.min(c):.3f} | {np.mean(o):.3f} |"
        )
    targets = sorted({table[r]["target"] for r in runs})
    lines += [
        "",
        "Per target: clean precision mean / worst (on-task mean)",
        "",
        "| rule | " + " | ".join(targets) + " |",
        "|---" * (len(targets) + 1) + "|",
    ]
    for name in names:
        cells = []
        for t in targets:
            rs = [r for r in runs if table[r]["target"] == t]
            c = [table[r]["rules"][name]["clean"] for r in rs]
            o = [table[r]["rules"][name]["on_task"] for r in rs]
            cells.append(f"{np.mean(c):.3f} / {np.min(c):.2f} ({np.mean(o):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "AUC among the 2x band's on-task rows (higher term = cleaner; 0.5 = chance):", ""]
    keys = sorted({key for r in runs for key in table[r]["describe"] if key.startswith("auc_")})
    lines.append("| term | " + " | ".join(_label(r) for r in runs) + " |")
    lines.append("|---" * (len(runs) + 1) + "|")
    for key in keys:
        vals = [table[r]["describe"].get(key) for r in runs]
        lines.append(f"| {key[4:]} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    lines += ["", "AUC, mean over each target's runs (runs where the kind is in the band)", ""]
    lines.append("| term | " + " | ".join(targets) + " |")
    lines.append("|---" * (len(targets) + 1) + "|")
    for key in keys:
        cells = []
        for t in targets:
            v = [table[r]["describe"].get(key) for r in runs if table[r]["target"] == t]
            v = [x for x in v if x is not None]
            cells.append(f"{np.mean(v):.2f} ({len(v)})" if v else "-")
        lines.append(f"| {key[4:]} | " + " | ".join(cells) + " |")
    lines += ["", "Spearman among the 2x band's on-task rows", ""]
    lines.append("| pair | " + " | ".join(_label(r) for r in runs) + " |")
    lines.append("|---" * (len(runs) + 1) + "|")
    for key in sorted(k for k in table[runs[0]]["describe"] if k.startswith("spearman_")):
        vals = [table[r]["describe"][key] for r in runs]
        lines.append(f"| {key[9:]} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines += [
        "",
        "| run | n band2x on-task (clean/wrong/shuffled) | cos(g_clean, g_mis) | cos(recomputed, saved G) "
        "| max abs(cos - score) | max abs(loss - loss_full) | s |",
        "|---" * 7 + "|",
    ]
    for r in runs:
        d, m = table[r]["describe"], table[r]["meta"]
        lines.append(
            f"| {r} | {d['band2x_on_task']} ({d['band2x_clean']}/{d.get('n_wrong_answer', 0)}/"
            f"{d.get('n_shuffled', 0)}) | {m['cos_g_clean_g_mis']:.3f} | "
            f"{m['cos_recomputed_vs_saved_probe_gradient']:.6f} | {m['check_max_abs_cos_minus_score']:.1e} | "
            f"{m['check_max_abs_loss_minus_loss_full']:.1e} | {m['seconds_total']} |"
        )
    print("\n".join(lines))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "results.json").write_text(
            json.dumps({"runs": table, "rules": rules_}, indent=1, default=str)
        )
        Path(out, "table.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("compute", "evaluate"))
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--cache", default="runs/s16/h29/contrastive")
    ap.add_argument("--band", type=float, default=2.0, help="compute: the band's rows, x k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.command == "compute":
        cmd_compute(args.runs, args.cache, args.band, args.threads)
    else:
        cmd_evaluate(args.runs, args.cache, args.out)


if __name__ == "__main__":
    main()
