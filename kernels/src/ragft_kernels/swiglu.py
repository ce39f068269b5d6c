"""SwiGLU, the gated activation of Llama's MLP, forward and backward, saving only its two inputs.

Math, elementwise over gate g and up u of the same shape (..., I), with s = sigmoid(g):

    y  = silu(g) * u = g * s * u
    dg = dy * u * s * (1 + g * (1 - s))
    du = dy * g * s

torch's autograd keeps g (for SiLU), silu(g) and u (for the product); this keeps g and u and recomputes
s in the backward pass. Arithmetic in fp32, results in the inputs' dtype. The Triton kernels are flat
elementwise loops over blocks of the flattened tensors.
"""

from __future__ import annotations

import torch

from ragft_kernels.runtime import kernel, tl, triton_runs_on

BLOCK = 1024


@kernel
def swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@kernel
def swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if triton_runs_on(g):
        y = torch.empty_like(g)
        n = g.numel()
        if n:
            swiglu_fwd_kernel[(triton_blocks(n),)](g, u, y, n, BLOCK=BLOCK)
        return y
    return (torch.nn.functional.silu(g.float()) * u.float()).to(g.dtype)


def swiglu_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if triton_runs_on(g):
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            swiglu_bwd_kernel[(triton_blocks(n),)](dy, g, u, dg, du, n, BLOCK=BLOCK)
        return dg, du
    gf, uf, dyf = g.float(), u.float(), dy.float()
    s = torch.sigmoid(gf)
    return (dyf * uf * s * (1 + gf * (1 - s))).to(g.dtype), (dyf * gf * s).to(u.dtype)


def triton_blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


class SwiGLUFunction(torch.autograd.Function):
    """forward(gate, up) -> silu(gate) * up, all the same shape and dtype."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        return swiglu_bwd(dy, g, u)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up of one shape (..., I)."""
    if gate.dtype != up.dtype:
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    return SwiGLUFunction.apply(gate.contiguous(), up.contiguous())


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LlamaMLP's activation: `act_fn(gate_proj(x)) * up_proj(x)` with act_fn = SiLU."""
    return torch.nn.functional.silu(gate) * up


def mlp_forward(module, x: torch.Tensor) -> torch.Tensor:
    """A drop-in `forward` for a LlamaMLP instance with SiLU activation (any module with
    `gate_proj`, `up_proj` and `down_proj`): `module.forward = types.MethodType(mlp_forward, module)`."""
    return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))
