"""Heatmap of head scores (layers x heads) with the selected task heads outlined: ``heads.png``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def save_heatmap(
    scores: torch.Tensor,
    heads: Iterable[tuple[int, int]],
    path: str | Path,
    title: str = "",
    model: str = "",
    probe: str = "",
) -> Path:
    """Write ``scores [L, H]`` as an image (layer rows, head columns); ``heads`` are outlined in red.

    ``model`` (as the user named it) and ``probe`` (the probe set: its task) head the title, so the picture
    says on its own which model's heads for which task it shows."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    heads = list(heads)
    scores = torch.as_tensor(scores, dtype=torch.float32).cpu()
    if scores.dim() != 2:
        raise ValueError(f"scores must be [layers, heads], got shape {tuple(scores.shape)}")
    L, H = scores.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * H, 16), min(1.5 + 0.35 * L, 14)))
    try:
        im = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
        for layer, head in heads:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(0, H, max(1, H // 16)))
        ax.set_yticks(range(0, L, max(1, L // 16)))
        heading = " | ".join(
            part for part in (model and f"model {model}", probe and f"probe {_probe_name(probe)}") if part
        )
        outline = f"red outline: the {len(heads)} task heads"
        ax.set_title("\n".join(t for t in (heading, title, outline) if t), fontsize=9)
        fig.colorbar(im, ax=ax, label="score")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _probe_name(probe: str) -> str:
    """``.../arith/probe.parquet`` -> ``arith/probe.parquet``: the file and the folder that names its task."""
    p = Path(probe)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name
