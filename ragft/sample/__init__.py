"""The shipped sample data: a fictional ferry handbook with training data and eval questions.

The files in `SAMPLE_DIR` are made by `python -m ragft.sample.generate` (deterministic, seed 0)
and checked by the tests to be byte-identical to a fresh run.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "data"


def sample_path(name: str) -> str:
    """Absolute path of a shipped sample file, e.g. ``sample_path("train.jsonl")``."""
    path = SAMPLE_DIR / name
    if not path.is_file():
        present = sorted(p.name for p in SAMPLE_DIR.glob("*.jsonl")) if SAMPLE_DIR.is_dir() else []
        raise FileNotFoundError(
            f"sample file {name!r} not found in {SAMPLE_DIR} (present: {', '.join(present) or 'none'}); "
            "regenerate the sample with `python -m ragft.sample.generate`"
        )
    return str(path)
