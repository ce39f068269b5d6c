"""Shared fixtures: offline environment, composed configs, one local Ray cluster for the session, and
the sample index and tiny models (a base with two LoRA checkpoints) for serve and eval.

Embedding is the slow part of indexing on 2 CPU cores, so the embedding model is loaded once per
session (and counts what it embeds), the v1 sample index is built once (index and serve tests read
it), and tests that change an index work on a copy of it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# tests/kernels run Triton kernels on CPU tensors in Triton's interpreter, which has to be on when triton is
# first imported (transformers' Llama module imports it): kernel_testing (kernels/tests, on pytest's pythonpath)
# imports it in that mode and restores the environment, so subprocesses (Ray workers, engines) see none of it.
# ragft's kernels take their torch path unless a test sets TRITON_INTERPRET=1 (tests/kernels/conftest.py).
from kernel_testing import import_triton_interpreted  # noqa: E402

import_triton_interpreted()

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.serve_models import build_lora_adapter, build_tiny_base
from ragft import checkpoints as ckpt
from ragft.config.compose import compose_config
from ragft.index.embed import DEFAULT_MODEL, Embedder
from ragft.index.spec import validate_index
from ragft.index.update import update_index
from ragft.jsonl import read_rows
from ragft.sample import sample_path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One ragft cache (tokenizers, tokenized data) shared by every test, as on a user's machine."""
    path = tmp_path_factory.mktemp("ragft-cache")
    os.environ["RAGFT_CACHE"] = str(path)
    return path


@pytest.fixture
def compose_train(cache_dir, tmp_path):
    """Compose conf/train.yaml with overrides, exactly as `ragft train` would."""

    def _compose(*overrides: str):
        if not any(o.startswith("out_dir=") for o in overrides):
            overrides = (f"out_dir={tmp_path / 'run'}", *overrides)
        if not any(o.startswith("registry.path=") for o in overrides):  # never the repo's runs/registry.jsonl
            overrides = (f"registry.path={tmp_path / 'registry.jsonl'}", *overrides)
        return compose_config("train", overrides)

    return _compose


@pytest.fixture(scope="session")
def ray_cluster():
    """The embedded local Ray, started once and shared by all tests that train."""
    import ray

    from ragft.cluster import EMBEDDED_RAY_ENV
    from ragft.serve.run import serve_env

    # as `ragft train` and `ragft serve` start their embedded Ray
    for key, value in {**EMBEDDED_RAY_ENV, **serve_env(haproxy=True)}.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=4, configure_logging=False, log_to_driver=True)
    yield
    ray.shutdown()


class CountingEmbedder(Embedder):
    """The real embedder, counting the texts it encodes (queries included)."""

    def __init__(self):
        super().__init__(DEFAULT_MODEL, device="cpu", batch_size=64)
        self.encoded = 0

    def encode(self, texts):
        self.encoded += len(texts)
        return super().encode(texts)


@pytest.fixture(scope="session")
def embedder():
    return CountingEmbedder()


@pytest.fixture(scope="session")
def index_spec(tmp_path_factory):
    """`index_spec(index_path, *overrides, command="index")`: conf/index.yaml composed as `ragft index` would."""
    out = tmp_path_factory.mktemp("index-run")

    def _spec(index_path, *overrides: str, command: str = "index"):
        return validate_index(compose_config("index", [f"out_dir={out}", f"index.path={index_path}", *overrides]),
                              command=command)

    return _spec


@pytest.fixture(scope="session")
def build(index_spec, embedder):
    """`build(index_path, *overrides) -> UpdateStats`, with the shared model; `.embedded` = texts it encoded."""

    def _build(index_path, *overrides: str):
        before = embedder.encoded
        stats = update_index(index_spec(index_path, *overrides), embedder=embedder)
        stats.embedded = embedder.encoded - before
        return stats

    return _build


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory, build):
    """Version 1 of the index of the shipped corpus.jsonl (read-only: copy it to change it)."""
    path = tmp_path_factory.mktemp("sample-index") / "index"
    stats = build(path)
    assert stats.version == 1 and stats.embedded == stats.chunks
    return path


@pytest.fixture
def index_copy(sample_index, tmp_path):
    """A private copy of the v1 sample index, for tests that update or delete."""
    path = tmp_path / "index"
    shutil.copytree(sample_index, path)
    return path


@pytest.fixture(scope="session")
def corpus():
    return {d["id"]: d for d in read_rows(sample_path("corpus.jsonl"))}


@pytest.fixture(scope="session")
def corpus_v2():
    return {d["id"]: d for d in read_rows(sample_path("corpus_v2.jsonl"))}


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
