"""Stage 2 planning: everything about a scoring run resolved and checked on the driver, before any work.

Model config and context length, heads (``heads.json`` must fit the model), corpus shards (footers only),
prompt format, ICL demonstrations (fixed by seed) and the fingerprint of everything the scores depend on
(a resumed run must match it, or it refuses to mix scores).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import pyarrow as pa

from p2d_ray.config import SCORE_RESOURCE_FIELDS, P2DConfig
from p2d_ray.heads.headset import HeadSet
from p2d_ray.rundir import RunDir
from p2d_ray.scoring.scorers import USES_HEADS
from p2d_ray.scoring.shards import Shard, list_parquet_files, plan_shards, read_footer

ALIGNMENT_FIELDS = ("alignment_eps", "alignment_method", "alignment_normalize", "alignment_probe_rows")
DISTILL_FIELDS = (
    "strategy",
    "distill_min_rows",
    "distill_sample_fraction",
    "distill_sample_min",
    "distill_sample_max",
    "distill_audit_rows",
    "distill_layer",
    "distill_seed",
    "distill_folds",
    "distill_cascade_layer",
    "distill_cascade_fraction",
    "refine_fraction",
    "gate_min_spearman",
    "gate_min_recall",
    "gate_top_fraction",
    "gate_fallback",
    "distill_ood_factor",
    "distill_ood_exact",
)


@dataclass
class ScorePlan:
    """Everything the Ray pass needs, resolved and checked on the driver."""

    shards: list[Shard]
    id_type: pa.DataType
    fmt: str
    text_columns: list[str]
    demos: list[dict]
    heads: HeadSet | None
    model_json: str  # ModelConfig with the resolved local path, for the workers
    manifest: dict
    fingerprint: str
    provenance: dict = field(default_factory=dict)
    # The probe rows the scorer uses: icl_attention's query pool, gradient_alignment's probe-gradient rows
    probe_rows: list[dict] = field(default_factory=list)
    gradient_fingerprint: str | None = None  # gradient_alignment: which probe gradient the scores need
    strategy: str = "exact"  # score.strategy resolved: exact | distilled (scoring/distill.py)
    strategy_reason: str = ""
    distill_layer: int | None = None  # distilled: l_f, the layer the truncated forward stops at
    # Several targets in one pass (scoring/targets.py): {name: {cfg, heads, probe_rows, gradient_fingerprint}}
    targets: dict = field(default_factory=dict)
    cascade_layer: int | None = None  # distilled: l_c, the cascade's layer (None: no cascade)


def _context_length(hf_config) -> int | None:
    return getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)


def text_columns_for(d, names) -> list[str]:
    """The columns encode_row reads: prompt and response (and an Alpaca input) when a row has both, else
    the messages of a chat row, else the text column (``data.columns.read_columns``)."""
    from p2d_ray.data.columns import read_columns

    return read_columns(d, names)


def pick_demos(probe_rows: list[dict], k: int, seed: int) -> list[dict]:
    """P2D's selection prompt: k probe-set demonstrations, fixed for a run by ``seed``."""
    if len(probe_rows) < k:
        raise ValueError(f"data.icl_k={k} but the probe set has only {len(probe_rows)} rows")
    picked = sorted(random.Random(seed).sample(range(len(probe_rows)), k))
    return [probe_rows[i] for i in picked]


