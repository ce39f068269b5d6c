"""Which device and float type `auto` means where a process runs: the one rule behind every `auto` device,
precision and dtype.

bf16 where the hardware has it: CUDA GPUs from Ampere on, and CPUs with native bf16 matmuls (Intel
AMX or AVX-512 BF16; oneDNN emulates bf16 elsewhere, slower than fp32). Training, eval and serving
all resolve `auto` here, so a checkpoint is scored and served in the precision it was trained in.
"""

from __future__ import annotations

import functools
from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (Linux /proc/cpuinfo flags; False where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cuda_has_bf16() -> bool:
    import torch  # here, not at the top: config validation imports this module and needs no torch otherwise

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what serve.dtype and eval.dtype accept


def auto_dtype(device: str):
    """The torch dtype `auto` means on `device` ("cpu", "cuda" or "cuda:N")."""
    import torch

    fast = cuda_has_bf16() if str(device).startswith("cuda") else cpu_has_bf16()
    return torch.bfloat16 if fast else torch.float32


def resolve_dtype(dtype: str, device: str):
    """The torch dtype a config's `dtype` (one of DTYPES) names on `device`: `auto_dtype(device)` for "auto"."""
    import torch

    return auto_dtype(device) if dtype == "auto" else getattr(torch, dtype)


def resolve_device(device: str) -> str:
    """`device` as given, or for "auto" the CUDA GPU this process sees, else the CPU. Resolved where the work runs
    (a Ray worker or replica may see another device than the driver)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
