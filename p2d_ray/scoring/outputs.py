"""The scores directory: one Parquet file per input shard; its bookkeeping in a directory of its own.

    scores/<shard key>.parquet             id, score, loss_full, loss_gated, n_tokens (+ provenance metadata)
    quarantine/<shard key>.parquet         the shard's unscorable rows, with a ``reason`` (only shards that
                                           have some: no quarantine/ at all means no row was refused)
    _state/scores/manifest.json            what produced these scores (fingerprint) and the corpus shard list
    _state/scores/done/<shard key>.json    written LAST, after the shard's score and quarantine files are durable

Data directories hold data only, so ``datasets.load_dataset("<run_dir>/scores")`` and
``pandas.read_parquet("<run_dir>/scores")`` open them in one call. A shard counts as finished only when its
marker exists and carries the manifest's fingerprint, so an interrupted run leaves at worst a score file
without a marker, which the rerun simply rewrites. Every file is written to a hidden temporary name and
renamed into place (atomic on POSIX filesystems; readers skip names starting with ``.``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from p2d_ray.rundir import RunDir
from p2d_ray.scoring.shards import Shard

SCORE_COLUMNS = ("score", "loss_full", "loss_gated", "n_tokens")
METADATA_KEY = b"p2d"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_provenance(path: str | Path) -> dict:
    """The provenance a score file carries in its Parquet metadata (scorer, heads and config fingerprints)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))


STATE_DIR = "_state"


def state_dir(scores: Path) -> Path:
    """Bookkeeping of ``scores``: ``<parent>/_state/<name>``, beside the data and never inside it. Resolved
    through symlinks, so a run that links another run's scores (``p2d-ray compare``) reads its markers too."""
    real = scores.resolve()
    return real.parent / STATE_DIR / real.name


class ScoreStore:
    def __init__(self, run_dir: str | Path):
        run = RunDir(run_dir)
        self.scores, self.quarantine = run.scores, run.quarantine
        self.state = state_dir(self.scores)
        self.done = self.state / "done"
        self.manifest_path = self.state / "manifest.json"
        self._migrate()

    def _migrate(self) -> None:
        """Move the bookkeeping of a run made before it left ``scores/`` (``scores/_manifest.json`` and
        ``scores/_done/``) to its own directory, so such a run still resumes."""
        old_manifest, old_done = self.scores / "_manifest.json", self.scores / "_done"
        if not old_manifest.is_file() or self.manifest_path.exists():
            return
        self.state.mkdir(parents=True, exist_ok=True)
        if old_done.is_dir():
            shutil.rmtree(self.done, ignore_errors=True)
            os.replace(old_done, self.done)
        os.replace(old_manifest, self.manifest_path)

    # -- manifest ---------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else None

    def open(self, manifest: dict) -> None:
        """Start a new scores directory, or check that a resumed one was made by the same config, heads,
        model and corpus. Raises ValueError rather than mixing scores of two configurations."""
        old = self.read_manifest()
        leftovers = list(self.scores.glob("*.parquet")) if self.scores.is_dir() else []
        if old is not None and not leftovers:
            # Bookkeeping without a single score file (scores/ deleted to rescore): nothing to mix, start over.
            shutil.rmtree(self.state)
            old = None
        if old is None:
            if leftovers:
                raise ValueError(
                    f"{self.scores} holds {len(leftovers)} score file(s) but {self.manifest_path} is missing: "
                    "cannot tell what produced them; delete the directory or choose another run_dir"
                )
            for d in (self.scores, self.done):
                d.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, default=str))
            return
        if old["fingerprint"] != manifest["fingerprint"]:
            a, b = old.get("identity", {}), manifest["identity"]
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(
                f"{self.scores} was produced by a different configuration (changed: {', '.join(changed)}); "
                "refusing to mix scores. Use another run_dir or delete scores/ and quarantine/ to rescore."
            )
        if old["shards"] != manifest["shards"]:
            raise ValueError(
                f"the corpus changed since {self.scores} was started ({len(old['shards'])} shards then, "
                f"{len(manifest['shards'])} now, or files differ); refusing to mix scores. Use another run_dir "
                "or delete scores/ and quarantine/ to rescore."
            )
        self.done.mkdir(parents=True, exist_ok=True)

    # -- shards -----------------------------------------------------------------------------------
    def score_path(self, shard: Shard) -> Path:
        return self.scores / f"{shard.key}.parquet"

    def quarantine_path(self, shard: Shard) -> Path:
        return self.quarantine / f"{shard.key}.parquet"

    def marker(self, shard: Shard, fingerprint: str) -> dict | None:
        """The shard's completion record if it finished under ``fingerprint`` and its file exists."""
        p = self.done / f"{shard.key}.json"
        if not p.is_file() or not self.score_path(shard).is_file():
            return None
        rec = json.loads(p.read_text())
        return rec if rec.get("fingerprint") == fingerprint else None

    def write_shard(
        self, shard: Shard, scored: pa.Table, quarantined: pa.Table, record: dict, provenance: dict
    ) -> None:
        """Write the shard's scores and quarantine rows, then (last) its marker."""
        meta = {METADATA_KEY: json.dumps({**provenance, "shard": shard.to_dict()}, default=str).encode()}
        _atomic_write_table(self.score_path(shard), scored.replace_schema_metadata(meta))
        qpath = self.quarantine_path(shard)
        if quarantined.num_rows:
            qpath.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_table(qpath, quarantined.replace_schema_metadata(meta))
        elif qpath.exists():
            qpath.unlink()
        _atomic_write_text(self.done / f"{shard.key}.json", json.dumps(record, indent=1))

    def score_files(self, shards: list[Shard]) -> list[str]:
        return [str(self.score_path(s)) for s in shards]
