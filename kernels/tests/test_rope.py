"""RoPE against transformers' `apply_rotary_pos_emb` (Llama): q and k as Llama hands them (a transposed
view), grouped-query key heads, cos/sin shared over the batch or per row; outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ragft_kernels.rope import rope, rope_reference


def cos_sin(batch, seq, dim, dtype, per_row):
    positions = torch.arange(seq).repeat(batch if per_row else 1, 1).float()
    if per_row:
        positions[-1] = torch.arange(seq).flip(0)  # packed rows restart their positions
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def test_reference_is_transformers_function():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = cos_sin(2, 5, 8, torch.float32, per_row=True)
    for got, expected in zip(rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 3, 5, 12)], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_reference(kernel_path, shape, dtype, per_row):
    batch, heads, seq, dim = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seq, heads, dim, generator=g).to(dtype).transpose(1, 2)  # as Llama's view
    k = torch.randn(batch, max(1, heads // 3), seq, dim, generator=g).to(dtype)
    cos, sin = cos_sin(batch, seq, dim, dtype, per_row)
    dq, dk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    results = []
    for fn in (rope, rope_reference):
        qi, ki = q.detach().clone().requires_grad_(), k.clone().requires_grad_()
        qo, ko = fn(qi, ki, cos, sin)
        torch.autograd.backward((qo, ko), (dq, dk))
        results.append((qo, ko, qi.grad, ki.grad))
    for got, expected, name in zip(*results, ("q", "k", "dq", "dk")):
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        assert_close(got, expected, dtype, msg=name)
