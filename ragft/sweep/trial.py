"""What makes one job of a sweep a trial: its own out_dir (the sweep's job folder) and the sweep's W&B group.

Every launcher goes through `as_trial`: Hydra's basic and submitit launchers via `ragft train`'s task
function, ragft's Ray Tune launcher before it starts a trial.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, open_dict


def sweep_name(cfg: DictConfig, sweep_dir: str) -> str:
    """`sweep.name`, or the sweep folder's name (a timestamp by default)."""
    return cfg.sweep.name or Path(sweep_dir).name


def differing(overrides: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """(the overrides every trial has, each trial's other overrides): what names a trial in a sweep."""
    common = [o for o in (overrides[0] if overrides else []) if all(o in trial for trial in overrides)]
    return common, [[o for o in trial if o not in common] for trial in overrides]


def as_trial(cfg: DictConfig, output_dir: str, sweep_dir: str) -> DictConfig:
    """A copy of a composed train config that writes into `output_dir` and logs to the sweep's W&B group."""
    trial = copy.deepcopy(cfg)  # keeps the schema type that validation converts to
    with open_dict(trial):
        trial.out_dir = str(output_dir)
        if trial.tracking.group is None:
            trial.tracking.group = sweep_name(cfg, sweep_dir)
    return trial


def trial_of_hydra_job(cfg: DictConfig) -> DictConfig:
    """In a Hydra multirun job, the trial config for this job; outside one, `cfg` itself."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg
    hydra = HydraConfig.get()
    return as_trial(cfg, hydra.runtime.output_dir, hydra.sweep.dir)
