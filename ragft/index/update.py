"""Building an index, or updating one, as a new version: only what changed is chunked and embedded.

An update compares each incoming document's content hash (title + text) with the previous
version's:
  added      new id                        → chunked, embedded, stored under fresh int ids
  changed    same id, different hash       → all its old chunks removed, new ones added
  unchanged  same id, same hash            → its chunks and vectors carried over as they are
  deleted    in index.delete_ids (or absent from the corpus with index.remove_missing=true)
Documents already in the index but not in corpus.path are kept (an upsert), unless deleted.
A change of embedding model, chunking or index.rebuild=true re-embeds every document.

Everything is written to a staging folder and published atomically (ragft.index.versions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from ragft.errors import ConfigError
from ragft.index import store, tables, versions
from ragft.index.chunking import Chunker, hf_token_offsets, passage
from ragft.index.documents import Document, read_documents
from ragft.index.embed import Embedder, load_embedding_tokenizer
from ragft.index.embed_jobs import embed_texts
from ragft.index.spec import IndexSpec

log = logging.getLogger(__name__)


@dataclass
class UpdateStats:
    version: int = 0
    published: bool = False  # false when nothing changed: the current version already is the result
    documents: int = 0
    chunks: int = 0
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    delete_not_found: list[str] = field(default_factory=list)
    bad_rows_skipped: int = 0
    embedded_chunks: int = 0  # chunks embedded by this update
    reused_chunks: int = 0  # chunks (and vectors) carried over from the previous version
    removed_chunks: int = 0
    kind: str = ""
    store_edited: bool = False  # true: the previous FAISS index was edited (remove/add), false: built anew
    full_rebuild_reason: str | None = None
    seconds: dict = field(default_factory=dict)


def settings_of(spec: IndexSpec) -> dict:
    """What chunks and vectors depend on; an index built with other settings must be re-embedded."""
    i = spec.index
    return {"embedding_model": i.embedding_model, "query_prefix": i.query_prefix, "chunk_tokens": i.chunk_tokens,
            "chunk_overlap": i.chunk_overlap, "prepend_title": i.prepend_title}


def update_index(spec: IndexSpec, embedder: Embedder | None = None,
                 documents: Sequence[Document] = ()) -> UpdateStats:
    """Build `spec.index_path` from `spec.corpus_path`, or publish the next version of the index there.

    `documents` are upserted like rows of the corpus (ragft serve's live updates pass them here).
    """
    timer, stats = _Timer(), UpdateStats()
    incoming = _read_incoming(spec, documents, stats)
    timer.lap("read")
    root = Path(spec.index_path)
    with versions.writer_lock(root):
        prev = _Previous.load(root) if versions.is_index(root) else None
        settings = settings_of(spec)
        stats.full_rebuild_reason = _full_rebuild_reason(spec, prev, settings)
        if stats.full_rebuild_reason is not None and prev is not None:
            log.info("re-embedding every document: %s", stats.full_rebuild_reason)
        plan = _plan(spec, prev, incoming, stats)
        if _up_to_date(spec, prev, plan):
            stats.version, stats.documents, stats.chunks = prev.version, len(prev.documents), len(prev.chunks)
            stats.kind, stats.seconds = prev.manifest["store"]["kind"], timer.laps
            log.info("index %s is up to date at version %d: nothing to write", root, prev.version)
            return stats
        kept_rows, kept, fresh, next_id = _chunk(spec, prev, plan)
        timer.lap("chunk")
        vectors, new_vectors, dim = _embed(spec, prev, plan, fresh, kept_rows, embedder)
        chunks = kept.concat(fresh)
        stats.embedded_chunks, stats.reused_chunks = len(fresh), len(kept)
        stats.removed_chunks = len(prev.chunks) - len(kept) if prev else 0
        timer.lap("embed")
        index, kind, trained_on = _vector_store(spec, prev, plan, chunks, kept, fresh, vectors, new_vectors, dim,
                                                stats)
        timer.lap("store")
        _write_and_publish(spec, root, prev, plan, chunks, vectors, index, kind, trained_on, next_id + len(fresh),
                           dim, settings, stats, timer)
        return stats


@dataclass
class _Plan:
    """What happens to each document in this update (see the module docstring)."""

    full: bool  # every document is re-embedded
    added: list[Document]
    changed: list[Document]
    deleted: set[str]
    documents: list[dict]  # documents.jsonl of the new version

    @property
    def to_embed(self) -> list[Document]:
        return self.added + self.changed

    @property
    def gone(self) -> set[str]:
        """Documents whose old chunks leave the index."""
        return self.deleted | {d.id for d in self.changed}


def _read_incoming(spec: IndexSpec, documents: Sequence[Document], stats: UpdateStats) -> list[Document]:
    """The corpus file's documents (bad rows skipped per corpus.on_bad_row) followed by `documents`."""
    incoming: list[Document] = list(documents)
    if spec.corpus_path:
        read = read_documents(spec.corpus_path, spec.corpus.on_bad_row, tuple(spec.corpus.extensions))
        incoming, stats.bad_rows_skipped = read.documents + incoming, len(read.skipped)
        if read.skipped:
            log.warning("skipped %d bad document rows (corpus.on_bad_row=skip); first: %s", len(read.skipped),
                        read.skipped[0])
    clash = sorted(set(spec.index.delete_ids) & {d.id for d in incoming})
    if clash:
        raise ConfigError([f"index.delete_ids names documents that corpus.path also holds: {clash}"])
    return incoming


def _plan(spec: IndexSpec, prev: _Previous | None, incoming: list[Document], stats: UpdateStats) -> _Plan:
    """Sort the incoming documents into added, changed and unchanged against the previous version."""
    full = stats.full_rebuild_reason is not None
    prev_docs = {r["id"]: r for r in prev.documents} if prev else {}
    new_by_id = {d.id: d for d in incoming}
    deleted = {d for d in spec.index.delete_ids if d in prev_docs}
    stats.delete_not_found = sorted(set(spec.index.delete_ids) - set(prev_docs))
    if stats.delete_not_found:
        log.warning("index.delete_ids: not in the index, nothing to delete: %s", stats.delete_not_found)
    if spec.index.remove_missing and spec.corpus_path:
        deleted |= set(prev_docs) - set(new_by_id)
    added = [d for d in incoming if d.id not in prev_docs]
    changed = [d for d in incoming if d.id in prev_docs and (full or prev_docs[d.id]["hash"] != d.content_hash)]
    changed_ids = {d.id for d in changed}
    unchanged = [d for d in incoming if d.id in prev_docs and d.id not in changed_ids]
    # Documents left out of this corpus are kept as they are (upsert), unless deleted or rebuilt.
    carried = [i for i in prev_docs if i not in new_by_id and i not in deleted]
    if full and prev is not None:
        changed += [_document_from_record(prev_docs[i]) for i in carried]
        carried = []
    stats.added, stats.changed, stats.deleted = len(added), len(changed), len(deleted)
    stats.unchanged = len(unchanged) + len(carried)
    return _Plan(full, added, changed, deleted, _merged_records(prev, new_by_id, deleted, changed))


def _up_to_date(spec: IndexSpec, prev: _Previous | None, plan: _Plan) -> bool:
    """Nothing to write: no document changed and the store kind the index would get is the one it has."""
    if prev is None or plan.added or plan.changed or plan.deleted or plan.documents != prev.documents:
        return False
    return prev.manifest["store"]["kind"] == store.resolve_kind(spec.store_params, len(prev.chunks))


def _chunk(spec: IndexSpec, prev: _Previous | None, plan: _Plan):
    """Keep the chunk rows of untouched documents; chunk the new and changed ones under fresh int ids.
    Returns (kept rows of the previous table, the kept table, the fresh table, the first fresh id)."""
    kept_rows = [r for r, doc in enumerate(prev.chunks.doc_ids) if doc not in plan.gone] if prev else []
    kept = prev.chunks.take(kept_rows) if prev else tables.ChunkTable.empty()
    to_embed = plan.to_embed
    chunker = Chunker(hf_token_offsets(load_embedding_tokenizer(spec.index.embedding_model)), spec.index.chunk_tokens,
                      spec.index.chunk_overlap) if to_embed else None
    new_chunks = chunker.chunk_many([(d.id, d.text) for d in to_embed]) if chunker else []
    next_id = prev.manifest["next_id"] if prev else 0
    fresh = tables.ChunkTable(np.arange(next_id, next_id + len(new_chunks), dtype=np.int64),
                              [c.chunk_id for c in new_chunks], [c.doc_id for c in new_chunks],
                              [c.start for c in new_chunks], [c.end for c in new_chunks],
                              [c.text for c in new_chunks])
    return kept_rows, kept, fresh, next_id


def _embed(spec: IndexSpec, prev: _Previous | None, plan: _Plan, fresh: tables.ChunkTable, kept_rows: list[int],
           embedder: Embedder | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Embed only the fresh chunks; returns (all vectors: kept then fresh, the fresh ones, dimension)."""
    titles = {d.id: d.title for d in plan.to_embed}
    texts = [passage(titles[doc], text, spec.index.prepend_title) for doc, text in zip(fresh.doc_ids, fresh.texts)]
    embedder = embedder or Embedder(spec.index.embedding_model, spec.index.device, spec.index.batch_size,
                                    spec.index.query_prefix)
    if texts:
        new_vectors = embed_texts(texts, embedder, num_workers=spec.index.num_workers,
                                  ray_min_chunks=spec.index.ray_min_chunks, use_gpu=spec.index.use_gpu,
                                  ray_address=spec.index.ray_address)
        dim = new_vectors.shape[1]
    else:
        dim = prev.manifest["embedding"]["dim"]
        new_vectors = np.zeros((0, dim), dtype=np.float32)
    kept_vectors = np.asarray(prev.vectors[kept_rows]) if prev and kept_rows else np.zeros((0, dim), np.float32)
    return np.concatenate([kept_vectors, new_vectors]).astype(np.float32), new_vectors, dim


def _vector_store(spec: IndexSpec, prev: _Previous | None, plan: _Plan, chunks: tables.ChunkTable,
                  kept: tables.ChunkTable, fresh: tables.ChunkTable, vectors: np.ndarray, new_vectors: np.ndarray,
                  dim: int, stats: UpdateStats):
    """Edit a copy of the previous FAISS index where FAISS allows it, else build one; (index, kind, trained_on)."""
    params = spec.store_params
    kind = store.resolve_kind(params, len(chunks))
    trained_on = len(chunks)
    if prev and not plan.full and prev.manifest["store"]["kind"] == kind and store.can_edit(
            kind, len(chunks), prev.manifest["store"].get("trained_on", 0)):
        index = store.load(str(prev.dir / tables.STORE), params)
        store.edit(index, np.setdiff1d(prev.chunks.ids, kept.ids), new_vectors, fresh.ids)
        trained_on = prev.manifest["store"].get("trained_on", len(chunks))
        stats.store_edited = True
    else:
        index = store.build(kind, vectors, chunks.ids, params, dim)
    stats.kind = kind
    return index, kind, trained_on


def _write_and_publish(spec: IndexSpec, root: Path, prev: _Previous | None, plan: _Plan, chunks: tables.ChunkTable,
                       vectors: np.ndarray, index, kind: str, trained_on: int, next_id: int, dim: int,
                       settings: dict, stats: UpdateStats, timer: _Timer) -> None:
    """Write the version to a staging folder and publish it atomically (readers see the old one or the new)."""
    version = max([prev.version if prev else 0, *versions.list_versions(root)]) + 1
    staged = versions.staging_dir(root)
    tables.write_documents(staged / tables.DOCUMENTS, plan.documents)
    tables.write_chunks(staged / tables.CHUNKS, chunks)
    tables.write_vectors(staged / tables.VECTORS, vectors)
    store.save(index, str(staged / tables.STORE))
    stats.version, stats.documents, stats.chunks = version, len(plan.documents), len(chunks)
    timer.lap("write")
    stats.seconds = timer.laps
    manifest = _manifest(spec, settings, stats, prev, dim, index, kind, trained_on, next_id, plan.documents, staged)
    versions.publish(root, staged, manifest, spec.index.keep_versions)
    stats.published = True


@dataclass
class _Previous:
    """The current version of an existing index, as the writer needs it."""

    version: int
    dir: Path
    manifest: dict
    documents: list[dict]
    chunks: tables.ChunkTable
    vectors: np.ndarray  # memory-mapped

    @classmethod
    def load(cls, root: Path) -> _Previous:
        manifest = versions.read_manifest(root)
        folder = versions.version_dir(root, manifest["version"])
        return cls(manifest["version"], folder, manifest, tables.read_documents(folder / tables.DOCUMENTS),
                   tables.read_chunks(folder / tables.CHUNKS), tables.read_vectors(folder / tables.VECTORS))


def _full_rebuild_reason(spec: IndexSpec, prev: _Previous | None, settings: dict) -> str | None:
    if prev is None:
        return None
    if spec.index.rebuild:
        return "index.rebuild=true"
    m = prev.manifest
    before = {"embedding_model": m["embedding"]["model"], "query_prefix": m["embedding"]["query_prefix"],
              "chunk_tokens": m["chunking"]["chunk_tokens"], "chunk_overlap": m["chunking"]["chunk_overlap"],
              "prepend_title": m["chunking"]["prepend_title"]}
    diff = [f"{k}: {before.get(k)!r} → {v!r}" for k, v in settings.items() if before.get(k) != v]
    return "settings changed (" + "; ".join(diff) + ")" if diff else None


def _document_from_record(record: dict) -> Document:
    return Document(id=record["id"], text=record["text"], title=record["title"], source=record["source"],
                    metadata=record["metadata"])


def _merged_records(prev: _Previous | None, incoming: dict[str, Document], deleted: set[str],
                    changed: list[Document]) -> list[dict]:
    """documents.jsonl of the new version: previous order, replaced in place, new documents appended."""
    latest = {d.id: d.record() for d in changed}
    latest.update({i: d.record() for i, d in incoming.items()})  # metadata refreshes even when content did not change
    out, seen = [], set()
    for record in prev.documents if prev else []:
        if record["id"] in deleted:
            continue
        out.append(latest.get(record["id"], record))
        seen.add(record["id"])
    out += [r for i, r in latest.items() if i not in seen]
    return out


def _manifest(spec: IndexSpec, settings: dict, stats: UpdateStats, prev: _Previous | None, dim: int, index,
              kind: str, trained_on: int, next_id: int, documents: list[dict], staged: Path) -> dict:
    params = spec.store_params
    store_info = {"kind": kind, "requested_kind": params.kind, "ntotal": int(index.ntotal)}
    if kind == "ivf":  # trained_on: the size its centroids were fitted to (retrained past IVF_RETRAIN_GROWTH×)
        store_info.update(nlist=int(index.nlist), nprobe=params.ivf_nprobe, trained_on=trained_on)
    if kind == "hnsw":
        store_info.update(m=params.hnsw_m, ef_construction=params.hnsw_ef_construction,
                          ef_search=params.hnsw_ef_search)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for record in sorted(documents, key=lambda r: r["id"]):
        digest.update(f"{record['id']}\t{record['hash']}\n".encode())
    update = asdict(stats)
    for key in ("version", "published", "documents", "chunks", "kind"):
        update.pop(key)
    return {
        "format": versions.FORMAT,
        "version": stats.version,
        "parent_version": prev.version if prev else None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "content_hash": digest.hexdigest(),
        "documents": stats.documents,
        "chunks": stats.chunks,
        "embedding": {"model": spec.index.embedding_model, "dim": dim, "normalized": True,
                      "query_prefix": spec.index.query_prefix},
        "chunking": {"chunk_tokens": spec.index.chunk_tokens, "chunk_overlap": spec.index.chunk_overlap,
                     "prepend_title": spec.index.prepend_title, "tokenizer": spec.index.embedding_model},
        "store": store_info,
        "next_id": next_id,
        "update": update,
        "files": {p.name: p.stat().st_size for p in sorted(staged.iterdir())},
    }


class _Timer:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now
