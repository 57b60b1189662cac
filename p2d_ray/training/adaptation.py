"""The three adaptations compared through one trainer: P2D head deltas, PEFT LoRA, full fine-tuning.

``prepare_model`` turns a loaded base model into a model whose ``requires_grad`` parameters are exactly
what the adaptation trains; the trainer hands only those to the optimizer, so optimizer state is
proportional to what is trained (for ``heads``: the selected heads' deltas) and weight decay never
touches a frozen weight.
"""

from __future__ import annotations

from torch import nn

from p2d_ray.config import TrainConfig
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry, attention_modules, model_family
from p2d_ray.training.deltas import attach_head_deltas, freeze, trainable_parameters

ADAPTATIONS = ("heads", "lora", "full")
# Per family, the attention projections LoRA adapts (names inside each layer's attention module).
_ATTN_PROJECTIONS = {
    "gpt_neox": ("query_key_value", "dense"),
    "gpt2": ("c_attn", "c_proj"),
}
_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_projection_names(model: nn.Module) -> list[str]:
    """Full dotted names of every layer's q/k/v/o projections (fused ones for gpt2/gpt_neox).

    Full names, because a suffix like ``c_proj`` also names gpt2's MLP projection.
    """
    family = model_family(model)
    wanted = _ATTN_PROJECTIONS.get(family, _LLAMA_PROJECTIONS)
    attn_ids = {id(a) for a in attention_modules(model)}
    names = []
    for name, module in model.named_modules():
        if id(module) in attn_ids:
            names.extend(f"{name}.{child}" for child in wanted if hasattr(module, child))
    return names


def lora_config(model: nn.Module, cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=attention_projection_names(model),
        fan_in_fan_out=model_family(model) == "gpt2",
        bias="none",
    )


def prepare_model(model: nn.Module, cfg: TrainConfig, heads: HeadSet | None = None) -> nn.Module:
    """Make ``model`` trainable the way ``cfg.adaptation`` says; returns the model to train (a PeftModel
    for ``lora``). Raises ValueError for an unknown adaptation or ``heads`` without a HeadSet."""
    if cfg.adaptation == "heads":
        if heads is None:
            raise ValueError("train.adaptation=heads needs heads.json (run `p2d-ray localize` first)")
        attach_head_deltas(model, heads, train_o_proj=cfg.train_o_proj)
    elif cfg.adaptation == "lora":
        from peft import get_peft_model

        attention_geometry(model)  # the family is supported
        freeze(model)
        model = get_peft_model(model, lora_config(model, cfg))
    elif cfg.adaptation == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(f"train.adaptation={cfg.adaptation!r}; allowed: {', '.join(ADAPTATIONS)}")
    if not trainable_parameters(model):
        raise ValueError(f"train.adaptation={cfg.adaptation}: no trainable parameters")
    return model
