"""Where a build's texts are embedded: in this process for small jobs, as a Ray Data job
(ragft.index.ray_embed) when `num_workers > 1` and there are at least `ray_min_chunks` texts.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from ragft.index.embed import Embedder

log = logging.getLogger(__name__)


def use_ray(num_texts: int, num_workers: int, ray_min_chunks: int) -> bool:
    """Ray pays for its start-up (cluster, one model load per worker) only on many texts and several workers:
    the default threshold keeps every routine update (tens of changed documents) in-process and sends only
    bulk builds to the cluster (launch/bench_index.py measures both paths)."""
    return num_workers > 1 and num_texts >= ray_min_chunks


def embed_texts(texts: Sequence[str], embedder: Embedder, *, num_workers: int = 1, ray_min_chunks: int = 20_000,
                use_gpu: bool = False, ray_address: str | None = None) -> np.ndarray:
    """Embed `texts` in order, in-process or with Ray Data (see `use_ray`); logs the throughput."""
    started = time.perf_counter()
    if use_ray(len(texts), num_workers, ray_min_chunks):
        from ragft.index.ray_embed import embed_with_ray

        where = f"Ray Data, {num_workers} workers"
        vectors = embed_with_ray(texts, embedder, num_workers=num_workers, use_gpu=use_gpu, address=ray_address)
    else:
        where = "in-process"
        vectors = embedder.encode(texts)
    seconds = time.perf_counter() - started
    if texts:
        log.info("embedded %d chunks %s in %.1f s (%.0f chunks/s)", len(texts), where, seconds,
                 len(texts) / max(seconds, 1e-9))
    return vectors
