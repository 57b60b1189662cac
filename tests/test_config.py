"""Typed configuration: YAML + key=value overrides, one error listing every problem, round trip."""

from __future__ import annotations

import pytest
import yaml

from p2d_ray.config import ConfigError, P2DConfig, build_config, load_config


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_plus_overrides_typed(tmp_path):
    path = _write(
        tmp_path / "c.yaml", {"run_dir": "runs/x", "score": {"batch_size": 8}, "localize": {"top_k": 3}}
    )
    cfg = load_config(
        path,
        [
            "score.batch_size=32",
            "model.name_or_path=Qwen/Qwen2.5-0.5B",
            "train.use_gpu=true",
            "localize.top_k=null",
            "localize.alps_lr=0.5",
        ],
    )
    assert cfg.run_dir == "runs/x"  # from YAML
    assert cfg.score.batch_size == 32 and isinstance(cfg.score.batch_size, int)  # override wins, typed
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert cfg.train.use_gpu is True
    assert cfg.localize.top_k is None  # YAML null
    assert cfg.localize.alps_lr == 0.5
    assert cfg.select.fraction == 0.10  # untouched default


def test_unknown_key_is_an_error(tmp_path):
    path = _write(tmp_path / "c.yaml", {"score": {"batchsize": 8}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ["score.batchsize: unknown key; did you mean 'batch_size'? (got 8)"]
    with pytest.raises(ConfigError, match="scoring: unknown key; did you mean 'score'"):
        build_config({}, ["scoring=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError) as err:
        build_config({}, ["score.batch_size=abc"])
    (problem,) = err.value.problems
    assert problem.startswith("score.batch_size:") and "'abc'" in problem
    with pytest.raises(ConfigError, match="localize.method"):
        build_config({"localize": {"method": "random"}})


def test_contradictory_combinations():
    with pytest.raises(ConfigError) as err:
        build_config({}, ["score.min_actors=4", "score.max_actors=2"])
    assert "min_actors (4) > max_actors (2)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config({}, ["data.format=icl", "data.icl_k=0", "train.zero_stage=3"])
    # Two cross-section contradictions: one line each.
    assert err.value.problems == [
        "data.format=icl needs data.icl_k >= 1",
        "train.zero_stage=3 is not supported with train.adaptation=heads (use 0, 1 or 2)",
    ]


def test_every_problem_in_one_error(tmp_path):
    path = _write(tmp_path / "c.yaml", {"model": {"nme": "x"}, "score": {"min_actors": 3, "max_actors": 2}})
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.lr=fast", "localize.top_fraction=2"])
    problems = err.value.problems
    assert len(problems) == 4, problems
    joined = str(err.value)
    for needle in (
        "model.nme: unknown key",
        "train.lr:",
        "localize.top_fraction:",
        "min_actors (3) > max_actors (2)",
    ):
        assert needle in joined


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        build_config({}, ["score.batch_size"])
    with pytest.raises(ConfigError, match="'score' is not a section"):
        build_config({}, ["score=3", "score.batch_size=2"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(
        {}, ["score.batch_size=3", "localize.method=alps", "select.top_k=7", "data.probe_path=p.jsonl"]
    )
    saved = cfg.save(tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert again.fingerprint("localize") != P2DConfig().fingerprint("localize")
    assert again.fingerprint("train") == P2DConfig().fingerprint("train")


def test_alignment_cosine_needs_the_exact_method():
    """cosine divides by |g_i|, which only the exact method computes; a finite-difference config that never
    chose a normalisation (a run saved before `exact` existed) keeps the loss normalisation it had."""
    from p2d_ray.config import ScoreConfig

    assert (ScoreConfig().alignment_method, ScoreConfig().alignment_normalize) == ("exact", "cosine")
    assert ScoreConfig(alignment_method="central").alignment_normalize == "loss"
    with pytest.raises(ValueError, match="cosine needs"):
        ScoreConfig(alignment_method="forward", alignment_normalize="cosine")
