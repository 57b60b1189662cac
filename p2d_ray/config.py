"""Typed configuration for every P2D stage.

One YAML file describes a run; ``key=value`` overrides (dotted paths, YAML-typed values) are applied on
top. Unknown keys, wrong types and contradictory combinations are all reported together in a single
:class:`ConfigError` before any work starts. The resolved config is written next to the outputs
(``<run_dir>/config.yaml``) so every result says exactly what produced it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """Every problem found in a config, listed in one message."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    # extra="forbid": a typo in a key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # Asset names (p2d_ray.assets): "smollm2-135m" (SmolLM2-135M-Instruct, installed by make install) and
    # "p2d-demo" (a tiny Llama built offline in ~2 CPU-min); anything else is a hub id or a local path.
    name_or_path: str = "p2d-demo"
    revision: str | None = None
    trust_remote_code: bool = False  # secure default: never run code shipped with a checkpoint
    use_safetensors: bool = True  # secure default: refuse pickle (.bin) weights
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


# Roles a dataset's columns play (DataConfig's *_column fields; the keys of a column map).
COLUMN_ROLES = ("id", "prompt", "response", "text", "input", "messages")


class DataConfig(_Section):
    """Where the probe set and the corpus live, and how a row becomes tokens."""

    probe_path: str | None = None  # ~100 task samples (Parquet or JSONL); None = demo probe set
    # Parquet / JSONL / CSV file, directory or glob (local or s3://), a `datasets` save_to_disk directory, or a
    # dataset name (org/name); non-Parquet is ingested once into <run_dir>/corpus/. None = demo corpus.
    corpus_path: str | None = None
    corpus_config: str | None = None  # dataset name / save_to_disk only: the config (subset) name
    corpus_split: str = "train"  # dataset name / save_to_disk only: the split
    # The demo's target task when probe/corpus/held-out paths are None (p2d_ray.assets.synthetic.TARGETS).
    demo_target: Literal["arithmetic", "units"] = "arithmetic"
    # The corpus's columns by role (the probe / held-out sets use them too unless mapped otherwise).
    id_column: str = "id"
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # Alpaca's `input`: when a row has it (non-empty), it is appended to the prompt ("<prompt>\n\n<input>").
    input_column: str = "input"
    # Chat rows (HF / TRL): a list of {role, content}; the last turn (assistant) is the scored target, the
    # turns before it the prompt, rendered by the chat template. Used when a row has no prompt/response.
    messages_column: str = "messages"
    # torchtune-style column map of the probe set, {role: the probe's column}, roles id / prompt / response /
    # text / input / messages: e.g. {prompt: question, response: answer} when the probe names them so.
    probe_column_map: dict[Literal[COLUMN_ROLES], str] = Field(default_factory=dict)  # type: ignore[valid-type]
    # auto: prompt/response if both columns exist, else chat if a messages column exists, else plain text.
    format: Literal["auto", "plain", "prompt_response", "chat", "icl"] = "auto"
    # format=chat: the system message. None = the chat template's own default (SmolLM2's adds ~20 tokens
    # to every row: "You are a helpful AI assistant named SmolLM..."); "" = an empty system message.
    system_prompt: str | None = None
    icl_k: int = Field(3, ge=0, le=32)  # demonstrations from the probe set for format=icl
    icl_instruction: str = "Here are examples of the target task."
    max_length: int = Field(256, ge=8)
    overlong: Literal["truncate", "quarantine"] = "truncate"


