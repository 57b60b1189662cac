"""``p2d-ray evaluate``: held-out task loss / perplexity and greedy exact match, base vs adapted, on Ray Data.

The held-out rows (the first ``evaluate.n_samples``) go through a Ray Data actor pool, like scoring: each
actor (:class:`HeldoutEvaluator`) loads the base model and the adapted model once and, per batch,
computes for each of them

- the summed next-token loss over the response tokens (prompt tokens are context, never scored) and the
  token count, so the report can give the token-weighted mean loss and ``perplexity = exp(loss)``;
- for answer-format tasks (every reference ends ``#### <number>``), a greedy continuation of the prompt
  (left-padded batch, stopped at eos or a newline) and whether its ``####`` number equals the reference's.

The driver joins the per-sample rows on ``id`` (Ray Data does not keep row order), writes them to
``<run_dir>/eval_samples.parquet`` and the side-by-side summary to ``<run_dir>/eval.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from p2d_ray.config import P2DConfig
from p2d_ray.data.answers import cut_at_stop, exact_match, is_answer_format
from p2d_ray.data.columns import warn_unread
from p2d_ray.data.formatting import Encoded, collate, encode_row, row_parts, task_format
from p2d_ray.data.io import read_table
from p2d_ray.progress import stage_summary
from p2d_ray.rundir import RunDir, stage_fingerprint

BASE, ADAPTED = "base", "adapted"


# -- what is evaluated -------------------------------------------------------------------------------
def read_heldout(cfg: P2DConfig) -> tuple[pa.Table, str, bool]:
    """The first ``evaluate.n_samples`` held-out rows, their format and whether exact match applies.

    Every row is encoded once here, so a bad row fails the command before Ray starts.

    Raises:
        ValueError: missing id/text columns, an empty held-out set, duplicate ids, or a row that cannot be
            encoded (null / empty / non-string text, too long, nothing to score), named by id.
    """
    from p2d_ray.assets.paths import heldout_path
    from p2d_ray.models.loading import load_tokenizer

    path = heldout_path(cfg)
    table = read_table(path, "evaluate.heldout_path", cfg.data, cfg.evaluate.heldout_column_map)
    id_col = cfg.data.id_column
    if id_col not in table.column_names:
        raise ValueError(
            f"evaluate: held-out set {path} has no id column {id_col!r}; found {table.column_names}"
        )
    fmt = task_format(cfg.data, table.column_names)  # raises naming the missing text columns
    warn_unread(cfg.data, fmt, table.column_names, f"held-out set {path}")
    table = table.slice(0, cfg.evaluate.n_samples)
    if table.num_rows == 0:
        raise ValueError(f"evaluate: held-out set {path} is empty")
    ids = table.column(id_col).to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"evaluate: held-out set {path} has duplicate ids in column {id_col!r}")
    tok = load_tokenizer(cfg.model)
    for row in table.to_pylist():
        try:
            encode_row(row, tok, cfg.data, fmt)
        except ValueError as err:
            raise ValueError(f"evaluate: held-out row {id_col}={row[id_col]!r} in {path}: {err}") from None
    # Exact match needs a prompt to continue and a `#### <number>` reference to compare with.
    answers = fmt != "plain" and is_answer_format([row_parts(r, cfg.data)[1] for r in table.to_pylist()])
    return table, fmt, answers


def eval_variants(cfg: P2DConfig) -> dict[str, str | None]:
    """name -> run dir holding its adapter (None: the base model). ``adapted`` only once training wrote one."""
    variants: dict[str, str | None] = {BASE: None}
    if (RunDir(cfg.run_dir).adapter / "manifest.json").is_file():
        variants[ADAPTED] = cfg.run_dir
    return variants


# -- per-batch math (plain torch; no Ray) -------------------------------------------------------------
def response_nll(
    model, batch: dict[str, torch.Tensor], chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over each sample's response tokens and their count, both ``[B]``."""
    from p2d_ray.models.loss import sample_loss

    loss = sample_loss(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_tokens)
    return loss.loss_sum, loss.n_tokens


