"""Embedding as a Ray Data job: a pool of `num_workers` actors, each loading the model once.

Texts go in with their row number and come back with it, because Ray Data may finish blocks
out of order; the driver puts the vectors back in input order. Each actor runs the very same
`Embedder.encode` as the in-process path, batching `batch_size` texts per forward pass.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ragft.cluster import init_ray
from ragft.index.embed import Embedder

log = logging.getLogger(__name__)


class _EmbedBatches:
    """The Ray Data UDF: one model per actor, reused for every batch it is given."""

    def __init__(self, model: str, device: str, batch_size: int):
        self.embedder = Embedder(model, device=device, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.embedder.encode([str(t) for t in batch["text"]])
        return {"row": batch["row"], "vector": vectors}


def embed_with_ray(texts: Sequence[str], embedder: Embedder, *, num_workers: int, use_gpu: bool = False,
                   address: str | None = None) -> np.ndarray:
    import ray
    import ray.data

    init_ray(address, num_workers + 1)  # + Ray Data's own read/collect tasks
    items = [{"row": i, "text": t} for i, t in enumerate(texts)]
    # Several blocks per worker so a slow worker does not hold the tail of the job.
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), num_workers * 4)))
    out = ds.map_batches(
        _EmbedBatches,
        fn_constructor_kwargs={"model": embedder.model_name, "device": "cuda" if use_gpu else "cpu",
                               "batch_size": embedder.batch_size},
        batch_size=embedder.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    rows, vectors = [], []
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        rows.append(np.asarray(batch["row"]))
        vectors.append(np.asarray(batch["vector"], dtype=np.float32))
    if not rows:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    order = np.argsort(np.concatenate(rows), kind="stable")
    return np.ascontiguousarray(np.concatenate(vectors)[order])
