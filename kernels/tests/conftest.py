"""Each kernel test runs twice: the Triton kernel under Triton's interpreter (CPU tensors) and the torch path
that runs on CPUs. Both are compared with the same torch reference. kernel_testing imports Triton in
interpreter mode, so it comes first."""

from kernel_testing import kernel_path  # noqa: F401  (the fixture, shared with ragft's tests/kernels)
