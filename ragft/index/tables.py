"""The files inside one index version and their in-memory form.

    documents.jsonl  one row per document: id, content hash, title, source, metadata, text
    chunks.jsonl     one row per chunk, in vector order: id (int, the FAISS id), chunk_id, doc_id,
                     start, end, text (== the document's text[start:end])
    vectors.npy      float32 (chunks, dim), L2-normalised: the embeddings, kept so an update can
                     rebuild the store (HNSW, IVF retraining, kind change) without re-embedding
    store.faiss      the FAISS index over those vectors, keyed by the chunks' int ids

JSONL keeps the texts readable with standard tools; a 100k-chunk table loads in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ragft.jsonl import read_rows, write_jsonl

DOCUMENTS = "documents.jsonl"
CHUNKS = "chunks.jsonl"
VECTORS = "vectors.npy"
STORE = "store.faiss"


@dataclass
class ChunkTable:
    """Columns of chunks.jsonl; row i is vector i."""

    ids: np.ndarray  # int64, the FAISS ids
    chunk_ids: list[str]
    doc_ids: list[str]
    starts: list[int]
    ends: list[int]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.chunk_ids)

    @classmethod
    def empty(cls) -> ChunkTable:
        return cls(np.zeros(0, dtype=np.int64), [], [], [], [], [])

    def take(self, rows: Iterable[int]) -> ChunkTable:
        rows = list(rows)
        return ChunkTable(self.ids[rows] if rows else np.zeros(0, dtype=np.int64),
                          [self.chunk_ids[r] for r in rows], [self.doc_ids[r] for r in rows],
                          [self.starts[r] for r in rows], [self.ends[r] for r in rows], [self.texts[r] for r in rows])

    def concat(self, other: ChunkTable) -> ChunkTable:
        return ChunkTable(np.concatenate([self.ids, other.ids]).astype(np.int64), self.chunk_ids + other.chunk_ids,
                          self.doc_ids + other.doc_ids, self.starts + other.starts, self.ends + other.ends,
                          self.texts + other.texts)


def write_chunks(path: Path, table: ChunkTable) -> None:
    write_jsonl(path, ({"id": int(table.ids[i]), "chunk_id": table.chunk_ids[i], "doc_id": table.doc_ids[i],
                        "start": table.starts[i], "end": table.ends[i], "text": table.texts[i]}
                       for i in range(len(table))))


def read_chunks(path: Path) -> ChunkTable:
    table = ChunkTable.empty()
    ids = []
    for row in read_rows(path):
        ids.append(row["id"])
        table.chunk_ids.append(row["chunk_id"])
        table.doc_ids.append(row["doc_id"])
        table.starts.append(row["start"])
        table.ends.append(row["end"])
        table.texts.append(row["text"])
    table.ids = np.asarray(ids, dtype=np.int64)
    return table


def write_documents(path: Path, records: Iterable[dict]) -> None:
    write_jsonl(path, records)


def read_documents(path: Path) -> list[dict]:
    return read_rows(path)


def write_vectors(path: Path, vectors: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a name without it
        np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))


def read_vectors(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")
