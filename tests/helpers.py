"""Helpers several test modules (and benchmarks) share: input files written the way a user would, a scores
directory written the way scoring would, and the check that training moved only the selected heads.

Imported like conftest (``from helpers import ...``): pytest puts tests/ on sys.path; a benchmark inserts it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_parts(directory: Path, table: pa.Table, n_files: int, **write_kw) -> None:
    """``table`` split evenly, in order, into ``directory/part-{i}.parquet`` (``write_kw``: e.g.
    ``row_group_size``): files x row groups = the shards scoring plans."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // n_files)
    for i in range(n_files):
        pq.write_table(table.slice(i * per, per), directory / f"part-{i}.parquet", **write_kw)


def write_probe_and_heldout(root: Path, corpus: pa.Table, n_probe: int, n_heldout: int) -> None:
    """``root/probe.parquet`` and ``root/heldout.parquet`` of the demo mixture, none of their prompts in
    ``corpus`` nor in each other."""
    from p2d_ray.assets.synthetic import generate_heldout, generate_probe

    used = corpus.column("prompt").to_pylist()
    probe = generate_probe(used, n_rows=n_probe)
    pq.write_table(probe, root / "probe.parquet")
    heldout = generate_heldout(used + probe.column("prompt").to_pylist(), n_rows=n_heldout)
    pq.write_table(heldout, root / "heldout.parquet")


def write_job_inputs(root: Path, n_corpus: int, n_files: int, n_probe: int, n_heldout: int) -> str:
    """What a submitted job reads, as a user would have it: the demo mixture as
    ``root/corpus/part-{i}.parquet`` (``n_files`` files of row groups of 100 rows), ``root/probe.parquet``,
    ``root/heldout.parquet``, and a tiny random Llama in ``root/model``. Returns the model's path."""
    from conftest import save_tiny_model

    from p2d_ray.assets.synthetic import generate_corpus

    corpus = generate_corpus(n_corpus, seed=0)
    write_parts(root / "corpus", corpus, n_files, row_group_size=100)
    write_probe_and_heldout(root, corpus, n_probe, n_heldout)
    return save_tiny_model(root / "model", "llama")


def write_scores(run_dir: Path, corpus: Path, columns: Callable[[pa.ChunkedArray], dict]) -> None:
    """A complete scores directory for the Parquet ``corpus`` (one shard per row group, ``id`` keyed),
    written through the same ScoreStore API the pipeline uses (marker last). ``columns(ids)`` gives a
    shard's columns besides ``id``: score, loss_full, loss_gated, n_tokens."""
    from p2d_ray.scoring.outputs import ScoreStore
    from p2d_ray.scoring.shards import plan_shards, read_shard

    shards, _ = plan_shards(str(corpus), ["id"])
    store = ScoreStore(run_dir)
    store.open(
        {
            "fingerprint": "f0",
            "identity": {},
            "scorer": "influence",
            "corpus": str(corpus),
            "icl_demos": [],
            "shards": [s.to_dict() for s in shards],
        }
    )
    for shard in shards:
        ids = read_shard(shard, ["id"]).column("id")
        scores = pa.table({"id": ids, **columns(ids)})
        store.write_shard(shard, scores, pa.table({}), {"fingerprint": "f0"}, {"scorer": "influence"})


def assert_only_heads_moved(model, base, heads) -> None:
    """Outside the q/k/v/o slices of ``heads`` every parameter of ``model`` is bitwise ``base``'s; inside,
    every weight the heads own moved."""
    import torch

    from p2d_ray.models.geometry import attention_geometry, head_params, slice_weight

    geo = attention_geometry(base)
    names = {id(p): n for n, p in base.named_parameters()}
    owned = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in base.named_parameters()}
    for layer, head in heads:
        hp = head_params(base, geo, layer, head)
        for ws in (hp.q, hp.k, hp.v, hp.o):
            slice_weight(ws, owned[names[id(ws.module.weight)]]).fill_(True)
    base_params = dict(base.named_parameters())
    for name, p in model.named_parameters():
        b, m = base_params[name], owned[name]
        assert torch.equal(p[~m], b[~m]), f"{name}: entries outside the selected heads changed"
        if m.any():
            assert not torch.equal(p[m], b[m]), f"{name}: selected entries did not move"


def task_or_item_rows(start: int, n: int, task: bool) -> list[dict]:
    """Ids ``start..start+n``: an addition task ("What is i plus j?") or off-task item descriptions."""
    if task:
        return [
            {
                "id": i,
                "prompt": f"What is {i} plus {i % 7}? ",
                "response": f"It is {i + i % 7}. #### {i + i % 7}",
            }
            for i in range(start, start + n)
        ]
    return [
        {
            "id": i,
            "prompt": f"Tell me about item {i}{' please' * (i % 4)}. ",
            "response": f"Item {i} is blue.",
        }
        for i in range(start, start + n)
    ]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every TensorBoard event file under ``log_dir`` (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc; payload = an ``Event`` proto)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    for path in files:
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out
