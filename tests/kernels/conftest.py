"""The model-patching tests run like the kernels' own (kernels/tests): once with the Triton kernels under
Triton's interpreter (CPU tensors), once on the torch path ragft uses on CPUs."""

from kernel_testing import kernel_path  # noqa: F401  (the fixture, from kernels/tests: pytest's pythonpath)