def plan_score(cfg: P2DConfig, selects: list | None = None) -> ScorePlan:
    """Resolve and check model, heads, corpus and prompt format. Raises ValueError before any work.

    ``selects``: the SelectConfig of every target the pass scores for (default: ``cfg.select``); with the
    distilled strategy they size the refine bands (scoring/distill.refine_rows)."""
    from p2d_ray.models.loading import resolve_path
    from p2d_ray.scoring.distill import refine_rows
    from p2d_ray.scoring.features import distill_layer

    d, s = cfg.data, cfg.score
    model = _check_model(cfg)
    heads = _check_heads(cfg, model) if USES_HEADS[s.scorer] else None
    corpus, shards, id_type, fmt, text_columns = _corpus_layout(cfg)
    if s.scorer == "icl_attention":
        _check_icl_contexts(cfg, fmt, model.context)
    probe = _read_probe(cfg, fmt)
    demos = pick_demos(probe, d.icl_k, cfg.seed) if fmt == "icl" else []
    # The probe rows the scorer itself uses: icl_attention's query pool, or the rows of the probe gradient.
    # They travel in the plan, so what is hashed into the fingerprint is exactly what gets used.
    probe_rows = {"icl_attention": probe, "gradient_alignment": probe[: s.alignment_probe_rows]}.get(
        s.scorer, []
    )
    selects = selects or [cfg.select]
    n_rows = sum(sh.num_rows for sh in shards)
    strategy, why = resolve_strategy(s, n_rows, model.hf_config, selects)
    identity = _identity(cfg, corpus, fmt, heads, demos, probe_rows, model.fingerprint, strategy)
    if strategy == "distilled":  # the refine bands the selection sizes are part of what the scores are
        identity["score"]["refine_rows"] = [refine_rows(s, sel, n_rows) for sel in selects]
    fingerprint = _hash(identity)
    manifest = {
        "fingerprint": fingerprint,
        "identity": identity,
        "scorer": s.scorer,
        "corpus": corpus,
        "icl_demos": demos,
        "shards": [sh.to_dict() for sh in shards],
    }
    provenance = {
        "scorer": s.scorer,
        "gate_mode": s.gate_mode if heads is not None else None,
        "heads_fingerprint": identity["heads"],
        "config_fingerprint": fingerprint,
        "model_fingerprint": model.fingerprint,
        "format": fmt,
        "icl_demo_ids": [r.get(d.id_column) for r in demos],
        "probe_gradient_fingerprint": identity["probe_gradient"],
        "strategy": strategy,
    }
    model_json = cfg.model.model_copy(update={"name_or_path": resolve_path(cfg.model)}).model_dump_json()
    return ScorePlan(
        shards,
        id_type,
        fmt,
        text_columns,
        demos,
        heads,
        model_json,
        manifest,
        fingerprint,
        provenance,
        probe_rows,
        identity["probe_gradient"],
        strategy,
        why,
        distill_layer(s, model.hf_config) if strategy == "distilled" else None,
        cascade_layer=_cascade_layer(s, model.hf_config, selects, n_rows)
        if strategy == "distilled"
        else None,
    )


def _cascade_layer(s, hf_config, selects: list, n_rows: int) -> int | None:
    """l_c where the cascade runs: its layer (features.cascade_layer, which also checks an explicit one), or
    None where it is off or cannot change what is refined (distill.cascade_needed)."""
    from p2d_ray.scoring.distill import cascade_needed
    from p2d_ray.scoring.features import cascade_layer

    l_c = cascade_layer(s, hf_config)
    return l_c if l_c is not None and cascade_needed(s, selects, n_rows) else None


