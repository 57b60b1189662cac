"""The pictures read on their own: aer.png's quality axis shows the points with room (a single exact-match
point never becomes a sliver axis), the AER = 1 line is labelled, heads.png names the model and the probe."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

from p2d_ray.heads.heatmap import save_heatmap
from p2d_ray.report.plot import plot_aer, quality_limits

EM = "held-out exact match (higher is better)"
PPL = "held-out perplexity (lower is better)"


def test_quality_axis_is_never_a_sliver():
    lo, hi = quality_limits([0.02], 0.019, share=True)  # the one point at 2% exact match
    assert lo == 0.0 and hi >= 0.1
    lo, hi = quality_limits([0.9], 0.5, share=True)
    assert lo == 0.0 and hi == 1.0
    lo, hi = quality_limits([12.0], None, share=False)  # one perplexity: +-10% around it
    assert lo <= 10.8 and hi >= 13.2
    lo, hi = quality_limits([7.0, 9.0], 10.0, share=False)  # the base line is in view too
    assert lo < 7.0 and hi > 10.0


def test_aer_plot_labels_the_full_fine_tuning_line(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(plt, "close", lambda fig: saved.setdefault("fig", fig))  # keep the figure to read
    points = [
        {
            "variant": "heads x influence 10%",
            "aer": 0.3,
            "aer_label": "estimated",
            "quality": 0.02,
            "quality_name": EM,
        }
    ]
    path = plot_aer(points, tmp_path / "aer.png", base_quality=0.019)
    assert path.stat().st_size > 10_000
    ax = saved["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "AER = 1: full fine-tuning on all data" in labels and "base model, no training (1.9%)" in labels
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 0.1


def test_heatmap_names_model_and_probe(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(plt, "close", lambda fig: saved.setdefault("fig", fig))
    scores = torch.rand(30, 9, generator=torch.Generator().manual_seed(0))
    save_heatmap(
        scores,
        [(3, 1), (20, 4)],
        tmp_path / "heads.png",
        "gradient head importance (2 of 270 kept)",
        model="smollm2-135m",
        probe="/data/arith/probe.parquet",
    )
    title = saved["fig"].axes[0].get_title()
    assert "model smollm2-135m" in title and "probe arith/probe.parquet" in title and "2 task heads" in title


@pytest.mark.parametrize("bad", [[], None])
def test_aer_plot_needs_points(tmp_path, bad):
    with pytest.raises(ValueError, match="at least one variant"):
        plot_aer(bad or [], tmp_path / "x.png")
