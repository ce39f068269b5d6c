"""The training loss: next-token cross-entropy with logits computed only where a label is.

Fine-tuning on chat rows labels the answers only (data.train_on_prompt=false), a few tokens in a
prompt of hundreds. Projecting every position onto the vocabulary and then ignoring most of them is
the largest cost of a small model (the LM head is over half the FLOPs of the 2-layer demo model) and
the largest activation of a large one (batch x sequence x 128k logits), so the model is asked, via
transformers' `logits_to_keep` boolean mask, for the labelled positions alone. The value is the
mean over labelled tokens, as transformers computes it from `labels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ragft.data.tokenize import IGNORE_INDEX


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of `model` (an HF causal LM, or a PEFT / DeepSpeed wrapper around one) on
    `batch` (input_ids, labels, and whatever else the model takes: attention_mask, position_ids)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX  # position t predicts token t + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (labelled tokens, vocab)
    return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX])
