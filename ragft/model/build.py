"""Model and tokenizer construction: the tiny random-init Llama, `from_pretrained` models, LoRA / QLoRA.

Every model, the tiny one included, reaches the workers as a folder that
`from_pretrained` loads: the driver writes the tiny model's random init once
(`materialize_tiny`), so workers, checkpoints and PEFT adapters all see an
ordinary HF model and the tiny case is not a second code path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ragft.config.schema import MethodConfig, ModelConfig
from ragft.model.tokenizer import CHAT_TEMPLATE, cached_tokenizer

ADAPTER_METHODS = ("lora", "qlora")


def tiny_llama_config(model: ModelConfig, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        max_position_embeddings=model.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        use_cache=True,
    )


def materialize_tiny(model: ModelConfig, corpus_paths: list[str], cache_dir: str, seed: int, dest: str | Path) -> Path:
    """Write the tiny model (random init from `seed`) and its trained tokenizer to `dest`."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(cached_tokenizer(corpus_paths, model.vocab_size, cache_dir))
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(tiny_llama_config(model, tokenizer))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-base-"))
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, dest)
    return dest


def context_length(source: str) -> int:
    """The most tokens (prompt + completion) the model at `source` takes: its text config's position limit
    (a multimodal config nests the text model's)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).get_text_config(decoder=True).max_position_embeddings


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """A tokenizer with a pad token and a chat template (ragft's, when the model ships none)."""
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding never carries loss (labels are -100), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_model(
    source: str,
    model: ModelConfig,
    method: MethodConfig,
    dtype: torch.dtype,
    use_cuda: bool,
):
    """Load the base model from `source` and wrap it for `method` (full: as is; lora/qlora: PEFT)."""
    kwargs = dict(
        dtype=dtype,
        attn_implementation=model.attn_implementation,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )
    if method.name == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method.quant_type,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()} if use_cuda else None
    lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    lm.config.use_cache = False  # the KV cache is useless in training and costs memory
    if model.kernels != "none":
        from ragft.kernels.llama import apply_kernels

        apply_kernels(lm, model.kernels)
    if model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.name == "qlora":
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=model.gradient_checkpointing)
    if method.name in ADAPTER_METHODS:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(
            lm,
            LoraConfig(
                task_type="CAUSAL_LM",
                r=method.r,
                lora_alpha=method.alpha,
                lora_dropout=method.dropout,
                target_modules=list(method.target_modules),
            ),
        )
        if model.gradient_checkpointing:
            lm.enable_input_require_grads()
        if model.kernels == "ragft":
            from ragft.kernels.lora import replay_lora_dropout

            replay_lora_dropout(lm)
    return lm


def module_names(source: str, model: ModelConfig) -> set[str]:
    """Leaf-module short names of a model (`q_proj`, ...), built on the meta device: no weights load. A hub id's
    config.json comes from the cache or ragft's shipped copy when one has it (ragft.model.memory.config_source)."""
    from ragft.model.memory import config_source

    config = AutoConfig.from_pretrained(config_source(source, model.revision), revision=model.revision,
                                        trust_remote_code=model.trust_remote_code)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    return {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules() if name}


def model_architecture(model: ModelConfig) -> tuple[str, str]:
    """(model_type, hidden_act) of the model a config names, from its config alone (tiny: llama, silu)."""
    if model.source == "tiny":
        config = LlamaConfig()
    else:
        from ragft.model.memory import config_source

        config = AutoConfig.from_pretrained(config_source(model.source, model.revision), revision=model.revision,
                                            trust_remote_code=model.trust_remote_code).get_text_config(decoder=True)
    return config.model_type, getattr(config, "hidden_act", "?")


def tiny_module_names(model: ModelConfig) -> set[str]:
    """Module names of the tiny model, without training its tokenizer."""
    config = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
    )
    with torch.device("meta"):
        lm = LlamaForCausalLM(config)
    return {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules() if name}
