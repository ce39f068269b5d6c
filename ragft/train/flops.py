"""Model FLOPs per trained token and the peak FLOP/s of known GPUs, for MFU.

Counted per token, matmuls only (the embedding lookup does none; attention's own
score/value products are left out, as in the 6N rule):
  full:      6 N            forward 2N, backward 2N for activation grads + 2N for weight grads
  LoRA/QLoRA: 4 N + 2 N_t   every weight takes part forward and in the activation grads, but only
                            the N_t trainable adapter weights get weight grads
where N counts every parameter but the input embedding, adapters included.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS_BF16 = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,  # the SXM part reports itself so
    "H100 PCIe": 756.0,
    "H100": 756.0,  # other H100 names: assume the slower PCIe part rather than overstate MFU
    "A100": 312.0,
}


def flops_per_token(model: torch.nn.Module, adapter: bool) -> float:
    embedding = model.get_input_embeddings().weight
    total = trainable = 0
    for param in model.parameters():
        if param is embedding:
            continue
        n = getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves only a shard in .numel()
        total += n
        trainable += n if param.requires_grad else 0
    return float(4 * total + 2 * trainable) if adapter else float(6 * total)


def peak_flops_per_device(peak_tflops: float | None, use_gpu: bool) -> float | None:
    """From `cluster.peak_tflops`, else the table by device name; None on CPU or an unknown GPU."""
    if peak_tflops:
        return peak_tflops * 1e12
    if not (use_gpu and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None
