"""The training loss: next-token cross-entropy with logits computed only where a label is.

Fine-tuning on chat rows labels the answers only (data.train_on_prompt=false), a few tokens in a
prompt of hundreds. Projecting every position onto the vocabulary and then ignoring most of them is
the largest cost of a small model (the LM head is over half the FLOPs of the 2-layer demo model) and
the largest activation of a large one (batch x sequence x 128k logits), so the model is asked, via
transformers' `logits_to_keep` boolean mask, for the labelled positions alone. The value is the
mean over labelled tokens, as transformers computes it from `labels`.

With `model.kernels=ragft` the LM head of the model is a `ragft.kernels.llama.FusedLossHead`: given the
targets, it returns the loss computed chunk by chunk (ragft.kernels.linear_ce), so even the labelled
positions' logits never exist all at once. With `model.kernels=liger`, Liger-Kernel's patched forward
computes its own fused loss from `labels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ragft.data.tokenize import IGNORE_INDEX
from ragft.kernels.llama import fused_loss_head, uses_liger


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of `model` (an HF causal LM, or a PEFT / DeepSpeed wrapper around one) on
    `batch` (input_ids, labels, and whatever else the model takes: attention_mask, position_ids)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX  # position t predicts token t + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = fused_loss_head(model)
    if head is not None:
        head.targets = targets[targets != IGNORE_INDEX]
        try:
            return model(**inputs, use_cache=False, logits_to_keep=keep).logits  # the head returned the loss
        finally:
            head.targets = None
    if uses_liger(model):
        return model(**batch, use_cache=False).loss
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (labelled tokens, vocab)
    return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX])
