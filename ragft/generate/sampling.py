"""Per-request sampling for ragft's transformers engine: each request's temperature, top-p and seed.

Logits are sampled in fp32, each request with its own `torch.Generator`, so a seeded request gets
the same draws whatever else shares its batch. A request under `ragft.generate.engine.GREEDY_BELOW`
gets no generator and is decoded by argmax (`ragft.generate.decode_group`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch


def seeded_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    """A generator of its own for one request: from `seed`, or from the OS's randomness when it has none."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1  # manual_seed takes a non-negative int64
    return torch.Generator(device=device).manual_seed(seed)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token id per row of fp32 `logits` (rows, vocab), each at its temperature within its top-p nucleus,
    drawn with its own generator."""
    probs = torch.softmax(logits / temperatures.unsqueeze(1), dim=-1)
    if bool((top_ps < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens above it already hold top_p: the one that crosses top_p stays.
        sorted_probs.masked_fill_(sorted_probs.cumsum(-1) - sorted_probs > top_ps.unsqueeze(1), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race, as vLLM samples): no renormalisation
    # after the top-p cut, and each row takes one fixed-size draw per step from its own generator, so what a
    # seeded row draws does not depend on the rest of the batch.
    noise = torch.empty_like(probs)
    for row, generator in zip(noise, generators):
        row.exponential_(generator=generator)
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
