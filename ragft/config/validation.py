"""What every command's validation shares: the typed job config, and the facts of this machine it checks against.

Each command turns its composed config into a frozen spec (train/spec.py, index/spec.py, eval/spec.py,
serve/spec.py, raft/job.py) and starts with `typed_job_config`; a problem is a `ragft.errors.ConfigError`.
"""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig, OmegaConf

from ragft.config.schema.choices import plain_choices
from ragft.errors import ConfigError


def typed_job_config(cfg: DictConfig):
    """The composed config as its schema dataclass (interpolations resolved, types checked), or a
    ConfigError naming every required key left unset: the first step of every command's validation."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except Exception as err:  # missing_keys resolves interpolations: one that cannot resolve fails here already
        raise ConfigError([first_line(err)]) from None
    if missing:
        raise ConfigError([f"{key} is required (set {key}=...)" for key in missing])
    try:  # closed choices were checked at compose; from here on they are plain strings
        return plain_choices(OmegaConf.to_object(cfg))
    except Exception as err:  # an interpolation that cannot resolve, e.g. ${sample:...} of a missing file
        raise ConfigError([first_line(err)]) from None


def cuda_available() -> bool:
    """Whether this process sees a CUDA device (validation that refuses GPU settings without one)."""
    import torch

    return torch.cuda.is_available()


def has_module(name: str) -> bool:
    """Whether an optional package is installed (without importing it)."""
    return importlib.util.find_spec(name) is not None


def first_line(err: Exception) -> str:
    """The first line of an error's message (or its type): one line in a listed config problem."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
