"""``p2d-ray validate``: check a config against its model, heads and data before a cluster is paid for,
and the pre-flight check every command runs before its first stage (:func:`preflight`).

No Ray and no GPU: only the model's HF *config* and file listing are read (never its weights), heads.json,
and the data exactly as the stages will read it: the corpus through the one listing rule
(``p2d_ray.data.ingest``; a JSONL / CSV / ``datasets`` corpus is ingested into the run directory first, once),
every file's footer (each must have the columns the first file's format needs, and the corpus must have rows)
and -- for ``validate`` itself, ``deep`` -- every row group of the id and text columns decoded (a corrupt data
page behind an intact footer is found here; measured cost in BENCHMARKS.md) with invalid UTF-8 counted.
Probe and held-out sets are read whole (they are small) and every row checked for the text the format needs.
Every check yields one finding::

    {"check": "model", "status": "ok" | "unchecked" | "error", "message": "..."}

``unchecked`` is not a failure: it means the thing cannot be reached from here (a hub model that is not
in the local cache while offline, an s3:// corpus without network or credentials) and will be read by the
cluster at run time. ``error`` means the run would fail: a missing local path, a model family we cannot
gate, pickle-only weights, no tokenizer, heads localised on another model, a corpus without the columns the
prompt format needs, 0 rows, a corrupt file.

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
    """Findings for a remote table from its probe (footers and schema only)."""
    from p2d_ray.data.formatting import resolve_format

    if "error" in probed:
        msg = f"{path} is unreachable from here ({probed['error']}); the cluster reads it at run time"
        return [_finding(check, "unchecked", msg)]
    cols = probed["columns"]
    problems = []
    try:
        fmt = resolve_format(cfg.data, cols)
    except ValueError as err:
        problems.append(str(err))
        fmt = None
    if need_id and cfg.data.id_column not in cols:
        problems.append(_no_id(path, cols, cfg))
    if problems:
        return [_finding(check, "error", "; ".join(problems), columns=cols)]
    rows = probed["rows"]
    size = f"{rows} rows" if rows is not None else "rows not counted"
    msg = f"{path}: {probed['files']} file(s), {size}, format {fmt}"
    return [_finding(check, "ok", msg, columns=cols, rows=rows, files=probed["files"], format=fmt)]


def _no_id(path: str, cols, cfg: P2DConfig) -> str:
    return (
        f"data.id_column={cfg.data.id_column!r} is not a column of {path} (found {sorted(cols)}): "
        "rows are joined back to their scores by id"
    )


def _decode(shards, columns: list[str], rules: dict | None = None) -> tuple[list[str], int, int]:
    """Decode every shard's ``columns`` as the score stage will: (problems naming file and row group, rows
    with invalid UTF-8, rows ``score`` can score by ``rules``, :func:`_column_rules`). pyarrow decodes ~1M
    short rows/s per core, in a thread pool."""
    import pyarrow as pa

    from p2d_ray.scoring.shards import read_shard
    from p2d_ray.scoring.tokenize import invalid_utf8

    def one(shard):
        try:
            table = read_shard(shard, columns)
        except (OSError, pa.ArrowException) as err:
            return (
                f"{shard.path} row group {shard.row_group}: cannot decode ({str(err).strip().splitlines()[0][:200]})",
                0,
                0,
            )
        masks = [m for m in (invalid_utf8(table.column(c)) for c in columns) if m is not None]
        return None, int(sum(masks).astype(bool).sum()) if masks else 0, _scorable(table, rules or {})

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, shards))
    return [p for p, _, _ in results if p], sum(n for _, n, _ in results), sum(k for _, _, k in results)


def _column_rules(cfg: P2DConfig, text: list[str]) -> dict[str, str]:
    """What ``score`` needs of each column it reads (``formatting.row_parts``): ``id`` not null; ``text``
    non-blank text (a response, a plain row's text); ``string`` text that may be blank (a prompt); ``list``
    not null (chat messages); ``optional`` anything (an Alpaca input)."""
    d = cfg.data
    rules = {d.id_column: "id"}
    for c in text:
        if c == getattr(d, "messages_column", None):
            rules[c] = "list"
        elif c == getattr(d, "input_column", None):
            rules[c] = "optional"
        elif c == d.prompt_column and d.response_column in text:
            rules[c] = "string"
        else:
            rules[c] = "text"
    return rules


def _scorable(table, rules: dict[str, str]) -> int:
    """Rows that meet every column's rule (:func:`_column_rules`): an upper bound on what ``score`` scores,
    and exact when it is 0."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = np.ones(table.num_rows, dtype=bool)
    for c, rule in rules.items():
        if rule == "optional":
            continue
        col = table.column(c)
        ok &= col.is_valid().to_numpy(zero_copy_only=False)
        if rule in ("id", "list"):
            continue
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            return 0  # not text: every row is quarantined as non_string
        if rule == "text":
            try:
                size = pc.utf8_length(pc.utf8_trim_whitespace(col))
            except pa.ArrowInvalid:  # invalid UTF-8: counted (and quarantined) as bad_utf8
                size = pc.binary_length(col)
            ok &= pc.fill_null(pc.greater(size, 0), False).to_numpy(zero_copy_only=False)
    return int(np.count_nonzero(ok))


def _dead_columns(files: list[str], rules: dict[str, str]) -> str | None:
    """From the footers alone (types and row-group null counts): why no row of the corpus can be scored,
    or None. A file is dead when its id column is null in every row, or a text column is not text (list,
    number, ...) or null in every row; a corpus whose files are all dead would quarantine every row, so
    it is refused up front (issue 25) rather than scored to an empty set."""
    import pyarrow as pa

    from p2d_ray.scoring.shards import read_footer

    if len(files) > MAX_FILES_TO_COUNT:
        return None
    why: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        metas = list(pool.map(read_footer, files))
    for meta in metas:
        schema = meta.schema.to_arrow_schema()
        dead = None
        for c, rule in rules.items():
            if rule == "optional":
                continue
            t = schema.field(c).type
            text_ok = pa.types.is_string(t) or pa.types.is_large_string(t) or rule in ("id", "list")
            if not text_ok and not pa.types.is_null(t):
                dead = f"column {c!r} is {t}, not text"
            elif pa.types.is_null(t) or _null_in_every_row(meta, c):
                dead = f"column {c!r} is null in every row"
            if dead:
                break
        if dead is None:
            return None
        why[dead] = why.get(dead, 0) + 1
    shown = "; ".join(f"{w} ({n} of {len(files)} file(s))" for w, n in why.items())
    return f"no row of the corpus can be scored: {shown}; every row would be quarantined"


def _null_in_every_row(meta, column: str) -> bool:
    """Every row group's statistics say ``column`` is all nulls (False when any lacks statistics)."""
    if meta.num_row_groups == 0:
        return False
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        chunk = next(
            (group.column(j) for j in range(group.num_columns) if group.column(j).path_in_schema == column),
            None,
        )
        stats = chunk.statistics if chunk is not None else None
        if stats is None or not stats.has_null_count or stats.null_count < group.num_rows:
            return False
    return True


def _corpus_findings(cfg: P2DConfig, deep: bool) -> list[dict]:
    """The corpus exactly as ``score`` reads it: listing rule, ingest, every footer, (deep) every page."""
    from p2d_ray.assets import paths
    from p2d_ray.data.columns import unread_columns
    from p2d_ray.data.formatting import resolve_format
    from p2d_ray.data.ingest import list_data_files
    from p2d_ray.scoring.plan import text_columns_for
    from p2d_ray.scoring.shards import plan_shards, read_footer

    path = paths.corpus_path(cfg)
    if is_remote(path):
        if not deep:
            return [_finding("corpus", "unchecked", f"{path}: remote, read by the score stage")]
        return _table_findings("corpus", path, _probe_remote([path])[path], cfg, True)
    try:
        source = list_data_files(path)
        parquet = paths.corpus_parquet(
            cfg
        )  # a JSONL / CSV / datasets corpus: ingested into run_dir once, here
        files = list_data_files(parquet).files
        names = read_footer(files[0]).schema.to_arrow_schema().names
        fmt = resolve_format(cfg.data, names)
        text = text_columns_for(cfg.data, names)
        if cfg.data.id_column not in names:
            raise ValueError(_no_id(files[0], names, cfg))
        shards, _ = plan_shards(parquet, [cfg.data.id_column, *text], files=files)
        dead = _dead_columns(files, _column_rules(cfg, text))
        if dead:
            raise ValueError(f"{parquet}: {dead}")
    except ValueError as err:
        return [_finding("corpus", "error", str(err).replace("\n  ", " ").replace("\n", " "))]
    rows = sum(sh.num_rows for sh in shards)
    via = "" if source.kind == "parquet" else f" (ingested from {source.kind} {path})"
    msg = f"{parquet}{via}: {len(files)} file(s), {len(shards)} shard(s), {rows} rows, format {fmt}"
    msg += source.skipped_note()
    unread = unread_columns(cfg.data, fmt, names)
    msg += f"; column(s) {unread} hold text but are not read" if unread else ""
    if deep:
        rules = _column_rules(cfg, text)
        problems, bad_utf8, scorable = _decode(shards, [cfg.data.id_column, *text], rules)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            return [_finding("corpus", "error", f"corrupt data: {shown}")]
        if scorable == 0:
            msg = (
                f"{parquet}: no row of the corpus can be scored: none of its {rows} rows has an id and the "
                f"text it needs in {text}; every row would be quarantined"
            )
            return [_finding("corpus", "error", msg)]
        if bad_utf8:
            msg += f"; {bad_utf8} row(s) with invalid UTF-8 will be quarantined (bad_utf8)"
    return [_finding("corpus", "ok", msg, columns=names, rows=rows, files=len(files), format=fmt)]


def _small_table_findings(check: str, what: str, path: str, cfg: P2DConfig, need_id: bool) -> list[dict]:
    """A probe or held-out set, read whole (small by construction); every row must have usable text."""
    from collections import Counter

    from p2d_ray.data.columns import unread_columns
    from p2d_ray.data.formatting import resolve_format, row_parts
    from p2d_ray.data.io import read_table

    if is_remote(path):
        return _table_findings(check, path, _probe_remote([path])[path], cfg, need_id)
    column_map = cfg.data.probe_column_map if check == "probe" else cfg.evaluate.heldout_column_map
    try:
        table = read_table(path, what, cfg.data, column_map)
        cols = table.column_names
        if table.num_rows == 0:
            raise ValueError(f"{what}={path!r} has 0 rows")
        fmt = resolve_format(cfg.data, cols)
        if need_id and cfg.data.id_column not in cols:
            raise ValueError(_no_id(path, cols, cfg))
        rows = table.to_pylist()
    except UnicodeDecodeError:
        return [_finding(check, "error", f"{what}={path!r}: a string column holds invalid UTF-8")]
    except ValueError as err:
        return [_finding(check, "error", str(err))]
    bad: Counter = Counter()
    first = None
    for i, row in enumerate(rows):
        try:
            row_parts(row, cfg.data)
        except ValueError as err:
            bad[str(err)] += 1
            first = first if first is not None else i
    if bad:
        msg = f"{what}={path!r}: {sum(bad.values())} row(s) without usable text {dict(bad)}, first at row {first}"
        return [_finding(check, "error", msg)]
    if check == "probe" and fmt == "icl" and len(rows) < cfg.data.icl_k:
        msg = f"data.icl_k={cfg.data.icl_k} but {what}={path!r} has only {len(rows)} rows"
        return [_finding(check, "error", msg)]
    problem = _probe_encoding_problem(cfg, rows) if check == "probe" else None
    if problem:
        return [_finding(check, "error", f"{what}={path!r}: {problem}")]
    msg = f"{path}: {len(rows)} rows, format {fmt}"
    unread = unread_columns(cfg.data, fmt, cols)
    msg += f"; column(s) {unread} hold text but are not read" if unread else ""
    return [_finding(check, "ok", msg, columns=cols, rows=len(rows), files=1, format=fmt)]


def _data_findings(cfg: P2DConfig, checks: set[str], deep: bool) -> list[dict]:
    from p2d_ray.assets import paths

    findings = []
    if "corpus" in checks:
        findings += _corpus_findings(cfg, deep)
    if "probe" in checks:
        findings += _small_table_findings("probe", "data.probe_path", paths.probe_path(cfg), cfg, False)
    if "heldout" in checks:
        findings += _small_table_findings(
            "heldout", "evaluate.heldout_path", paths.heldout_path(cfg), cfg, True
        )
    return findings


def _local_tokenizer(cfg: P2DConfig):
    """The model's tokenizer when its files are on this machine (a local directory, a built asset model, the
    Hugging Face cache), else None: validate never downloads and never builds."""
    from p2d_ray.assets import is_asset_model, model_dir
    from p2d_ray.models.loading import load_tokenizer, looks_local

    name = cfg.model.name_or_path
    model = cfg.model
    if is_asset_model(name):
        if not (model_dir(name) / "config.json").is_file():
            return None
        model = cfg.model.model_copy(update={"name_or_path": str(model_dir(name))})
    elif not looks_local(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "tokenizer_config.json", revision=cfg.model.revision)
        if not isinstance(cached, str):
            return None
    try:
        return load_tokenizer(model)
    except Exception:  # no tokenizer files: the model check reports that
        return None


def _probe_encoding_problem(cfg: P2DConfig, rows: list[dict]) -> str | None:
    """The probe rows encoded as localize and the probe gradient encode them (tokenizer only): a row whose
    answer vanishes after truncation at ``data.max_length`` is refused there, so it is an error here too."""
    from p2d_ray.data.formatting import encode_probe

    tokenizer = _local_tokenizer(cfg)
    if tokenizer is None:
        return None
    limits = [cfg.localize.max_probe_samples, cfg.score.alignment_probe_rows]
    limit = None if None in limits else max(limits)
    try:
        encode_probe(rows[:limit], tokenizer, cfg.data)
    except ValueError as err:
        return f"{err} (after truncation at data.max_length={cfg.data.max_length})"
    return None


# -- model ----------------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _model_findings(cfg: P2DConfig) -> tuple[list[dict], object | None, str | None]:
    """(findings, geometry or None, the local directory checked or None)."""
    from transformers import AutoConfig

    from p2d_ray.assets import is_asset_model, model_dir
    from p2d_ray.models.geometry import UnsupportedModelError, geometry_from_config
    from p2d_ray.models.loading import looks_local

    name = path = cfg.model.name_or_path
    if is_asset_model(name):
        # An offline asset model: check the cached build if there is one, never build it just to check.
        built = model_dir(name)
        if not (built / "config.json").is_file():
            return (
                [_finding("model", "ok", f"{name}: offline asset model, built on first use under {built}")],
                None,
                None,
            )
        path = str(built)
    local = looks_local(path)
    if local and not Path(path).expanduser().is_dir():
        return [_finding("model", "error", f"model.name_or_path={name!r}: no such directory")], None, None
    if not local:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=cfg.model.revision)
        if not isinstance(cached, str) and _hub_offline():
            msg = (
                f"{name}: cannot check offline (config.json is not in the local Hugging Face cache); "
                "the cluster downloads it at run time"
            )
            return [_finding("model", "unchecked", msg)], None, None
    try:
        hf_config = AutoConfig.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        text = str(err)
        if not local and ("connect" in text.lower() or "offline" in text.lower()):
            return (
                [_finding("model", "unchecked", f"{name}: hub unreachable from here ({text[:200]})")],
                None,
                None,
            )
        return (
            [_finding("model", "error", f"model.name_or_path={name!r}: {text.splitlines()[0][:300]}")],
            None,
            None,
        )
    try:
        geo = geometry_from_config(hf_config)
    except UnsupportedModelError as err:
        return [_finding("model", "error", str(err))], None, None
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
        return findings, geo, str(Path(path).expanduser())
    return findings, geo, None


