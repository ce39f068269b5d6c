"""Retrieval quality on the shipped sample: recall@5 of the gold doc_ids of qa.jsonl, per mode.

Measured on this machine (280 ferry documents, 282 chunks, 387 questions, all-MiniLM-L6-v2,
chunk_tokens=128, titles prepended): dense 0.979, bm25 1.000, hybrid 0.997. The bounds below sit
just under those (one or two questions of slack each) so a regression in chunking, embedding or
fusion fails here, while a different BLAS summation order does not.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from ragft.config.schema import RagConfig
from ragft.index import Index
from ragft.index.index import relative, rrf
from ragft.jsonl import read_rows
from ragft.rag import rag_messages
from ragft.sample import sample_path

RECALL_FLOOR = {"dense": 0.97, "bm25": 0.995, "hybrid": 0.99}


def recall_at(k: int, questions: list[dict], results) -> float:
    found = sum(bool(set(q["doc_ids"]) & {h.doc_id for h in hits[:k]}) for q, hits in zip(questions, results))
    return found / len(questions)


@pytest.fixture(scope="module")
def qa():
    return read_rows(sample_path("qa.jsonl"))


@pytest.fixture(scope="module")
def runs(sample_index, qa):
    """Top-50 hits per question for each mode (one batch each)."""
    index = Index.open(sample_index)
    return {mode: index.search_many([q["question"] for q in qa], 50, mode=mode) for mode in ("dense", "bm25", "hybrid")}


def test_recall_at_5_per_mode(qa, runs):
    recall = {mode: recall_at(5, qa, res) for mode, res in runs.items()}
    print("\nrecall@5 on qa.jsonl: " + ", ".join(f"{m} {r:.3f}" for m, r in recall.items()))
    for mode, floor in RECALL_FLOOR.items():
        assert recall[mode] >= floor, (mode, recall[mode])
    # Relative-score fusion (the default) keeps BM25's clear lead on name questions, so hybrid is held to
    # the better of the two with no margin. (RRF, ranks only, lost one of 387 here: 0.997 vs bm25 1.000.)
    assert recall["hybrid"] >= max(recall["dense"], recall["bm25"])


def test_hits_carry_offsets_and_scores_in_order(sample_index, corpus):
    index = Index.open(sample_index)
    for mode in ("dense", "bm25", "hybrid"):
        hits = index.search("Who currently skippers the ferry Grerel?", k=5, mode=mode)
        assert len(hits) == 5
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        for h in hits:
            assert corpus[h.doc_id]["text"][h.start:h.end] == h.text
            assert h.chunk_id.startswith(f"{h.doc_id}#")
        assert hits[0].doc_id == "ferry-0009", mode


# Single and batched search must agree on what eval and serve share: the chunks, in order, and the prompt
# rendered from them. Not on the last bits of the scores: the CPU's float32 matmul kernels (embedding and
# FAISS inner products) pick their blocking by batch shape, so one query embedded alone and the same query
# in a batch of two differ by up to ~6e-8 in cosine and ~1.4e-7 in fused score on some machines (0 on the
# one that wrote this). 1e-5 leaves ~70x that and is still far below any real change of score.
SCORE_TOL = dict(rel=1e-5, abs=1e-5)


def test_min_score_and_single_equals_batch(sample_index):
    index = Index.open(sample_index)
    query = "What is the route code of the Fousond?"
    rag = RagConfig()
    messages = [{"role": "user", "content": query}]
    for mode in ("dense", "bm25", "hybrid"):
        single = index.search(query, 5, mode=mode)
        batch = index.search_many([query, "unrelated"], 5, mode=mode)[0]
        assert [(h.doc_id, h.chunk_id) for h in single] == [(h.doc_id, h.chunk_id) for h in batch], mode
        assert [replace(h, score=0.0) for h in single] == [replace(h, score=0.0) for h in batch], mode
        # the prompt `prompt_ids` tokenizes (serve's ingress and eval both build it from the hits this way)
        assert rag_messages(messages, single, rag) == rag_messages(messages, batch, rag), mode
        assert [h.score for h in single] == pytest.approx([h.score for h in batch], **SCORE_TOL), mode

    # min_score keeps exactly the hits scoring at or above it, in single and batched search alike. The
    # threshold sits midway across the widest gap among the top 5 cosines, far from any hit's score.
    hits = index.search(query, 5, mode="dense")
    gap, cut = max((hits[i].score - hits[i + 1].score, i + 1) for i in range(len(hits) - 1))
    assert gap > 1e-3, [h.score for h in hits]
    threshold = hits[cut].score + gap / 2
    kept = [h.chunk_id for h in hits[:cut]]
    assert [h.chunk_id for h in index.search(query, 5, mode="dense", min_score=threshold)] == kept
    assert [h.chunk_id for h in index.search_many([query, "unrelated"], 5, mode="dense",
                                                  min_score=threshold)[0]] == kept
    assert index.search(query, 5, mode="dense", min_score=0.99) == []  # no cosine reaches 0.99 here
    assert len(index.search(query, 5, mode="dense", min_score=-1.0)) == 5  # every cosine is >= -1


def test_rrf_rewards_agreement_and_is_deterministic():
    dense = [(1, 0.9), (2, 0.8), (3, 0.7)]
    bm25 = [(3, 9.0), (4, 5.0)]
    fused = rrf([dense, bm25], k=60)
    assert fused[0][0] == 3  # in both lists
    assert fused[0][1] == pytest.approx(1 / 63 + 1 / 61)
    assert [row for row, _ in fused] == [3, 1, 2, 4]  # 2 and 4 tie on 1/62 (both rank 2): the lower row first


def test_relative_fusion_keeps_a_clear_lead_and_is_deterministic():
    dense = [(1, 0.62), (2, 0.61), (3, 0.605), (4, 0.60), (5, 0.10)]  # unsure: near-equal top cosines
    bm25 = [(4, 20.0), (2, 5.0), (6, 4.0)]  # sure: an exact name match far ahead of the rest
    fused = relative([dense, bm25])
    assert fused[0][0] == 4 and fused[1][0] == 2
    assert fused[0][1] == pytest.approx(((0.60 - 0.10) / (0.62 - 0.10) + 1.0) / 2)
    assert rrf([dense, bm25], k=60)[0][0] == 2  # ranks only: 1/62 + 1/62 beats 1/64 + 1/61
    assert relative([[(7, 1.0), (8, 1.0)]]) == [(7, 1.0), (8, 1.0)]  # equal scores: all 1, lower row first


def test_bm25_counts_a_repeated_query_term_once():
    """Okapi BM25 with the query-term frequency saturated (k3 = 0), checked against the textbook formula: a
    query of one word repeated a hundred thousand times scores as the word once, and costs as much."""
    import math
    import time

    from ragft.index.bm25 import BM25

    texts = ["the ferry kinand carries 105 passengers", "the harbour of kinand", "a ferry timetable"]
    bm25 = BM25(texts, k1=1.2, b=0.75)
    lengths = [5, 2, 2]  # "the", "of" and "a" are stopwords
    avg = sum(lengths) / 3

    def textbook(term_counts: list[int]) -> list[float]:
        n = sum(1 for c in term_counts if c)
        idf = math.log1p((3 - n + 0.5) / (n + 0.5))
        return [idf * c * 2.2 / (c + 1.2 * (0.25 + 0.75 * length / avg)) for c, length in zip(term_counts, lengths)]

    want = [a + b for a, b in zip(textbook([1, 0, 1]), textbook([1, 1, 0]))]  # ferry, kinand
    assert bm25.scores("ferry kinand").tolist() == pytest.approx(want, rel=1e-5)
    started = time.perf_counter()
    assert bm25.scores("ferry " * 100_000 + "kinand").tolist() == pytest.approx(want, rel=1e-5)
    assert time.perf_counter() - started < 2
