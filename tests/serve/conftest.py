"""Fixtures for the serve tests: a tiny base with two LoRA checkpoints on it, and composed serve configs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.serve_models import build_lora_adapter, build_tiny_base
from ragft.cli import compose_config
from ragft.train import checkpoint as ckpt


@dataclass(frozen=True)
class ServeModels:
    base: Path
    alpha: Path  # LoRA checkpoints with ragft manifests (run ids run-alpha, run-beta)
    beta: Path


def add_manifest(folder: Path, run_id: str, base: Path, step: int) -> Path:
    """Make a plain PEFT adapter folder look like a `ragft train` checkpoint (manifest with sha256 sums)."""
    files = {str(p.relative_to(folder)): ckpt.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"format": "ragft-checkpoint/1", "run_id": run_id, "step": step, "method": "lora",
                "model": {"name": "tiny", "source": str(base)}, "metrics": {}, "files": files}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory, cache_dir) -> ServeModels:
    root = tmp_path_factory.mktemp("serve-models")
    base = build_tiny_base(root / "base", cache_dir)
    alpha = add_manifest(build_lora_adapter(base, root / "alpha", seed=1), "run-alpha", base, 10)
    beta = add_manifest(build_lora_adapter(base, root / "beta", seed=2), "run-beta", base, 20)
    return ServeModels(base, alpha, beta)


@pytest.fixture(scope="session")
def compose_serve():
    """Compose conf/serve.yaml with overrides, exactly as `ragft serve` would."""
    return lambda *overrides: compose_config("serve", overrides)