def resolve_strategy(s, n_rows: int, hf_config, selects: list) -> tuple[str, str]:
    """``score.strategy`` -> (exact | distilled, why). auto: distilled from ``distill_min_rows`` rows up; a
    distilled run whose sample would be the whole corpus is exact (the same scores, without the detour).
    ``selects``: every target's SelectConfig (they size the refine bands and so decide the cascade)."""
    from p2d_ray.scoring.distill import refine_rows, sample_size
    from p2d_ray.scoring.features import distill_layer

    if s.strategy == "exact":
        return "exact", "score.strategy=exact"
    if s.scorer == "icl_attention":
        if s.strategy == "distilled":
            raise ValueError("score.strategy=distilled needs a batch scorer; icl_attention scores contexts")
        return "exact", "score.strategy=auto: icl_attention scores contexts, not rows"
    if s.scorer == "noop":
        if s.strategy == "distilled":
            raise ValueError("score.strategy=distilled needs a model scorer; noop computes nothing to distil")
        return "exact", "score.strategy=auto: noop"
    if s.strategy == "auto" and s.scorer != "gradient_alignment":  # one or two forwards a row: little to save
        return "exact", f"score.strategy=auto: distilled only replaces gradient_alignment (scorer {s.scorer})"
    if s.strategy == "auto" and n_rows < s.distill_min_rows:
        return (
            "exact",
            f"score.strategy=auto: {n_rows:,} rows < score.distill_min_rows={s.distill_min_rows:,}",
        )
    n_sample = sample_size(n_rows, s)
    if n_sample + s.distill_audit_rows >= n_rows:
        return (
            "exact",
            f"{n_rows:,} rows: the distilled sample ({n_sample:,} + audit) would be the whole corpus",
        )
    layer, l_c = distill_layer(s, hf_config), _cascade_layer(s, hf_config, selects, n_rows)
    cascade = f", its top {s.distill_cascade_fraction:.0%} again from layer {l_c}" if l_c is not None else ""
    bands = sorted({refine_rows(s, sel, n_rows) for sel in selects})
    band = "/".join(f"{b:,}" for b in bands)
    whose = (
        "the selection's band" if s.refine_fraction is None else f"score.refine_fraction={s.refine_fraction}"
    )
    return "distilled", (
        f"score.strategy={s.strategy}: {n_rows:,} rows, {n_sample:,} scored exactly (+{s.distill_audit_rows} "
        f"audit), the rest predicted from layer {layer}{cascade}; the predicted top {band} rescored exactly "
        f"({whose})"
    )


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs of the model, read once: its HF config, context length (tokens; None when the
    config names none) and fingerprint (hashes the weights' first MiB)."""

    hf_config: object
    context: int | None
    fingerprint: str


def _check_model(cfg: P2DConfig) -> ModelFacts:
    """The model's weights are loadable safely and its family is supported; ``data.max_length`` fits its
    context."""
    from p2d_ray.models.loading import load_config_checked, model_fingerprint, weights_problems

    problems = weights_problems(cfg.model)  # e.g. pickle-only weights: refused here, not inside an actor
    if problems:
        raise ValueError("; ".join(problems))
    hf_config = load_config_checked(cfg.model)
    ctx = _context_length(hf_config)
    if ctx is not None and cfg.data.max_length > ctx:
        raise ValueError(f"data.max_length={cfg.data.max_length} exceeds the model's context length ({ctx})")
    return ModelFacts(hf_config, ctx, model_fingerprint(cfg.model))


def _check_heads(cfg: P2DConfig, model: ModelFacts) -> HeadSet:
    """``<run_dir>/heads.json``, checked to fit this model (shape and fingerprint) and to be non-empty."""
    from p2d_ray.models.geometry import geometry_from_config

    path = RunDir(cfg.run_dir).heads_json
    heads = HeadSet.load(path)
    heads.check_fits(geometry_from_config(model.hf_config))
    heads.check_model(model.fingerprint, cfg.model.name_or_path)
    if len(heads) == 0:
        raise ValueError(f"{path} lists no heads; scorer {cfg.score.scorer!r} needs some")
    return heads


def _corpus_layout(cfg: P2DConfig):
    """The corpus as Parquet shards (footers only) and its prompt format.
    Returns ``(corpus path, shards, id type, format, text columns)``."""
    from p2d_ray.assets.paths import corpus_parquet
    from p2d_ray.data.columns import warn_unread
    from p2d_ray.data.formatting import resolve_format

    d = cfg.data
    corpus = corpus_parquet(cfg)  # the source itself when Parquet, else its shards ingested into run_dir
    files = list_parquet_files(corpus)
    first = read_footer(files[0]).schema.to_arrow_schema()
    fmt = resolve_format(d, first.names)
    text_columns = text_columns_for(d, first.names)
    warn_unread(d, fmt, first.names, f"corpus {corpus}")
    if cfg.score.scorer == "ifd" and fmt == "plain":
        raise ValueError(
            "score.scorer=ifd needs a prompt and a response per row (IFD = loss of the response given the "
            f"prompt / loss of the response alone); data.format resolved to 'plain' for columns {first.names}"
        )
    shards, schema = plan_shards(corpus, [d.id_column, *text_columns], files=files)
    return corpus, shards, canonical_id_type(schema.field(d.id_column).type), fmt, text_columns


def _check_icl_contexts(cfg: P2DConfig, fmt: str, ctx: int | None) -> None:
    """icl_attention: its own contexts are the prompt format, and they fit the model."""
    s, d = cfg.score, cfg.data
    if fmt == "icl":
        raise ValueError(
            "score.scorer=icl_attention builds its own ICL contexts; data.format=icl would nest probe "
            "demonstrations inside every row: use chat, prompt_response or plain"
        )
    need = (s.icl_demos + s.icl_queries) * d.max_length + 64
    if ctx is not None and need > ctx:
        raise ValueError(
            f"score.icl_demos + score.icl_queries = {s.icl_demos + s.icl_queries} rows of up to "
            f"data.max_length={d.max_length} tokens ({need}) exceed the model's context length ({ctx})"
        )


def _read_probe(cfg: P2DConfig, fmt: str) -> list[dict]:
    """The probe set, read once when anything of the run uses it (ICL demonstrations, icl_attention's
    queries, the probe gradient); else ``[]``."""
    from p2d_ray.assets.paths import probe_path
    from p2d_ray.data.io import read_rows

    s = cfg.score
    if fmt != "icl" and s.scorer not in ("icl_attention", "gradient_alignment"):
        return []
    # The probe gradient alone needs only its first rows (a Parquet probe is read only that far).
    limit = s.alignment_probe_rows if fmt != "icl" and s.scorer == "gradient_alignment" else None
    return read_rows(probe_path(cfg), limit, "data.probe_path", cfg.data, cfg.data.probe_column_map)


def _identity(
    cfg: P2DConfig,
    corpus: str,
    fmt: str,
    heads,
    demos: list[dict],
    probe_rows: list[dict],
    model_fp: str,
    strategy: str = "exact",
) -> dict:
    """What the scores depend on (hashed into the run's fingerprint; a resume must match it). Not: where the
    corpus lives (its shards are compared separately), resource knobs, and settings the chosen format /
    scorer ignores (changing them must not block a resume)."""
    from p2d_ray.assets.paths import corpus_path
    from p2d_ray.data.ingest import ingested
    from p2d_ray.data.io import rows_hash

    s = cfg.score
    data = cfg.data.model_dump(
        mode="json",
        exclude={"corpus_path", "corpus_config", "corpus_split", "probe_path"}
        | (set() if fmt == "icl" else {"icl_k", "icl_instruction"}),
    )
    icl_keys = {k for k in type(s).model_fields if k.startswith("icl_")}
    score = s.model_dump(
        mode="json",
        exclude=set(SCORE_RESOURCE_FIELDS)
        | (set() if s.scorer == "influence" else {"gate_mode"})
        | (set() if s.scorer == "icl_attention" else icl_keys)
        | (set() if s.scorer == "gradient_alignment" else set(ALIGNMENT_FIELDS))
        # exact: the strategy's knobs are not hashed, so an exact run's fingerprint is what it always was
        | (set() if strategy == "distilled" else set(DISTILL_FIELDS)),
    )
    if strategy == "distilled":
        score["strategy"] = "distilled"  # resolved (auto -> distilled)
    grad_fp = None
    if s.scorer == "gradient_alignment":
        from p2d_ray.scoring.gradient import gradient_fingerprint

        grad_fp = gradient_fingerprint(model_fp, heads, rows_hash(probe_rows), data)
    identity = {
        "model": cfg.model.model_dump(mode="json", exclude={"device"}),
        "model_fingerprint": model_fp,
        "data": data,
        "format": fmt,
        "score": score,
        "heads": heads.fingerprint() if heads is not None else None,
        "icl_demos": rows_hash(demos) if demos else None,
        "probe_gradient": grad_fp,
    }
    ingest = ingested(cfg.run_dir) if corpus != corpus_path(cfg) else None
    if ingest is not None:  # a changed JSONL / datasets source is re-ingested under the same file names
        identity["corpus_source"] = ingest["fingerprint"]
    if s.scorer == "icl_attention":  # only here, so the other scorers' fingerprints stay as they were
        identity["icl_probe"] = rows_hash(probe_rows)
    return identity


def canonical_id_type(t: pa.DataType) -> pa.DataType:
    """One id type for every block (files may differ: int32 vs int64, string vs large_string)."""
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
