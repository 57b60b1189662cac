"""Driver side of the scoring pass: result rows grouped by shard, each shard written once complete.

The driver receives only the small per-row results (id, scores, reason, shard/row keys). A shard's score
and quarantine files are written the moment its last row arrives, then its completion marker; the summary
is rebuilt from every marker and fails loudly if any row is unaccounted for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2d_ray.scoring.actor import ACTOR_COL, PAD_COL, PID_COL, RSS_COL, SCORE_TIME_COL
from p2d_ray.scoring.outputs import SCORE_COLUMNS, ScoreStore
from p2d_ray.scoring.plan import ScorePlan
from p2d_ray.scoring.quarantine import count_reasons, quarantine_table
from p2d_ray.scoring.scorers import COMPONENT_COLUMNS
from p2d_ray.scoring.shards import Shard
from p2d_ray.scoring.tokenize import TOKENIZE_TIME_COL

log = logging.getLogger("p2d_ray.score")


class ShardCollector:
    """Driver side of the pass: groups result rows by shard, writes a shard once all its rows arrived."""

    def __init__(
        self,
        store: ScoreStore,
        plan: ScorePlan,
        todo: dict[int, Shard],
        id_column: str,
        on_shard_done: Callable[[Shard], None] | None = None,
    ):
        self.store, self.plan, self.todo, self.id_column = store, plan, todo, id_column
        self.on_shard_done = on_shard_done
        self.parts: dict[int, list[pa.Table]] = {}
        self.count: dict[int, int] = {}
        self.finished: list[int] = []
        self.extra_columns: tuple[str, ...] = ()  # written beside the scores (distill.py: score_source, ood)
        self.write_seconds = 0.0
        self.stats = {
            "rows": 0,
            "scored": 0,
            "tokens": 0,
            "target_tokens": 0,
            "padded_tokens": 0,
            "tokenize_s": 0.0,
            "score_s": 0.0,
        }
        self.actors: set[str] = set()  # Ray actor ids: a killed and restarted actor counts once
        self.pids: set[int] = set()  # its processes: one more per restart
        self.peak_rss: dict[int, int] = {}  # actor process id -> its peak resident set (bytes)

    def add(self, block: pa.Table) -> None:
        sids = block.column("_shard").to_numpy()
        for sid in np.unique(sids):
            part = block.filter(pa.array(sids == sid))
            sid = int(sid)
            self.parts.setdefault(sid, []).append(part)
            self.count[sid] = self.count.get(sid, 0) + part.num_rows
            if self.count[sid] > self.todo[sid].num_rows:
                raise RuntimeError(f"shard {self.todo[sid].key}: received more rows than it has")
            if self.count[sid] == self.todo[sid].num_rows:
                self._finish(sid)

    def _finish(self, sid: int) -> None:
        t0 = time.perf_counter()
        shard = self.todo[sid]
        table = pa.concat_tables(self.parts.pop(sid)).sort_by("_row")
        rows = table.column("_row").to_numpy()
        if not np.array_equal(rows, np.arange(shard.num_rows)):
            raise RuntimeError(f"shard {shard.key}: rows missing or duplicated in the pipeline output")
        bad = table.column("reason").is_valid()
        scored = table.filter(pc.invert(bad))
        quarantined = table.filter(bad)
        components = COMPONENT_COLUMNS.get(self.plan.provenance.get("scorer"), ())
        score_table = scored.select([self.id_column, *SCORE_COLUMNS, *components, *self.extra_columns])
        record = {
            "shard": shard.key,
            "path": shard.path,
            "row_group": shard.row_group,
            "rows_in": shard.num_rows,
            "rows_scored": scored.num_rows,
            "rows_quarantined": quarantined.num_rows,
            "reasons": count_reasons(quarantined.column("reason")),
            "rows_truncated": int(pc.sum(scored.column("truncated")).as_py() or 0),
            "target_tokens": int(pc.sum(scored.column("n_tokens")).as_py() or 0),
            "fingerprint": self.plan.fingerprint,
        }
        if record["rows_scored"] + record["rows_quarantined"] != record["rows_in"]:
            raise RuntimeError(f"shard {shard.key}: rows_in != rows_scored + rows_quarantined: {record}")
        if "unreadable" in record["reasons"]:
            log.warning(
                "%s row group %d cannot be decoded: its %d rows are quarantined as unreadable",
                shard.path,
                shard.row_group,
                shard.num_rows,
            )
        self.store.write_shard(
            shard,
            score_table,
            quarantine_table(quarantined, shard, self.id_column),
            record,
            self.plan.provenance,
        )
        st = self.stats
        st["rows"] += shard.num_rows
        st["scored"] += scored.num_rows
        st["tokens"] += int(pc.sum(scored.column("length")).as_py() or 0)
        st["target_tokens"] += record["target_tokens"]
        st["padded_tokens"] += int(pc.sum(scored.column(PAD_COL)).as_py() or 0)
        st["tokenize_s"] += float(pc.sum(table.column(TOKENIZE_TIME_COL)).as_py() or 0.0)
        st["score_s"] += float(pc.sum(table.column(SCORE_TIME_COL)).as_py() or 0.0)
        self.actors.update(pc.unique(scored.column(ACTOR_COL)).to_pylist())
        self.pids.update(int(p) for p in pc.unique(scored.column(PID_COL)).to_pylist())
        self._peak_rss(scored)
        self.finished.append(sid)
        self.write_seconds += time.perf_counter() - t0
        log.info("scored shard %s (%d/%d this run)", shard.key, len(self.finished), len(self.todo))
        if self.on_shard_done is not None:
            self.on_shard_done(shard)

    def _peak_rss(self, scored: pa.Table) -> None:
        """Each actor process's largest peak resident set (bytes) over its result rows."""
        if scored.num_rows == 0:
            return
        grouped = scored.group_by(PID_COL).aggregate([(RSS_COL, "max")])
        for pid, rss in zip(grouped[PID_COL].to_pylist(), grouped[f"{RSS_COL}_max"].to_pylist(), strict=True):
            self.peak_rss[int(pid)] = max(self.peak_rss.get(int(pid), 0), int(rss))

    def check_complete(self) -> None:
        missing = [self.todo[s].key for s in self.todo if s not in self.finished]
        if missing:
            raise RuntimeError(
                f"{len(missing)} shard(s) did not receive all their rows (e.g. {missing[:3]}): rows were lost "
                "in the pipeline; nothing was marked done for them"
            )


