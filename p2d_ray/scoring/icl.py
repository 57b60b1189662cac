"""``icl_attention``: P2D's Stage 2 scorer (Data Whisperer's ICL attention, summed over the task heads H_T).

A *context* is one sequence: an instruction, ``n_d`` corpus rows as demonstrations and ``n_q`` probe rows as
queries with their reference answers, teacher-forced (no generation)::

    [BOS] instruction \\n demo_1 \\n ... demo_nd \\n query_1 \\n ... query_nq

Every segment is a row exactly as ``encode_row`` tokenised it for the run's prompt format (chat template,
prompt/response, plain), without its leading BOS. For each task head (l, h) we read the attention from the
*query-answer rows* (the positions that predict a query's reference-answer tokens) to each demonstration's
tokens (``heads.attention``: only those heads and rows, reduced to per-demo sums at once):

    a_j = sum_{(l,h) in H_T} sum_{r in R} A^{l,h}[r, D_j] / (|R| * |D_j|)      ("area": mean attention per cell)
    w_j = k * a_j / sum_i a_i                                                 (k = demos in the context; mean 1)
    w_j /= mean of w over the group's contexts at j's slot                    (position debiasing)
    score_j = mean over the contexts j was in of  w_j * m(context)

``m`` is the context's query metric from the same forward: ``likelihood`` = exp(-mean NLL of the queries'
answer tokens) (teacher-forced analogue of Data Whisperer's exact match / ROUGE), or ``none`` (m = 1; the
forward then stops after the highest task-head layer, skipping the rest of the model and the LM head).
The BOS / first token (the usual attention sink) and the separators belong to no demonstration.

Contexts come from *groups*: rows ``_row // icl_pool`` of one shard. Each of ``icl_repeats`` repeats shuffles
a group (seeded by ``icl_seed``, shard, group, repeat) and splits it into contexts of ~``n_d`` rows, with
``n_q`` probe queries drawn per context; so every row is in exactly ``icl_repeats`` contexts with different
co-demonstrations and queries. Groups never depend on how Ray cut blocks or batches (the pipeline aligns
blocks to groups), so scores are the same across runs, actor counts and resumes.

Measured on SmolLM2-135M (issue 12, 96-row planted mixtures, two target tasks): the signal lives in the middle
layers (all heads of layers 13-20: AUC 0.83 / 0.84 of clean on-task rows); heads in layers 0-3 and the last
layers carry none or an inverted one, so a head set dominated by early-layer heads (as gradient localisation
gives) scores near chance, and random heads in the same layers do as well as the task heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from p2d_ray.heads.attention import AttentionProbe, probe_attention, use_probe_attention
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.loss import loss_from_hidden

ICL_COLUMNS = ("icl_weight", "icl_metric", "icl_contexts")  # components written beside the score
EPS = 1e-12


@dataclass
class Segment:
    """One row in token space: ``ids`` without the leading BOS, ``target`` 1 on reference-answer tokens."""

    ids: np.ndarray  # [n] int64
    target: np.ndarray  # [n] int8


def to_segment(ids: np.ndarray, loss_mask: np.ndarray, bos_id: int | None) -> Segment:
    ids, loss_mask = np.asarray(ids, dtype=np.int64), np.asarray(loss_mask, dtype=np.int8)
    if bos_id is not None and len(ids) and ids[0] == bos_id:
        ids, loss_mask = ids[1:], loss_mask[1:]
    return Segment(ids, loss_mask)


@dataclass
class Context:
    demos: list[int]  # indices of the rows (in the caller's row list) used as demonstrations
    queries: list[int]  # indices into the probe pool
    group: int = 0  # index of its group (position debiasing pools the group's contexts)


@dataclass
class ICLScores:
    score: np.ndarray  # [n] mean of w * m over the row's contexts
    weight: np.ndarray  # [n] mean w
    metric: np.ndarray  # [n] mean m of its contexts
    contexts: np.ndarray  # [n] int32


def plan_contexts(
    groups: np.ndarray, n_d: int, n_q: int, repeats: int, seed: int, n_probe: int
) -> list[Context]:
    """Contexts for rows with group keys ``groups`` ``[n, 2]`` (shard, group): each row is a demonstration in
    exactly ``repeats`` contexts, only with rows of its own group. Deterministic in (seed, keys, order)."""
    out: list[Context] = []
    keys, inverse = np.unique(groups, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for g, (shard, group) in enumerate(keys):
        members = np.flatnonzero(inverse == g)  # in the caller's order: callers sort rows by (shard, row)
        n_ctx = -(-len(members) // n_d)
        for r in range(repeats):
            rng = np.random.default_rng([seed, int(shard), int(group), r])
            for chunk in np.array_split(rng.permutation(members), n_ctx):  # sizes differ by at most 1
                q = rng.choice(n_probe, size=min(n_q, n_probe), replace=False)
                out.append(Context(rng.permutation(chunk).tolist(), q.tolist(), g))
    return out


def debias_positions(contexts: Sequence[Context], weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Divide each weight by the mean weight of its slot (position in the context) over the contexts of its
    group (slots that only one context of the group fills are left as they are). Measured on SmolLM2 (issue 12): the slot nearest the queries draws far more attention than the
    first, whatever the row (recency), and without this the weights rank positions, not rows."""
    out = [np.asarray(w, dtype=np.float64).copy() for w in weights]
    groups = np.array([c.group for c in contexts])
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        width = max(len(out[c]) for c in members)
        total, count = np.zeros(width), np.zeros(width)
        for c in members:
            total[: len(out[c])] += out[c]
            count[: len(out[c])] += 1
        # A slot seen in one context only (a group of <= n_d rows, e.g. a small shard) says nothing about
        # position vs row: dividing by it would set every such weight to 1. Leave those weights as they are.
        mean = np.where(count >= 2, total / np.maximum(count, 1), 1.0)
        for c in members:
            out[c] = out[c] / np.maximum(mean[: len(out[c])], EPS)
    return out


