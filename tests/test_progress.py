"""Progress lines a person can read (rows done / total, rate, ETA) and Ray Data's chatter kept in the run log."""

from __future__ import annotations

import io
import logging
import re

from p2d_ray.progress import Progress, duration, ray_data_output, stage_summary


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()  # not a tty: CI, `ray job logs`
    bar = Progress("score", 6000, every_s=0.0, stream=out)
    bar.update(1200)
    bar.update(4800)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines.pop(0) == "score: 0/6,000 rows ..."  # at once: the first rows can take minutes
    assert re.fullmatch(r"score: 1,200/6,000 rows \(20%\) [\d.]+ rows/s ETA \d+s", lines[0]), lines[0]
    assert re.fullmatch(r"score: 6,000/6,000 rows \(100%\) [\d.]+ rows/s in \d+s", lines[-1]), lines[-1]
    quiet = io.StringIO()
    bar = Progress("score", 10, every_s=3600, stream=quiet)
    bar.update(5)
    assert quiet.getvalue() == "score: 0/10 rows ...\n"  # the opening line, then none before the interval


def test_duration_and_summary():
    assert [duration(s) for s in (4.4, 338, 7380)] == ["4s", "5m38s", "2h03m"]
    out = io.StringIO()
    stage_summary("select", 61, "subset/ (10 rows)", stream=out)
    assert out.getvalue() == "select: done in 1m01s; wrote subset/ (10 rows)\n"


def test_ray_data_lines_go_to_the_run_log(tmp_path, monkeypatch):
    import ray.data

    monkeypatch.delenv("P2D_RAY_VERBOSE", raising=False)
    logger = logging.getLogger("ray.data")
    before = list(logger.handlers)
    with ray_data_output(tmp_path):
        assert not ray.data.DataContext.get_current().enable_progress_bars
        logger.info("Starting execution of Dataset")
    assert "Starting execution of Dataset" in (tmp_path / "logs" / "ray_data.log").read_text()
    assert logger.handlers == before  # restored
    monkeypatch.setenv("P2D_RAY_VERBOSE", "1")
    with ray_data_output(tmp_path / "v"):
        pass
    assert not (tmp_path / "v" / "logs").exists()
