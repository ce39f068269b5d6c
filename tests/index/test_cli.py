"""`ragft index` and `ragft search` as a user runs them: subprocesses, exit codes, stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ragft.sample import sample_path


def ragft(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragft", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_search_prints_json_lines(sample_index, tmp_path, corpus):
    proc = ragft("search", f"index.path={sample_index}", "query=Who currently skippers the ferry Grerel?", "k=3",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits = [json.loads(line) for line in proc.stdout.splitlines()]  # nothing but JSON on stdout
    assert len(hits) == 3
    assert set(hits[0]) == {"doc_id", "chunk_id", "score", "start", "end", "title", "text"}
    assert hits[0]["doc_id"] == "ferry-0009"
    for h in hits:
        assert corpus[h["doc_id"]]["text"][h["start"]:h["end"]] == h["text"]
    assert list(tmp_path.iterdir()) == []  # search writes nothing


def test_index_builds_then_updates_and_reports(tmp_path):
    small = tmp_path / "docs.jsonl"
    lines = open(sample_path("corpus.jsonl")).readlines()
    small.write_text("".join(lines[:6]))
    index = tmp_path / "idx"
    first = ragft("index", f"corpus.path={small}", f"index.path={index}", f"out_dir={tmp_path / 'run1'}",
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"published version 1 → {index}" in first.stdout and "6 added" in first.stdout
    manifest = json.loads((index / "manifest.json").read_text())
    assert (manifest["version"], manifest["documents"]) == (1, 6)

    small.write_text("".join(lines[1:7]))  # ferry-0001 leaves the corpus and is deleted, ferry-0007 is new
    second = ragft("index", f"corpus.path={small}", f"index.path={index}", "index.delete_ids=[ferry-0001]",
                   f"out_dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "published version 2" in second.stdout and "1 added" in second.stdout and "1 deleted" in second.stdout


def test_bad_config_exits_2_listing_every_problem(tmp_path):
    proc = ragft("index", f"corpus.path={tmp_path / 'missing.jsonl'}", f"index.path={tmp_path / 'idx'}",
                 "index.chunk_tokens=64", "index.chunk_overlap=64", "k=0", f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "3 problem(s)" in proc.stderr  # closed choices (index.kind, retrieval.mode) are refused at compose
    for needle in ("corpus.path=", "does not exist", "index.chunk_overlap=64", "k=0"):
        assert needle in proc.stderr, needle
    assert not (tmp_path / "idx").exists()


def test_bad_document_exits_2_with_file_and_line(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "body": "no text"}\n')
    proc = ragft("index", f"corpus.path={docs}", f"index.path={tmp_path / 'idx'}", f"out_dir={tmp_path / 'run'}",
                 cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{docs}:2: document 'b': 'text' must be a string" in proc.stderr
    assert not (tmp_path / "idx" / "manifest.json").exists()