def prompt_ids(enc: Encoded) -> list[int]:
    """The unscored prefix of an encoded row (bos + prompt / chat scaffolding): what generation continues."""
    n = enc.loss_mask.index(1) if 1 in enc.loss_mask else len(enc.input_ids)
    return enc.input_ids[:n]


def newline_stop(tokenizer):
    """Stop generation at a newline in the decoded text (any token containing one). Built once per model
    owner: its vocabulary scan costs ~1.5 s on SmolLM2's 49k tokens, which ``stop_strings`` paid per call."""
    from transformers import StopStringCriteria

    return StopStringCriteria(tokenizer, ["\n"])


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop=None) -> list[str]:
    """Greedy continuations of a batch of prompts, left-padded so every prompt ends at the same position
    (its next token is generated from the last column); stops at eos or a newline (``stop``: a
    :func:`newline_stop` to reuse). Returns the new text."""
    T = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), T), pad, dtype=torch.long)  # [B, T], left padding
    attention_mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, T - len(p) :] = torch.tensor(p)
        attention_mask[i, T - len(p) :] = 1
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),  # generate derives position ids from it
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        stopping_criteria=[stop or newline_stop(tokenizer)],
    )  # [B, T + new]
    texts = tokenizer.batch_decode(out[:, T:], skip_special_tokens=True)
    return [cut_at_stop(t) for t in texts]


# -- the Ray Data callable class ------------------------------------------------------------------------
class HeldoutEvaluator:
    """``map_batches`` UDF: loads every model variant once per actor; ``__call__(batch) -> batch``.

    Output columns: ``id``, ``n_tokens`` and per variant ``v``: ``nll_sum_<v>`` (and, with exact match,
    ``prediction_<v>``, ``correct_<v>``).
    """

    def __init__(self, cfg_json: dict, variants: dict[str, str | None], fmt: str, answers: bool):
        from p2d_ray.models.loading import load_model, load_tokenizer

        self.cfg = P2DConfig.model_validate(cfg_json)
        # Ray sets OMP_NUM_THREADS=1 for a fractional actor; choose the thread count deliberately.
        torch.set_num_threads(self.cfg.evaluate.torch_threads)
        self.fmt, self.answers = fmt, answers
        self.tok = load_tokenizer(self.cfg.model)
        self.stop = newline_stop(self.tok)
        self.models = {}
        for name, run_dir in variants.items():
            if run_dir is None:
                self.models[name] = load_model(self.cfg.model)
            else:
                from p2d_ray.training.export import load_adapted_model

                model = load_adapted_model(self.cfg.model_copy(update={"run_dir": run_dir}))
                self.models[name] = model.eval()

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        data = self.cfg.data
        rows = batch.to_pylist()
        enc = [encode_row(r, self.tok, data, self.fmt) for r in rows]
        padded = collate(enc, self.tok.pad_token_id)  # right padding for the loss: [B, T]
        out: dict[str, list] = {"id": [r[data.id_column] for r in rows]}  # renamed "id" in the output
        prompts = [prompt_ids(e) for e in enc]
        refs = [row_parts(r, data)[1] for r in rows]
        for name, model in self.models.items():
            device = next(model.parameters()).device
            nll, count = response_nll(
                model, {k: v.to(device) for k, v in padded.items()}, self.cfg.score.loss_chunk_tokens
            )
            out["n_tokens"] = count.long().tolist()
            out[f"nll_sum_{name}"] = nll.double().tolist()
            if self.answers:
                preds = greedy_generate(model, self.tok, prompts, self.cfg.evaluate.max_new_tokens, self.stop)
                out[f"prediction_{name}"] = preds
                out[f"correct_{name}"] = [exact_match(p, r) for p, r in zip(preds, refs, strict=True)]
        return pa.table(out)


