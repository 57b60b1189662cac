"""``aer.png``: task quality against AER for every adaptation x selection variant (the paper's Figure 1 form).

Each variant is one run's ``report.json``; a good method sits top-left (high quality, low cost). The base
model (no training, AER 0) is drawn as a dashed reference line, full fine-tuning on all data sits at AER 1.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers, CI or this machine

import matplotlib.pyplot as plt  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(6, 4.2))
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
        ax.annotate(
            p["variant"], (p["aer"], p["quality"]), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    if base_quality is not None:
        ax.axhline(base_quality, color="grey", linestyle="--", linewidth=1, label="base model (no training)")
        ax.legend(loc="best", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)  # full fine-tuning on all data
    ax.set_xlabel("AER (cost / full fine-tuning on all data; hollow = estimated)")
    ax.set_ylabel(names.pop())
    # Room on the right for the labels of the rightmost points; AER 1 (full fine-tuning) always in view.
    ax.set_xlim(0, 1.35 * max(1.0, *(p["aer"] for p in points)))
    ax.grid(alpha=0.3)
    ax.set_title("Quality vs adaptation efficiency")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
