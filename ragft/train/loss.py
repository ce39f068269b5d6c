"""The training loss: next-token cross-entropy with logits computed only where a label is.

Fine-tuning on chat rows labels the answers only (data.train_on_prompt=false), a few tokens in a
prompt of hundreds. Projecting every position onto the vocabulary and then ignoring most of them is
the largest cost of a small model (the LM head is over half the FLOPs of the 2-layer demo model) and
the largest activation of a large one (batch x sequence x 128k logits), so the model is asked, via
transformers' `logits_to_keep`, for the labelled positions alone. The value is the mean over labelled
tokens, as transformers computes it from `labels`.

transformers 5.20 and later take a per-row boolean mask. Older ones (what vLLM 0.32 pins) take only
positions shared by the whole batch, so there the model computes the union of the rows' labelled
positions and the other rows' entries at those positions are ignored.

With `model.kernels=ragft` the LM head of the model is a `ragft.kernels.llama.FusedLossHead`: given the
targets, it returns the loss computed chunk by chunk (ragft_kernels.linear_ce), so even the labelled
positions' logits never exist all at once. With `model.kernels=liger`, Liger-Kernel's patched forward
computes its own fused loss from `labels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import modeling_utils

from ragft.data.tokenize import IGNORE_INDEX
from ragft.kernels.llama import fused_loss_head, uses_liger

ROW_MASKS = hasattr(modeling_utils, "slice_logits_to_keep")


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_to_keep, targets) for `labels` (batch, sequence): position t predicts token t + 1. With
    row masks, the boolean mask and the targets it selects, in the model's (row-major) output order; without,
    the batch's labelled columns and the (batch, columns) targets there, IGNORE_INDEX where a row has none."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    if ROW_MASKS:
        return keep, shifted[keep]
    columns = keep.any(0).nonzero().squeeze(1)
    return columns, shifted[:, columns]


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of `model` (an HF causal LM, or a PEFT / DeepSpeed wrapper around one) on
    `batch` (input_ids, labels, and whatever else the model takes: attention_mask, position_ids)."""
    if uses_liger(model):
        return model(**batch, use_cache=False).loss
    keep, targets = labelled_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = fused_loss_head(model)
    if head is not None:
        head.targets = targets
        try:
            return model(**inputs, use_cache=False, logits_to_keep=keep).logits  # the head returned the loss
        finally:
            head.targets = None
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
