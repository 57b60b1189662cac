"""Load Hugging Face causal LMs safely, and resolve device and dtype in one place."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from p2d_ray.assets import is_asset_model, resolve_model
from p2d_ray.assets.cache import META_FILE
from p2d_ray.config import ModelConfig
from p2d_ray.models.geometry import attention_geometry, geometry_from_config
from p2d_ray.progress import verbose


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is visible to this process")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU, bf16 on GPU.

    Measured on SmolLM2, a CPU with avx512_bf16 (BENCHMARKS.md, ``benchmarks/dtype.py``): bf16 forwards cost
    2.2x less CPU, but per-row losses move by ~0.008 nats and the influence ranking by enough that 2 of 9
    top-10% rows change (Spearman 0.983): fp32 stays the CPU default, since selection must not depend on
    the kernel; set ``model.dtype=bfloat16`` to trade that for speed."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_path(cfg: ModelConfig) -> str:
    """The hub name or local path to load; an asset name (``smollm2-135m``, ``p2d-demo``) resolves to its
    cached directory, built on first use (p2d_ray.assets)."""
    return resolve_model(cfg.name_or_path)


def load_config_checked(cfg: ModelConfig):
    """The HF config, with the family checked before any weights are read."""
    path = resolve_path(cfg)
    hf_config = AutoConfig.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    geometry_from_config(hf_config)  # raises UnsupportedModelError naming the family
    return hf_config


def load_tokenizer(cfg: ModelConfig):
    tok = AutoTokenizer.from_pretrained(
        resolve_path(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked out of every loss.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(cfg: ModelConfig, device: torch.device | None = None) -> PreTrainedModel:
    """Load a causal LM for inference (eval mode, no grad on weights unless the caller enables it)."""
    device = device or resolve_device(cfg.device)
    load_config_checked(cfg)
    if not verbose():  # transformers' per-load "Loading weights" bar, once per actor/worker: noise in a log
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(cfg),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=cfg.use_safetensors,
            dtype=resolve_dtype(cfg.dtype, device),
            attn_implementation=cfg.attn_implementation,
        )
    except OSError as err:
        if cfg.use_safetensors and "safetensors" in str(err).lower():
            raise RuntimeError(
                f"{cfg.name_or_path}: no safetensors weights found; pickle weights can run arbitrary code. "
                "Convert the checkpoint, or set model.use_safetensors=false if you trust it."
            ) from err
        raise
    model.to(device).eval()
    attention_geometry(model)  # the modules we hook must match the config
    return model


def model_fingerprint(cfg: ModelConfig) -> str:
    """Identifies the weights: hub name + revision, or a hash of a local directory's weight files (names and
    sizes, its JSON configs, the first MiB of the weights). The asset cache's build record is left out: it
    holds timings, so every conversion of the same model would otherwise be "another model"."""
    path = resolve_path(cfg)
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.json"))
        for f in [f for f in files if f.name != META_FILE]:
            st = os.stat(f)
            h.update(f"{f.name}:{st.st_size}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
        if (p / "model.safetensors").is_file():
            with open(p / "model.safetensors", "rb") as fh:
                h.update(fh.read(1 << 20))
    else:
        h.update(json.dumps([path, cfg.revision]).encode())
    return h.hexdigest()[:16]


def looks_local(name: str) -> bool:
    """A filesystem path rather than a hub id (``org/name``)."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def weights_problems(model, path: Path | None = None) -> list[str]:
    """Local checkpoints: weight files the loader will accept (no pickle while ``use_safetensors``) and a
    tokenizer. Hub names and the demo models (built by us) are not checked here. One line per problem."""
    if path is None:
        if is_asset_model(model.name_or_path) or not looks_local(model.name_or_path):
            return []
        path = Path(model.name_or_path).expanduser()
    if not path.is_dir():
        return [f"model.name_or_path={model.name_or_path!r}: no such directory"]
    out = []
    if model.use_safetensors and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        found = f" (found pickle weights {pickles[:3]})" if pickles else ""
        out.append(
            f"{path}: no *.safetensors weights{found}; pickle weights can run arbitrary code, so "
            "model.use_safetensors=true refuses them: convert the checkpoint to safetensors, or set "
            "model.use_safetensors=false if you trust it"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        out.append(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json / tokenizer.model)")
    return out
