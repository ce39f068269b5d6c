"""RMSNorm, forward and backward, as Llama computes it, saving only its input.

Math, for x (N, H) (any leading shape is flattened to rows), weight w (H,) and eps:

    rstd_i = 1 / sqrt(mean_j x_ij^2 + eps)               (N,)   fp32
    xhat_i = x_i * rstd_i                                 rounded to x's dtype, as LlamaRMSNorm does
    y_i    = w * xhat_i                                   dtype: the promotion of w's and x's
    dw     = sum_i dy_i * xhat_i                          (H,)
    dx_i   = rstd_i * (g_i - xhat_i * mean_j(g_ij * xhat_ij)),  g_i = dy_i * w

torch's own autograd keeps x and xhat (and more) per norm; this one keeps x, w and rstd (N floats) and
recomputes xhat in the backward pass. All arithmetic is fp32. The Triton kernels take one row per
program in the forward pass; in the backward pass each program walks a strided set of rows and
accumulates its share of dw, which torch then sums.
"""

from __future__ import annotations

import torch

from ragft_kernels.runtime import kernel, next_power_of_2, tl, triton_runs_on


@kernel
def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * cols + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / cols + eps)
    xhat = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * cols + offs, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@kernel
def rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, cols, programs,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * cols
    step = programs * cols
    dy_ptr += start
    x_ptr += start
    dx_ptr += start
    for row in range(pid, rows, programs):
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + row)
        xn = x.to(tl.float32) * rstd
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xn.to(x.dtype).to(tl.float32)
        g = dy * w
        dx = rstd * (g - xn * (tl.sum(g * xn, axis=0) / cols))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dy_ptr += step
        x_ptr += step
        dx_ptr += step
    tl.store(dw_ptr + pid * cols + offs, dw, mask=mask)


def out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H) contiguous -> y (N, H), rstd (N,) fp32."""
    rows, cols = x.shape
    if triton_runs_on(x):
        y = torch.empty(rows, cols, dtype=out_dtype(x, weight), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        if rows:
            rms_norm_fwd_kernel[(rows,)](x, weight, y, rstd, cols, eps, BLOCK=next_power_of_2(cols))
        return y, rstd
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return weight * (xf * rstd[:, None]).to(x.dtype), rstd


def rms_norm_bwd(dy, x, weight, rstd, need_dw: bool):
    """-> dx (N, H) in x's dtype, dw (H,) in w's dtype (None unless `need_dw`)."""
    rows, cols = x.shape
    if triton_runs_on(x):
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        programs = max(1, min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
                                  if x.is_cuda else 4))
        dw = torch.empty(programs, cols, dtype=torch.float32, device=x.device)
        rms_norm_bwd_kernel[(programs,)](dy, x, weight, rstd, dx, dw, rows, cols, programs,
                                         BLOCK=next_power_of_2(cols))
        return dx, dw.sum(0).to(weight.dtype) if need_dw else None
    xn = x.float() * rstd[:, None]
    dyf = dy.float()
    dw = (dyf * xn.to(x.dtype).float()).sum(0).to(weight.dtype) if need_dw else None
    g = dyf * weight.float()
    dx = rstd[:, None] * (g - xn * (g * xn).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw


class RMSNormFunction(torch.autograd.Function):
    """forward(x (N, H), weight (H,), eps) -> y (N, H)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,), as LlamaRMSNorm computes it."""
    shape = x.shape
    y = RMSNormFunction.apply(x.reshape(-1, shape[-1]).contiguous(), weight, eps)
    return y.view(*shape[:-1], y.shape[-1])


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, verbatim."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_forward(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A drop-in `forward` for a LlamaRMSNorm instance (any module with `weight` and `variance_epsilon`):
    `module.forward = types.MethodType(rms_norm_forward, module)`."""
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)
