"""The Ray Data embedding path gives the in-process vectors (the reference), in the same order."""

from __future__ import annotations


import numpy as np
import pytest

from ragft.index.embed_jobs import embed_texts, use_ray
from ragft.jsonl import read_rows
from ragft.sample import sample_path


def test_threshold_keeps_small_jobs_in_process():
    assert not use_ray(282, num_workers=2, ray_min_chunks=20_000)
    assert not use_ray(10**6, num_workers=1, ray_min_chunks=0)
    assert use_ray(20_000, num_workers=2, ray_min_chunks=20_000)


@pytest.mark.ray
def test_ray_data_path_equals_in_process(ray_cluster, embedder):
    texts = [d["text"] for d in read_rows(sample_path("corpus.jsonl"))][:24]
    reference = embed_texts(texts, embedder)
    # ray_min_chunks=0 forces the Ray path; batch 5 puts each worker on several uneven batches.
    embedder.batch_size, saved = 5, embedder.batch_size
    try:
        vectors = embed_texts(texts, embedder, num_workers=2, ray_min_chunks=0)
    finally:
        embedder.batch_size = saved
    assert vectors.shape == reference.shape == (24, 384) and vectors.dtype == np.float32
    # Same model and code; only batch padding and the per-actor thread count (1 vs 2) differ, which
    # moves float32 sums by ~1e-7.
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert (np.argmax(vectors @ reference.T, axis=1) == np.arange(24)).all()
