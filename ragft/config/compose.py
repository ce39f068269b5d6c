"""Composing a command's config outside its Hydra app, exactly as `ragft <command>` composes it.

The one-process training loop, the demo, the Ray Tune launcher, tests and benchmarks all build their
configs here, from the same configs (the package ragft.conf, found through importlib as `pkg://ragft.conf`,
so an installed wheel finds them too), config store and resolvers as the command line.
"""

from __future__ import annotations

import threading
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from ragft.config.resolvers import package_file, sample_path, time_minutes
from ragft.config.schema import register_configs

CONF_MODULE = "ragft.conf"
CONF_PATH = f"pkg://{CONF_MODULE}"  # Hydra's search-path form of the package
CONF_DIR = str(Path(str(files(CONF_MODULE))))  # the same folder on disk, for code that reads the YAML files
_LOCK = threading.Lock()  # Hydra's config store and GlobalHydra are process-wide: one composition at a time


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """ragft/conf/<config_name>.yaml composed with `overrides`."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with _LOCK:
        register_configs()
        register_resolvers()
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))


def register_resolvers() -> None:
    """The `${name:...}` resolvers the YAML files use."""
    if not OmegaConf.has_resolver("sample"):
        OmegaConf.register_new_resolver("sample", sample_path)
    if not OmegaConf.has_resolver("slurm_minutes"):  # submitit's timeout_min from cluster.time
        OmegaConf.register_new_resolver("slurm_minutes", time_minutes)
    if not OmegaConf.has_resolver("package_file"):  # model/smollm2.yaml: the GGUF inside a PyPI package
        OmegaConf.register_new_resolver("package_file", package_file)
    if not OmegaConf.has_resolver("mul"):  # cluster/slurm.yaml: num_workers = nodes × gpus_per_node
        OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b))
