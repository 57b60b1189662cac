"""``p2d-ray validate``: check a config against its model, heads and corpus before a cluster is paid for.

No Ray and no GPU: only the model's HF *config* is read (never its weights), only Parquet footers and
schemas of the corpus, only heads.json. Every check yields one finding::

    {"check": "model", "status": "ok" | "unchecked" | "error", "message": "..."}

``unchecked`` is not a failure: it means the thing cannot be reached from here (a hub model that is not
in the local cache while offline, an s3:// corpus without network or credentials) and will be read by the
cluster at run time. ``error`` means the run would fail: a missing local path, a model family we cannot
gate, heads localised on another geometry, a corpus without the columns the prompt format needs.

Remote paths are probed in a subprocess with a deadline, so an unreachable bucket costs seconds, never a
hang (pyarrow's S3 client retries DNS and credential look-ups on its own schedule).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from p2d_ray.config import P2DConfig

REMOTE_PROBE_TIMEOUT_S = 45.0
MAX_FILES_TO_COUNT = 256  # counting rows reads every footer: fine locally, slow for 10k s3 objects


class ValidationFailed(ValueError):
    """At least one check failed; ``report`` holds every finding."""

    def __init__(self, report: dict):
        self.report = report
        lines = [f"  - {f['check']}: {f['message']}" for f in report["findings"] if f["status"] == "error"]
        super().__init__("config does not validate:\n" + "\n".join(lines))


def _finding(check: str, status: str, message: str, **extra) -> dict:
    return {"check": check, "status": status, "message": message, **extra}


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


# -- tables (corpus, probe set, held-out set) ---------------------------------------------------------
def probe_table(path: str) -> dict:
    """Schema, file count and (when cheap) row count of a Parquet dataset or a JSONL/JSON file.

    Returns ``{"columns": [...], "files": n, "rows": n | None}`` or ``{"error": "..."}``; never raises.
    """
    import pyarrow.dataset as pads

    from p2d_ray.data.io import read_table

    try:
        if path.endswith((".jsonl", ".json")):
            table = read_table(path)  # probe/held-out sets: small by construction
            return {"columns": table.column_names, "files": 1, "rows": table.num_rows}
        dataset = pads.dataset(path, format="parquet")
        files = dataset.files
        if not files:
            return {"error": f"no Parquet files under {path}"}
        rows = dataset.count_rows() if len(files) <= MAX_FILES_TO_COUNT else None
        return {"columns": dataset.schema.names, "files": len(files), "rows": rows}
    except FileNotFoundError:
        return {"error": f"not found: {path}"}
    except Exception as err:  # report any reader failure as a finding, with its type
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}


def _probe_remote(paths: list[str], timeout: float = REMOTE_PROBE_TIMEOUT_S) -> dict[str, dict]:
    """Probe remote paths in one subprocess (threads inside), killed at ``timeout``."""
    if not paths:
        return {}
    cmd = [sys.executable, "-m", "p2d_ray.validate", "--probe", json.dumps(paths)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {p: {"error": f"no answer within {timeout:.0f} s"} for p in paths}
    except (json.JSONDecodeError, IndexError):
        return {p: {"error": f"probe failed: {out.stderr.strip()[-300:]}"} for p in paths}
    return result


def _table_findings(check: str, path: str, probed: dict, cfg: P2DConfig, need_id: bool) -> list[dict]:
    from p2d_ray.data.formatting import resolve_format

    if "error" in probed:
        if is_remote(path):
            msg = f"{path} is unreachable from here ({probed['error']}); the cluster reads it at run time"
            return [_finding(check, "unchecked", msg)]
        return [_finding(check, "error", probed["error"])]
    cols = probed["columns"]
    problems = []
    try:
        fmt = resolve_format(cfg.data, cols)
    except ValueError as err:
        problems.append(str(err))
        fmt = None
    if need_id and cfg.data.id_column not in cols:
        problems.append(
            f"data.id_column={cfg.data.id_column!r} is not a column of {path} (found {sorted(cols)}): "
            "scores are joined back to rows by id"
        )
    if problems:
        return [_finding(check, "error", "; ".join(problems), columns=cols)]
    rows = probed["rows"]
    size = f"{rows} rows" if rows is not None else "rows not counted"
    msg = f"{path}: {probed['files']} file(s), {size}, format {fmt}"
    return [_finding(check, "ok", msg, columns=cols, rows=rows, files=probed["files"], format=fmt)]


def _data_findings(cfg: P2DConfig) -> list[dict]:
    from p2d_ray.data import paths

    # None means the offline demo assets (built and cached on first use).
    tables = {
        "corpus": (paths.corpus_path(cfg), True),
        "probe": (paths.probe_path(cfg), False),
        "heldout": (paths.heldout_path(cfg), False),
    }
    remote = _probe_remote(sorted({p for p, _ in tables.values() if is_remote(p)}))
    findings = []
    for check, (path, need_id) in tables.items():
        probed = remote[path] if is_remote(path) else probe_table(path)
        findings += _table_findings(check, path, probed, cfg, need_id)
    return findings


# -- model ----------------------------------------------------------------------------------------------
def _looks_local(name: str) -> bool:
    """A filesystem path rather than a hub id (``org/name``)."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _model_findings(cfg: P2DConfig) -> tuple[list[dict], object | None]:
    """(findings, geometry or None)."""
    from transformers import AutoConfig

    from p2d_ray.assets import is_asset_model, model_dir
    from p2d_ray.models.geometry import UnsupportedModelError, geometry_from_config

    name = path = cfg.model.name_or_path
    if is_asset_model(name):
        # An offline asset model: check the cached build if there is one, never build it just to check.
        built = model_dir(name)
        if not (built / "config.json").is_file():
            return [
                _finding("model", "ok", f"{name}: offline asset model, built on first use under {built}")
            ], None
        path = str(built)
    local = _looks_local(path)
    if local and not Path(path).expanduser().is_dir():
        return [_finding("model", "error", f"model.name_or_path={name!r}: no such directory")], None
    if not local:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=cfg.model.revision)
        if not isinstance(cached, str) and _hub_offline():
            msg = (
                f"{name}: cannot check offline (config.json is not in the local Hugging Face cache); "
                "the cluster downloads it at run time"
            )
            return [_finding("model", "unchecked", msg)], None
    try:
        hf_config = AutoConfig.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        text = str(err)
        if not local and ("connect" in text.lower() or "offline" in text.lower()):
            return [_finding("model", "unchecked", f"{name}: hub unreachable from here ({text[:200]})")], None
        return [
            _finding("model", "error", f"model.name_or_path={name!r}: {text.splitlines()[0][:300]}")
        ], None
    try:
        geo = geometry_from_config(hf_config)
    except UnsupportedModelError as err:
        return [_finding("model", "error", str(err))], None
    findings = [
        _finding(
            "model",
            "ok",
            f"{name}: {geo.family}, {geo.n_layers} layers x {geo.n_heads} heads "
            f"({geo.n_kv_heads} kv), head_dim {geo.head_dim}",
            geometry=geo.to_dict(),
        )
    ]
    max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if max_pos is not None and cfg.data.max_length > max_pos:
        msg = f"data.max_length={cfg.data.max_length} exceeds the model's {max_pos} positions"
        findings.append(_finding("model", "error", msg))
    if local:
        findings += _weights_findings(Path(path).expanduser(), cfg)
    return findings, geo


