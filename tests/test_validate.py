"""``p2d-ray validate``: config vs model (HF config only), heads.json and corpus, with no Ray and no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_parts

from p2d_ray.cli import main as cli_main
from p2d_ray.config import build_config, load_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import AttentionGeometry
from p2d_ray.validate import ValidationFailed, run_validate

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def _by_check(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in report["findings"]:
        out.setdefault(f["check"], []).append(f)
    return out


def _statuses(report: dict, check: str) -> set[str]:
    return {f["status"] for f in _by_check(report)[check]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A 2-file prompt/response corpus with ids, a probe set (JSONL) and a held-out set."""
    root = tmp_path_factory.mktemp("validate_data")
    ids = list(range(100))
    corpus = pa.table({"id": ids, "prompt": [f"q{j}" for j in ids], "response": [f"a{j}" for j in ids]})
    write_parts(root / "corpus", corpus, 2)
    (root / "probe.jsonl").write_text(
        "".join(json.dumps({"prompt": "q", "response": "a"}) + "\n" for _ in range(5))
    )
    pq.write_table(pa.table({"id": [1], "prompt": ["q"], "response": ["a"]}), root / "heldout.parquet")
    # Columns that fit no prompt format, and a corpus without ids.
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), root / "wrong_columns.parquet")
    pq.write_table(pa.table({"prompt": ["q"], "response": ["a"]}), root / "no_ids.parquet")
    return root


def _cfg(tiny_llama, data_dir, tmp_path, **over):
    data = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": tiny_llama},
        "data": {
            "corpus_path": str(data_dir / "corpus"),
            "probe_path": str(data_dir / "probe.jsonl"),
            "max_length": 64,
        },
        "evaluate": {"heldout_path": str(data_dir / "heldout.parquet")},
    }
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    report = run_validate(load_config(path), raise_on_error=False)
    assert report["ok"], [f for f in report["findings"] if f["status"] == "error"]
    checks = _by_check(report)
    assert set(checks) == {"run", "model", "heads", "corpus", "probe", "heldout"}
    cfg = load_config(path)
    if cfg.model.name_or_path != "p2d-demo":
        # Hub names under HF_HUB_OFFLINE=1 and not cached: a clear non-fatal finding, not a crash.
        assert _statuses(report, "model") == {"unchecked"}
        assert "cannot check offline" in checks["model"][0]["message"]
    if cfg.data.corpus_path and cfg.data.corpus_path.startswith("s3://"):
        # No network here: reported as unreachable, within the probe deadline, never a hang or an error.
        assert _statuses(report, "corpus") == {"unchecked"}
        assert "unreachable" in checks["corpus"][0]["message"]
    else:
        corpus = checks["corpus"][0]
        assert corpus["status"] == "ok" and corpus["rows"] > 0 and cfg.data.id_column in corpus["columns"]


def test_local_model_and_data_all_ok(tiny_llama, data_dir, tmp_path):
    report = run_validate(_cfg(tiny_llama, data_dir, tmp_path))
    assert report["ok"]
    checks = _by_check(report)
    model = checks["model"][0]
    assert (
        model["status"] == "ok" and model["geometry"]["n_heads"] == 4 and model["geometry"]["n_kv_heads"] == 2
    )
    corpus = checks["corpus"][0]
    assert (corpus["status"], corpus["rows"], corpus["files"], corpus["format"]) == (
        "ok",
        100,
        2,
        "prompt_response",
    )
    assert checks["probe"][0]["rows"] == 5


def test_heads_json_must_fit_the_models_geometry(tiny_llama, data_dir, tmp_path):
    cfg = _cfg(tiny_llama, data_dir, tmp_path)
    run = Path(cfg.run_dir)
    fits = AttentionGeometry("llama", 2, 4, 2, 16, 64)
    HeadSet(((0, 1), (1, 3)), fits).save(run / "heads.json")
    report = run_validate(cfg)
    assert any("2 heads fit the model" in f["message"] for f in _by_check(report)["heads"])
    # Heads localised on another model (8 heads per layer): caught before a cluster is paid for.
    HeadSet(((0, 7),), AttentionGeometry("llama", 2, 8, 2, 8, 64)).save(run / "heads.json")
    with pytest.raises(ValidationFailed, match="heads were localised on a model with geometry") as err:
        run_validate(cfg)
    assert _statuses(err.value.report, "heads") == {"error"}


def test_data_problems_are_hard_errors_listed_together(tiny_llama, data_dir, tmp_path):
    cfg = _cfg(
        tiny_llama,
        data_dir,
        tmp_path,
        **{
            "data.corpus_path": data_dir / "no_ids.parquet",
            "data.probe_path": data_dir / "wrong_columns.parquet",
            "evaluate.heldout_path": data_dir / "missing.parquet",
        },
    )
    report = run_validate(cfg, raise_on_error=False)
    assert not report["ok"]
    checks = _by_check(report)
    assert "data.id_column='id' is not a column" in checks["corpus"][0]["message"]
    assert "needs column 'text'" in checks["probe"][0]["message"]
    assert checks["heldout"][0]["status"] == "error" and "no such file" in checks["heldout"][0]["message"]


def test_model_problems(tiny_llama, data_dir, tmp_path):
    # A local path that does not exist is an error (unlike an uncached hub name offline).
    report = run_validate(_cfg(str(tmp_path / "nope"), data_dir, tmp_path), raise_on_error=False)
    assert (
        _statuses(report, "model") == {"error"}
        and "no such directory" in _by_check(report)["model"][0]["message"]
    )
    report = run_validate(_cfg("some-org/some-model", data_dir, tmp_path), raise_on_error=False)
    assert report["ok"] and _statuses(report, "model") == {"unchecked"}
    # A family we cannot gate, and a max_length beyond the model's positions.
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    report = run_validate(_cfg(str(bert), data_dir, tmp_path), raise_on_error=False)
    assert _statuses(report, "model") == {"error"} and "bert" in _by_check(report)["model"][0]["message"]
    report = run_validate(
        _cfg(tiny_llama, data_dir, tmp_path, **{"data.max_length": 4096}), raise_on_error=False
    )
    assert "exceeds the model's 512 positions" in " ".join(f["message"] for f in _by_check(report)["model"])


def test_remote_run_dir_is_rejected(tiny_llama, data_dir, tmp_path):
    cfg = _cfg(tiny_llama, data_dir, tmp_path, run_dir="s3://bucket/runs/x")
    report = run_validate(cfg, raise_on_error=False)
    assert _statuses(report, "run") == {"error"}


def test_cli_exit_codes(tiny_llama, data_dir, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    _cfg(tiny_llama, data_dir, tmp_path).save(good)
    assert cli_main(["validate", "--config", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert (
        cli_main(["validate", "--config", str(good), f"data.corpus_path={data_dir / 'no_ids.parquet'}"]) == 2
    )
    err = capsys.readouterr().err
    assert "config does not validate" in err and "corpus: data.id_column='id'" in err