class ICLScorer:
    """Holds the model (switched to ``p2d_sdpa``), the task heads and the tokenised probe pool."""

    def __init__(
        self,
        model: nn.Module,
        heads: HeadSet,
        probe: Sequence[Segment],
        instruction_ids: Sequence[int],
        sep_ids: Sequence[int],
        bos_id: int | None,
        pad_id: int,
        n_d: int = 8,
        n_q: int = 2,
        repeats: int = 1,
        seed: int = 0,
        metric: str = "likelihood",
        position_debias: bool = True,
        contexts_per_batch: int = 2,
        chunk_tokens: int = 1024,
        strip_bos: int | None = None,  # the BOS encode_row put before each row's text (formatting.added_bos)
    ):
        if not probe:
            raise ValueError("icl_attention: the probe set has no usable rows (all empty or too long)")
        use_probe_attention(model)
        self.model, self.heads, self.probe = model, heads.by_layer(), list(probe)
        self.head_ = [int(b) for b in ([bos_id] if bos_id is not None else [])] + list(instruction_ids)
        self.sep, self.pad_id, self.strip_bos = list(sep_ids), pad_id, strip_bos
        self.n_d, self.n_q, self.repeats, self.seed = n_d, n_q, repeats, seed
        self.metric, self.contexts_per_batch, self.chunk_tokens = metric, contexts_per_batch, chunk_tokens
        self.position_debias = position_debias

    def _assemble(self, ctx: Context, rows: Sequence[Segment]):
        """Token ids, answer mask, demo-span ids (-1 elsewhere) and answer rows of one context."""
        ids, target, span = [np.asarray(self.head_, np.int64)], [np.zeros(len(self.head_), np.int8)], []
        span.append(np.full(len(self.head_), -1))
        sep = np.asarray(self.sep, np.int64)
        for j, i in enumerate(ctx.demos):
            seg = rows[i]
            ids += [seg.ids, sep]
            target += [np.zeros(len(seg.ids) + len(sep), np.int8)]  # demos are context, never scored
            span += [np.full(len(seg.ids), j), np.full(len(sep), -1)]
        for n, q in enumerate(ctx.queries):
            seg = self.probe[q]
            tail = sep if n < len(ctx.queries) - 1 else sep[:0]
            ids += [seg.ids, tail]
            target += [seg.target, np.zeros(len(tail), np.int8)]
            span += [np.full(len(seg.ids) + len(tail), -1)]
        ids, target, span = np.concatenate(ids), np.concatenate(target), np.concatenate(span)
        # Query-answer rows: position t predicts answer token t + 1 (formatting.py's shift convention).
        rows_ = np.flatnonzero(target[1:])
        return ids, target, span, rows_

    @torch.inference_mode()
    def _run(self, batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``[C, n_d]`` (0 beyond a context's demos) and metric ``[C]`` for a micro-batch."""
        C = len(batch)
        T = max(len(b[0]) for b in batch)
        R = max(len(b[3]) for b in batch)
        S = max(int(b[2].max()) + 1 for b in batch)
        ids = torch.full((C, T), self.pad_id, dtype=torch.long)
        am = torch.zeros(C, T, dtype=torch.long)
        lm = torch.zeros(C, T, dtype=torch.long)
        span = torch.full((C, T), -1, dtype=torch.long)
        rows = torch.zeros(C, R, dtype=torch.long)
        row_ok = torch.zeros(C, R)
        for c, (i, t, s, r) in enumerate(batch):
            n = len(i)
            ids[c, :n], am[c, :n], lm[c, :n] = torch.from_numpy(i), 1, torch.from_numpy(t.astype(np.int64))
            span[c, :n] = torch.from_numpy(s)
            rows[c, : len(r)], row_ok[c, : len(r)] = torch.from_numpy(r), 1
            rows[c, len(r) :] = int(r[0]) if len(r) else 0  # padding rows: any valid position, masked below
        onehot = torch.zeros(C, T, S)
        valid = span >= 0
        onehot[valid] = torch.nn.functional.one_hot(span[valid], S).float()  # [C, T, S]
        device = next(self.model.parameters()).device
        probe = AttentionProbe(self.heads, rows.to(device), onehot.to(device), self.metric == "none")
        hidden = probe_attention(self.model, ids.to(device), am.to(device), probe)
        mass = sum(x.sum(dim=1) for x in probe.result.values()).float().cpu()  # [C, R, S] over H_T
        mass = (mass * row_ok[:, :, None]).sum(dim=1)  # [C, S] over the answer rows
        span_len = onehot.sum(dim=1)  # [C, S]
        area = row_ok.sum(dim=1, keepdim=True).clamp(min=1) * span_len.clamp(min=1)
        a = torch.where(span_len > 0, mass / area, torch.zeros_like(mass))  # mean attention per cell
        k = (span_len > 0).sum(dim=1, keepdim=True)  # demos per context
        w = k * a / a.sum(dim=1, keepdim=True).clamp(min=EPS)  # [C, S], mean 1 over a context's demos
        if hidden is None:
            metric = torch.ones(C)
        else:
            loss = loss_from_hidden(self.model, hidden, ids.to(device), lm.to(device), self.chunk_tokens)
            metric = torch.exp(-loss.mean.float().cpu())  # [C] geometric-mean probability of the answers
        return w, metric

    def score_rows(self, rows: Sequence[Segment], groups: np.ndarray) -> ICLScores:
        """Scores of ``rows`` (demonstrations) with group keys ``groups`` ``[n, 2]``."""
        n = len(rows)
        contexts = plan_contexts(groups, self.n_d, self.n_q, self.repeats, self.seed, len(self.probe))
        built = [self._assemble(c, rows) for c in contexts]
        # Longest first, micro-batches of similar length (little padding).
        order = sorted(range(len(built)), key=lambda c: -len(built[c][0]))
        weights: list[np.ndarray] = [np.zeros(0)] * len(contexts)
        metrics = np.ones(len(contexts))
        for start in range(0, len(order), self.contexts_per_batch):
            idx = order[start : start + self.contexts_per_batch]
            w, metric = self._run([built[c] for c in idx])
            for b, c in enumerate(idx):
                weights[c], metrics[c] = (
                    w[b, : len(contexts[c].demos)].numpy().astype(np.float64),
                    float(metric[b]),
                )
        if self.position_debias:
            weights = debias_positions(contexts, weights)
        w_sum, wm_sum, m_sum = np.zeros(n), np.zeros(n), np.zeros(n)
        count = np.zeros(n, dtype=np.int32)
        for ctx, wj, m in zip(contexts, weights, metrics, strict=True):
            w_sum[ctx.demos] += wj
            wm_sum[ctx.demos] += wj * m
            m_sum[ctx.demos] += m
            count[ctx.demos] += 1
        div = np.maximum(count, 1)
        return ICLScores(wm_sum / div, w_sum / div, m_sum / div, count)


def build_icl_scorer(
    model: nn.Module, heads: HeadSet, cfg, tokenizer, data_json: str, fmt: str, probe_rows: list[dict]
) -> ICLScorer:
    """The actor's scorer: probe rows encoded once, exactly as corpus rows (``encode_row``, same format).

    ``cfg`` is the ScoreConfig. Probe rows ``encode_row`` rejects (empty, too long...) are left out of the pool.
    """
    from p2d_ray.config import DataConfig
    from p2d_ray.data.formatting import added_bos, encode_row

    data = DataConfig.model_validate_json(data_json)
    bos = tokenizer.bos_token_id
    strip = added_bos(tokenizer, fmt)  # the BOS each encoded row carries in front of its own text
    probe = []
    for row in probe_rows:
        try:
            enc = encode_row(row, tokenizer, data, fmt)
        except ValueError:
            continue
        probe.append(to_segment(np.asarray(enc.input_ids), np.asarray(enc.loss_mask), strip))
    instruction = tokenizer(cfg.icl_instruction + "\n", add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return ICLScorer(
        model,
        heads,
        probe,
        instruction,
        sep,
        bos,
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        n_d=cfg.icl_demos,
        n_q=cfg.icl_queries,
        repeats=cfg.icl_repeats,
        seed=cfg.icl_seed,
        metric=cfg.icl_metric,
        position_debias=cfg.icl_position_debias,
        contexts_per_batch=max(1, cfg.batch_size // cfg.icl_demos),
        chunk_tokens=cfg.loss_chunk_tokens,
        strip_bos=strip,  # corpus rows are cut into segments the same way (ScorerActor)
    )
