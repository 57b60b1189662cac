"""``ScorerActor``: the Ray Data callable class that holds the frozen model and the task-head gates.

``__init__`` runs once per actor (load the model, set torch threads deliberately: Ray sets
``OMP_NUM_THREADS`` from the actor's CPU share, 1 for a fractional CPU); ``__call__`` scores one batch
of tokenised rows. A call receives one block of whole bucketing windows (:func:`micro_batch_rows`), sorts
each window by length and scores it in micro-batches of ``batch_size`` (length bucketing: padding stays
small without a global sort, and a row's micro-batch depends on its shard alone).
Rows that arrive with a quarantine ``reason`` pass through unscored.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from p2d_ray.config import ModelConfig, ScoreConfig
from p2d_ray.scoring.scorers import COMPONENT_COLUMNS, build_scorer

SCORE_TIME_COL = "_t_score"  # per-row share of its micro-batch's model seconds (for stats)
ACTOR_COL = "_actor"  # Ray actor id of the actor that scored the row (actor count in stats)
PID_COL = "_pid"  # pid of its process (a restarted actor: a new pid under the same actor id)
PAD_COL = "_padded"  # padded length of the row's micro-batch (padding overhead in stats)
FEATURES_COL = "features"  # several targets: per-row pooled layer-l_f features (fp16) for targets added later
RSS_COL = "_peak_rss"  # the actor's peak resident set (bytes, VmHWM) when it returned the row


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes (Linux ``VmHWM``: model load included)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # KiB on Linux, bytes on macOS


def collate_arrow(
    input_ids: pa.ChunkedArray | pa.ListArray,
    loss_mask: pa.ChunkedArray | pa.ListArray,
    rows: np.ndarray,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """``formatting.collate`` for rows of Arrow list columns, without a Python list per row.

    Returns input_ids / attention_mask / loss_mask ``[B, T]`` (long), right-padded to the longest row;
    identical to ``collate`` (tested).
    """
    take = pa.array(np.asarray(rows, dtype=np.int64))
    ids, mask = input_ids.take(take), loss_mask.take(take)
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)  # [B]
    B, T = len(lengths), int(lengths.max())
    r = np.repeat(np.arange(B), lengths)  # row of each token
    c = np.arange(len(r)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # its position in the row
    out = {
        "input_ids": np.full((B, T), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((B, T), dtype=np.int64),
        "loss_mask": np.zeros((B, T), dtype=np.int64),
    }
    out["input_ids"][r, c] = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
    out["attention_mask"][r, c] = 1
    out["loss_mask"][r, c] = pc.list_flatten(mask).to_numpy(zero_copy_only=False)
    return {k: torch.from_numpy(v) for k, v in out.items()}


def micro_batch_rows(batch: pa.Table, ok: np.ndarray, batch_size: int, window_rows: int | None) -> list:
    """The rows ``ok`` of ``batch`` cut into micro-batches, as a function of each row's shard and row alone.

    Rows are bucketed by window, ``(_shard, _row // window_rows)``: fixed stretches of each shard (the pipeline
    aligns blocks to them and hands a call whole blocks). Within a window they are sorted by length, longest
    first (ties by row), and cut every ``batch_size`` rows; a micro-batch never spans two windows. So a row is
    always scored beside the same rows with the same padding, whichever actor gets its block, how the blocks
    were cut, or which shards a resumed run had left: scores are bit-identical (padding changes float
    rounding: ~3e-6 when micro-batches depended on what else a call held). The longest micro-batch goes first,
    so an out-of-memory shows at once rather than at the end of a run.
    """
    if len(ok) == 0:
        return []
    all_lengths = batch.column("length").to_numpy()
    lengths = all_lengths[ok]
    rows = batch.column("_row").to_numpy()[ok].astype(np.int64)
    shards = batch.column("_shard").to_numpy()[ok].astype(np.int64)
    windows = rows // window_rows if window_rows else np.zeros_like(rows)
    order = np.lexsort((rows, -lengths, windows, shards))
    idx, keys = ok[order], np.stack([shards[order], windows[order]], axis=1)
    cuts = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
    out = []
    for window in np.split(idx, cuts):
        out += [window[s : s + batch_size] for s in range(0, len(window), batch_size)]
    out.sort(key=lambda mb: -int(all_lengths[mb[0]]))  # stable: equal lengths keep their window order
    return out


def token_capped(micro_batches: list, lengths: np.ndarray, max_tokens: int | None) -> list:
    """Each micro-batch cut, in order, into pieces of at most ``max_tokens`` padded tokens (rows x the piece's
    longest row); a row longer than ``max_tokens`` is a piece alone. None: unchanged. A piece depends on its
    micro-batch's rows alone, so scores stay independent of how blocks and calls were cut.

    Why: the exact scorer's backward keeps every layer's activations of the micro-batch (~1.5 MB per token on
    SmolLM2, fp32), so an actor's peak memory follows the largest ``batch_size x length`` it meets, not the
    model (BENCHMARKS.md, "Scoring actors' memory")."""
    if not max_tokens:
        return list(micro_batches)
    out = []
    for mb in micro_batches:
        start = 0
        while start < len(mb):
            end, longest = start, 0
            while end < len(mb):
                longest_next = max(longest, int(lengths[mb[end]]))
                if end > start and (end - start + 1) * longest_next > max_tokens:
                    break
                end, longest = end + 1, longest_next
            out.append(mb[start:end])
            start = end
    return out


# glibc malloc in a scoring actor's process (BENCHMARKS.md, "Scoring actors' memory"): at most 2 arenas (Ray's
# threads would each get one). A fixed MALLOC_MMAP_THRESHOLD_ (every activation mmap'd and unmapped on free)
# lowered the peak by 0.13 GB more but cost ~27 % of the scoring time, so it is left out; score.max_batch_tokens
# and score.release_memory do the work.
ACTOR_MALLOC_ENV = {"MALLOC_ARENA_MAX": "2"}


def actor_env() -> dict[str, str]:
    """Environment of the scoring actors' processes: :data:`ACTOR_MALLOC_ENV`, where the driver's own
    environment sets one of these variables its value wins."""
    return {k: os.environ.get(k, v) for k, v in ACTOR_MALLOC_ENV.items()}


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere): the freed
    activations of a call would otherwise stay resident between calls."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _actor_id() -> str:
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a local Ray (~30 s) to answer
            return f"pid-{os.getpid()}"
        return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
    except Exception:  # outside Ray (unit tests call the class directly)
        return f"pid-{os.getpid()}"


class ScorerActor:
    def __init__(
        self,
        model_json: str,
        score_json: str,
        heads_json: dict | None,
        id_column: str = "id",
        icl_json: dict | None = None,
        probe_gradient: list | None = None,
        window_rows: int | None = None,
        targets: dict | None = None,
        feature_layer: int | None = None,
    ):
        """``probe_gradient``: ``[bytes or ObjectRef of ProbeGradient.to_bytes()]`` (gradient_alignment); a
        list so that Ray hands the actor the reference and the actor fetches it once, here.
        ``window_rows``: the length-bucketing window (see :func:`micro_batch_rows`); None: the whole call.
        ``targets``: ``{name: [probe gradient bytes or ObjectRef]}``: several targets scored in one pass
        (scoring/targets.py; exact gradient_alignment), one ``score__<name>`` column each."""
        from p2d_ray.heads.headset import HeadSet
        from p2d_ray.models.loading import load_model, load_tokenizer

        self.cfg = ScoreConfig.model_validate_json(score_json)
        torch.set_num_threads(self.cfg.torch_threads)
        model_cfg = ModelConfig.model_validate_json(model_json)
        tok = load_tokenizer(model_cfg)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.id_column = id_column
        self.model = None if self.cfg.scorer == "noop" else load_model(model_cfg)
        heads = HeadSet.from_json(heads_json) if heads_json is not None else None
        pg = None
        if probe_gradient:
            import ray

            from p2d_ray.scoring.gradient import ProbeGradient

            data = probe_gradient[0]
            pg = ProbeGradient.from_bytes(ray.get(data) if isinstance(data, ray.ObjectRef) else data)
        self.device = next(self.model.parameters()).device if self.model is not None else torch.device("cpu")
        self.icl = None
        if self.cfg.scorer == "icl_attention":  # contexts span rows: scored per call, not per micro-batch
            from p2d_ray.scoring.icl import build_icl_scorer

            # icl_json = {"data_json", "fmt", "probe_rows"}: the probe pool is tokenised here, once per actor.
            self.icl = build_icl_scorer(self.model, heads, self.cfg, tok, **icl_json)
        self.target_columns: tuple[str, ...] = ()
        if targets:
            import ray

            from p2d_ray.scoring.gradient import ProbeGradient
            from p2d_ray.scoring.targets import build_multi_scorer, target_columns

            grads = {
                n: ProbeGradient.from_bytes(ray.get(r[0]) if isinstance(r[0], ray.ObjectRef) else r[0])
                for n, r in targets.items()
            }
            self.target_columns = target_columns(grads)
            multi = build_multi_scorer(
                self.model, grads, self.cfg.alignment_normalize, self.cfg.loss_chunk_tokens, feature_layer
            )
        self.score = (
            multi
            if targets
            else None
            if self.icl is not None
            else build_scorer(
                self.cfg.scorer,
                self.model,
                heads,
                self.cfg.gate_mode,
                self.cfg.loss_chunk_tokens,
                self.cfg.influence_fused,
                # ifd's "response alone" starts from BOS (EOS for tokenizers without one, e.g. GPT-2's).
                bos_id=tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0),
                pad_id=self.pad_id,
                probe_gradient=pg,
                alignment_eps=self.cfg.alignment_eps,
                alignment_method=self.cfg.alignment_method,
                alignment_normalize=self.cfg.alignment_normalize,
            )
        )
        self.window_rows = window_rows
        self.pid = os.getpid()
        # A restarted actor (max_restarts) keeps its Ray actor id but not its pid: stats count actors by id.
        self.actor_id = _actor_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        score = np.full(n, np.nan)
        loss_full = np.full(n, np.nan)
        loss_gated = np.full(n, np.nan)
        n_tokens = np.zeros(n, dtype=np.int64)
        seconds = np.zeros(n, dtype=np.float32)
        padded = np.zeros(n, dtype=np.int32)
        has_full = has_gated = False
        components = {
            c: np.full(n, np.nan) for c in (*COMPONENT_COLUMNS.get(self.cfg.scorer, ()), *self.target_columns)
        }
        ok = np.flatnonzero(batch.column("reason").is_null().to_numpy(zero_copy_only=False))
        input_ids = batch.column("input_ids")
        loss_mask = batch.column("loss_mask")
        micro_batches = micro_batch_rows(batch, ok, self.cfg.batch_size, self.window_rows)
        if self.icl is not None:  # contexts span rows: the whole call at once, components filled there
            micro_batches = []
            components.update(self._score_icl(batch, ok, score, n_tokens, seconds, padded))
        lengths = batch.column("length").to_numpy()
        features = None
        for idx in token_capped(micro_batches, lengths, self.cfg.max_batch_tokens):
            t0 = time.perf_counter()
            tensors = {
                k: v.to(self.device) for k, v in collate_arrow(input_ids, loss_mask, idx, self.pad_id).items()
            }
            out = self.score(tensors)
            score[idx] = out.score.float().cpu().numpy()
            n_tokens[idx] = out.n_tokens.cpu().numpy()
            if out.loss_full is not None:
                loss_full[idx], has_full = out.loss_full.float().cpu().numpy(), True
            if out.loss_gated is not None:
                loss_gated[idx], has_gated = out.loss_gated.float().cpu().numpy(), True
            for c, values in components.items():
                if c in out.extra:  # e.g. loss_minus only for a central difference: NaN otherwise
                    values[idx] = out.extra[c].float().cpu().numpy()
            if FEATURES_COL in out.extra:  # [B, D] pooled features for later targets (scoring/targets.py)
                f = out.extra[FEATURES_COL].cpu().numpy().astype(np.float16)
                if features is None:
                    features = np.zeros((n, f.shape[1]), dtype=np.float16)
                features[idx] = f
            seconds[idx] = (time.perf_counter() - t0) / len(idx)
            padded[idx] = tensors["input_ids"].shape[1]
        valid = np.zeros(n, dtype=bool)
        valid[ok] = True
        cols = {
            "score": pa.array(score, mask=~valid),
            "loss_full": pa.array(loss_full, mask=~(valid & has_full)),
            "loss_gated": pa.array(loss_gated, mask=~(valid & has_gated)),
            "n_tokens": pa.array(n_tokens),
            **{c: pa.array(values, mask=~valid) for c, values in components.items()},
            SCORE_TIME_COL: pa.array(seconds),
            ACTOR_COL: pa.array([self.actor_id] * n, pa.string()),
            PID_COL: pa.array(np.full(n, self.pid, dtype=np.int64)),
            PAD_COL: pa.array(padded),
            RSS_COL: pa.array(np.full(n, peak_rss_bytes(), dtype=np.int64)),
        }
        if features is not None:
            flat = pa.array(features.reshape(-1), pa.float16())
            cols[FEATURES_COL] = pa.FixedSizeListArray.from_arrays(flat, features.shape[1])
        if self.cfg.release_memory:
            release_free_memory()
        keep = [c for c in batch.column_names if c not in ("input_ids", "loss_mask")]
        out_table = batch.select(keep)
        for name, arr in cols.items():
            out_table = out_table.append_column(name, arr)
        return out_table

    def _score_icl(self, batch, ok, score, n_tokens, seconds, padded) -> dict[str, np.ndarray]:
        """icl_attention over the scorable rows ``ok`` of this call; fills score / n_tokens / seconds / padded
        in place and returns the component columns.

        Contexts are assembled in token space from each row's ``input_ids`` / ``loss_mask`` as tokenize.py made
        them: the row's own prompt format (chat scaffolding included) is kept, and the loss mask marks the
        answer, so no text is re-tokenised and no tokenizer merge across segment boundaries can change a row.
        Groups are (shard, row // icl_pool): the pipeline aligns blocks to them and hands each call one block.
        """
        from p2d_ray.scoring.icl import ICL_COLUMNS, to_segment

        t0 = time.perf_counter()
        ok = ok[np.lexsort((batch.column("_row").to_numpy()[ok], batch.column("_shard").to_numpy()[ok]))]
        take = pa.array(ok.astype(np.int64))
        ids = batch.column("input_ids").take(take).to_pylist()
        masks = batch.column("loss_mask").take(take).to_pylist()
        rows = [to_segment(i, m, self.icl.strip_bos) for i, m in zip(ids, masks, strict=True)]
        groups = np.stack(
            [batch.column("_shard").to_numpy()[ok], batch.column("_row").to_numpy()[ok] // self.cfg.icl_pool],
            axis=1,
        ).astype(np.int64)
        out = self.icl.score_rows(rows, groups) if len(rows) else None
        n = batch.num_rows
        extra = {c: np.full(n, np.nan) for c in ICL_COLUMNS}
        extra["icl_contexts"] = np.zeros(n, dtype=np.int32)
        if out is not None:
            score[ok] = out.score
            extra["icl_weight"][ok], extra["icl_metric"][ok] = out.weight, out.metric
            extra["icl_contexts"][ok] = out.contexts
            n_tokens[ok] = [int(sum(m[1:])) for m in masks]
            seconds[ok] = (time.perf_counter() - t0) / len(ok)
            padded[ok] = [len(i) for i in ids]
        return extra
