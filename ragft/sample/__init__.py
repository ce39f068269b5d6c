"""The shipped sample data: a fictional ferry handbook with training data and eval questions.

The files in `SAMPLE_DIR` are made by `python -m ragft.sample.generate` (deterministic, seed 0)
and checked by the tests to be byte-identical to a fresh run.
"""

from __future__ import annotations

from ragft.config.resolvers import SAMPLE_DIR, sample_path

__all__ = ["SAMPLE_DIR", "sample_path"]
