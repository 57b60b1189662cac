"""Export a trained update: head deltas (safetensors + heads.json), the same update as a standard PEFT LoRA
adapter, and optionally a merged full model.

Why a head delta IS a LoRA adapter: PEFT's LoRA computes ``y = base(x) + B(A(x)) * alpha / r`` with
``A [r, in]`` and ``B [out, r]``. With ``alpha = r`` (scale 1) and a one-hot selection matrix ``S``:

    rows Δ [r, in]  (output features idx):  A = Δ,      B = S [out, r], S[idx[j], j] = 1
    cols Δ [out, r] (input features idx):   A = Sᵀ [r, in], Sᵀ[j, idx[j]] = 1,   B = Δ

Every module gets its own rank ``r = len(idx)`` (``rank_pattern`` / ``alpha_pattern``), so anything that
serves PEFT LoRA adapters serves a P2D head update, and ``PeftModel.from_pretrained(base, path)``
reproduces the trained model's logits.

Layout under ``<run_dir>/adapter/``::

    manifest.json                   {"adaptation": heads|lora|full, "base_model": ..., "weights_sha256": ...}
    heads/head_deltas.safetensors   one Δ per projection module; specs in the safetensors metadata
    heads/heads.json                the HeadSet that was trained
    peft/adapter_config.json, adapter_model.safetensors, README.md   (heads and lora adaptations; written
                                    by PEFT's save_pretrained, naming a base PEFT loads offline:
                                    training/model_card.py; README.md is our model card)
``<run_dir>/merged/`` holds the merged model (``save_pretrained``) for ``full``, or when
``train.export_merged`` is set.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from p2d_ray.config import P2DConfig
from p2d_ray.heads.headset import HeadSet
from p2d_ray.training.deltas import DeltaSpec, attach_from_specs, load_delta_values, merge_head_deltas

HEADS_FILE = "head_deltas.safetensors"
MANIFEST = "manifest.json"


# -- (a) head deltas -------------------------------------------------------------------------------
def save_head_deltas(
    specs: list[DeltaSpec], values: dict[str, torch.Tensor], heads: HeadSet, out_dir: str | Path
) -> Path:
    """Write ``Δ`` per module (``<module>.delta``) with the specs as safetensors metadata, plus heads.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{s.module_name}.delta": values[s.module_name].contiguous() for s in specs}
    meta = {"format": "p2d-head-deltas/1", "specs": json.dumps([s.to_json() for s in specs])}
    save_file(tensors, str(out / HEADS_FILE), metadata=meta)
    heads.save(out / "heads.json")
    return out


def load_head_deltas(adapter_dir: str | Path) -> tuple[list[DeltaSpec], dict[str, torch.Tensor], HeadSet]:
    """Read what :func:`save_head_deltas` wrote: (specs, ``{module_name: Δ}``, heads)."""
    d = Path(adapter_dir)
    path = d / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no head deltas at {path} (run `p2d-ray train` with train.adaptation=heads)")
    with safe_open(str(path), framework="pt") as f:
        specs = [DeltaSpec.from_json(s) for s in json.loads(f.metadata()["specs"])]
        values = {s.module_name: f.get_tensor(f"{s.module_name}.delta") for s in specs}
    return specs, values, HeadSet.load(d / "heads.json")


