"""The ids a FAISS index holds, for checks that the store and chunks.jsonl agree."""

from __future__ import annotations

import numpy as np


def ids_of(index) -> np.ndarray:
    """Every id the index holds (for checks: ids in the store must equal ids in chunks.jsonl)."""
    import faiss

    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    if isinstance(index, faiss.IndexIVF):
        invlists = index.invlists
        out = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
               for i in range(index.nlist) if invlists.list_size(i)]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)
    raise TypeError(f"cannot list the ids of {type(index).__name__}")
