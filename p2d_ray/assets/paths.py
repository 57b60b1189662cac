"""A run's inputs: the probe set, corpus and held-out set of the config, or else the offline demo's
(``data.demo_target`` picks the demo's target task; built once, then cached). Every stage asks here, so a
config keeps its portable form (no path means "the demo"), and reading a user's corpus never imports the
demo's generator."""

from __future__ import annotations

from p2d_ray.config import P2DConfig


def _demo(cfg: P2DConfig):
    from p2d_ray.assets import demo_data

    return demo_data(cfg.data.demo_target)


def probe_path(cfg: P2DConfig) -> str:
    return cfg.data.probe_path or str(_demo(cfg).probe_path)


def corpus_path(cfg: P2DConfig) -> str:
    if not cfg.data.corpus_path and cfg.targets and all(t.demo_task() for t in cfg.targets):
        # several demo targets: the demo corpus with one hidden label per target (is_clean_on_task_<name>)
        from p2d_ray.assets.synthetic import demo_targets_corpus

        return str(demo_targets_corpus([t.demo_task() for t in cfg.targets]))
    return cfg.data.corpus_path or str(_demo(cfg).corpus_dir)


def heldout_path(cfg: P2DConfig) -> str:
    return cfg.evaluate.heldout_path or str(_demo(cfg).heldout_path)


def corpus_parquet(cfg: P2DConfig) -> str:
    """The run's corpus as Parquet: the source itself when it is Parquet, else ``<run_dir>/corpus`` (a
    user's JSONL / CSV / ``datasets`` corpus, ingested once). Every stage that reads the corpus goes through
    here."""
    from p2d_ray.data.ingest import as_parquet

    return as_parquet(corpus_path(cfg), cfg.run_dir, cfg.data)
