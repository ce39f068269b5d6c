"""The model an export writes: a LoRA adapter folded into its base, or a full fine-tune's weights, in one dtype.

LoRA is folded in float32 whatever the export's dtype (W + scale·B·A summed in bf16 would round the update
away where it is small next to W), then cast. The tokenizer (with its chat template) is the checkpoint's:
training saved the one it used beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ragft.model.build import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dtype(dtype: str, base: str, checkpoint: str) -> torch.dtype:
    """The torch dtype `export.dtype` names; auto: the one the base model's config.json records (else float32).
    A full fine-tune whose base cannot be read here (a hub id not in the local cache) uses its own config's."""
    if dtype != "auto":
        return DTYPES[dtype]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except OSError:
        config = AutoConfig.from_pretrained(checkpoint)
    recorded = getattr(config, "dtype", None)
    if isinstance(recorded, str):
        recorded = DTYPES.get(recorded)
    return recorded if recorded in DTYPES.values() else torch.float32


def merged_model(checkpoint: str, kind: str, base: str, dtype: torch.dtype):
    """The checkpoint as one plain transformers model in `dtype` (no PEFT wrapper left), ready to save."""
    from transformers import AutoModelForCausalLM

    if kind == "lora":
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.config.use_cache = True  # training turns the KV cache off; the exported model is for generation
    return model


def checkpoint_tokenizer(checkpoint: str, base: str):
    """The tokenizer saved with the checkpoint (the base's where the checkpoint has none), chat template included."""
    has_own = any((Path(checkpoint) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return load_tokenizer(checkpoint if has_own else base)