# -- summary -----------------------------------------------------------------------------------------
def summarize(samples: pa.Table, variants, answers: bool) -> dict:
    """Token-weighted mean response loss, perplexity and exact match per variant, plus adapted - base."""
    n_tokens = sum(samples.column("n_tokens").to_pylist())
    out: dict = {}
    for name in variants:
        loss = sum(samples.column(f"nll_sum_{name}").to_pylist()) / max(n_tokens, 1)
        s = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        if answers:
            correct = sum(samples.column(f"correct_{name}").to_pylist())
            s.update(exact_match=correct / samples.num_rows, n_correct=correct)
        out[name] = s
    if BASE in out and ADAPTED in out:
        out["delta"] = {k: out[ADAPTED][k] - out[BASE][k] for k in out[BASE] if k != "n_correct"}
    return out


def evaluate_on_ray(cfg: P2DConfig, table: pa.Table, fmt: str, answers: bool, variants) -> pa.Table:
    """Run :class:`HeldoutEvaluator` over ``table`` on a Ray Data actor pool; rows sorted by id."""
    import ray

    from p2d_ray.runtime import ensure_ray

    ensure_ray()  # the cluster in RAY_ADDRESS, or a local Ray
    ev = cfg.evaluate
    n_blocks = max(1, min(table.num_rows, ev.num_actors * 4))  # a small table arrives as one block
    n_actors = max(1, min(ev.num_actors, -(-table.num_rows // ev.batch_size)))  # no actor without a batch
    from p2d_ray.progress import Progress, ray_data_output

    bar, parts = Progress("evaluate", table.num_rows), []
    with ray_data_output(cfg.run_dir):  # Ray Data's chatter -> <run_dir>/logs/, ours: rows, rate, ETA
        ds = ray.data.from_arrow(table).repartition(n_blocks)
        ds = ds.map_batches(
            HeldoutEvaluator,
            fn_constructor_kwargs={
                "cfg_json": cfg.model_dump(mode="json"),
                "variants": variants,
                "fmt": fmt,
                "answers": answers,
            },
            batch_format="pyarrow",
            batch_size=ev.batch_size,
            # Every actor from the start: a pool growing from 1 gave the demo's 2 batches to one actor.
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=ev.num_cpus_per_actor,  # fractional: whole-CPU actors starve the read task on 2 cores
            num_gpus=ev.num_gpus_per_actor,
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            parts.append(batch)
            bar.update(batch.num_rows)
    bar.close()
    out = pa.concat_tables(parts)
    assert out.num_rows == table.num_rows, f"evaluate: {table.num_rows} rows in, {out.num_rows} out"
    return out.sort_by("id")


def run_evaluate(cfg: P2DConfig) -> dict:
    """Evaluate the base and the adapted model on the held-out set; writes ``eval.json``."""
    run = RunDir(cfg.run_dir)
    cfg.save(run.path("config.yaml"))
    table, fmt, answers = read_heldout(cfg)  # bad input fails here, before Ray starts
    variants = eval_variants(cfg)
    t0 = time.perf_counter()
    with run.timed("evaluate", stage_fingerprint(cfg, "evaluate")):
        samples = evaluate_on_ray(cfg, table, fmt, answers, variants)
        pq.write_table(samples, run.path("eval_samples.parquet"))
        result = {
            "n_samples": samples.num_rows,
            "n_tokens": sum(samples.column("n_tokens").to_pylist()),
            "format": fmt,
            "exact_match": answers,
            "variants": list(variants),
            **summarize(samples, variants, answers),
        }
        Path(run.path("eval.json")).write_text(json.dumps(result, indent=1))
        from p2d_ray.training.model_card import write_model_card

        write_model_card(cfg)  # the adapter's card gets the held-out numbers
    stage_summary(
        "evaluate", time.perf_counter() - t0, f"{run.path('eval.json')} ({samples.num_rows:,} rows)"
    )
    return result
