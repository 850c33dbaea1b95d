"""Tiny random-init causal LMs, one per supported family, built from transformers configs."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
_GQA = dict(_COMMON, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_GQA),
    "mistral": lambda: MistralConfig(**_GQA, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_GQA),
    "gemma": lambda: GemmaConfig(**_GQA, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_GQA, head_dim=8, sliding_window=16),
    "gemma3_text": lambda: Gemma3TextConfig(
        **_GQA,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "phi3": lambda: Phi3Config(**_GQA, pad_token_id=0),
    "opt": lambda: OPTConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, intermediate_size=64, max_position_embeddings=256),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=256),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()
