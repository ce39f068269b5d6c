"""Reading the documents to index: a JSONL file (DESIGN.md §3) or a folder of .txt / .md files.

A JSONL row is `{"id": str, "text": str, "title"?: str, "source"?: str, "metadata"?: object}`; other
keys are ignored. A folder yields one document per file, its id the path relative to the folder.
A row that is not a document becomes a `ragft.jsonl.BadRowError` naming its file and line, the
same error training data raises, so the CLI reports both the same way (exit 2).

Each document carries a content hash of what its chunks and embeddings derive from (title and
text): an update re-embeds a document only when that hash changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ragft.jsonl import JSONL_SUFFIXES, BadRowError, collect_rows, json_object, jsonl_rows


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str | None = None
    source: str | None = None
    metadata: dict = field(default_factory=dict)
    origin: str = ""  # "path:line" or the file, for messages about this document later on

    @property
    def content_hash(self) -> str:
        return content_hash(self.title, self.text)

    def record(self) -> dict:
        """The row stored in an index version's documents.jsonl (origin is where it came from, not what it is)."""
        return {"id": self.id, "hash": self.content_hash, "title": self.title, "source": self.source,
                "metadata": self.metadata, "text": self.text}


@dataclass
class ReadDocuments:
    documents: list[Document]
    skipped: list[BadRowError] = field(default_factory=list)


def content_hash(title: str | None, text: str) -> str:
    # Title is part of what gets embedded (index.prepend_title), so a retitled document is a changed one.
    return hashlib.sha256(f"{title or ''}\0{text}".encode()).hexdigest()


def read_documents(path: str, on_bad_row: str = "error", extensions: tuple[str, ...] = (".txt", ".md")
                   ) -> ReadDocuments:
    """Every document under `path`. `on_bad_row="error"` raises the first BadRowError; "skip" collects them.

    Duplicate ids are bad rows too (the second occurrence, naming the first): an index maps one id
    to one document, and silently keeping either copy would hide a mistake in the corpus.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    rows = _folder_rows(p, extensions) if p.is_dir() else _jsonl_rows(p)
    documents, skipped = collect_rows(
        rows, lambda row, origin: row if isinstance(row, Document) else parse_document(row, origin), on_bad_row,
        str(path), "documents", key=lambda doc: doc.id, key_name="document id")
    return ReadDocuments(documents=documents, skipped=skipped)


def parse_document(row: Any, origin: str) -> Document:
    """The `Document` a decoded JSONL row describes, or BadRowError saying why it describes none."""
    json_object(row, origin)
    doc_id, text = row.get("id"), row.get("text")
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise BadRowError.at(origin, f"'id' must be a non-empty string, got {doc_id!r}")
    if not isinstance(text, str):
        got = "nothing" if text is None else type(text).__name__
        raise BadRowError.at(origin, f"document {doc_id!r}: 'text' must be a string, got {got}")
    if not text.strip():
        raise BadRowError.at(origin, f"document {doc_id!r}: 'text' is empty: nothing to index")
    for key in ("title", "source"):
        if row.get(key) is not None and not isinstance(row[key], str):
            got = type(row[key]).__name__
            raise BadRowError.at(origin, f"document {doc_id!r}: '{key}' must be a string, got {got}")
    metadata = row.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        got = type(metadata).__name__
        raise BadRowError.at(origin, f"document {doc_id!r}: 'metadata' must be an object, got {got}")
    return Document(id=doc_id, text=text, title=row.get("title"), source=row.get("source"),
                    metadata=metadata or {}, origin=origin)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix not in JSONL_SUFFIXES:
        raise BadRowError(str(path), None, f"a corpus file must be JSONL ({', '.join(JSONL_SUFFIXES)}); "
                                           "for .txt / .md files point corpus.path at their folder")
    yield from jsonl_rows(path)


def _folder_rows(folder: Path, extensions: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    for file in files:
        rel = file.relative_to(folder).as_posix()
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            yield f"{file}:{line}", BadRowError(str(file), line, f"not UTF-8 text: {err.reason} at byte {err.start}")
            continue
        if not text.strip():
            yield str(file), BadRowError(str(file), None, "empty file: nothing to index")
            continue
        yield str(file), Document(id=rel, text=text, title=_title(text, file), source=rel, origin=str(file))


def _title(text: str, file: Path) -> str:
    """A Markdown file's first `# heading`, else the file name without its suffix."""
    if file.suffix.lower() == ".md":
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
            if line.strip():
                break
    return file.stem
