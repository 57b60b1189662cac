"""Progress a person can read: rows done / total, rate and ETA for long stages, and a closing summary.

    with ray_data_output(run_dir):       # Ray Data's INFO lines and bars -> <run_dir>/logs/ray_data.log
        bar = Progress("score", total=6000)
        for block in ds.iter_batches(...):
            bar.update(block.num_rows)   # terminal: a tqdm bar; else every 30 s a plain line:
        bar.close()                      # score: 1,200/6,000 rows (20%) 14.2 rows/s ETA 5m38s
    stage_summary("score", seconds, "scores/ (20 shards)")   # score: done in 7m02s; wrote scores/ (20 shards)

Everything goes to stderr, so a command's JSON result on stdout stays machine-readable. ``--verbose`` on
the CLI (or ``P2D_RAY_VERBOSE=1``, which also reaches ``ray job submit`` entrypoints) shows Ray Data's own
output instead of sending it to the run's log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

VERBOSE_ENV = "P2D_RAY_VERBOSE"
EVERY_S = 30.0  # plain-line interval when stderr is not a terminal (CI, `ray job logs`)


def _say(text: str, stream) -> None:
    """One line to ``stream``, written directly: Ray Train patches ``print`` in its workers to log through
    the root logger AND tee to stderr, which put every line of a worker's progress twice on the console,
    once on the driver's stdout (where a command's JSON result must stand alone)."""
    stream.write(text + "\n")
    stream.flush()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def duration(seconds: float) -> str:
    """``42s``, ``5m38s``, ``2h03m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Rows (or any ``unit``) done / total with rate and ETA: a tqdm bar when stderr is a terminal,
    else a plain line at the start, every ``every_s`` seconds (and, with ``every_fraction``, every that
    fraction of the total), and a last one at :meth:`close` (or when :meth:`set` reaches the total).

    ``start``: units already done before this process (a resumed training run): the rate counts only new ones.
    """

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str = "rows",
        every_s: float = EVERY_S,
        stream=None,
        start: int = 0,
        every_fraction: float | None = None,
    ):
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = self.start = start
        self.t0 = self._last = time.perf_counter()
        self.note = ""
        self.every_units = max(1, round(total * every_fraction)) if every_fraction else None
        self._next = start + self.every_units if self.every_units else None
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=start, desc=stage, unit=f" {unit}", file=self.stream, dynamic_ncols=True
            )
        else:  # say at once what is coming: the first rows can take minutes (workers start, models load)
            _say(f"{stage}: {start:,}/{total:,} {unit} ...", self.stream)

    def line(self, now: float | None = None) -> str:
        elapsed = (time.perf_counter() if now is None else now) - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = (
            f" ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        )
        speed = f"{rate:.1f}" if rate >= 1 or rate == 0 else f"{rate:.2g}"
        note = f" {self.note}" if self.note else ""
        return f"{self.stage}: {self.done:,}/{self.total:,} {self.unit}{pct} {speed} {self.unit}/s{eta}{note}"

    def update(self, n: int, note: str = "") -> None:
        """``n`` more units done."""
        self.set(self.done + n, note)

    def set(self, done: int, note: str = "") -> None:
        """``done`` units done in all (e.g. the optimizer step); ``note`` ends the line (e.g. the loss)."""
        if self._bar is not None:
            self._bar.update(done - self.done)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self.done, self.note = done, note
            return
        self.done, self.note = done, note
        now = time.perf_counter()
        due = now - self._last >= self.every_s or (self._next is not None and done >= self._next)
        if done >= self.total and self.every_units is not None:
            due = True  # a stepped stage has no close(): its last step is its last line
        elif done >= self.total:
            return  # the last line is close()'s
        if due:
            self._last = now
            if self._next is not None:
                while self._next <= done:
                    self._next += self.every_units
            _say(self.line(now), self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            _say(f"{self.line()} in {duration(time.perf_counter() - self.t0)}", self.stream)


def stage_summary(stage: str, seconds: float, wrote: str, stream=None) -> None:
    """The closing line of a stage: what it wrote and how long it took."""
    _say(f"{stage}: done in {duration(seconds)}; wrote {wrote}", stream or sys.stderr)


@contextmanager
def ray_data_output(run_dir: str | Path):
    """Unless verbose: Ray Data's console log lines go to ``<run_dir>/logs/ray_data.log`` and its progress
    bars are off for the duration (our own :class:`Progress` says rows, rate and ETA instead)."""
    if verbose():
        yield
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    logger = logging.getLogger("ray.data")
    consoles = [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    path = Path(run_dir, "logs", "ray_data.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    before = list(logger.handlers)
    for h in consoles:
        logger.removeHandler(h)
    logger.addHandler(to_file)
    try:
        yield
    finally:
        logger.removeHandler(to_file)
        to_file.close()
        now = list(logger.handlers)  # the saved order back, keeping any handler added meanwhile
        logger.handlers = [h for h in before if h in consoles or h in now] + [
            h for h in now if h not in before
        ]
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
