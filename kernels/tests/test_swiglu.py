"""SwiGLU against `F.silu(gate) * up` (LlamaMLP's activation): output and both gradients."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from ragft_kernels.swiglu import BLOCK, swiglu, swiglu_reference

SHAPES = [(1, 1, 3), (2, 3, 130), (1, 1, BLOCK + 7)]  # the last one spans two blocks, the second short


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_silu_times_up(kernel_path, shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate, up = (3 * torch.randn(*shape, generator=g)).to(dtype), torch.randn(*shape, generator=g).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    results = []
    for fn in (swiglu, swiglu_reference):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = fn(a, b)
        y.backward(dy)
        results.append((y, a.grad, b.grad))
    (y, dg, du), (ry, rdg, rdu) = results
    assert y.dtype == dtype
    assert_close(y, ry, dtype, scale=10, msg="y")
    assert_close(dg, rdg, dtype, scale=10, msg="d gate")
    assert_close(du, rdu, dtype, scale=10, msg="d up")
