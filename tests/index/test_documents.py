"""Ingest: JSONL documents and folders of .txt / .md; bad rows reported with file and line."""

from __future__ import annotations

import json

import pytest

from ragft.index.documents import read_documents
from ragft.jsonl import BadRowError
from ragft.sample import sample_path

GOOD = '{"id": "a", "text": "Alpha text.", "title": "A", "metadata": {"k": 1}}'


def write(path, *lines: str):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("row, reason", [
    ('{"id": "b"}', "'text' must be a string, got nothing"),
    ('{"id": "b", "text": "   "}', "'text' is empty"),
    ('{"text": "no id"}', "'id' must be a non-empty string"),
    ('{"id": 7, "text": "x"}', "'id' must be a non-empty string"),
    ('{"id": "b", "text": "x", "metadata": [1]}', "'metadata' must be an object"),
    ('{"id": "b", "text": "x", "title": 3}', "'title' must be a string"),
    ('["id", "text"]', "expected a JSON object"),
    ('{"id": "b", "text": "x"', "invalid JSON"),
    ('{"id": "a", "text": "again"}', "duplicate document id 'a' (first at "),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, row, reason):
    path = write(tmp_path / "docs.jsonl", GOOD, "", row, '{"id": "c", "text": "Gamma."}')
    with pytest.raises(BadRowError) as err:
        read_documents(str(path))
    assert (err.value.path, err.value.line) == (str(path), 3)
    assert str(err.value).startswith(f"{path}:3: ") and reason in str(err.value)

    skipped = read_documents(str(path), on_bad_row="skip")
    assert [d.id for d in skipped.documents] == ["a", "c"] and len(skipped.skipped) == 1


def test_sample_corpus_reads_whole(corpus):
    docs = read_documents(sample_path("corpus.jsonl")).documents
    assert [d.id for d in docs] == list(corpus)
    assert docs[0].title == corpus["ferry-0001"]["title"] and docs[0].metadata == corpus["ferry-0001"]["metadata"]
    assert docs[0].origin.endswith("corpus.jsonl:1")


def test_folder_of_text_and_markdown(tmp_path):
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "boarding.md").write_text("# Boarding rules\n\nFoot passengers board first.\n")
    (tmp_path / "faq.txt").write_text("Dogs are welcome on the open deck.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.md").write_text("# secret\n")
    docs = {d.id: d for d in read_documents(str(tmp_path)).documents}
    assert set(docs) == {"guides/boarding.md", "faq.txt"}
    assert docs["guides/boarding.md"].title == "Boarding rules" and docs["faq.txt"].title == "faq"
    assert docs["faq.txt"].text == "Dogs are welcome on the open deck.\n"


def test_folder_file_that_is_not_utf8_names_its_line(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "bad.txt").write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(BadRowError, match=r"bad\.txt:2: not UTF-8"):
        read_documents(str(tmp_path))


def test_content_hash_follows_title_and_text_only(tmp_path):
    rows = [{"id": "a", "text": "T", "title": "x", "metadata": {"rev": 1}},
            {"id": "b", "text": "T", "title": "x", "metadata": {"rev": 2}},
            {"id": "c", "text": "T", "title": "y"}]
    path = write(tmp_path / "d.jsonl", *map(json.dumps, rows))
    a, b, c = read_documents(str(path)).documents
    assert a.content_hash == b.content_hash != c.content_hash
