"""A scoring actor's memory (issue 26, item 8): micro-batches capped in padded tokens, the C heap handed back
after a call, and every actor's peak resident set recorded in score_stats.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoConfig

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config
from p2d_ray.scoring.actor import ScorerActor, peak_rss_bytes, release_free_memory, token_capped

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_token_capped_cuts_micro_batches_in_order():
    lengths = np.array([100, 90, 50, 50, 50, 10, 300])
    mbs = [np.array([0, 1, 2, 3, 4, 5]), np.array([6])]
    pieces = token_capped(mbs, lengths, 200)
    assert [p.tolist() for p in pieces] == [[0, 1], [2, 3, 4, 5], [6]]  # 2x100, 4x50, one row alone
    for p in pieces[:2]:
        assert len(p) * lengths[p].max() <= 200
    assert [p.tolist() for p in token_capped(mbs, lengths, None)] == [m.tolist() for m in mbs]
    # unsorted rows: the piece's longest row counts, wherever it sits
    assert [p.tolist() for p in token_capped([np.array([5, 0])], lengths, 100)] == [[5], [0]]


def test_peak_rss_is_the_process_high_water_mark():
    before = peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert peak_rss_bytes() >= before
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    assert abs(peak_rss_bytes() - int(status["VmHWM"].split()[0]) * 1024) < 8 * 2**20
    del block
    release_free_memory()  # glibc malloc_trim: must not fail, whatever is free


def _batch(rows: list[tuple[int, int]]) -> pa.Table:
    """A tokenised call as the pipeline hands it: (shard, row) keys, ids of varying lengths."""
    rng = np.random.default_rng(0)
    ids, masks, lengths = [], [], []
    for i in range(len(rows)):
        n = 8 + (i * 7) % 40
        ids.append(rng.integers(3, 200, n).tolist())
        masks.append([0] * (n // 2) + [1] * (n - n // 2))
        lengths.append(n)
    return pa.table(
        {
            "id": list(range(len(rows))),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "loss_mask": pa.array(masks, pa.list_(pa.int8())),
            "length": pa.array(lengths, pa.int32()),
            "reason": pa.nulls(len(rows), pa.string()),
            "_shard": pa.array([s for s, _ in rows], pa.int32()),
            "_row": pa.array([r for _, r in rows], pa.int32()),
        }
    )


def test_a_token_cap_keeps_the_scores(tiny_llama):
    """Capped micro-batches score every row as uncapped ones do (up to float rounding of the padding)."""
    heads = HeadSet(((0, 1), (1, 2)), geometry_from_config(AutoConfig.from_pretrained(tiny_llama)))
    batch = _batch([(0, r) for r in range(24)])
    out = {}
    for cap in (None, 64):
        cfg = build_config(
            {
                "model": {"name_or_path": tiny_llama},
                "score": {
                    "scorer": "influence",
                    "batch_size": 8,
                    "max_batch_tokens": cap,
                    "release_memory": True,
                },
            }
        )
        actor = ScorerActor(cfg.model.model_dump_json(), cfg.score.model_dump_json(), heads.to_json())
        out[cap] = actor(batch)
    from p2d_ray.scoring.actor import micro_batch_rows

    mbs = micro_batch_rows(batch, np.arange(24), 8, None)
    pieces = token_capped(mbs, batch.column("length").to_numpy(), 64)
    assert len(pieces) > len(mbs)  # the cap did cut the 8-row micro-batches (of up to 8 x 47 tokens)
    for col in ("score", "loss_full", "loss_gated"):
        np.testing.assert_allclose(
            out[64].column(col).to_numpy(), out[None].column(col).to_numpy(), atol=1e-5
        )
    assert out[64].column("_peak_rss").to_numpy().min() > 50 * 2**20  # torch alone is more than that


def assert_peak_rss_recorded(run_dir: str | Path) -> None:
    """score_stats.json names every actor process's peak RSS (bytes) and the largest; called by the pipeline
    tests of tests/test_data_shapes.py (one Ray pass serves both checks)."""
    stats = json.loads(Path(run_dir, "score_stats.json").read_text())["actors"]
    peaks = stats["peak_rss_bytes"]
    assert len(peaks) == stats["processes"] >= 1, stats
    for pid, rss in peaks.items():
        assert int(pid) > 0 and 100 * 2**20 < rss < 64 * 2**30, (pid, rss)  # a Python + torch process
    assert stats["max_peak_rss_bytes"] == max(peaks.values())


def test_peak_rss_reaches_score_stats():
    """The collector keeps each process's largest reported peak (rows of several calls, two actors)."""
    from p2d_ray.scoring.collect import ShardCollector

    collector = ShardCollector.__new__(ShardCollector)
    collector.peak_rss = {}
    table = pa.table({"_pid": [7, 7, 9], "_peak_rss": [100, 300, 200]})
    collector._peak_rss(table)
    collector._peak_rss(pa.table({"_pid": [7], "_peak_rss": [250]}))
    assert collector.peak_rss == {7: 300, 9: 200}
