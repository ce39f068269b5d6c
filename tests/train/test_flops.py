"""MFU inputs: model FLOPs per token (6N full, 4N + 2N_trainable for adapters) and device peaks."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ragft.train.flops import flops_per_token, peak_flops_per_device


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_full_is_six_n_without_the_embedding():
    model = tiny_llama()
    n = sum(p.numel() for p in model.parameters()) - 100 * 16  # the lookup table does no matmul
    # by hand: q,k,v,o 4×16×16 + gate,up,down 3×16×32 + 2 norms ×16 + final norm 16 + lm_head 16×100
    assert n == 4 * 256 + 3 * 512 + 2 * 16 + 16 + 1600
    assert flops_per_token(model, adapter=False) == 6 * n


def test_lora_counts_weight_grads_for_adapters_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * (2 * 16 + 16 * 2)
    total = sum(p.numel() for p in model.parameters()) - 100 * 16
    assert flops_per_token(model, adapter=True) == 4 * total + 2 * trainable


def test_peak_is_unknown_on_cpu_unless_given():
    assert peak_flops_per_device(None, use_gpu=False) is None
    assert peak_flops_per_device(None, use_gpu=True) is None or torch.cuda.is_available()
    assert peak_flops_per_device(400.0, use_gpu=False) == 400e12