def summarize(store: ScoreStore, plan: ScorePlan) -> dict:
    """score_summary.json from every shard's marker; fails loudly if any row is unaccounted for."""
    per_shard, reasons = {}, {}
    totals = {"rows_in": 0, "rows_scored": 0, "rows_quarantined": 0, "rows_truncated": 0}
    for shard in plan.shards:
        rec = store.marker(shard, plan.fingerprint)
        if rec is None:
            raise RuntimeError(f"shard {shard.key} has no completion marker after the run")
        if rec["rows_in"] != shard.num_rows or rec["rows_scored"] + rec["rows_quarantined"] != rec["rows_in"]:
            raise RuntimeError(f"shard {shard.key}: rows_in != rows_scored + rows_quarantined ({rec})")
        per_shard[shard.key] = {k: rec[k] for k in ("rows_in", "rows_scored", "rows_quarantined", "reasons")}
        for k in totals:
            totals[k] += rec[k]
        for r, n in rec["reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
    if totals["rows_in"] != totals["rows_scored"] + totals["rows_quarantined"]:
        raise RuntimeError(f"rows_in != rows_scored + rows_quarantined in total: {totals}")
    return {
        **totals,
        "quarantine_reasons": reasons,
        "n_shards": len(plan.shards),
        **plan.provenance,
        "shards": per_shard,
    }
