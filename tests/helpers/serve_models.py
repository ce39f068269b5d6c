"""Tiny models for the serve tests: a base Llama, random LoRA adapters on it, and perturbed full copies.

Random-init logits are nearly uniform, so greedy decoding of a fresh tiny model sits on argmax
near-ties that flip with the last bit of a matmul (batched vs alone, padded vs not). The base
built here has its lm_head scaled up, which widens the argmax margins until token-for-token
comparisons between code paths are stable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

LM_HEAD_SCALE = 30.0


def build_tiny_base(dest: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The default tiny Llama (ragft's ModelConfig) with a tokenizer trained on the sample data, at `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragft.config.schema import ModelConfig
    from ragft.model.build import materialize_tiny
    from ragft.sample import sample_path

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    if cache_dir is None:
        cache_dir = os.environ.get("RAGFT_CACHE") or tempfile.mkdtemp(prefix="ragft-cache-")
    dest.parent.mkdir(parents=True, exist_ok=True)
    raw = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".raw-base-")) / "model"
    corpus = [sample_path("corpus.jsonl"), sample_path("train.jsonl")]
    materialize_tiny(ModelConfig(tokenizer_corpus=corpus), corpus, str(cache_dir), seed=0, dest=raw)
    model = AutoModelForCausalLM.from_pretrained(raw)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(raw).save_pretrained(dest)
    shutil.rmtree(raw.parent)
    return dest


def build_lora_adapter(base: str | Path, dest: str | Path, seed: int) -> Path:
    """A random LoRA adapter on `base` (q_proj, v_proj) whose outputs differ visibly from the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    if (dest / "adapter_config.json").exists():
        return dest
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    # init_lora_weights=False: B is random too, so the adapter changes the output from the start.
    config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest


def build_full_model(base: str | Path, dest: str | Path, seed: int, noise: float = 0.5) -> Path:
    """A copy of `base` with every weight perturbed by relative Gaussian noise: a stand-in full fine-tune."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std().clamp(min=1e-3))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest
