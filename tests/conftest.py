"""Shared fixtures: tiny real HF models built from configs (never downloaded) and one local Ray."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


# The tiny GQA Llama shape every tiny model here shares: 2 layers x 4 query heads, 2 kv heads, hidden 64.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def save_tiny_model(path, family: str = "llama", seed: int = 0, **overrides):
    """Build a tiny random causal LM of ``family`` with the byte-level tokenizer and save it
    (safetensors) under ``path``. Returns the path as str."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from p2d_ray.assets.tokenizer import build_tokenizer

    tok = build_tokenizer()
    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common, **overrides)
        model = GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            **common,
            **overrides,
        )
        model = GPTNeoXForCausalLM(cfg)
    else:
        cls_cfg, cls_model = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        }[family]
        model = cls_model(cls_cfg(**common, **{**TINY_LLAMA, **overrides}))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of a tiny random Llama (2 layers x 4 query heads, 2 kv heads: GQA) with a byte tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads
    spinning for each other made the planted-model training ~20x slower (measured: 3-5 s vs 45-90 s).
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (ray.init costs ~8 s here). 4 logical CPUs on a 2-core box so
    a read task and two fractional actors never starve each other."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()
