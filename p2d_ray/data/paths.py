"""Where a run's probe set, corpus and held-out set come from: the config, or the offline demo assets."""

from __future__ import annotations

from p2d_ray.config import P2DConfig


def _demo():
    from p2d_ray.data.synthetic import demo_assets  # builds the demo corpus once, then cached

    return demo_assets()


def probe_path(cfg: P2DConfig) -> str:
    return cfg.data.probe_path or str(_demo().probe_path)


def corpus_path(cfg: P2DConfig) -> str:
    return cfg.data.corpus_path or str(_demo().corpus_dir)


def heldout_path(cfg: P2DConfig) -> str:
    return cfg.evaluate.heldout_path or str(_demo().heldout_path)
