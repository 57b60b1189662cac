"""``aer.png``: task quality against AER for every adaptation x selection variant (the paper's Figure 1 form).

Each variant is one run's ``report.json``; a good method sits top-left (high quality, low cost). The base
model (no training, AER 0) is drawn as a dashed reference line, full fine-tuning on all data sits at AER 1.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers, CI or this machine

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402


def quality_limits(values: list[float], base: float | None, share: bool) -> tuple[float, float]:
    """A y range that shows every point and the base line with room around them, never a sliver: a rate
    gets a 0-based axis up to at least 10%, another metric at least +-10% of its value around the data."""
    vals = [v for v in [*values, base] if v is not None]
    lo, hi = min(vals), max(vals)
    if share:
        return 0.0, min(1.0, max(0.1, hi * 1.25 + 0.02))
    pad = max(0.15 * (hi - lo), 0.1 * max(abs(lo), abs(hi)), 1e-6)
    return lo - pad, hi + pad


def quality_of(evaluation: dict | None, variant: str = "adapted") -> tuple[float, str] | None:
    """(value, axis name) of a variant's held-out quality: exact match for answer tasks, else perplexity."""
    if not evaluation or variant not in evaluation:
        return None
    v = evaluation[variant]
    if "exact_match" in v:
        return float(v["exact_match"]), "held-out exact match (higher is better)"
    return float(v["perplexity"]), "held-out perplexity (lower is better)"


def plot_aer(points: list[dict], path: str | Path, base_quality: float | None = None) -> Path:
    """Scatter ``points`` (dicts with ``variant``, ``aer``, ``aer_label``, ``quality``, ``quality_name``).

    Args:
        points: one per variant; estimated AERs are drawn hollow, measured ones filled.
        base_quality: the untrained model's quality, drawn as a horizontal reference line.

    Raises:
        ValueError: no points, or points whose quality metrics differ (they cannot share an axis).
    """
    if not points:
        raise ValueError("plot_aer needs at least one variant with an AER and a quality")
    names = {p["quality_name"] for p in points}
    if len(names) > 1:
        raise ValueError(f"variants measure quality differently ({sorted(names)}): cannot share one axis")
    name = names.pop()
    share = "exact match" in name  # a rate: shown in percent on a 0-based axis
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for p in points:
        filled = p["aer_label"] == "measured"
        ax.scatter(
            p["aer"],
            p["quality"],
            s=60,
            color="C0" if filled else "white",
            edgecolor="C0",
            linewidth=1.5,
            zorder=3,
        )
        value = f"{100 * p['quality']:.1f}%" if share else f"{p['quality']:.3g}"
        ax.annotate(
            f"{p['variant']}\n{value}, AER {p['aer']:.2f}",
            (p["aer"], p["quality"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    if base_quality is not None:
        base = f"{100 * base_quality:.1f}%" if share else f"{base_quality:.3g}"
        ax.axhline(
            base_quality, color="grey", linestyle="--", linewidth=1, label=f"base model, no training ({base})"
        )
    ax.axvline(1.0, color="C3", linestyle=":", linewidth=1.2, label="AER = 1: full fine-tuning on all data")
    ax.set_xlabel("AER (cost / full fine-tuning on all data; hollow = estimated)")
    ax.set_ylabel(name)
    # Room on the right for the labels of the rightmost points; AER 1 (full fine-tuning) always in view.
    ax.set_xlim(0, 1.35 * max(1.0, *(p["aer"] for p in points)))
    ax.set_ylim(*quality_limits([p["quality"] for p in points], base_quality, share))
    if share:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(
        "Quality vs adaptation efficiency (top-left is best)"
        if share or "higher" in name
        else "Quality vs adaptation efficiency (bottom-left is best)"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
