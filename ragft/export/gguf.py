"""A merged llama-architecture model as one GGUF file, written with the `gguf` package's writer.

What llama.cpp's converter writes for a Llama with a byte-level BPE tokenizer, and transformers' GGUF loader
reads back (`from_pretrained(folder, gguf_file=name)`):
  - hyper-parameters under `llama.*` (context, widths, heads, RMS epsilon, RoPE base and dimensions);
  - tensors renamed by gguf's own tensor name map (`blk.N.attn_q.weight`, ...), with the rows of Q and K
    permuted into llama.cpp's RoPE layout (pairs of rotated halves interleaved), 1-D tensors in float32 and the
    rest in the export's dtype; a tied LM head is left out, which is how GGUF says "tied";
  - the tokenizer as gpt2-style metadata: every token by id, its type (control for special added tokens), the
    merges, the special token ids, whether BOS is prepended, and the chat template.
Sentencepiece tokenizers, RoPE scaling and other architectures are refused by `ragft.export.spec.check_gguf`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FILE_TYPES = {torch.float32: "ALL_F32", torch.float16: "MOSTLY_F16", torch.bfloat16: "MOSTLY_BF16"}
TENSOR_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_gguf(model, tokenizer, path: Path) -> None:
    """Write `model` (a transformers Llama) and its fast `tokenizer` to the GGUF file `path`."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(Path(path).stem)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[model.dtype]])
    add_hyperparameters(writer, config)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    for name, data, raw_dtype in gguf_tensors(model):
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_hyperparameters(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def rope_theta(config) -> float:
    """RoPE's base: `rope_parameters` in transformers 5, `rope_theta` before."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def gguf_tensors(model):
    """(GGUF name, array, GGML type) for every weight; Q and K rows permuted into llama.cpp's RoPE layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # no output.weight: the loader ties it to token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for the tensor {hf_name}")
        if hf_name.endswith("q_proj.weight"):
            tensor = permute_for_rope(tensor, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute_for_rope(tensor, config.num_key_value_heads)
        kind = "F32" if tensor.ndim == 1 else TENSOR_TYPES[tensor.dtype]
        tensor = tensor.detach().float() if kind == "F32" else tensor.detach()
        if kind == "BF16":  # numpy has no bfloat16: the tensor's bytes, whose shape the writer derives from the type
            data = tensor.contiguous().view(torch.uint8).numpy()
        else:
            data = tensor.contiguous().numpy()
        yield name, data, gguf.GGMLQuantizationType[kind]


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half layout of a Q or K projection's rows → llama.cpp's interleaved pairs (per head)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):  # the embedding's rows: ids past the tokenizer's are padding
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(state.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(prepends_bos(tokenizer))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for how text is split before BPE: `smollm` (digits one by one, then GPT-2's split) or
    `gpt-2` (GPT-2's split alone), the two byte-level forms `check_gguf` lets through."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    digits = any(step.get("type") == "Digits" and step.get("individual_digits") for step in steps)
    return "smollm" if digits else "gpt-2"


def prepends_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