def _weights_findings(path: Path, cfg: P2DConfig) -> list[dict]:
    """Local checkpoints: weight files in the format the loader will accept, and a tokenizer."""
    out = []
    if cfg.model.use_safetensors and not any(path.glob("*.safetensors")):
        out.append(
            _finding(
                "model",
                "error",
                f"{path}: no *.safetensors weights (model.use_safetensors=true refuses pickle)",
            )
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        out.append(_finding("model", "error", f"{path}: no tokenizer files"))
    return out


# -- heads ----------------------------------------------------------------------------------------------
def _heads_findings(cfg: P2DConfig, geo) -> list[dict]:
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.rundir import RunDir

    findings = []
    if geo is not None and cfg.localize.top_k is not None and cfg.localize.top_k > geo.total_heads:
        msg = f"localize.top_k={cfg.localize.top_k} exceeds the model's {geo.total_heads} heads"
        findings.append(_finding("heads", "error", msg))
    heads_json = RunDir(cfg.run_dir).heads_json
    if not heads_json.is_file():
        findings.append(_finding("heads", "ok", f"no {heads_json} yet: localize writes it"))
        return findings
    try:
        heads = HeadSet.load(heads_json)
    except ValueError as err:
        return findings + [_finding("heads", "error", f"{heads_json}: {err}")]
    if geo is None:
        msg = f"{heads_json}: {len(heads)} heads; not checked against the model (model config unavailable)"
        return findings + [_finding("heads", "unchecked", msg)]
    try:
        heads.check_fits(geo)
    except ValueError as err:
        return findings + [_finding("heads", "error", f"{heads_json}: {err}")]
    return findings + [_finding("heads", "ok", f"{heads_json}: {len(heads)} heads fit the model")]


# -- run-wide -------------------------------------------------------------------------------------------
def _run_findings(cfg: P2DConfig) -> list[dict]:
    if is_remote(cfg.run_dir):
        # Stages hand files to each other through the run directory (p2d_ray.rundir, pathlib based).
        msg = (
            f"run_dir={cfg.run_dir!r}: must be a filesystem path every node sees (local for one node, "
            "NFS/EFS/Filestore for a cluster); put checkpoints on s3:// with train.storage_path"
        )
        return [_finding("run", "error", msg)]
    return [_finding("run", "ok", f"run_dir {cfg.run_dir}")]


def run_validate(cfg: P2DConfig, *, raise_on_error: bool = True) -> dict:
    """Check ``cfg`` against its model (HF config only), heads (heads.json, if present) and data.

    Returns ``{"ok": bool, "findings": [...]}``. Raises :class:`ValidationFailed` (a ValueError listing
    every failed check) when ``raise_on_error`` and any check failed, so ``p2d-ray validate`` exits 2.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The data probe (a subprocess for remote paths) overlaps with reading the model config.
        data = pool.submit(_data_findings, cfg)
        model, geo = _model_findings(cfg)
        findings = _run_findings(cfg) + model + _heads_findings(cfg, geo) + data.result()
    report = {"ok": not any(f["status"] == "error" for f in findings), "findings": findings}
    if raise_on_error and not report["ok"]:
        raise ValidationFailed(report)
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    # Subprocess side of _probe_remote: one thread per path, one JSON line out.
    _paths = json.loads(sys.argv[2])
    with ThreadPoolExecutor(max_workers=max(1, len(_paths))) as _pool:
        _results = dict(zip(_paths, _pool.map(probe_table, _paths), strict=True))
    print(json.dumps(_results))
