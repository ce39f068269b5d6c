"""What the kernel tests share: Triton imported in interpreter mode, the `kernel_path` fixture that runs a test
once per path (Triton kernel in the interpreter, torch path), and comparing a kernel with its torch reference
at per-dtype tolerances. On the path through pytest's `pythonpath` (kernels/pyproject.toml, and ragft's)."""

from __future__ import annotations

import importlib
import os


def import_triton_interpreted() -> None:
    """Import Triton with TRITON_INTERPRET=1, then restore the environment (subprocesses see none of it).

    The interpreter has to be on when triton is first imported (ragft_kernels.runtime says why); without
    Triton installed the tests run their torch paths only."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton.language")
    except ImportError:
        pass
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


import_triton_interpreted()

# After Triton is imported interpreted (torch or pytest may import it too).
import pytest  # noqa: E402
import torch  # noqa: E402

from ragft_kernels.runtime import INTERPRETER_READY  # noqa: E402


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETER_READY, reason="needs triton, imported with TRITON_INTERPRET=1 (kernel_testing.py does)"))])
def kernel_path(request, monkeypatch):
    """"triton": kernels run in Triton's interpreter; "torch": the CPU torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


# (rtol, atol): fp32 differs from the reference by summation order only; bf16 rounds intermediate results to
# 8 bits of mantissa at other places than the reference does.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg=""):
    """`got` equals `expected` within `dtype`'s tolerance; `scale` widens atol for sums over many terms."""
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=msg)
