"""Fused linear + cross-entropy against the torch reference (whole logits, `F.cross_entropy` in fp32):
loss and both gradients, for odd shapes, ignored rows, one row, frozen weights and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from ragft_kernels.linear_ce import (IGNORE_INDEX, MIN_CHUNK_ELEMENTS, chunk_rows, linear_cross_entropy,
                                     linear_cross_entropy_reference)

# rows, hidden, vocab: none a multiple of a block; one row; a vocabulary larger than the interpreter's block
SHAPES = [(1, 8, 17), (37, 16, 130), (50, 24, 1000)]


def inputs(rows, hidden, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[1::3] = IGNORE_INDEX  # ignored rows among the others (none when rows == 1)
    return h, w, y


def run(fn, h, w, y, weight_grad=True, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    loss = fn(h, w, y, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_gradients_match_reference(kernel_path, shape, dtype):
    h, w, y = inputs(*shape, dtype)
    loss, dh, dw = run(linear_cross_entropy, h, w, y, chunk=7)  # several chunks, the last one short
    ref_loss, ref_dh, ref_dw = run(linear_cross_entropy_reference, h, w, y)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, dtype, msg="loss")
    assert_close(dh, ref_dh, dtype, scale=0.1, msg="d hidden")
    assert_close(dw, ref_dw, dtype, scale=0.1, msg="d weight")


def test_frozen_weight_gets_no_gradient_and_default_chunks(kernel_path):
    """LoRA freezes the LM head: no weight gradient is computed; the default chunking gives the same loss."""
    h, w, y = inputs(37, 16, 130, torch.float32)
    loss, dh, dw = run(linear_cross_entropy, h, w, y, weight_grad=False)
    ref_loss, ref_dh, _ = run(linear_cross_entropy_reference, h, w, y, weight_grad=False)
    assert dw is None
    assert_close(loss, ref_loss, torch.float32)
    assert_close(dh, ref_dh, torch.float32)


def test_scaled_upstream_gradient_and_all_rows_ignored(kernel_path):
    h, w, y = inputs(9, 8, 33, torch.float32)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    (3.0 * linear_cross_entropy(hh, ww, y)).backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    (3.0 * linear_cross_entropy_reference(hr, wr, y)).backward()
    assert_close(hh.grad, hr.grad, torch.float32)
    assert_close(ww.grad, wr.grad, torch.float32)
    none = torch.full_like(y, IGNORE_INDEX)
    loss = linear_cross_entropy(h.requires_grad_(), w, none)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0


def test_autocast_bf16_matches_reference_under_autocast():
    """Under CPU bf16 autocast (ragft's CPU training), h and W are cast as the LM head's matmul would be."""
    h, w, y = inputs(37, 16, 130, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dh, dw = run(linear_cross_entropy, h, w, y)
        ref_loss, ref_dh, ref_dw = run(linear_cross_entropy_reference, h, w, y)
    assert dh.dtype == dw.dtype == torch.float32
    assert_close(loss, ref_loss, torch.bfloat16)
    assert_close(dh, ref_dh, torch.bfloat16, scale=0.1)
    assert_close(dw, ref_dw, torch.bfloat16, scale=0.1)


def test_chunk_keeps_logits_block_small():
    """SmolLM2, micro batch 8 x 256, every position labelled: a chunk's logits are a few MB, not the 400 MB
    of the whole (N, V) matrix in fp32; small inputs take one chunk."""
    rows, vocab, hidden = 2048, 49152, 576
    chunk = chunk_rows(rows, vocab, hidden)
    assert chunk * vocab <= max(2 * rows * hidden, MIN_CHUNK_ELEMENTS + vocab)
    assert chunk < rows // 10
    assert chunk_rows(1, vocab, hidden) == 1 and chunk_rows(50, 1000, 24) == 50
