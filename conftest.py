"""Keeps the installed distribution `kernels` (Hugging Face's, which transformers imports) importable under pytest.

With --import-mode=importlib and this folder as rootdir, pytest names the files under kernels/ (ragft-kernels'
tests) `kernels.tests.*` and, if no module `kernels` is loaded yet, loads the folder kernels/ as that module,
hiding the installed one: transformers' Llama module then fails to import. Importing the installed one first
makes pytest hang kernels.tests under it instead. Without it installed there is nothing to hide."""

import importlib.util

if importlib.util.find_spec("kernels") is not None:
    import kernels  # noqa: F401