def _weights_findings(path: Path, cfg: P2DConfig) -> list[dict]:
    from p2d_ray.models.loading import weights_problems

    return [_finding("model", "error", msg) for msg in weights_problems(cfg.model, path)]


# -- heads ----------------------------------------------------------------------------------------------
def _heads_findings(cfg: P2DConfig, geo, model_path: str | None, required: bool = False) -> list[dict]:
    from p2d_ray.heads.headset import HeadSet
    from p2d_ray.rundir import RunDir

    findings = []
    if geo is not None and cfg.localize.top_k is not None and cfg.localize.top_k > geo.total_heads:
        msg = f"localize.top_k={cfg.localize.top_k} exceeds the model's {geo.total_heads} heads"
        findings.append(_finding("heads", "error", msg))
    heads_json = RunDir(cfg.run_dir).heads_json
    if not heads_json.is_file():
        if required:
            msg = f"heads file not found: {heads_json} (run `p2d-ray localize` first)"
            return findings + [_finding("heads", "error", msg)]
        findings.append(_finding("heads", "ok", f"no {heads_json} yet: localize writes it"))
        return findings
    try:
        heads = HeadSet.load(heads_json)
    except ValueError as err:
        return findings + [_finding("heads", "error", str(err))]
    if geo is None:
        msg = f"{heads_json}: {len(heads)} heads; not checked against the model (model config unavailable)"
        return findings + [_finding("heads", "unchecked", msg)]
    try:
        heads.check_fits(geo)
        if model_path is not None:
            from p2d_ray.models.loading import model_fingerprint

            local = cfg.model.model_copy(update={"name_or_path": model_path})
            heads.check_model(model_fingerprint(local), cfg.model.name_or_path)
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
    problem = _unwritable(Path(cfg.run_dir))
    if problem:
        return [_finding("run", "error", problem)]
    return [_finding("run", "ok", f"run_dir {cfg.run_dir}")]