class LocalizeConfig(_Section):
    method: Literal["gradient", "fisher", "alps"] = "gradient"
    top_fraction: float = Field(0.10, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # overrides top_fraction when set
    batch_size: int = Field(8, ge=1)
    max_probe_samples: int = Field(100, ge=1)
    alps_steps: int = Field(20, ge=1)
    alps_lr: float = Field(1e-2, gt=0)
    torch_threads: int | None = Field(None, ge=1)  # None: every CPU this process may use
    # corpus: rank heads by importance on the probe / importance on the first contrast_samples corpus rows
    # (drops heads that every input needs); none: importance on the probe alone (the paper's proxy).
    contrast: Literal["none", "corpus"] = "none"
    contrast_samples: int = Field(100, ge=1)
    # random_heads: the falsification control -- random heads with the task heads' count per layer
    # (seeded by the run seed) replace the task heads for scoring and training.
    control: Literal["none", "random_heads"] = "none"


class ScoreConfig(_Section):
    scorer: Literal[
        "influence", "activation", "perplexity", "ifd", "icl_attention", "gradient_alignment", "noop"
        # Default by measurement (RESULTS.md): head-subspace gradient alignment is the only scorer that selects the
        # task on the demo corpus with SmolLM2; influence / perplexity / ifd / icl_attention stay as baselines.
    ] = "gradient_alignment"
    gate_mode: Literal["zero", "uniform"] = "zero"
    batch_size: int = Field(16, ge=1)
    # Actor pool: same shape drives 1 CPU actor on a laptop and 64 GPU actors on a fleet.
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    num_cpus_per_actor: float = Field(0.5, gt=0)  # fractional: two 1-CPU actors deadlock a 2-CPU node
    num_gpus_per_actor: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    blocks_per_actor: int = Field(4, ge=1)  # repartition so every actor gets work
    loss_chunk_tokens: int = Field(1024, ge=16)  # never materialise [B, T, V] log-probs at once
    # Memory of a scoring actor (BENCHMARKS.md, "Scoring actors' memory"): a micro-batch is cut into pieces of
    # at most max_batch_tokens padded tokens (None: batch_size rows whatever their length), and the C heap's
    # free pages go back to the OS after every call (release_memory).
    max_batch_tokens: int | None = Field(None, ge=16)
    release_memory: bool = False
    # Length bucketing: each actor call takes batch_size * bucket_batches rows, sorts them by length and
    # scores them in micro-batches of batch_size, so padding stays small (demo corpus, batch 32: 256-row
    # windows pad 11.5% of tokens, 1024-row windows 3%).
    bucket_batches: int = Field(32, ge=1)
    max_rows_per_block: int = Field(4096, ge=1)  # upper bound on rows per block (load balance, memory)
    num_cpus_per_tokenize_task: float = Field(1.0, gt=0)
    # influence: full and gated passes in ONE forward of the batch stacked twice with per-sample gates
    # [2B, L, H] (2x activation memory), or two forwards. Same CPU cost measured here (BENCHMARKS.md);
    # try true on GPUs, where a small batch underuses the device.
    influence_fused: bool = False
    # Duplicate-id check: on the driver with pyarrow up to this many corpus rows (a Ray shuffle costs seconds
    # of fixed overhead), as a Ray Data hash aggregation above it (never collects 10M ids on the driver).
    local_dedup_max_rows: int = Field(1_000_000, ge=0)
    # Wait this long for min_actors to start before dispatching (0: do not wait); an autoscaling cluster may
    # need minutes to add GPU nodes. Past it, the run fails with a timeout instead of hanging.
    actor_start_timeout_s: int = Field(900, ge=0)
    # icl_attention (scoring/icl.py): contexts of icl_demos corpus rows + icl_queries probe rows, each row in
    # icl_repeats contexts drawn (seeded by icl_seed) from groups of icl_pool consecutive rows of a shard.
    icl_demos: int = Field(8, ge=1, le=64)
    icl_queries: int = Field(2, ge=1, le=16)
    icl_repeats: int = Field(1, ge=1)
    icl_seed: int = 0
    icl_pool: int = Field(64, ge=1)
    # likelihood: w x exp(-mean NLL of the queries' answers) from the full forward; none: w alone (the
    # forward stops after the highest task-head layer). none by measurement: the metric changed top-10%
    # precision by -0.1..+0.2 on SmolLM2 (no consistent gain) and costs 1.55x vs 0.89x a plain forward.
    icl_metric: Literal["likelihood", "none"] = "none"
    # Divide a weight by its slot's mean weight over the group's contexts (recency bias; RESULTS.md).
    icl_position_debias: bool = True
    icl_instruction: str = (
        "Below are some demonstrations of how to answer. Answer the questions after them the same way."
    )
    # gradient_alignment (scoring/gradient.py): how <g_i, G> is computed (exact: one batched backward with
    # per-row gradient slices, also gives |g_i|; central / forward: finite differences of forwards, O(eps^2) /
    # O(eps) error), the finite-difference step along the unit probe gradient, how the alignment is normalised
    # (cosine: / |g_i|, needs exact; loss: / L_i; none), and how many probe rows make the gradient (computed
    # once per run on the driver). exact + cosine by measurement (RESULTS.md, Session 5).
    alignment_method: Literal["exact", "central", "forward"] = "exact"
    alignment_eps: float = Field(0.05, gt=0)
    alignment_normalize: Literal["cosine", "loss", "none"] = "cosine"
    alignment_probe_rows: int = Field(100, ge=1)
    # Scoring strategy (scoring/distill.py). exact: the scorer on every row. distilled: the scorer on a seeded
    # sample (stratified by shard) + a ridge regressor on pooled residual-stream features from a forward that
    # stops at layer distill_layer predicts the rest; the predicted top band (refine_fraction) is re-scored
    # exactly; a fidelity gate (k-fold + a fresh audit sample) falls back to exact below thresholds.
    # auto: distilled from distill_min_rows corpus rows up (resolved in plan.py; the 300-row demo stays exact).
    strategy: Literal["auto", "exact", "distilled"] = "auto"
    distill_min_rows: int = Field(5000, ge=1)
    distill_sample_fraction: float = Field(0.02, gt=0, le=1)
    distill_sample_min: int = Field(1000, ge=2)
    distill_sample_max: int = Field(100_000, ge=2)
    distill_audit_rows: int = Field(200, ge=0)  # a fresh sample scored exactly, never fitted on
    distill_layer: int | None = Field(None, ge=1)  # None: round(L / 10), at least 1
    distill_seed: int = 0
    distill_folds: int = Field(5, ge=2)
    # The cascade: the stage-1 predicted top distill_cascade_fraction of the corpus is re-predicted by a second
    # ridge on pooled features from a forward that stops at distill_cascade_layer (fitted on the sample's
    # features at that layer, written by the sample pass), those rows rank first, and the refine band is taken
    # from that ranking. None: round(L / 2) (15 of 30 on SmolLM2: the offline frontier's best second stage,
    # layers 9 and 12 worse; RESULTS.md Session 11); no cascade where that is not above distill_layer (a
    # 2-layer model). An explicit layer must lie above distill_layer and below the last layer. Fraction 0: off.
    # 0.1 by measurement (RESULTS.md Session 12, issue 24: four SmolLM2 3,000-row corpora through the engine):
    # with refine_fraction 0.05 the only point within 0.05 of exact on every corpus (-0.02 mean, -0.05 worst)
    # at <= 0.35 forwards per row (0.34 at 100,000 rows); 0.15 costs 0.02 more and was no better. Since
    # Session 14 it runs only where a refine band is smaller than its band (refine_fraction below).
    distill_cascade_layer: int | None = Field(None, ge=2)
    distill_cascade_fraction: float = Field(0.1, ge=0, le=1)
    # The refine band: the rows re-scored exactly, from the predicted top (with the cascade, from its ranking).
    # None (default): the selection's band, select.band_factor x its k (per target, its own k), so every row
    # the selection looks at is ranked by exact scores and has the loss the quality rule reads. A share of the
    # corpus (0: off) instead caps the cost. Why (RESULTS.md / BENCHMARKS.md Session 14, issue 24): at 10,000
    # rows (1,200 exact) a band of 5 % left 40 % of the picks ranked by prediction alone, 0.73 clean against
    # ~0.87 for exact; the selection's band (15 %) gave 0.85, with the frontier 0.73 / 0.75 / 0.76 / 0.80 at
    # 5 / 7.5 / 10 / 12.5 % (benchmarks/refine_frontier.py). Its price: nothing at 10,000 rows (1,234 vs 1,235
    # busy s: the cascade it replaces cost as much), ~0.1 forwards per row at scale (0.51 vs 0.41 from 100,000
    # rows by those runs' terms; exact 2.4). Session 12 chose 0.05 on 3,000-row corpora a third exact, which hid
    # the loss. When the band covers the cascade's, the cascade is skipped: it could not change which rows are
    # refined (so with the defaults it runs only for a target that selects fewer rows than the cascade band).
    refine_fraction: float | None = Field(None, ge=0, le=1)
    gate_min_spearman: float = Field(0.5, ge=-1, le=1)  # k-fold and audit held-out Spearman
    gate_min_recall: float = Field(0.4, ge=0, le=1)  # exact top select-fraction within the predicted top
    gate_top_fraction: float = Field(0.10, gt=0, le=1)
    gate_fallback: Literal["exact", "warn"] = "exact"
    # a row is out of distribution past distill_ood_factor x the sample's largest distance
    distill_ood_factor: float = Field(1.5, gt=0)
    distill_ood_exact: bool = True  # score out-of-distribution rows exactly (in the refine pass)

    @model_validator(mode="after")
    def _pool(self) -> ScoreConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        l_f, l_c = self.distill_layer, self.distill_cascade_layer
        if l_c is not None and l_f is not None and l_c <= l_f:  # below the last layer: checked at plan time
            raise ValueError(f"distill_cascade_layer ({l_c}) must be above distill_layer ({l_f})")
        if self.alignment_normalize == "cosine" and self.alignment_method != "exact":
            if "alignment_normalize" not in self.model_fields_set:
                # A finite-difference method without a chosen normalisation (e.g. a run saved before
                # `exact` existed) keeps the loss normalisation it always had.
                self.alignment_normalize = "loss"
                return self
            raise ValueError(
                f"alignment_normalize=cosine needs the row gradient's norm, which only alignment_method=exact "
                f"computes (got {self.alignment_method!r}); use alignment_normalize=loss with finite differences"
            )
        return self


# ScoreConfig fields that change how fast scores are computed, not what they are: a resumed run may
# change them (e.g. a smaller batch after an OOM, more actors) and still add to the same scores.
SCORE_RESOURCE_FIELDS = (
    "batch_size",
    "min_actors",
    "max_actors",
    "num_cpus_per_actor",
    "num_gpus_per_actor",
    "torch_threads",
    "blocks_per_actor",
    "loss_chunk_tokens",
    "max_batch_tokens",
    "release_memory",
    "bucket_batches",
    "max_rows_per_block",
    "num_cpus_per_tokenize_task",
    "influence_fused",
    "local_dedup_max_rows",
    "actor_start_timeout_s",
)


class SelectConfig(_Section):
    fraction: float | None = Field(0.10, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # overrides fraction when set
    stratify_by: str | None = None  # a corpus column: fraction / top_k is allocated per stratum
    # Which scores column ranks the rows: "score" (the run's scorer), or e.g. "loss_full" with
    # ascending=true for perplexity selection from the same scores file.
    # "random": a seeded uniform random selection (hash of the run seed and the id), the baseline.
    score_column: Literal["score", "loss_full", "loss_gated", "n_tokens", "random"] = "score"
    ascending: bool = False  # False: highest score first
    # Relevance, then quality (scoring/quality.py, issue 29; applies when score_column is "score"): the
    # band_factor x k rows ranked first by relevance, less those whose relevance is below
    # r_k - band_guard x (r_1 - r_k) (rows of another task; None: no guard), re-ranked by relevance
    # percentile + quality_weight x quality_column percentile (lowest loss best; None: quality alone; rows
    # without it, e.g. distilled ones, by relevance). "relevance": the plain top k. The default by
    # measurement (RESULTS.md Sessions 10-11, SmolLM2): as clean or cleaner than relevance alone on 7 of 8
    # corpora (arithmetic 0.89 vs 0.80, units 0.92 vs 0.88, unseen capitals 0.97 vs 0.80, letters equal), on-task
    # share unchanged but one row of 240, and the held-out loss after training on its pick lower on 5 of 5 seeds.
    rule: Literal["relevance", "relevance_then_quality"] = "relevance_then_quality"
    band_factor: float = Field(1.5, ge=1)
    band_guard: float | None = Field(0.5, ge=0)
    quality_column: Literal["loss_full", "loss_gated", "n_tokens"] = "loss_full"
    quality_weight: float | None = Field(1.0, ge=0)


class TrainConfig(_Section):
    """Stage 3 (p2d_ray.training): which parameters learn, the optimizer, and the Ray Train shape."""

    # heads: only the selected heads' q/k/v rows and o_proj columns (P2D); lora: PEFT LoRA on the
    # attention projections; full: every weight. All three run through the same trainer.
    adaptation: Literal["heads", "lora", "full"] = "heads"
    train_o_proj: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # caps optimizer steps (epochs x ceil(rows / global batch))
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # only ever applied to trained parameters
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    batch_size: int = Field(8, ge=1)  # per worker micro-batch
    grad_accum: int = Field(1, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Extra custom resources per worker, e.g. {"accelerator_type:H100": 0.001}; CPU/GPU come from above.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    torch_threads: int | None = Field(None, ge=1)  # None: int(cpus_per_worker)
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between checkpoints (and one at the end)
    checkpoints_to_keep: int = Field(2, ge=1)
    storage_path: str | None = None  # local, NFS or s3://; None = <run_dir>/train
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the latest checkpoint; -1 = forever
    export_merged: bool = False
    seed: int = 0  # seeds each rank's shuffle of its rows, pass after pass (training/worker.seeded_passes)
    # Tracking (p2d_ray.training.tracking): TensorBoard event files under <run_dir>/tensorboard/train by
    # default; MLflow / W&B through Ray Train's integrations when set (optional packages, not installed).
    tensorboard: bool = True
    mlflow_tracking_uri: str | None = (
        None  # e.g. sqlite:////abs/mlflow.db or http://mlflow:5000 (not file://)
    )
    wandb_project: str | None = None
    tracking_experiment: str = "p2d-ray"  # MLflow experiment / W&B group

    @model_validator(mode="after")
    def _resources(self) -> TrainConfig:
        clash = {"CPU", "GPU"} & set(self.resources_per_worker)
        if clash:
            raise ValueError(
                f"resources_per_worker must not set {sorted(clash)}: use cpus_per_worker / use_gpu"
            )
        return self


class EvalConfig(_Section):
    """Held-out evaluation (``p2d-ray evaluate``): base vs adapted model on a Ray Data actor pool."""

    heldout_path: str | None = None  # None = demo held-out set
    # The held-out set's column map, {role: its column} (see data.probe_column_map); unmapped roles use data's.
    heldout_column_map: dict[Literal[COLUMN_ROLES], str] = Field(default_factory=dict)  # type: ignore[valid-type]
    n_samples: int = Field(64, ge=1)  # the first n rows of the held-out set
    max_new_tokens: int = Field(48, ge=1)  # greedy answer length cap (a worked `#### n` solution)
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(0.5, gt=0)  # fractional, as for scoring
    num_gpus_per_actor: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)


class ReportConfig(_Section):
    """The report step: AER and the quality-vs-AER plot."""

    # True: measure the AER denominator by full fine-tuning on the whole corpus (expensive; also evaluated);
    # False: estimate it from full fine-tuning steps timed through the same trainer, labelled "estimated".
    full_baseline: bool = False
    timing_steps: int = Field(5, ge=1)  # full steps timed for the estimate, after one warm-up step
    variants: list[str] = Field(default_factory=list)  # more run dirs / report.json files to plot


SELECTORS = ("p2d", "p2d_contrastive", "random_heads", "random", "perplexity", "perplexity_high", "ifd")


class CompareConfig(_Section):
    """``p2d-ray compare``: every selector x adaptation x seed through the same select -> train -> evaluate.

    Selectors: ``p2d`` (``score.scorer`` under the localised task heads, ``localize`` as configured),
    ``p2d_contrastive`` (the same with ``localize.contrast=corpus``), ``random_heads`` (the falsification
    control: P2D with random heads of the task heads' count per layer, new heads per seed), ``random``
    (seeded uniform), ``perplexity`` (lowest loss first), ``perplexity_high`` (highest first), ``ifd``.
    Every selector keeps ``select.fraction`` / ``top_k`` of the corpus and every cell trains the same
    ``train`` budget; only the adaptation's learning rate differs (``lr``, fixed per adaptation, never
    per selector).
    """

    selectors: list[Literal[SELECTORS]] = Field(default_factory=lambda: list(SELECTORS))  # type: ignore[valid-type]
    adaptations: list[Literal["heads", "lora", "full"]] = Field(
        default_factory=lambda: ["heads", "lora", "full"]
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    # Per adaptation; an adaptation missing here uses train.lr.
    lr: dict[Literal["heads", "lora", "full"], float] = Field(default_factory=dict)
    eval_variants_per_pass: int = Field(16, ge=1)  # adapted models one evaluation actor holds at once

    @model_validator(mode="after")
    def _unique(self) -> CompareConfig:
        for name in ("selectors", "adaptations", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values) or not values:
                raise ValueError(f"{name} must be a non-empty list without repeats, got {values}")
        bad = {k: v for k, v in self.lr.items() if v <= 0}
        if bad:
            raise ValueError(f"lr must be > 0, got {bad}")
        return self


# A target's name: a directory name under <run_dir>/targets/ and a column suffix (score__<name>).
TARGET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
DEMO_TARGETS = ("arithmetic", "units")


class TargetConfig(_Section):
    """One named target task of a multi-target run (``targets:``; p2d_ray/targets.py): its probe set (a path,
    or one of the demo's target tasks), its held-out set, and optionally its own selection size."""

    name: str
    probe_path: str | None = None  # None: the demo's probe set of demo_target
    # The demo's task family for a target without probe_path (None: the name, when it is a demo task).
    demo_target: Literal["arithmetic", "units"] | None = None
    heldout_path: str | None = None  # None: the demo's held-out set of demo_target
    probe_column_map: dict[Literal[COLUMN_ROLES], str] = Field(default_factory=dict)  # type: ignore[valid-type]
    fraction: float | None = Field(None, gt=0, le=1)  # None: select.fraction / top_k
    top_k: int | None = Field(None, ge=1)
    # A target added after the shared pass: no model pass over the corpus; its exact scores on a seeded sample
    # (score.distill_sample_*) and a ridge regressor on the features that pass stored predict the rest.
    later: bool = False

    @model_validator(mode="after")
    def _name(self) -> TargetConfig:
        import re

        if not re.match(TARGET_NAME_PATTERN, self.name):
            raise ValueError(
                f"target name {self.name!r} must be 1-64 letters, digits, '_' or '-', starting with a letter or "
                "digit (it names a directory under <run_dir>/targets/ and the column score__<name>)"
            )
        return self

    def demo_task(self) -> str | None:
        """The demo task family this target reads its probe / held-out set from, if any."""
        return self.demo_target or (self.name if self.name in DEMO_TARGETS else None)


class P2DConfig(_Section):
    run_dir: str = "runs/demo"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    localize: LocalizeConfig = Field(default_factory=LocalizeConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    # Several target tasks scored in one corpus pass (p2d_ray/targets.py). Empty: the single target that
    # data.probe_path / data.demo_target / evaluate.heldout_path describe (every run before targets existed).
    targets: list[TargetConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> P2DConfig:
        problems = []
        problems += _target_problems(self)
        if self.data.format == "icl" and self.data.icl_k == 0:
            problems.append("data.format=icl needs data.icl_k >= 1")
        if self.train.use_gpu is False and self.score.num_gpus_per_actor > 0 and self.model.device == "cpu":
            problems.append("score.num_gpus_per_actor > 0 contradicts model.device=cpu")
        if self.train.zero_stage == 3 and self.train.adaptation == "heads":
            # ZeRO-3 partitions parameters; our head deltas index rows of frozen weights directly.
            problems.append("train.zero_stage=3 is not supported with train.adaptation=heads (use 0, 1 or 2)")
        if self.select.fraction is None and self.select.top_k is None:
            problems.append("select needs fraction or top_k")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): detects changed configs on resume."""
        data = self.model_dump(mode="json")
        if not data.get("targets"):  # a single-target run's fingerprints are what they were before targets
            data.pop("targets", None)
        if sections:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
        return path


def _target_problems(cfg: P2DConfig) -> list[str]:
    """``targets``: unique names, a probe set each, and the scorer one shared pass supports (exact
    gradient_alignment; either score.strategy: distill.py runs its passes once for every target)."""
    if not cfg.targets:
        return []
    problems = []
    names = [t.name for t in cfg.targets]
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        problems.append(f"targets: names must be unique, repeated: {sorted(seen)}")
    lower = [n.lower() for n in names]
    if len(set(lower)) != len(lower) and not seen:
        problems.append(f"targets: names must differ in more than case (directories): {names}")
    if all(t.later for t in cfg.targets):
        problems.append("targets: at least one target must be scored in the shared pass (later: false)")
    for i, t in enumerate(cfg.targets):
        if t.probe_path is None and t.demo_task() is None:
            problems.append(
                f"targets[{i}] ({t.name}): needs probe_path (or demo_target, one of {list(DEMO_TARGETS)})"
            )
        if t.probe_path is not None and t.heldout_path is None and t.demo_task() is None:
            problems.append(f"targets[{i}] ({t.name}): needs heldout_path with a probe_path of its own")
    if cfg.score.scorer != "gradient_alignment":
        problems.append(
            f"targets: one pass for several targets needs score.scorer=gradient_alignment (got {cfg.score.scorer})"
        )
    elif cfg.score.alignment_method != "exact":
        problems.append("targets: one pass for several targets needs score.alignment_method=exact")
    if cfg.localize.control != "none":
        problems.append("targets: localize.control=random_heads is not supported with several targets")
    return problems


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError([f"override {dotted!r}: {key!r} is not a section"])
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["score.batch_size=32", "model.name_or_path=Qwen/Qwen2.5-0.5B"]`` -> nested dict.

    Values are parsed as YAML scalars so ``32`` is an int, ``true`` a bool, ``null`` None.
    """
    tree: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    if problems:
        raise ConfigError(problems)
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _did_you_mean(loc: tuple) -> str:
    """``"; did you mean 'batch_size'?"`` for a mistyped key at ``loc``, from the keys the schema allows."""
    import difflib

    model: Any = P2DConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(model, type) else None
        model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(model.model_fields)}"


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:
            # Cross-section checks (P2DConfig._cross_checks) join their problems with "; ": one line each.
            problems.extend(msg.split("; "))
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(e["loc"])
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        problems.append(f"{loc}: {msg}{shown}")
    return problems


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> P2DConfig:
    """Validate a config dict plus overrides; raises :class:`ConfigError` listing every problem."""
    merged = _merge(data or {}, parse_overrides(overrides or []))
    try:
        return P2DConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> P2DConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"])
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{path}: top level must be a mapping, got {type(loaded).__name__}"])
        data = loaded or {}
    return build_config(data, overrides)
