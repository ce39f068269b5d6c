"""Comparing a kernel with its torch reference at per-dtype tolerances."""

from __future__ import annotations

import torch

# (rtol, atol): fp32 differs from the reference by summation order only; bf16 rounds intermediate results to
# 8 bits of mantissa at other places than the reference does.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg=""):
    """`got` equals `expected` within `dtype`'s tolerance; `scale` widens atol for sums over many terms."""
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=msg)
