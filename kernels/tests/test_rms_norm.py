"""RMSNorm against LlamaRMSNorm's own arithmetic: output, input and weight gradients, odd widths, one row,
fp32 and bf16, and an fp32 weight on bf16 input (mixed, as on CPUs under autocast)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from ragft_kernels.rms_norm import rms_norm, rms_norm_reference

SHAPES = [(1, 1, 8), (2, 5, 37), (3, 7, 130)]


@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_llama_rms_norm(kernel_path, shape, dtype, weight_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype if weight_dtype == "same" else torch.float32)
    dy = torch.randn(*shape, generator=g)
    results = []
    for fn in (rms_norm, rms_norm_reference):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, 1e-6)
        (y.float() * dy).sum().backward()
        results.append((y, xi.grad, wi.grad))
    (y, dx, dw), (ry, rdx, rdw) = results
    assert y.dtype == ry.dtype and y.shape == ry.shape
    assert_close(y, ry, dtype, msg="y")
    assert_close(dx, rdx, dtype, msg="dx")
    assert_close(dw, rdw, dtype, scale=shape[0] * shape[1], msg="dw")  # a sum over rows
