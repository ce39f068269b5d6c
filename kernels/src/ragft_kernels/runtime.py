"""Where a Triton kernel can run, and Triton as an optional import.

The kernels import and run without Triton: every kernel has a torch path. A Triton kernel runs on CUDA
tensors, or on CPU tensors under Triton's interpreter (for correctness tests only: it is slow). The
interpreter needs `TRITON_INTERPRET=1` set before Triton itself is imported (transformers' Llama module
imports it), because Triton's own library functions (`tl.sum`, `tl.sigmoid`) are built in one mode then;
the test suites' conftest.py files import Triton that way first thing. With Triton imported so,
`TRITON_INTERPRET` unset or 0 sends CPU tensors back to the torch paths, which is how the tests run both
paths in one process.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: torch paths only
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Triton was imported in interpreter mode: its library functions are interpreted ones.
INTERPRETER_READY = HAS_TRITON and type(tl.sum).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_runs_on(tensor) -> bool:
    """True when a Triton kernel can take `tensor`: Triton is installed and the tensor is on CUDA, or on the
    CPU with the interpreter on."""
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and INTERPRETER_READY and interpreting()


class Kernel:
    """A Triton kernel written as a plain function, jitted on first launch (`kernel[grid](...)`) in the mode
    (compiled or interpreted) current at that moment."""

    def __init__(self, fn):
        self.fn = fn
        self.jitted = {}

    def __getitem__(self, grid):
        mode = interpreting()
        if mode not in self.jitted:
            self.jitted[mode] = triton.jit(self.fn)
        return self.jitted[mode][grid]


def kernel(fn) -> Kernel:
    """Decorator for a Triton kernel body (in place of `@triton.jit`)."""
    return Kernel(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
