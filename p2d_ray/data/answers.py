"""Answer-format tasks: a response whose final answer follows ``####`` (GSM8K style), and exact match on it."""

from __future__ import annotations

import re
from collections.abc import Iterable

# The number after the first "####": optional sign, digits with optional thousands commas, optional decimals.
ANSWER = re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)")


def parse_answer(text: str | None) -> str | None:
    """The number after ``####`` in canonical form (commas dropped, ``7.0`` -> ``7``), or None if absent."""
    if not text:
        return None
    m = ANSWER.search(text)
    if m is None:
        return None
    raw = m.group(1).replace(",", "")
    if "." in raw:
        raw = raw.rstrip("0").rstrip(".")
    if raw in ("-0", ""):
        raw = "0"
    return raw


def is_answer_format(references: Iterable[str | None]) -> bool:
    """True when every reference response carries a ``#### <number>`` answer (and there is at least one)."""
    refs = list(references)
    return bool(refs) and all(parse_answer(r) is not None for r in refs)


def exact_match(prediction: str | None, reference: str | None) -> bool:
    """Both sides parse to the same number; a prediction without ``####`` is wrong."""
    want = parse_answer(reference)
    return want is not None and parse_answer(prediction) == want


def cut_at_stop(text: str, stop: str = "\n") -> str:
    """Generated text up to (not including) the first ``stop``: the answer line of a single-line response."""
    i = text.find(stop)
    return text if i < 0 else text[:i]
