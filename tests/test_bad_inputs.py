"""Nothing a user feeds p2d-ray ends in a traceback or a silent skip (issue 15), and any corpus a user has is
read (issue 14): every bad input below goes through the CLI on a tiny model and must give the expected exit
code, a one-line message naming the problem and no traceback; where rows were read, every row is counted
(rows_in = scored + quarantined).

Most rows run the CLI in-process (``cli.main``, one shared local Ray); the rows whose point is the process
itself (Ctrl-C, the refusal before Ray starts) run a real CLI subprocess.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoConfig

from p2d_ray.cli import main as cli_main
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import geometry_from_config

REPO = Path(__file__).resolve().parents[1]
GOOD = [{"id": i, "text": f"row number {i} is a fine row"} for i in range(40)]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _write(path: Path, rows, schema=None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **kw)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    return _jsonl(
        tmp_path_factory.mktemp("probe") / "probe.jsonl",
        [{"id": i, "prompt": f"What is {i} plus 1? ", "response": f"{i + 1}"} for i in range(6)],
    )


@dataclass
class Case:
    command: str
    overrides: dict = field(default_factory=dict)  # on top of the base config
    rc: int = 2
    message: str = ""  # must appear on ONE line of stderr
    reasons: dict | None = None  # score only: the quarantine reasons expected
    rows_in: int | None = None
    files: dict = field(default_factory=dict)  # extra stderr / output checks


# -- the inputs: each returns a Case for the files it writes under tmp ------------------------------------
def bad_utf8(tmp, model):
    t = pa.table(
        {
            "id": list(range(12)),
            "text": pa.array(
                [f"fine row {i}".encode() for i in range(10)] + [b"\xff\xfe broken", b"ok \xc3"], pa.binary()
            ).view(pa.string()),
        }
    )
    (tmp / "c").mkdir()
    pq.write_table(t, tmp / "c" / "bad.parquet")
    return Case("score", {"data.corpus_path": tmp / "c"}, 0, reasons={"bad_utf8": 2}, rows_in=12)


def _corrupt_second_row_group(path: Path) -> None:
    data = bytearray(path.read_bytes())
    col = pq.ParquetFile(path).metadata.row_group(1).column(1)  # the text column of row group 1 only
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    for i in range(start, start + col.total_compressed_size):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def corrupt_page_validate(tmp, model):
    f = _write(tmp / "c" / "part.parquet", GOOD, row_group_size=10)
    _corrupt_second_row_group(f)
    return Case("validate", {"data.corpus_path": tmp / "c"}, 2, "part.parquet row group 1: cannot decode")


def corrupt_page_score(tmp, model):
    f = _write(tmp / "c" / "part.parquet", GOOD, row_group_size=10)
    _corrupt_second_row_group(f)
    return Case("score", {"data.corpus_path": tmp / "c"}, 0, reasons={"unreadable": 10}, rows_in=40)


def empty_corpus(tmp, model):
    _write(tmp / "c" / "e.parquet", [], schema=pa.schema([("id", pa.int64()), ("text", pa.string())]))
    return Case("validate", {"data.corpus_path": tmp / "c"}, 2, "the corpus is empty (0 rows")


def empty_probe(tmp, model):
    _write(tmp / "c" / "x.parquet", GOOD)
    (tmp / "p.jsonl").write_text("")
    return Case(
        "validate", {"data.corpus_path": tmp / "c", "data.probe_path": tmp / "p.jsonl"}, 2, "has 0 rows"
    )


def later_file_lacks_column(tmp, model):
    _write(tmp / "c" / "a.parquet", [{"id": 1, "prompt": "p", "response": "r"}])
    _write(tmp / "c" / "b.parquet", [{"id": 2, "prompt": "p"}])
    return Case("validate", {"data.corpus_path": tmp / "c"}, 2, "b.parquet: missing column(s) ['response']")


def no_extension_and_upper_case(tmp, model):
    _write(tmp / "c" / "part-00000", GOOD[:10])  # Hive / Spark style: no suffix
    _write(tmp / "c" / "part-00001.PARQUET", GOOD[10:25])
    _write(tmp / "c" / "part-00002.parquet", GOOD[25:])
    (tmp / "c" / "_SUCCESS").write_text("")
    (tmp / "c" / "README.txt").write_text("not data")
    return Case("score", {"data.corpus_path": tmp / "c"}, 0, reasons={}, rows_in=40)


def no_extension_validate(tmp, model):
    no_extension_and_upper_case(tmp, model)
    return Case(
        "validate", {"data.corpus_path": tmp / "c"}, 0, "skipped 1 file(s) that are not parquet: README.txt"
    )


def run_missing_corpus(tmp, model):
    return Case("run", {"data.corpus_path": tmp / "nowhere"}, 2, "no such file or directory")


def _score_refuses_heads(tmp, message: str) -> Case:
    """Scoring a good corpus with a scorer that reads heads.json (the caller wrote a bad one): refused."""
    _write(tmp / "c" / "x.parquet", GOOD)
    return Case("score", {"data.corpus_path": tmp / "c", "score.scorer": "influence"}, 2, message)


def heads_other_model(tmp, model):
    geo = geometry_from_config(AutoConfig.from_pretrained(model))
    HeadSet(((0, 1),), geo, {"model_fingerprint": "0123456789abcdef"}).save(tmp / "run" / "heads.json")
    return _score_refuses_heads(tmp, "heads were localised on a model with fingerprint 0123456789abcdef")


def heads_not_json(tmp, model):
    (tmp / "run").mkdir()
    (tmp / "run" / "heads.json").write_text('{"heads": [[0, 1]')
    return _score_refuses_heads(tmp, "heads.json is not valid JSON")


def probe_without_responses(tmp, model):
    _write(tmp / "c" / "x.parquet", GOOD)
    _jsonl(tmp / "p.jsonl", [{"prompt": "q?", "response": "a"}, {"prompt": "q2?", "response": ""}])
    return Case(
        "localize",
        {"data.corpus_path": tmp / "c", "data.probe_path": tmp / "p.jsonl"},
        2,
        "without usable text",
    )


def heldout_missing(tmp, model):
    return Case("evaluate", {"evaluate.heldout_path": tmp / "nope.parquet"}, 2, "evaluate.heldout_path=")


def unknown_format(tmp, model):
    return Case("validate", {"data.format": "xml"}, 2, "data.format")


def dir_without_data_files(tmp, model):
    (tmp / "c").mkdir()
    (tmp / "c" / "notes.md").write_text("nothing here")
    return Case("score", {"data.corpus_path": tmp / "c"}, 2, "no Parquet, JSON Lines or CSV files found")


def model_without_tokenizer(tmp, model):
    d = tmp / "m"
    d.mkdir()
    for f in Path(model).iterdir():
        if f.name.endswith((".safetensors", "config.json")) and not f.name.startswith("tokenizer"):
            (d / f.name).symlink_to(f)
    return Case("score", {"model.name_or_path": d}, 2, "no tokenizer files")


def jsonl_corpus(tmp, model):
    rows = [{"prompt": f"What is {i} plus 1? ", "response": f"It is {i + 1}."} for i in range(30)]
    _jsonl(tmp / "corpus.jsonl", rows)  # no id column: ingest numbers the rows
    return Case(
        "score",
        {"data.corpus_path": tmp / "corpus.jsonl", "score.scorer": "perplexity"},
        0,
        reasons={},
        rows_in=30,
    )


def csv_corpus(tmp, model):
    (tmp / "c.csv").write_text("id,text\n" + "".join(f"{i},row {i} of a csv file\n" for i in range(15)))
    return Case("validate", {"data.corpus_path": tmp / "c.csv"}, 0, "15 rows, format plain")


def datasets_save_to_disk(tmp, model):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"id": i, "text": f"saved row {i}"} for i in range(25)] + [{"id": 99, "text": ""}]
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp / "saved"))
    return Case("score", {"data.corpus_path": tmp / "saved"}, 0, reasons={"empty": 1}, rows_in=26)


def dataset_name_not_cached(tmp, model):
    return Case(
        "score",
        {"data.corpus_path": "nobody-here/no-such-dataset"},
        2,
        "in the local Hugging Face cache (HF_HUB_OFFLINE=1)",
    )


def rows_that_already_held(tmp, model):
    """nulls, empties, non-strings, overlong, duplicate and null ids: quarantined, counted, the rest scored."""
    rows = GOOD[:20] + [
        {"id": 100, "text": None},
        {"id": 101, "text": "  "},
        {"id": None, "text": "no id"},
        {"id": 5, "text": "duplicate of id 5"},
        {"id": 102, "text": "x" * 300},
    ]
    _write(tmp / "c" / "a.parquet", rows)
    _write(
        tmp / "c" / "b.parquet",
        [{"id": 200, "text": 7}],
        schema=pa.schema([("id", pa.int64()), ("text", pa.int64())]),
    )
    reasons = {"null": 1, "empty": 1, "null_id": 1, "duplicate_id": 1, "too_long": 1, "non_string": 1}
    return Case(
        "score",
        {"data.corpus_path": tmp / "c", "data.overlong": "quarantine"},
        0,
        reasons=reasons,
        rows_in=26,
    )


# -- issue 25: what validate let through and a stage then refused, or failed on with a traceback ----------
def probe_answers_truncated(tmp, model):
    """Answers past data.max_length (64 tokens): localize and score refuse such a probe, so validate does."""
    _write(tmp / "c" / "x.parquet", GOOD)
    long = [
        {"prompt": "Please think about this. " * 8 + f"What is {i}? ", "response": f"{i}"} for i in range(4)
    ]
    _jsonl(tmp / "p.jsonl", long)
    return Case(
        "validate",
        {"data.corpus_path": tmp / "c", "data.probe_path": tmp / "p.jsonl"},
        2,
        "no_target_tokens (after truncation at data.max_length=64)",
    )


def list_text_column(tmp, model):
    _write(tmp / "c" / "x.parquet", [{"id": i, "text": [f"row {i}", "as a list"]} for i in range(10)])
    return Case("validate", {"data.corpus_path": tmp / "c"}, 2, "column 'text' is list<")


def all_null_text_validate(tmp, model):
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    _write(tmp / "c" / "x.parquet", [{"id": i, "text": None} for i in range(10)], schema=schema)
    return Case("validate", {"data.corpus_path": tmp / "c"}, 2, "column 'text' is null in every row")


def all_null_text_score(tmp, model):
    """Refused by the pre-flight (footer statistics), before Ray starts."""
    all_null_text_validate(tmp, model)
    return Case("score", {"data.corpus_path": tmp / "c"}, 2, "no row of the corpus can be scored")


def blank_text_validate(tmp, model):
    """Footers cannot tell blank text: validate decodes the pages and counts what can be scored."""
    _write(tmp / "c" / "x.parquet", [{"id": i, "text": " " * (i % 3)} for i in range(10)])
    return Case("validate", {"data.corpus_path": tmp / "c"}, 2, "no row of the corpus can be scored")


def offline_s3_corpus_score(tmp, model):
    """No network here: one line before any work (was a traceback from ingest.resolve_fs)."""
    return Case(
        "score", {"data.corpus_path": "s3://p2d-ray-no-such-bucket/corpus"}, 1, "cannot be read from here"
    )


def _under_a_file(tmp) -> Path:
    (tmp / "afile").write_text("a file, not a directory")
    return tmp / "afile" / "run"


def run_dir_under_a_file_score(tmp, model):
    _write(tmp / "c" / "x.parquet", GOOD)
    return Case("score", {"data.corpus_path": tmp / "c", "run_dir": _under_a_file(tmp)}, 2, "is under a file")


def run_dir_under_a_file_validate(tmp, model):
    _write(tmp / "c" / "x.parquet", GOOD)
    return Case(
        "validate",
        {"data.corpus_path": tmp / "c", "run_dir": _under_a_file(tmp)},
        2,
        "a file, not a directory",
    )


CASES = [
    probe_answers_truncated,
    list_text_column,
    all_null_text_validate,
    all_null_text_score,
    blank_text_validate,
    offline_s3_corpus_score,
    run_dir_under_a_file_score,
    run_dir_under_a_file_validate,
    bad_utf8,
    corrupt_page_validate,
    empty_corpus,
    empty_probe,
    later_file_lacks_column,
    no_extension_and_upper_case,
    no_extension_validate,
    run_missing_corpus,
    heads_other_model,
    heads_not_json,
    probe_without_responses,
    heldout_missing,
    unknown_format,
    dir_without_data_files,
    model_without_tokenizer,
    csv_corpus,
    datasets_save_to_disk,
    dataset_name_not_cached,
    rows_that_already_held,
]


def _base(tmp: Path, model: str, probe: Path) -> dict:
    _write(tmp / "default_corpus" / "x.parquet", GOOD)
    _write(tmp / "heldout.parquet", [{"id": 1, "prompt": "What is 2 plus 1? ", "response": "3"}])
    return {
        "run_dir": tmp / "run",
        "model.name_or_path": model,
        "data.corpus_path": tmp / "default_corpus",
        "data.probe_path": probe,
        "data.max_length": 64,
        "evaluate.heldout_path": tmp / "heldout.parquet",
        "score.scorer": "noop",
        "score.min_actors": 1,
        "score.max_actors": 1,
        "score.actor_start_timeout_s": 120,
    }


@pytest.mark.parametrize("make", CASES, ids=lambda f: f.__name__)
def test_bad_input(make, request, tiny_llama, probe, tmp_path):
    case = make(tmp_path, tiny_llama)
    if case.reasons is not None:  # only a scoring pass needs Ray; every refusal happens before Ray starts
        request.getfixturevalue("ray_local")
    overrides = {**_base(tmp_path, tiny_llama, probe), **case.overrides}
    rc, out, err = cli(case.command, *[f"{k}={v}" for k, v in overrides.items()])
    assert "Traceback" not in err, err
    assert rc == case.rc, (rc, out, err)
    if case.message:
        lines = err.splitlines() + out.splitlines()
        assert any(case.message in line for line in lines), (case.message, err, out)
    if case.command == "run" and rc != 0:
        assert not (tmp_path / "run" / "heads.json").exists(), (
            "no stage may start before every input is checked"
        )
    if case.reasons is not None:
        result = json.loads(out)
        assert result["rows_in"] == case.rows_in
        assert result["rows_in"] == result["rows_scored"] + result["rows_quarantined"]
        assert result["quarantine_reasons"] == case.reasons
        q = tmp_path / "run" / "quarantine"
        n_q = pq.read_table(q).num_rows if any(q.glob("*.parquet")) else 0
        assert n_q == result["rows_quarantined"]


def test_corrupt_page_quarantined_naming_file_and_row_group(ray_local, tiny_llama, probe, tmp_path):
    """The corrupt-page row of the table, at score time: that row group's rows quarantined (counted, named),
    the rest scored. (validate refuses the same file: corrupt_page_validate.)"""
    case = corrupt_page_score(tmp_path, tiny_llama)
    overrides = {**_base(tmp_path, tiny_llama, probe), **case.overrides}
    rc, out, err = cli("score", *[f"{k}={v}" for k, v in overrides.items()])
    assert rc == 0 and "Traceback" not in err, err
    result = json.loads(out)
    assert result["quarantine_reasons"] == case.reasons and result["rows_in"] == case.rows_in
    assert result["rows_in"] == result["rows_scored"] + result["rows_quarantined"]
    q = pq.read_table(tmp_path / "run" / "quarantine")
    assert set(q.column("row_group").to_pylist()) == {1} and set(q.column("reason").to_pylist()) == {
        "unreadable"
    }
    assert "part.parquet row group 1" in json.loads(q.column("row_json")[0].as_py())["error"]
    # issue 25: select treats the quarantined row group as score did (was an OSError traceback, rc 1)
    rc, out, err = cli("select", *[f"{k}={v}" for k, v in overrides.items()], "select.fraction=0.5")
    assert rc == 0 and "Traceback" not in err, err
    selection = json.loads(out)
    assert selection["n_scored"] == 30 and selection["n_selected"] == 15 and selection["n_corpus"] == 40
    subset = pq.read_table(tmp_path / "run" / "subset")
    assert subset.num_rows == 15 and not set(subset.column("id").to_pylist()) & set(range(10, 20))


def test_zero_scorable_rows_fail_score_and_select_in_one_line(ray_local, tiny_llama, probe, tmp_path):
    """Blank text in every row (footers cannot tell; the pre-flight passes): score quarantines every row,
    then fails in one line (was rc 0 with an empty score set), and select says why there is nothing to
    select (was `No match for FieldRef.Name(id)`, rc 2)."""
    _write(tmp_path / "c" / "x.parquet", [{"id": i, "text": "  "} for i in range(12)])
    args = [
        f"{k}={v}"
        for k, v in {**_base(tmp_path, tiny_llama, probe), "data.corpus_path": tmp_path / "c"}.items()
    ]
    rc, out, err = cli("score", *args)
    assert rc == 2 and "Traceback" not in err, err
    line = next(x for x in err.splitlines() if "no row of the corpus could be scored" in x)
    assert "all 12 rows were quarantined" in line and "'empty': 12" in line
    rc, out, err = cli("select", *args)
    assert rc == 2 and "Traceback" not in err, err
    assert any("nothing to select: no row of the corpus was scored" in x for x in err.splitlines()), err


def test_jsonl_corpus_scored_end_to_end_ingested_once(ray_local, tiny_llama, probe, tmp_path):
    case = jsonl_corpus(tmp_path, tiny_llama)
    args = [f"{k}={v}" for k, v in {**_base(tmp_path, tiny_llama, probe), **case.overrides}.items()]
    assert cli("validate", *args)[0] == 0
    record = json.loads((tmp_path / "run" / "corpus_ingest.json").read_text())
    assert record["rows"] == 30 and record["added_id_column"] == "id" and record["kind"] == "json"
    mtime = (tmp_path / "run" / "corpus" / "part-00000.parquet").stat().st_mtime_ns
    rc, out, _ = cli("score", *args)
    assert rc == 0 and json.loads(out)["rows_scored"] == 30
    assert (tmp_path / "run" / "corpus" / "part-00000.parquet").stat().st_mtime_ns == mtime  # not redone
    scores = pq.read_table(tmp_path / "run" / "scores")
    assert sorted(scores.column("id").to_pylist()) == list(range(30))
    assert all(v > 0 for v in scores.column("loss_full").to_pylist())  # real perplexity scores


# -- real CLI processes: the point is the process ------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli_proc(
    args: list[str], env: dict | None = None, default_sigint: bool = False, **kw
) -> subprocess.Popen:
    """The CLI in a real process. ``default_sigint``: Ctrl-C raises KeyboardInterrupt in it, as when started
    from a terminal, even if this test process was started with SIGINT ignored (see the Ctrl-C test)."""
    code = "import sys; from p2d_ray.cli import main; sys.exit(main())"
    if default_sigint:
        code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); " + code
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_pickle_only_model_refused_the_same_way_by_every_command(tiny_llama, probe, tmp_path):
    d = tmp_path / "pickle_model"
    d.mkdir()
    for f in Path(tiny_llama).iterdir():
        if not f.name.endswith(".safetensors"):
            (d / f.name).symlink_to(f)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    base = {**_base(tmp_path, tiny_llama, probe), "model.name_or_path": d}
    args = [f"{k}={v}" for k, v in base.items()]
    messages = set()
    for command in ("validate", "localize", "score", "train", "evaluate", "run"):
        rc, _, err = cli(command, *args)
        assert rc == 2 and "Traceback" not in err, (command, err)
        line = next(x for x in err.splitlines() if "pytorch_model.bin" in x)
        messages.add(line[line.index(str(d)) :])  # the message itself, after "p2d-ray <cmd>: ..." prefixes
    assert len(messages) == 1, messages
    # A real process: refused before Ray starts (no local Ray instance started, no traceback).
    p = _cli_proc(["score", *args])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err and "pickle weights" in err
    assert "Started a local Ray instance" not in err + out


def _alive_scorer_actors(ray) -> list:
    from ray._private import state

    return [
        a for a in state.actors().values() if a["State"] == "ALIVE" and "ScorerActor" in a["ActorClassName"]
    ]


def _wait_for_a_new_scorer_actor(ray, p, before: set) -> None:
    """Until a scoring actor not in ``before`` (actor ids) is alive, while the CLI process ``p`` still runs."""
    deadline = time.monotonic() + 600
    while not {a["ActorID"] for a in _alive_scorer_actors(ray)} - before:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no scoring actor started"
        time.sleep(0.2)  # polling Ray's actor table, not timing


def test_ctrl_c_during_scoring(ray_local, tiny_llama, probe, tmp_path):
    """SIGINT to a real CLI process while its scoring actors are working: one line, rc 130, nothing of the
    run left behind, and the rerun resumes from exactly the shards the interrupted run finished.

    The signal is sent as soon as an actor of this run is alive (read from Ray's actor table), when 60
    shards leave tens of seconds of work on any machine. The CLI joins the test's Ray (RAY_ADDRESS) rather
    than starting its own: on this shared 2-core machine a second ``ray.init`` can exceed Ray's fixed 30 s
    node start-up deadline."""
    n_shards = 60
    rows = [{"id": i, "text": f"row {i} " + "word " * 20} for i in range(20 * n_shards)]
    _write(tmp_path / "c" / "x.parquet", rows, row_group_size=20)
    base = {
        **_base(tmp_path, tiny_llama, probe),
        "data.corpus_path": tmp_path / "c",
        "score.scorer": "perplexity",
    }
    base.update({"score.batch_size": 4, "score.bucket_batches": 1, "score.max_rows_per_block": 20})
    args = [f"{k}={v}" for k, v in base.items()]
    address = ray_local.get_runtime_context().gcs_address
    # An earlier test's pool can still be shutting down: wait for an actor of THIS run.
    before = {a["ActorID"] for a in _alive_scorer_actors(ray_local)}
    p = _cli_proc(
        ["score", *args],
        start_new_session=True,
        env={**_env(), "RAY_ADDRESS": address},
        # As in a terminal. A suite started in the background (`make test &`, a runner without job control)
        # has SIGINT ignored, the child inherits that, and Python (rightly) keeps an inherited SIG_IGN: the
        # CLI then never sees the signal and scores to the end (rc 0).
        default_sigint=True,
    )
    from p2d_ray.scoring.outputs import ScoreStore

    _wait_for_a_new_scorer_actor(ray_local, p, before)
    children = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "interrupted" in x)
    assert f"of {n_shards} shards done, rerun to resume" in line, line
    n_done = int(line.split("interrupted; ")[1].split(" of ")[0])
    assert 0 <= n_done < n_shards
    assert n_done == len(list(ScoreStore(tmp_path / "run").done.glob("*.json")))
    assert not (tmp_path / "run" / ".p2d-ray.lock").exists()  # the run dir's lock is released on Ctrl-C
    # Nothing left behind: the CLI's own child processes and the run's scoring actors are gone (polled).
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [(c.pid, c.name()) for c in alive]
    deadline = time.monotonic() + 120
    while _alive_scorer_actors(ray_local):
        assert time.monotonic() < deadline, _alive_scorer_actors(ray_local)
        time.sleep(0.5)
    # The rerun resumes: the finished shards are skipped, every row scored once.
    rc, out, err = cli("score", *args)
    assert rc == 0, err
    assert json.loads(out)["rows_in"] == 20 * n_shards
    stats = json.loads((tmp_path / "run" / "score_stats.json").read_text())
    assert stats["shards"]["already_done"] == n_done


def test_stdout_is_the_json_result_alone(ray_local, tiny_llama, probe, tmp_path):
    """A real ``p2d-ray train`` process that joins a Ray cluster gets its workers' output forwarded (Ray's
    log_to_driver): stdout still parses as the command's JSON result, and the training progress line is
    on stderr once per update. (Before: the workers' DeepSpeed and progress lines landed on stdout, and
    Ray Train's patched ``print`` doubled every progress line.)"""
    base = _base(tmp_path, tiny_llama, probe)
    args = [f"{k}={v}" for k, v in base.items()]
    rc, _, err = cli("localize", *args)
    assert rc == 0, err
    _write(tmp_path / "run" / "subset" / "part-0.parquet", GOOD[:16])
    address = ray_local.get_runtime_context().gcs_address
    p = _cli_proc(
        ["train", *args, "train.epochs=1", "train.num_workers=1", "train.cpus_per_worker=0.5"],
        env={**_env(), "RAY_ADDRESS": address},
    )
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    result = json.loads(out)  # nothing but the result
    assert result["rows"] == 16 and result["steps"] >= 1
    opening = [x for x in err.splitlines() if "train: 0/" in x]
    assert len(opening) == 1, err
