"""Put the kernels of ragft_kernels (or Liger-Kernel's) into a loaded Llama-family model: `model.kernels=ragft|liger`.

`apply_kernels(model, "ragft")` rebinds `forward` on the model's own module instances, never on the
transformers classes, so other models in the same process (a reference in a test, an eval model) stay
as they are:

- every LlamaRMSNorm -> ragft_kernels.rms_norm;
- every LlamaMLP (SiLU) -> its projections around ragft_kernels.swiglu;
- every LlamaAttention -> RoPE through ragft_kernels.rope (transformers calls the module-level
  `apply_rotary_pos_emb`; it is replaced once by a function that takes ragft's path only inside a
  patched attention's forward, and transformers' own elsewhere);
- the LM head (a plain nn.Linear) -> a `FusedLossHead`: while `ragft.train.loss` holds targets in it, the
  head returns the fused linear + cross-entropy loss instead of logits (ragft_kernels.linear_ce);
- PEFT's LoRA layers, once `ragft.model.build` has wrapped the model -> LoRA dropout replayed in the
  backward instead of kept (ragft.kernels.lora).

The model may sit inside PEFT and DeepSpeed wrappers; LoRA layers on the projections keep working
because the patched forwards call the (wrapped) projection modules. Each kernel picks Triton where it
can run (CUDA) and its torch path otherwise. `liger` calls Liger-Kernel's own patch on the instance.
"""

from __future__ import annotations

import contextvars
import types

import torch

from ragft_kernels.linear_ce import IGNORE_INDEX, linear_cross_entropy
from ragft_kernels.rms_norm import rms_norm_forward
from ragft_kernels.rope import rope
from ragft_kernels.swiglu import mlp_forward

KERNELS = ("none", "ragft", "liger")
LLAMA_MODEL_TYPES = ("llama",)  # SmolLM2, Llama 2/3 and the tiny model are all this
SILU = ("silu", "swish")

inside_patched_attention = contextvars.ContextVar("ragft_rope", default=False)


class FusedLossHead:
    """Owns an LM head (nn.Linear, no bias): `targets` set -> the head's forward returns the mean
    cross-entropy of its would-be logits against them (a 0-dim tensor), computed chunk by chunk."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head
        self.targets: torch.Tensor | None = None
        self.plain_forward = head.forward
        head.forward = self.forward
        head.ragft_fused_loss = self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return self.plain_forward(hidden)
        return linear_cross_entropy(hidden, self.head.weight, self.targets, IGNORE_INDEX)


def fused_loss_head(model) -> FusedLossHead | None:
    """The FusedLossHead inside `model` (any wrapper), or None when the model was not patched."""
    for module in model.modules():
        head = getattr(module, "ragft_fused_loss", None)
        if head is not None:
            return head
    return None


def uses_liger(model) -> bool:
    """True when `model` (any wrapper) was patched with model.kernels=liger."""
    return any(getattr(module, "ragft_liger", False) for module in model.modules())


def causal_lm_of(model):
    """The transformers model with an LM head inside PEFT / DeepSpeed wrappers."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise ValueError(f"no transformers causal LM found inside {type(model).__name__}")


def check_supported(model_type: str, hidden_act: str) -> list[str]:
    """Why `model.kernels=ragft|liger` cannot patch a model of this type (empty when it can)."""
    problems = []
    if model_type not in LLAMA_MODEL_TYPES:
        problems.append(f"model.kernels patches Llama-family models only ({', '.join(LLAMA_MODEL_TYPES)}); "
                        f"this model's type is {model_type!r}: use model.kernels=none")
    if hidden_act not in SILU:
        problems.append(f"model.kernels: the MLP activation is {hidden_act!r}, the kernels implement SiLU only")
    return problems


def apply_kernels(model, kernels: str) -> list[str]:
    """Patch `model` in place with `kernels` (none | ragft | liger); returns what was patched, one line each."""
    if kernels == "none":
        return []
    lm = causal_lm_of(model)
    problems = check_supported(getattr(lm.config, "model_type", "?"), getattr(lm.config, "hidden_act", "?"))
    if problems:
        raise ValueError("; ".join(problems))
    if kernels == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Liger swaps the instance's norms, MLPs and RoPE, and LlamaForCausalLM.forward (class-wide) for one
        # that computes the fused loss from `labels`: ragft.train.loss passes labels for such a model.
        apply_liger_kernel_to_llama(model=lm)
        lm.ragft_liger = True
        return ["liger-kernel: RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy (from labels)"]
    if kernels != "ragft":
        raise ValueError(f"model.kernels={kernels!r} is not one of {', '.join(KERNELS)}")
    from transformers.models.llama import modeling_llama as llama

    install_rope_dispatch(llama)
    counts = {"RMSNorm": 0, "SwiGLU MLP": 0, "RoPE attention": 0}
    for module in lm.modules():
        if isinstance(module, llama.LlamaRMSNorm):
            module.forward = types.MethodType(rms_norm_forward, module)
            counts["RMSNorm"] += 1
        elif isinstance(module, llama.LlamaMLP):
            module.forward = types.MethodType(mlp_forward, module)
            counts["SwiGLU MLP"] += 1
        elif isinstance(module, llama.LlamaAttention):
            module.forward = rope_scope(module.forward)
            counts["RoPE attention"] += 1
    done = [f"{name} x{n}" for name, n in counts.items()]
    head = lm.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        FusedLossHead(head)
        done.append("LM head: fused linear + cross-entropy")
    else:
        done.append(f"LM head left as is ({type(head).__name__}): logits then cross-entropy")
    return done


def rope_scope(forward):
    """Wrap an attention instance's forward so RoPE inside it takes ragft's kernel."""
    def patched(*args, **kwargs):
        token = inside_patched_attention.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            inside_patched_attention.reset(token)

    return patched


def install_rope_dispatch(llama_module) -> None:
    """Replace modeling_llama.apply_rotary_pos_emb (once) by a dispatcher between ragft's RoPE and the original."""
    original = llama_module.apply_rotary_pos_emb
    if getattr(original, "ragft_original", None) is not None:
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if inside_patched_attention.get() and unsqueeze_dim == 1:
            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.ragft_original = original
    llama_module.apply_rotary_pos_emb = apply_rotary_pos_emb
