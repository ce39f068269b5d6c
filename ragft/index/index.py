"""The read side used by eval and serve: `Index.open(path)`, `index.search(query, k)`, `index.version`.

An `Index` answers from exactly one version: `open` reads manifest.json once and loads that
version's chunks and FAISS store into memory, so updates published meanwhile (new files, old
ones pruned) change nothing for it until `reload()`. A reload swaps the whole loaded version in
one assignment, so a search running concurrently uses either the old or the new one, never a mix.

Retrieval modes: dense (FAISS cosine), bm25, hybrid (the default): both lists, `fetch_k` deep,
fused by relative score (`retrieval.fusion=relative`, the default: min-max normalised scores,
averaged) or by reciprocal rank (`rrf`: score = sum over lists of 1 / (rrf_k + rank)).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ragft.config.schema import RetrievalConfig
from ragft.index import store, tables, versions
from ragft.index.bm25 import BM25
from ragft.index.chunking import passage
from ragft.index.embed import Embedder

log = logging.getLogger(__name__)

MODES = ("dense", "bm25", "hybrid")
_OPEN_ATTEMPTS = 3  # a version pruned between reading the pointer and loading it: read the pointer again


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: str
    text: str
    score: float  # cosine (dense), BM25 (bm25) or reciprocal-rank fusion (hybrid)
    start: int  # character offsets of `text` in the document's text
    end: int
    title: str | None = None  # the document's title

    def to_json(self) -> dict:
        return {"doc_id": self.doc_id, "chunk_id": self.chunk_id, "score": self.score, "start": self.start,
                "end": self.end, "title": self.title, "text": self.text}


class _Loaded:
    """One version in memory. Never modified after loading (BM25 is filled in once, under a lock)."""

    def __init__(self, root: Path, version: int, retrieval: RetrievalConfig):
        folder = versions.version_dir(root, version)
        self.manifest = versions.read_manifest(root, version)
        self.version = version
        self.chunks = tables.read_chunks(folder / tables.CHUNKS)
        self.titles = {r["id"]: r["title"] for r in tables.read_documents(folder / tables.DOCUMENTS)}
        s = self.manifest["store"]
        self.store = store.load(str(folder / tables.STORE), store.StoreParams(
            kind=s["kind"], ivf_nprobe=s.get("nprobe", store.StoreParams.ivf_nprobe),
            hnsw_ef_search=s.get("ef_search", store.StoreParams.hnsw_ef_search)))
        self.row_of = {int(i): r for r, i in enumerate(self.chunks.ids)}
        self._retrieval = retrieval
        self._bm25: BM25 | None = None
        self._bm25_lock = threading.Lock()

    @property
    def bm25(self) -> BM25:
        with self._bm25_lock:
            if self._bm25 is None:
                prepend = self.manifest["chunking"]["prepend_title"]
                texts = [passage(self.titles.get(doc), text, prepend)
                         for doc, text in zip(self.chunks.doc_ids, self.chunks.texts)]
                self._bm25 = BM25(texts, k1=self._retrieval.bm25_k1, b=self._retrieval.bm25_b)
            return self._bm25

    def hit(self, row: int, score: float) -> Hit:
        c = self.chunks
        return Hit(c.doc_ids[row], c.chunk_ids[row], c.texts[row], float(score), c.starts[row], c.ends[row],
                   self.titles.get(c.doc_ids[row]))


class Index:
    """A versioned ragft index opened for search."""

    def __init__(self, root: Path, loaded: _Loaded, retrieval: RetrievalConfig, device: str):
        self.path = root
        self._loaded = loaded
        self.retrieval = retrieval
        self._device = device
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, retrieval: RetrievalConfig | None = None, device: str = "auto",
             version: int | None = None) -> Index:
        """Open the current version of the index at `path` (or a given `version` still on disk)."""
        retrieval = retrieval or RetrievalConfig()
        if retrieval.mode not in MODES:
            raise ValueError(f"retrieval.mode={retrieval.mode!r} is not one of {', '.join(MODES)}")
        root = Path(path)
        return cls(root, _load(root, version, retrieval), retrieval, device)

    @property
    def version(self) -> int:
        return self._loaded.version

    @property
    def manifest(self) -> dict:
        return self._loaded.manifest

    def __len__(self) -> int:
        return len(self._loaded.chunks)

    def reload(self) -> bool:
        """Switch to the index's current version; True when it was a newer one."""
        current = versions.read_manifest(self.path)["version"]
        if current == self.version:
            return False
        loaded = _load(self.path, None, self.retrieval)
        if loaded.manifest["embedding"] != self._loaded.manifest["embedding"]:
            with self._embedder_lock:
                self._embedder = None  # another model: queries must be embedded with the new one
        self._loaded = loaded  # one assignment: concurrent searches see the old or the new version
        log.info("index %s: reloaded version %d", self.path, loaded.version)
        return True

    def document_chunks(self, doc_ids: Sequence[str]) -> list[Hit]:
        """Every chunk of the given documents, in document then offset order (score 0: nothing was asked)."""
        loaded, wanted = self._loaded, set(doc_ids)
        rows = [r for r, doc in enumerate(loaded.chunks.doc_ids) if doc in wanted]
        order = {doc: i for i, doc in enumerate(doc_ids)}
        rows.sort(key=lambda r: (order[loaded.chunks.doc_ids[r]], loaded.chunks.starts[r]))
        return [loaded.hit(r, 0.0) for r in rows]

    def search(self, query: str, k: int = 5, *, mode: str | None = None, min_score: float | None = None) -> list[Hit]:
        """The best `k` chunks for `query`, best first."""
        return self.search_many([query], k, mode=mode, min_score=min_score)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, *, mode: str | None = None,
                    min_score: float | None = None) -> list[list[Hit]]:
        """`search` for several queries, embedding them in one batch."""
        return self.search_versioned(queries, k, mode=mode, min_score=min_score)[1]

    def search_versioned(self, queries: Sequence[str], k: int = 5, *, mode: str | None = None,
                         min_score: float | None = None) -> tuple[int, list[list[Hit]]]:
        """`search_many`, and the version the hits come from (citations name it: chunk ids are reused)."""
        loaded = self._loaded  # one version for the whole call, whatever reload() does meanwhile
        mode = mode or self.retrieval.mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        min_score = self.retrieval.min_score if min_score is None else min_score
        depth = max(k, self.retrieval.fetch_k) if mode == "hybrid" else k
        dense = self._dense(loaded, queries, depth) if mode in ("dense", "hybrid") else [None] * len(queries)
        results = []
        for query, dense_hits in zip(queries, dense):
            bm25_hits = _pairs(*loaded.bm25.top(query, depth)) if mode in ("bm25", "hybrid") else None
            if mode == "dense":
                ranked = dense_hits
            elif mode == "bm25":
                ranked = bm25_hits
            else:
                lists = [dense_hits, bm25_hits]
                ranked = rrf(lists, self.retrieval.rrf_k) if self.retrieval.fusion == "rrf" else relative(lists)
            if min_score is not None:
                ranked = [(row, score) for row, score in ranked if score >= min_score]
            results.append([loaded.hit(row, score) for row, score in ranked[:k]])
        return loaded.version, results

    def _dense(self, loaded: _Loaded, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        vectors = self.embedder(loaded).encode_queries(list(queries))
        scores, ids = store.search(loaded.store, vectors, depth)
        return [[(loaded.row_of[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def embedder(self, loaded: _Loaded | None = None) -> Embedder:
        emb = (loaded or self._loaded).manifest["embedding"]
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder(emb["model"], device=self._device, query_prefix=emb["query_prefix"])
            return self._embedder


def rrf(ranked_lists: Sequence[Sequence[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each list adds 1 / (k + rank) to the rows it holds (rank from 1).

    Ties (same fused score) go to the row ranked best in any list, then the lower row: deterministic.
    """
    fused: dict[int, float] = {}
    best: dict[int, int] = {}
    for hits in ranked_lists:
        for rank, (row, _) in enumerate(hits, start=1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k + rank)
            best[row] = min(best.get(row, rank), rank)
    return sorted(fused.items(), key=lambda item: (-item[1], best[item[0]], item[0]))


def relative(ranked_lists: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Relative score fusion: each list's scores min-max normalised to [0, 1], averaged over the lists.

    Unlike RRF it keeps how far a list's top hit stands above the rest: on name- and code-heavy
    questions BM25's exact match is far ahead, and RRF (ranks only) lets chunks that both lists
    rank moderately outvote it (docs/benchmarks.md compares the two).
    A row missing from a list scores 0 there. Ties go to the lower row: deterministic.
    """
    fused: dict[int, float] = {}
    for hits in ranked_lists:
        if not hits:
            continue
        scores = [score for _, score in hits]
        low, span = min(scores), max(scores) - min(scores)
        for row, score in hits:
            fused[row] = fused.get(row, 0.0) + ((score - low) / span if span > 0 else 1.0) / len(ranked_lists)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def _pairs(rows: np.ndarray, scores: np.ndarray) -> list[tuple[int, float]]:
    return [(int(r), float(s)) for r, s in zip(rows, scores)]


def _load(root: Path, version: int | None, retrieval: RetrievalConfig) -> _Loaded:
    if version is not None:
        return _Loaded(root, version, retrieval)
    for attempt in range(_OPEN_ATTEMPTS):
        current = versions.read_manifest(root)["version"]
        try:
            return _Loaded(root, current, retrieval)
        except FileNotFoundError:
            if attempt == _OPEN_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")

