"""An index version's JSONL tables are read strictly: a damaged line is an error naming the file and line,
never a table silently shorter than its vectors."""

from __future__ import annotations

import numpy as np
import pytest

from ragft.index.tables import ChunkTable, read_chunks, read_documents, write_chunks, write_documents
from ragft.jsonl import BadRowError


def chunks(n: int) -> ChunkTable:
    return ChunkTable(np.arange(n, dtype=np.int64), [f"c{i}" for i in range(n)], ["d"] * n, [0] * n, [1] * n,
                      ["é"] * n)


def test_tables_round_trip(tmp_path):
    write_chunks(tmp_path / "chunks.jsonl", chunks(3))
    table = read_chunks(tmp_path / "chunks.jsonl")
    assert table.chunk_ids == ["c0", "c1", "c2"] and table.texts == ["é"] * 3 and table.ids.tolist() == [0, 1, 2]
    write_documents(tmp_path / "documents.jsonl", [])
    assert read_documents(tmp_path / "documents.jsonl") == []  # an index may hold no document


def test_a_torn_chunk_line_names_file_and_line(tmp_path):
    path = tmp_path / "chunks.jsonl"
    write_chunks(path, chunks(3))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:10] + "\n" + lines[2], encoding="utf-8")
    with pytest.raises(BadRowError, match=rf"^{path}:2: invalid JSON"):
        read_chunks(path)


def test_a_document_row_that_is_no_object_names_file_and_line(tmp_path):
    path = tmp_path / "documents.jsonl"
    path.write_text('{"id": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(BadRowError, match=rf"^{path}:2: expected a JSON object, got list"):
        read_documents(path)