# -- (b) the same update as a PEFT LoRA adapter ----------------------------------------------------
def head_deltas_to_lora(
    specs: list[DeltaSpec], values: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module_name: (A [r, in], B [out, r])}`` with ``B @ A == scatter(Δ)`` (see module docstring)."""
    out = {}
    for s in specs:
        delta = values[s.module_name].float()
        r = len(s.index)
        idx = torch.tensor(s.index, dtype=torch.long)
        if s.axis == "rows":
            a = delta  # [r, in]
            b = torch.zeros(s.out_features, r)
            b[idx, torch.arange(r)] = 1.0  # S [out, r]
        else:
            a = torch.zeros(r, s.in_features)
            a[torch.arange(r), idx] = 1.0  # Sᵀ [r, in]
            b = delta  # [out, r]
        out[s.module_name] = (a.contiguous(), b.contiguous())
    return out


def save_peft_from_deltas(
    specs: list[DeltaSpec],
    values: dict[str, torch.Tensor],
    out_dir: str | Path,
    base_model_name_or_path: str,
    fan_in_fan_out: bool = False,
    hf_config=None,
    card: str = "",
    revision: str | None = None,
) -> Path:
    """Write a standard PEFT LoRA adapter (per-module rank, alpha = rank so the scale is 1) through PEFT's
    own ``save_pretrained`` (adapter_config.json, adapter_model.safetensors, README.md model card).

    Args:
        base_model_name_or_path: recorded in the adapter as the user named the model (hub name, short name
            or path), never a local cache path.
        fan_in_fan_out: True for gpt2 (Conv1D weights ``[in, out]``); A and B are the same.
        hf_config: the base model's config (default: read from ``base_model_name_or_path``).
        card: a paragraph for the model card (what was trained and how).
    """
    from peft import LoraConfig

    factors = head_deltas_to_lora(specs, values)
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    config = LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=sorted(factors),
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        rank_pattern=dict(ranks),
        alpha_pattern={k: float(v) for k, v in ranks.items()},
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        inference_mode=True,
    )
    # PEFT's on-disk key convention: base_model.model.<module>.lora_{A,B}.weight (no adapter name).
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    return save_peft_adapter(config, tensors, out_dir, base_model_name_or_path, hf_config, card, revision)


def save_peft_adapter(
    config,
    tensors: dict[str, torch.Tensor],
    out_dir: str | Path,
    base_name: str,
    hf_config=None,
    card: str = "",
    revision: str | None = None,
) -> Path:
    """``PeftModel.save_pretrained`` of a LoRA ``config`` with the weights ``tensors`` (PEFT's on-disk keys),
    on a base model built on the meta device: no base weights are read or allocated, so this costs the
    same for a 7B model as for a tiny one. The adapter and its model card name ``base_name``."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = copy.deepcopy(hf_config or AutoConfig.from_pretrained(base_name))
    hf_config._name_or_path = base_name  # what PEFT records as base_model_name_or_path and in the card
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config)
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 deprecated alias; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, copy.deepcopy(config))
    model.peft_config["default"].base_model_name_or_path = base_name
    model.peft_config["default"].revision = revision  # a hub base: the revision trained on
    if card:
        # save_pretrained completes an existing README.md (base model, library, PEFT version) in place.
        from huggingface_hub import ModelCard, ModelCardData

        ModelCard.from_template(ModelCardData(), model_description=card).save(out / "README.md")
    # The adapter weights are passed in: the meta model only supplies structure, config and card.
    state = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ): v.contiguous()
        for k, v in tensors.items()
    }
    # Embeddings are never adapted here: "auto" would look for the base's config under base_name (a short
    # name such as smollm2-135m is no Hub id) only to warn.
    model.save_pretrained(str(out), state_dict=state, save_embedding_layers=False)
    return out


# -- manifest and whole-run export -----------------------------------------------------------------
def write_manifest(adapter_dir: str | Path, **fields) -> Path:
    p = Path(adapter_dir) / MANIFEST
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(fields, indent=1))
    return p


def read_manifest(adapter_dir: str | Path) -> dict:
    p = Path(adapter_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"no trained adapter at {p.parent} (run `p2d-ray train` first)")
    return json.loads(p.read_text())


