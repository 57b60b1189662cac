"""Where a run's probe set, corpus and held-out set come from: the config, or the offline demo assets
(``data.demo_target`` picks the demo's target task; p2d_ray.assets resolves and builds them)."""

from __future__ import annotations

from p2d_ray.config import P2DConfig


def _demo(cfg: P2DConfig):
    from p2d_ray.assets import demo_data  # builds the demo sets once, then cached

    return demo_data(cfg.data.demo_target)


def probe_path(cfg: P2DConfig) -> str:
    return cfg.data.probe_path or str(_demo(cfg).probe_path)


def corpus_path(cfg: P2DConfig) -> str:
    return cfg.data.corpus_path or str(_demo(cfg).corpus_dir)


def heldout_path(cfg: P2DConfig) -> str:
    return cfg.evaluate.heldout_path or str(_demo(cfg).heldout_path)
