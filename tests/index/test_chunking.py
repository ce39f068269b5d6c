"""Chunking: offsets that cite the exact passage, token budgets, overlap on sentence boundaries.

Token counts are checked against the embedding model's own tokenizer (the reference for what
the encoder sees), not against the chunker's sum of per-sentence counts.
"""

from __future__ import annotations

import pytest

from ragft.index import tables, versions
from ragft.index.chunking import Chunker, hf_token_offsets
from ragft.index.embed import DEFAULT_MODEL, load_embedding_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_embedding_tokenizer(DEFAULT_MODEL)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_every_chunk_of_the_sample_index_is_its_documents_text(sample_index, corpus):
    folder = versions.version_dir(sample_index, 1)
    chunks = tables.read_chunks(folder / tables.CHUNKS)
    assert len(chunks) >= len(corpus)
    for chunk_id, doc_id, start, end, text in zip(chunks.chunk_ids, chunks.doc_ids, chunks.starts, chunks.ends,
                                                  chunks.texts):
        assert corpus[doc_id]["text"][start:end] == text, chunk_id
    stored = {r["id"]: r for r in tables.read_documents(folder / tables.DOCUMENTS)}
    assert {i: r["text"] for i, r in stored.items()} == {i: d["text"] for i, d in corpus.items()}


def test_long_document_chunks_fit_overlap_and_cover_everything(tokenizer):
    sentences = [f"Sentence number {i} tells of the ferry Vessel{i} and her home port Harbour{i}." for i in range(60)]
    text = " ".join(sentences[:25]) + "\n\n" + " ".join(sentences[25:])
    chunker = Chunker(hf_token_offsets(tokenizer), chunk_tokens=64, chunk_overlap=16)
    chunks = chunker.chunk("doc", text)
    assert len(chunks) > 5
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert n_tokens(tokenizer, c.text) <= 64
        assert c.text[0].isupper() and c.text.endswith(".")  # cut on sentence boundaries
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "neighbours share their boundary sentences"
        assert n_tokens(tokenizer, text[b.start:a.end]) <= 16
        assert b.start > a.start
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    assert [c.chunk_id for c in chunks] == [f"doc#{i}" for i in range(len(chunks))]


def test_paragraph_break_is_preferred_to_a_mid_paragraph_cut(tokenizer):
    para = " ".join(f"Fact {i} about the harbour is recorded here." for i in range(4))  # ~40 tokens
    text = f"{para}\n\n{para}\n\n{para}"
    chunks = Chunker(hf_token_offsets(tokenizer), chunk_tokens=64, chunk_overlap=0).chunk("d", text)
    assert [c.text for c in chunks] == [para, para, para]


def test_a_sentence_longer_than_a_chunk_is_cut_at_token_boundaries(tokenizer):
    text = "Intro. " + " ".join(f"word{i}" for i in range(300)) + ". Outro."
    chunks = Chunker(hf_token_offsets(tokenizer), chunk_tokens=40, chunk_overlap=10).chunk("d", text)
    assert len(chunks) > 8
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert n_tokens(tokenizer, c.text) <= 40
    assert chunks[-1].text.endswith("Outro.")


def test_bad_sizes_are_refused(tokenizer):
    with pytest.raises(ValueError):
        Chunker(hf_token_offsets(tokenizer), chunk_tokens=32, chunk_overlap=32)
