"""Each kernel test runs twice: the Triton kernel under Triton's interpreter (CPU tensors) and the torch
path ragft uses on CPUs. Both are compared with the same torch reference."""

from __future__ import annotations

import pytest

from ragft.kernels.runtime import INTERPRETER_READY


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETER_READY, reason="needs triton, imported with TRITON_INTERPRET=1 (tests/conftest.py sets it)"))])
def kernel_path(request, monkeypatch):
    """"triton": kernels run in Triton's interpreter; "torch": the CPU torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param

