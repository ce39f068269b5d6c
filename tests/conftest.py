"""Shared fixtures: offline environment, composed configs, and one local Ray cluster for the session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ragft.cli import CONF_DIR, register_resolvers
from ragft.config.schema import register_configs


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One ragft cache (tokenizers, tokenized data) shared by every test, as on a user's machine."""
    path = tmp_path_factory.mktemp("ragft-cache")
    os.environ["RAGFT_CACHE"] = str(path)
    return path


@pytest.fixture
def compose_train(cache_dir, tmp_path):
    """Compose conf/train.yaml with overrides, exactly as `ragft train` would."""
    register_configs()
    register_resolvers()

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        if not any(o.startswith("out_dir=") for o in overrides):
            overrides = (f"out_dir={tmp_path / 'run'}", *overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def ray_cluster():
    """The embedded local Ray, started once and shared by all tests that train."""
    import ray

    ray.init(num_cpus=4, configure_logging=False, log_to_driver=True)
    yield
    ray.shutdown()