def _unwritable(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be written (a path under a file, not a directory, a read-only filesystem, no
    permission), or None. Probed with a temporary file in it or in its nearest existing parent; nothing is
    created or left behind."""
    import os
    import tempfile

    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == run_dir else f"is under {str(probe)!r}, which is"
        return f"run_dir={str(run_dir)!r} {where} a file, not a directory"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".p2d-ray-write-check-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return f"run_dir={str(run_dir)!r} is not writable ({probe}: {err.strerror or err})"
    return None


STAGES = ("localize", "score", "select", "train", "evaluate")
EVERY_CHECK = {"run", "model", "heads", "corpus", "probe", "heldout"}


def stage_inputs(cfg: P2DConfig, stages) -> tuple[set[str], set[str]]:
    """(checks, outputs of earlier stages that must exist) for running ``stages`` in order: only what
    those stages read, and nothing a stage in ``stages`` writes first."""
    from p2d_ray.scoring.scorers import USES_HEADS

    stages = set(stages)
    checks, needed = {"run"}, set()
    if stages & {"localize", "score", "train", "evaluate"}:
        checks.add("model")
    if "localize" in stages:
        checks.add("probe")
        if cfg.localize.contrast == "corpus":
            checks.add("corpus")
    heads_needed = ("score" in stages and USES_HEADS[cfg.score.scorer]) or (
        "train" in stages and cfg.train.adaptation == "heads"
    )
    if heads_needed and "localize" not in stages:
        needed.add("heads")
    if "score" in stages:
        checks.add("corpus")
        if cfg.data.format == "icl" or cfg.score.scorer in ("gradient_alignment", "icl_attention"):
            checks.add("probe")
    if "select" in stages and "score" not in stages:
        needed.add("scores")
    if "train" in stages and "select" not in stages:
        needed.add("subset")
    if "evaluate" in stages:  # the adapter is optional: without one, evaluate reports the base model
        checks.add("heldout")
    return checks, needed


def _outputs_findings(cfg: P2DConfig, needed: set[str]) -> list[dict]:
    from p2d_ray.rundir import RunDir

    run = RunDir(cfg.run_dir)
    made_by = {
        "scores": ("score", run.scores),
        "subset": ("select", run.subset),
        "adapter": ("train", run.adapter),
    }
    out = []
    for name in sorted(needed - {"heads"}):
        stage, path = made_by[name]
        if not path.exists():
            out.append(_finding(name, "error", f"{path} not found (run `p2d-ray {stage}` first)"))
    return out


def run_validate(cfg: P2DConfig, *, raise_on_error: bool = True, stages=None, deep: bool = True) -> dict:
    """Check ``cfg`` against its model (HF config and files), heads (heads.json, if present) and data.

    Args:
        stages: None (``p2d-ray validate``): every check. Else only the inputs these stages read (the
            pre-flight of ``run`` and of each stage command).
        deep: decode every corpus page (validate); False reads footers only (pre-flight).
    Returns ``{"ok": bool, "findings": [...]}``. Raises :class:`ValidationFailed` (a ValueError listing
    every failed check) when ``raise_on_error`` and any check failed, so ``p2d-ray validate`` exits 2.
    """
    if cfg.targets:  # several targets (p2d_ray/targets.py): every target's single-target config is checked
        return _validate_targets(cfg, raise_on_error, stages, deep)
    if stages is None:
        checks, needed = EVERY_CHECK, set()
    else:
        checks, needed = stage_inputs(cfg, stages)
    # transformers' lazy top-level module is not safe to import from two threads at once (the data thread's
    # tokenizer and this thread's model config: "cannot import name 'AutoConfig' from 'transformers'", seen
    # under load): import it here, once, before the data thread starts.
    import p2d_ray.models.loading  # noqa: F401

    with ThreadPoolExecutor(max_workers=1) as pool:
        # The data checks (a subprocess for remote paths) overlap with reading the model config.
        data = pool.submit(_data_findings, cfg, checks, deep)
        model, geo, model_path = (
            _model_findings(cfg) if "model" in checks or "heads" in needed else ([], None, None)
        )
        heads = []
        if "heads" in checks or "heads" in needed:
            heads = _heads_findings(cfg, geo, model_path, required="heads" in needed)
        findings = _run_findings(cfg) + (model if "model" in checks else []) + heads + data.result()
    findings += _outputs_findings(cfg, needed)
    report = {"ok": not any(f["status"] == "error" for f in findings), "findings": findings}
    if raise_on_error and not report["ok"]:
        raise ValidationFailed(report)
    return report


def _validate_targets(cfg: P2DConfig, raise_on_error: bool, stages, deep: bool) -> dict:
    """:func:`run_validate` of each target's config (its probe / held-out set and heads, the shared model
    and corpus); a finding the targets share (model, corpus) is listed once, the others name their target."""
    from p2d_ray.targets import target_configs

    findings, seen = [], set()
    for name, tcfg in target_configs(cfg).items():
        for f in run_validate(tcfg, raise_on_error=False, stages=stages, deep=deep)["findings"]:
            key = (f["check"], f["status"], f["message"])
            if key in seen:
                continue
            seen.add(key)
            findings.append(
                f if f["check"] in ("model", "corpus") else {**f, "check": f"{name}: {f['check']}"}
            )
    report = {"ok": not any(f["status"] == "error" for f in findings), "findings": findings}
    if raise_on_error and not report["ok"]:
        raise ValidationFailed(report)
    return report


def preflight(cfg: P2DConfig, stages) -> None:
    """Every input of every stage in ``stages`` checked before the first one starts (footers, not pages).
    Raises :class:`ValidationFailed` naming each problem. Training's trackers come first (a missing or
    broken MLflow / W&B is one line before any stage, or Ray, starts)."""
    if "train" in stages:
        from p2d_ray.training.tracking import check_tracking

        check_tracking(cfg)
    if stages:
        run_validate(cfg, stages=stages, deep=False)


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    # Subprocess side of _probe_remote: one thread per path, one JSON line out.
    _paths = json.loads(sys.argv[2])
    with ThreadPoolExecutor(max_workers=max(1, len(_paths))) as _pool:
        _results = dict(zip(_paths, _pool.map(probe_table, _paths), strict=True))
    print(json.dumps(_results))
