"""The command line explains itself: per-command help built from the config schema, --version, "did you
mean" for mistyped commands and keys, and --print-config. No Ray, no model: argument handling only."""

from __future__ import annotations

import pytest
import yaml

from p2d_ray.cli import COMMANDS, HELP, main
from p2d_ray.config import P2DConfig, ScoreConfig, TrainConfig, build_config


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exit_:  # argparse's --help / --version
        rc = exit_.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_command_has_help():
    assert set(HELP) == set(COMMANDS)


def test_demo_target_flag(capsys):
    """`p2d-ray demo --target units` picks the demo corpus's other target task; a wrong one is refused."""
    rc, out, _ = _run(capsys, "demo", "--target", "units", "--print-config")
    assert rc == 0 and "demo_target: units" in out
    rc, _, err = _run(capsys, "demo", "--target", "poetry")
    assert rc == 2 and "invalid choice" in err and "arithmetic" in err


def test_stage_help_says_what_it_reads_writes_and_its_keys_with_schema_defaults(capsys):
    rc, out, _ = _run(capsys, "score", "--help")
    assert rc == 0
    assert "reads:" in out and "data.corpus_path" in out and "scores/*.parquet" in out
    assert f"score.batch_size = {ScoreConfig().batch_size}  int" in out
    assert f'score.scorer = "{ScoreConfig().scorer}"  {{influence, activation' in out  # default + choices
    rc, train_help, _ = _run(capsys, "train", "--help")
    assert f"train.lr = {TrainConfig().lr}  float" in train_help and "score.batch_size =" not in train_help
    assert train_help != out  # each stage has its own help


def test_version(capsys):
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.startswith("p2d-ray ")


def test_mistyped_command_and_key_get_suggestions(capsys):
    rc, _, err = _run(capsys, "scroe")
    assert rc == 2 and "unknown command 'scroe'; did you mean 'score'" in err
    rc, _, err = _run(capsys, "select", "select.fracton=0.2")
    assert rc == 2 and "select.fracton: unknown key; did you mean 'fraction'?" in err
    rc, _, err = _run(capsys, "select", "selct.fraction=0.2")
    assert rc == 2 and "selct: unknown key; did you mean 'select'?" in err


def test_print_config_is_the_resolved_config(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "runs/x", "score": {"batch_size": 4}}))
    rc, out, _ = _run(capsys, "score", "--config", str(path), "--print-config", "select.fraction=0.25")
    assert rc == 0
    printed = build_config(yaml.safe_load(out))
    assert printed == build_config(
        {"run_dir": "runs/x", "score": {"batch_size": 4}, "select": {"fraction": 0.25}}
    )
    assert printed.train == P2DConfig().train  # defaults filled in
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.parametrize("command", ["demo", "run", "compare"])
def test_multi_stage_help_lists_sections(capsys, command):
    rc, out, _ = _run(capsys, command, "--help")
    assert rc == 0 and "reads:" in out and "writes:" in out
