"""Fixtures for the serve tests: composed serve configs (the tiny models are in tests/conftest.py)."""

from __future__ import annotations

import pytest
from ragft.config.compose import compose_config


@pytest.fixture(scope="session")
def compose_serve():
    """Compose conf/serve.yaml with overrides, exactly as `ragft serve` would."""
    return lambda *overrides: compose_config("serve", overrides)
