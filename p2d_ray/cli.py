"""``p2d-ray`` command line: thin; every command is a config plus one stage function.

    p2d-ray demo                                   the whole pipeline on the offline demo assets
    p2d-ray localize --config X.yaml [key=value …]   Stage 1
    p2d-ray score    --config X.yaml [key=value …]   Stage 2 (Ray Data)
    p2d-ray select   --config X.yaml [key=value …]
    p2d-ray train    --config X.yaml [key=value …]   Stage 3 (Ray Train + DeepSpeed)
    p2d-ray evaluate --config X.yaml [key=value …]   held-out loss / exact match, base vs adapted
    p2d-ray report   --config X.yaml [key=value …]   report.json (timings, AER) + aer.png
    p2d-ray run      --config X.yaml [key=value …]   all stages + report, skipping the finished ones
    p2d-ray validate --config X.yaml [key=value …]   check config, model, heads and corpus; no Ray, no GPU
    p2d-ray compare  --config X.yaml [key=value …]   selectors x adaptations x seeds -> results table

``p2d-ray <command> --help`` says what the command reads and writes and lists its config keys with their
defaults (taken from the config schema); ``--print-config`` prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import typing
from dataclasses import dataclass

from p2d_ray.config import ConfigError, P2DConfig, load_config
from p2d_ray.pipeline import COMMANDS, resolve


@dataclass(frozen=True)
class CommandHelp:
    summary: str
    reads: str
    writes: str
    sections: tuple[str, ...]  # config sections whose keys --help lists with their defaults


# What each command reads and writes, for --help. Paths are relative to run_dir.
# The stages themselves (name, function, sections, outputs) are p2d_ray.stages.STAGE_TABLE.
HELP = {
    "localize": CommandHelp(
        "Stage 1: find the task attention heads from the probe set",
        "the model (model.name_or_path), the probe set (data.probe_path)",
        "heads.json (the task heads), heads.png (head scores, task heads outlined)",
        ("model", "localize"),
    ),
    "score": CommandHelp(
        "Stage 2: score every corpus row under the task heads (Ray Data actor pool)",
        "the corpus (data.corpus_path), heads.json, the model",
        "scores/*.parquet (id + scores), quarantine/*.parquet (refused rows + reason), score_summary.json, "
        "score_stats.json; resume markers in _state/scores/",
        ("data", "score"),
    ),
    "select": CommandHelp(
        "keep the top fraction (or top k) of the scored corpus",
        "scores/, the corpus",
        "subset/*.parquet (full corpus rows + score), selection.json, histogram.png",
        ("select",),
    ),
    "train": CommandHelp(
        "Stage 3: train only the task heads (or LoRA / full) on the subset (Ray Train + DeepSpeed)",
        "subset/, heads.json, the model",
        "adapter/ (head deltas + a PEFT LoRA adapter with model card), train/ checkpoints, train_summary.json",
        ("train",),
    ),
    "evaluate": CommandHelp(
        "held-out loss / perplexity / exact match, base vs adapted model",
        "the held-out set (evaluate.heldout_path), adapter/",
        "eval.json",
        ("evaluate",),
    ),
    "baseline": CommandHelp(
        "the AER denominator: full fine-tuning with the train recipe and epochs, estimated or measured",
        "scores/, subset/, train_summary.json, the model (report.full_baseline: also the held-out set)",
        "full_baseline.json (recipe, label, seconds), full_baseline_timing/ (the timed steps' run),"
        " full_baseline/ when measured",
        ("report", "train"),
    ),
    "report": CommandHelp(
        "reads the outputs only: stage seconds, the AER and the quality-vs-AER plot",
        "stages/*.json, full_baseline.json, eval.json, heads.json, scores/, subset/",
        "report.json, aer.png",
        ("report",),
    ),
    "run": CommandHelp(
        "every stage in order, then the report; finished stages are skipped",
        "what each stage reads",
        "what each stage writes (see `p2d-ray <stage> --help`), config.yaml",
        (),
    ),
    "validate": CommandHelp(
        "check config, model, heads and corpus up front; no Ray, no GPU",
        "the model config, heads.json, the probe set and the corpus (footers and a sample)",
        "nothing",
        ("model", "data"),
    ),
    "compare": CommandHelp(
        "every selector x adaptation x seed through the same select -> train -> evaluate",
        "the corpus, probe and held-out sets, the model",
        "compare/ (sources, selections, cells), results.json, RESULTS.md table, aer.png",
        ("compare",),
    ),
    "demo": CommandHelp(
        "the whole pipeline on the offline demo assets, with a plain-language summary",
        "nothing (builds the demo corpus and model once, cached in $P2D_RAY_CACHE)",
        "runs/demo/ (every stage's outputs), demo_summary.json",
        (),
    ),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("p2d-ray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _type_name(annotation) -> str:
    """``{a, b, c}`` for a Literal, else the plain type name (``int``, ``float | None``)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ", ".join(map(str, args)) + "}"
    name = getattr(annotation, "__name__", None)
    if name and not args:
        return name
    return str(annotation).replace("typing.", "")