def dir_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_sha256(path: str | Path) -> str:
    """sha256 over the ``*.safetensors`` files under ``path`` (sorted by relative name): which trained
    weights an adapter holds, so anything cached per adapter (compare's held-out evaluations) notices a
    retrained one whose other manifest fields (sizes, parameter counts) are the same."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(root.rglob("*.safetensors")):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 23), b""):
                h.update(chunk)
    return h.hexdigest()


def export_from_checkpoint(cfg: P2DConfig, export_dir: str | Path) -> dict:
    """Turn the ``export/`` folder of the final training checkpoint into ``<run_dir>/adapter`` (and
    ``<run_dir>/merged``). Returns the manifest."""
    from p2d_ray.models.geometry import model_family
    from p2d_ray.models.loading import load_config_checked, resolve_path
    from p2d_ray.training.model_card import peft_base, write_model_card

    run_dir = Path(cfg.run_dir)
    src = Path(export_dir)
    adapter = run_dir / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    adapter.mkdir(parents=True)
    adaptation = cfg.train.adaptation
    base = resolve_path(cfg.model)
    # Our short name stays here; the PEFT adapter names what PEFT can load (model_card.peft_base).
    peft_name, revision = peft_base(cfg)
    manifest: dict = {"adaptation": adaptation, "base_model": cfg.model.name_or_path, "base_path": base}
    if adaptation == "heads":
        shutil.copytree(src / "heads", adapter / "heads")
        specs, values, heads = load_head_deltas(adapter / "heads")
        hf_config = load_config_checked(cfg.model)
        card = (
            f"P2D head update of `{cfg.model.name_or_path}`: only the attention heads "
            f"{', '.join(f'L{layer}.H{h}' for layer, h in heads.heads)} were trained (their q/k/v rows"
            f"{' and o_proj columns' if cfg.train.train_o_proj else ''}), written as an exact LoRA adapter "
            "(per-module rank, scale 1). Made with p2d-ray."
        )
        save_peft_from_deltas(
            specs,
            values,
            adapter / "peft",
            peft_name,
            fan_in_fan_out=model_family(hf_config) == "gpt2",
            hf_config=hf_config,
            card=card,
            revision=revision,
        )
        manifest["heads_bytes"] = dir_size_bytes(adapter / "heads")
        manifest["peft_bytes"] = dir_size_bytes(adapter / "peft")
        manifest["trainable_params"] = sum(v.numel() for v in values.values())
        manifest["weights_sha256"] = weights_sha256(adapter / "heads")
    elif adaptation == "lora":
        # Re-saved through PEFT on the meta device so the adapter names the model as the user did (the
        # worker's copy records the local path it loaded from).
        from peft import LoraConfig
        from safetensors.torch import load_file

        lora = LoraConfig.from_pretrained(str(src / "peft"))
        card = (
            f"LoRA (r={lora.r}) on the attention projections of `{cfg.model.name_or_path}`, "
            "trained on a P2D-selected subset. Made with p2d-ray."
        )
        save_peft_adapter(
            lora,
            load_file(str(src / "peft" / "adapter_model.safetensors")),
            adapter / "peft",
            peft_name,
            load_config_checked(cfg.model),
            card,
            revision,
        )
        manifest["peft_bytes"] = dir_size_bytes(adapter / "peft")
        manifest["weights_sha256"] = weights_sha256(adapter / "peft")
    else:  # full: the update is the whole model
        manifest["merged_dir"] = str((run_dir / "merged").resolve())
    write_manifest(adapter, **manifest)
    if adaptation == "full":
        merged = run_dir / "merged"
        if merged.exists():
            shutil.rmtree(merged)
        shutil.copytree(src / "model", merged)
        manifest["merged_bytes"] = dir_size_bytes(merged)
        manifest["weights_sha256"] = weights_sha256(merged)
    elif cfg.train.export_merged:
        model = load_adapted_model(cfg)
        save_merged(model, cfg, run_dir / "merged")
        manifest["merged_dir"] = str((run_dir / "merged").resolve())
    write_manifest(adapter, **manifest)
    write_model_card(cfg)  # the full card; evaluate rewrites it with the held-out numbers
    return manifest


def save_merged(model, cfg: P2DConfig, out_dir: str | Path) -> Path:
    """``save_pretrained`` of a plain (merged) model plus the base tokenizer."""
    from p2d_ray.models.loading import load_tokenizer

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(cfg.model).save_pretrained(str(out))
    return out


def load_adapted_model(cfg: P2DConfig, device: torch.device | None = None):
    """The base model with the trained update of ``<run_dir>/adapter`` applied, as a plain model in eval
    mode (head deltas / LoRA merged into the weights; ``full`` loads ``<run_dir>/merged``)."""
    from p2d_ray.models.loading import load_model

    adapter = Path(cfg.run_dir) / "adapter"
    manifest = read_manifest(adapter)
    adaptation = manifest["adaptation"]
    if adaptation == "full":
        return load_model(cfg.model.model_copy(update={"name_or_path": manifest["merged_dir"]}), device)
    model = load_model(cfg.model, device)
    if adaptation == "heads":
        specs, values, heads = load_head_deltas(adapter / "heads")
        attach_from_specs(model, specs)
        load_delta_values(model, values)
        return merge_head_deltas(model).eval()
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter / "peft"))
    return peft_model.merge_and_unload().eval()
