"""The FAISS vector store: inner product on normalised vectors (= cosine), keyed by stable int64 ids.

Kinds:
  flat  exact search, IndexIDMap2 over IndexFlatIP. Cost grows linearly with the chunk count.
  ivf   IndexIVFFlat (its own id map): `nprobe` of `nlist` lists scanned per query. Supports
        removal, so an update edits a copy of the previous version's index in place.
  hnsw  IndexIDMap2 over IndexHNSWFlat. Fast and accurate, but FAISS cannot remove from an HNSW
        graph, so every update rebuilds it from the stored vectors.
`auto` picks flat up to `flat_max_chunks` and IVF above: flat search grows linearly with the index, IVF
keeps recall close to flat's at a fraction of the latency, and HNSW builds slower and cannot remove
vectors, which live updates need. launch/bench_index.py measures all three (docs/benchmarks.md).

The int ids are assigned by ragft.index.update and never reused; chunks.jsonl maps them to
chunk ids, so removing a document is `remove_ids` of its chunks' ids.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ragft.config.schema import IndexConfig

# FAISS's loader logs at INFO each SIMD build it tries and lacks, tracebacks included ("No module named
# 'faiss.swigfaiss_avx512'"): under Hydra's INFO logging that read like an error in every command's output.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

KINDS = ("auto", "flat", "ivf", "hnsw")
# IVF below this many vectors per list trains poorly (FAISS warns under 39 training points per centroid).
MIN_POINTS_PER_LIST = 39
# An IVF index trained on n vectors is retrained from scratch once it holds more than this factor
# times n: centroids fitted to a much smaller corpus leave lists unbalanced and queries slow.
IVF_RETRAIN_GROWTH = 2.0


_DEFAULTS = IndexConfig()  # the schema is the single home of defaults


@dataclass(frozen=True)
class StoreParams:
    """The `index.*` keys the store reads (see IndexConfig for what each does)."""

    kind: str = _DEFAULTS.kind
    flat_max_chunks: int = _DEFAULTS.flat_max_chunks
    ivf_nlist: int = _DEFAULTS.ivf_nlist  # 0: derived from the chunk count
    ivf_nprobe: int = _DEFAULTS.ivf_nprobe
    hnsw_m: int = _DEFAULTS.hnsw_m
    hnsw_ef_construction: int = _DEFAULTS.hnsw_ef_construction
    hnsw_ef_search: int = _DEFAULTS.hnsw_ef_search


def resolve_kind(params: StoreParams, num_vectors: int) -> str:
    if params.kind != "auto":
        return params.kind
    return "flat" if num_vectors <= params.flat_max_chunks else "ivf"


def ivf_nlist(params: StoreParams, num_vectors: int) -> int:
    """Lists for IVF: 4·sqrt(n) (FAISS's rule of thumb), capped so each list gets enough training points."""
    nlist = params.ivf_nlist or int(4 * math.sqrt(max(num_vectors, 1)))
    return max(1, min(nlist, num_vectors // MIN_POINTS_PER_LIST))


def build(kind: str, vectors: np.ndarray, ids: np.ndarray, params: StoreParams, dim: int):
    """A new FAISS index of `kind` holding `vectors` under `ids`."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params.hnsw_ef_construction
        index = faiss.IndexIDMap2(inner)
    elif kind == "ivf":
        nlist = ivf_nlist(params, len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # Seeded k-means: the same vectors always give the same index, so builds are reproducible.
        index.cp.seed = 1234
        index.train(vectors if len(vectors) else np.zeros((1, dim), dtype=np.float32))
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS[1:]}")
    if len(vectors):
        index.add_with_ids(vectors, ids)
    configure(index, params)
    return index


def can_edit(kind: str, num_after: int, trained_on: int) -> bool:
    """Whether an update may remove/add on a copy of the previous index instead of rebuilding it."""
    if kind == "flat":
        return True
    if kind == "ivf":
        return num_after <= max(trained_on, 1) * IVF_RETRAIN_GROWTH
    return False  # hnsw: FAISS has no removal from the graph


def edit(index, remove_ids: np.ndarray, add_vectors: np.ndarray, add_ids: np.ndarray):
    """Remove chunks by id and add new ones, in place."""
    import faiss

    if len(remove_ids):
        removed = index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(remove_ids, dtype=np.int64)))
        if removed != len(remove_ids):
            raise RuntimeError(f"the vector store held {removed} of the {len(remove_ids)} chunk ids to remove")
    if len(add_ids):
        index.add_with_ids(np.ascontiguousarray(add_vectors, dtype=np.float32), np.ascontiguousarray(add_ids, np.int64))
    return index


def configure(index, params: StoreParams) -> None:
    """Set the query-time knobs (they are not all saved in the index file)."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(params.ivf_nprobe, index.nlist)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = params.hnsw_ef_search


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (num_queries, k); missing hits have id -1."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def save(index, path: str) -> None:
    import faiss

    faiss.write_index(index, path)


def load(path: str, params: StoreParams):
    import faiss

    index = faiss.read_index(path)
    configure(index, params)
    return index