def section_keys(section: str) -> list[str]:
    """``section.key = default  type`` for every key of a config section, from the pydantic schema."""
    model = P2DConfig.model_fields[section].annotation
    lines = []
    for key, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {section}.{key} = {json.dumps(default)}  {_type_name(field.annotation)}")
    return lines


def command_epilog(name: str) -> str:
    h = HELP[name]
    d = P2DConfig()
    lines = [
        f"reads:  {h.reads}",
        f"writes: {h.writes}",
        f"        (paths under run_dir; run_dir = {json.dumps(d.run_dir)}, seed = {d.seed} by default)",
    ]
    if h.sections:
        lines += ["", "config keys (defaults):"]
        for section in h.sections:
            lines += section_keys(section)
    else:
        lines += [
            "",
            "config sections: " + ", ".join(P2DConfig.model_fields) + "  (see p2d-ray <stage> --help)",
        ]
    lines += ["", "set keys in the --config YAML or as key=value overrides, e.g. score.batch_size=32"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2d-ray", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"p2d-ray {version()}")
    # Flags every command takes.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=None, help="YAML config (defaults are the demo's)")
    common.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    common.add_argument("overrides", nargs="*", help="key=value overrides, e.g. score.batch_size=32")
    common.add_argument(
        "--verbose", "-v", action="store_true", help="show Ray Data's log lines and progress bars"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMANDS:
        h = HELP[name]
        p = sub.add_parser(
            name,
            parents=[common],
            help=h.summary,
            description=f"p2d-ray {name}: {h.summary}",
            epilog=command_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "demo":
            from typing import get_args

            from p2d_ray.config import DataConfig

            p.add_argument(
                "--target",
                choices=get_args(DataConfig.model_fields["demo_target"].annotation),
                help="the demo corpus's target task (same as data.demo_target=...)",
            )
            p.add_argument(
                "--targets",
                help="several demo targets in one corpus pass, comma-separated (e.g. arithmetic,units): "
                "one localize, one scoring pass, a selection per target and a combined one (targets: ...)",
            )
    return parser


def _unknown_command(argv: list[str]) -> str | None:
    """An error message for a mistyped command (``scroe``), with the closest commands."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None or first in COMMANDS:
        return None
    close = difflib.get_close_matches(first, list(COMMANDS), n=2, cutoff=0.6)
    hint = (
        f"did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"commands: {', '.join(COMMANDS)}"
    )
    return f"p2d-ray: unknown command {first!r}; {hint}"


def _resolve(target: str):
    return resolve(target)


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the process's command line: an interrupt may end the process (_exit_now)
    argv = sys.argv[1:] if argv is None else argv
    unknown = _unknown_command(argv)
    if unknown:
        print(unknown, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.verbose:  # read by p2d_ray.progress (an env var, so Ray job entrypoints inherit it)
        os.environ["P2D_RAY_VERBOSE"] = "1"
    else:  # libraries' deprecation notices (transformers, peft, torch) are for --verbose, not the console
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
    if getattr(args, "target", None):  # `p2d-ray demo --target units`
        args.overrides.append(f"data.demo_target={args.target}")
    if getattr(args, "targets", None):  # `p2d-ray demo --targets arithmetic,units`
        names = [n.strip() for n in args.targets.split(",") if n.strip()]
        args.overrides.append("targets=" + json.dumps([{"name": n} for n in names]))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"p2d-ray {args.command}: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        if args.command == "demo":  # what the demo will run: its knobs under the user's settings
            from p2d_ray.demo import demo_config

            cfg = demo_config(cfg)
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    from p2d_ray.runtime import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM (Kubernetes, Slurm, a spot notice, `timeout`) ends like Ctrl-C
        rc, result = _run_guarded(args.command, _resolve(COMMANDS[args.command]), cfg)
    if rc in (130, 143) and own_process:  # interrupted: the line is written, the lock released, Ray down
        _exit_now(rc)  # (a caller's in-process main([...]) gets rc back instead)
    if rc != 0:
        return rc
    if result is not None:
        if args.command in HUMAN_OUTPUT and sys.stdout.isatty():
            # A person at a terminal has just read the summary (on stderr): the result is in the run dir.
            msg = f"results in {cfg.run_dir}; redirected, stdout carries them as JSON"
            print(f"p2d-ray {args.command}: {msg}", file=sys.stderr)
        else:
            print(json.dumps(result, indent=1, default=str), flush=True)
    if args.command == "run" and isinstance(result, dict) and result.get("report"):
        _print_run_summary(cfg, result["report"])
    return 0


def _print_run_summary(cfg: P2DConfig, report: dict) -> None:
    """After the JSON, on stderr (stdout is the JSON alone): the results read for the user (selection vs
    random, training helped or not, AER)."""
    from pathlib import Path

    from p2d_ray.demo import summary_lines

    if cfg.targets:  # one row per target (p2d_ray/targets.py)
        from p2d_ray.targets import report_lines

        print("\n".join(report_lines(report, f"p2d-ray run: summary ({cfg.run_dir})")), file=sys.stderr)
        return
    if report.get("skipped"):
        report = json.loads(Path(cfg.run_dir, "report.json").read_text())
    lines = summary_lines(report, title=f"p2d-ray run: summary ({cfg.run_dir})")
    print("\n".join(lines), file=sys.stderr, flush=True)


# -- error and interrupt handling (one place, so every command behaves the same) ----------------------
# Commands whose summary is for a person (on stderr, like every progress line); at a terminal their JSON
# result is left in the run dir instead of following the summary. Every command's stdout is its JSON alone.
HUMAN_OUTPUT = ("demo", "compare")
PREFLIGHT = {s: (s,) for s in ("localize", "score", "select", "train", "evaluate")}  # `run`: pipeline.py


def _progress(cfg) -> str:
    """'N of M shards done, ' from the scores directory, when a scoring pass was under way."""
    try:
        from p2d_ray.scoring.outputs import ScoreStore
        from p2d_ray.scoring.shards import Shard

        store = ScoreStore(cfg.run_dir)
        manifest = store.read_manifest()
        if manifest is None:
            return ""
        shards = [Shard(**d) for d in manifest["shards"]]
        done = sum(store.marker(sh, manifest["fingerprint"]) is not None for sh in shards)
        return f"{done} of {len(shards)} shards done, "
    except Exception:  # progress is a courtesy: never let it mask the interrupt
        return ""


def _say(line: str) -> None:
    """One line on stderr in ONE write: ``print`` writes the text and its newline separately, and Ray's
    log thread (forwarding a worker's progress line) can write in between, gluing the two lines together
    (seen: "...; rerun to resumetrain: 5/16 steps ...")."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _exit_now(rc: int) -> typing.NoReturn:
    """End an interrupted command with ``rc`` and no interpreter teardown. After SIGTERM / Ctrl-C in the
    middle of a Ray Train or Ray Data call, native threads (Ray's core worker, gRPC, torch) can still be
    running while Python finalises its modules, and the process then died by SIGSEGV (rc -11 instead of 143,
    seen once in the suite's training-rerun test): a scheduler reads that as a crash, not a preemption.
    Everything the user is owed is done by now; flush it and leave."""
    import logging

    logging.shutdown()  # the run log's handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _run_guarded(command: str, func, cfg) -> tuple[int, object]:
    """Run ``func(cfg)`` for ``command`` after checking every input it reads; returns (exit code, result).

    Bad input (ValueError, FileNotFoundError): one message naming the problem, rc 2. A bad environment
    (RuntimeError): one message, rc 1. Ctrl-C: "interrupted; N of M shards done, rerun to resume", rc 130
    (SIGTERM: "terminated (SIGTERM); ...", rc 143), and a Ray this command started is shut down (no orphan
    workers). ``P2D_RAY_DEBUG=1`` re-raises instead.
    """
    import os

    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    debug = os.environ.get("P2D_RAY_DEBUG") == "1"
    locked = None
    try:
        from p2d_ray import runlock
        from p2d_ray.validate import preflight

        # One writer per run directory (p2d_ray/runlock.py); taking it also checks the directory is writable.
        locked = runlock.run_dir_of(cfg, command)
        if locked:
            runlock.acquire(locked, command)
        preflight(cfg, PREFLIGHT.get(command, ()))
        # stdout carries the command's JSON result alone. While the command runs, what would go there
        # goes to stderr: Ray prints its workers' stdout on ours (DeepSpeed's op-build line, anything a
        # library prints in a worker), and so would libraries in this process. A Ray this command started is
        # shut down inside, so Ray's last buffered worker lines land on stderr too, not after the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            result = func(cfg)
            if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
        return 0, result
    except KeyboardInterrupt as err:
        if debug:
            raise
        from p2d_ray.runtime import interrupt_exit

        rc, what = interrupt_exit(err)  # Ctrl-C: 130 "interrupted"; SIGTERM: 143 "terminated (SIGTERM)"
        # Ray first: its log thread forwards the workers' lines onto our stderr and could split ours. A Ray
        # torn mid-call may complain on the way down; the user is owed the one line and rc either way.
        if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
            with contextlib.suppress(Exception):
                sys.modules["ray"].shutdown()
        _say(f"p2d-ray {command}: {what}; {_progress(cfg)}rerun to resume")
        return rc, None
    except (ValueError, FileNotFoundError) as err:
        if debug:
            raise
        # Bad user input found up front: one clear message, no traceback from deep inside Ray.
        _say(f"p2d-ray {command}: error: {err}")
        return 2, None
    except RuntimeError as err:
        if debug:
            raise
        _say(f"p2d-ray {command}: error: {err} (P2D_RAY_DEBUG=1 shows the traceback)")
        return 1, None
    finally:
        if locked:  # on success, error, Ctrl-C and SIGTERM alike
            runlock.release(locked)


if __name__ == "__main__":
    sys.exit(main())
