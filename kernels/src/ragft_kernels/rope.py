"""Rotary position embedding (RoPE), forward and backward, as Llama applies it to queries and keys.

Math, for x (B, heads, S, D) (queries or keys), cos and sin (B or 1, S, D) whose two halves are equal
(Llama's layout), and x = [x1, x2] split in halves along D:

    y  = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
       = [x1 c1 - x2 s1,  x2 c2 + x1 s2]
    dx = dy * cos - rotate_half(dy * sin)
       = [dy1 c1 + dy2 s2,  dy2 c2 - dy1 s1]

The backward pass needs only cos and sin, never x, so nothing of x's size is saved. The Triton kernel
takes one (batch, position) per program, all heads as one tile, and reads x through its strides (Llama
hands it a transposed view); the torch path is the same formula in torch ops.
"""

from __future__ import annotations

import torch

from ragft_kernels.runtime import kernel, next_power_of_2, tl, triton_runs_on


@kernel
def rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, seq, half, sxb, sxh, sxs, scb, scs,
                BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch, position): all heads at once, a (heads, D/2) tile per half."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq
    s = pid % seq
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < half)
    x = x_ptr + b * sxb + s * sxs + h * sxh + d
    cs = b * scb + s * scs + tl.arange(0, BLOCK_D)[None, :]
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + half, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + cs, mask=d < half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + half, mask=d < half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=d < half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + half, mask=d < half, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    out = y_ptr + b * heads * seq * 2 * half + h * seq * 2 * half + s * 2 * half + d
    tl.store(out, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x (B, heads, S, D), cos/sin (B or 1, S, D) -> y (B, heads, S, D), contiguous, x's dtype."""
    batch, heads, seq, dim = x.shape
    if triton_runs_on(x):
        if x.stride(-1) != 1:
            x = x.contiguous()
        cos, sin = cos.expand(batch, seq, dim), sin.expand(batch, seq, dim)
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        y = torch.empty(batch, heads, seq, dim, dtype=x.dtype, device=x.device)
        if y.numel():
            rope_kernel[(batch * seq,)](x, cos, sin, y, heads, seq, dim // 2,
                                        x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                                        BACKWARD=backward, BLOCK_H=next_power_of_2(heads),
                                        BLOCK_D=next_power_of_2(dim // 2))
        return y
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((x2, -x1), dim=-1) if backward else torch.cat((-x2, x1), dim=-1)
    return (xf * c + rotated * s).to(x.dtype).contiguous()


class RoPEFunction(torch.autograd.Function):
    """forward(x (B, heads, S, D), cos (B|1, S, D), sin (B|1, S, D)) -> x rotated; no gradient to cos/sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_apply(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_apply(dy, cos, sin, backward=True), None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated: q (B, heads, S, D), k (B, kv_heads, S, D), cos/sin (B|1, S, D)."""
    cos, sin = cos.detach(), sin.detach()
    return RoPEFunction.apply(q, cos, sin), RoPEFunction.apply(k, cos, sin)


def rope_reference(q, k, cos, sin):
    """transformers' `apply_rotary_pos_emb` (Llama) with unsqueeze_dim=1."""
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
