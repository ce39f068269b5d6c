"""Fused linear + cross-entropy: the LM head and the loss without the logits matrix.

Math, for hidden states h (N, H), LM head weight W (V, H) and targets y (N,), rows with y = ignore_index
left out and n the number of the others:

    z_i = h_i W^T                   (V,)  logits of row i
    loss = 1/n sum_i (logsumexp(z_i) - z_i[y_i])
    dz_i = (softmax(z_i) - onehot(y_i)) / n
    dh_i = dz_i W                   (H,)
    dW   = sum_i dz_i^T h_i         (V, H)

Rows are taken a chunk at a time: the chunk's logits are computed, turned into their loss and, in place,
into their gradient dz, which goes straight into dh and dW; then the next chunk reuses the memory. The
(N, V) logits never exist, only a (chunk, V) block: the chunk is sized so that block is about as large
as h itself, and at least a few MB. Gradients are computed during the forward pass (as Liger-Kernel does), so the backward pass
only scales them by the incoming gradient and no logits are recomputed; dW is skipped when W is frozen
(LoRA), dh when h needs none.

The per-row softmax / loss / gradient step is a Triton kernel where Triton runs (CUDA, or the
interpreter in tests) and torch ops otherwise (the CPU path); the matmuls are torch's either way.
Under autocast, h and W are cast to the autocast dtype as the LM head's matmul would be, and the
softmax is computed in fp32 as `F.cross_entropy(logits.float(), ...)` does.
"""

from __future__ import annotations

import math

import torch

from ragft_kernels.runtime import kernel, next_power_of_2, tl, triton_runs_on

IGNORE_INDEX = -100


@kernel
def ce_rows_kernel(logits_ptr, logits_stride, targets_ptr, loss_ptr, vocab, scale, ignore_index,
                   COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: loss = logsumexp(z) - z[y]; with COMPUTE_GRAD, z is overwritten by
    (softmax(z) - onehot(y)) * scale. Ignored rows get loss 0 and gradient 0."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(base + cols, tl.zeros([BLOCK], dtype=tl.float32).to(base.dtype.element_ty),
                         mask=cols < vocab)
    else:
        # online softmax: running max m and running sum d of exp(z - m)
        m = -float("inf")
        d = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        z_target = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - z_target)
        if COMPUTE_GRAD:
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < vocab
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(base + cols, (grad * scale).to(base.dtype.element_ty), mask=mask)


def ce_rows_triton(logits: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int,
                   compute_grad: bool) -> torch.Tensor:
    """Launcher: per-row losses (fp32) of a (rows, V) logits block; the block becomes its gradient."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(next_power_of_2(vocab), 8192 if logits.is_cuda else 65536)
        ce_rows_kernel[(rows,)](logits, logits.stride(0), targets, loss, vocab, scale, ignore_index,
                                COMPUTE_GRAD=compute_grad, BLOCK=block)
    return loss


def ce_rows_torch(logits: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int,
                  compute_grad: bool) -> torch.Tensor:
    """The same in torch ops (the CPU path and the reference for the kernel)."""
    z = logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)
    loss = torch.where(valid, lse - z.gather(1, safe[:, None]).squeeze(1), 0.0)
    if compute_grad:
        z.sub_(lse[:, None]).exp_()  # softmax, in place of the fp32 logits
        z[torch.arange(len(z), device=z.device), safe] -= 1.0
        z.mul_(torch.where(valid, scale, 0.0)[:, None])
        logits.copy_(z)
    return loss


MIN_CHUNK_ELEMENTS = 2**22  # a few MB of logits: below that, per-chunk overhead outweighs the memory saved


def chunk_rows(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk so that a chunk's logits (chunk x V) are about the size of the hidden states (N x H),
    but never smaller than MIN_CHUNK_ELEMENTS (fewer, larger matmuls; on CPUs each op has a fixed cost)."""
    by_hidden = math.ceil(rows / max(1, math.ceil(vocab / hidden)))
    return max(1, min(rows, max(by_hidden, math.ceil(MIN_CHUNK_ELEMENTS / vocab))))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """forward(hidden (N, H), weight (V, H), targets (N,), ignore_index, chunk) -> mean loss (0-dim, fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = hidden.shape[0]
        n = int((targets != ignore_index).sum())
        scale = 1.0 / max(n, 1)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        use_triton = triton_runs_on(hidden)
        ce_rows = ce_rows_triton if use_triton else ce_rows_torch
        for start in range(0, rows, chunk):
            h = hidden[start:start + chunk]
            logits = h @ weight.t()
            loss = ce_rows(logits, targets[start:start + chunk].contiguous(), scale, ignore_index,
                           need_dh or need_dw)
            total += loss.sum()
            if need_dh:
                torch.mm(logits, weight, out=dh[start:start + chunk])
            if need_dw:
                dw.addmm_(logits.t(), h)
        ctx.save_for_backward(dh, dw)
        return total * scale if n else total * 0.0

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        if dh is not None and not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            dh = dh * grad_loss.to(dh.dtype)
        if dw is not None and not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            dw = dw * grad_loss.to(dw.dtype)
        return dh, dw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (rows equal to `ignore_index` left out),
    without materialising the logits. hidden (..., H), weight (V, H), targets (...,); returns an fp32 scalar."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    chunk = chunk or chunk_rows(hidden.shape[0], weight.shape[0], weight.shape[1])
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropyFunction.apply(hidden.contiguous(), weight, targets, ignore_index, chunk)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The torch reference: the whole logits matrix, then `F.cross_entropy` in fp32, as a causal-LM loss does."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return torch.nn.functional.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index)
