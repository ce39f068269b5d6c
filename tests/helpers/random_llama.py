"""A seeded, randomly initialised Llama small enough for unit tests: the model the loss, kernel and LoRA tests
compare against transformers and PEFT (each test picks the widths it needs)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def random_llama(**config) -> LlamaForCausalLM:
    """fp32, initialised from seed 0; `config` overrides SHAPE and LlamaConfig's defaults."""
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(LlamaConfig(**{**SHAPE, **config}), dtype=torch.float32)
