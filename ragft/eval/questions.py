"""Reading the eval question file: one JSON object per line.

A row is `{"id": str, "question": str, "answer": str, "doc_ids"?: [str, ...], ...}`. `doc_ids` are
the gold documents (retrieval metrics need them; answer metrics do not), and any other keys (the
sample's `attribute`, `changed`) are kept in `Question.extra` so reports can break scores down by
them. A row that is not a question becomes a `ragft.jsonl.BadRowError` naming its file and
line, the same error training data and corpora raise, so the CLI reports all three the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragft.jsonl import ON_BAD_ROW, BadRowError, collect_rows, json_object, jsonl_rows

REQUIRED = ("id", "question", "answer")
KNOWN = REQUIRED + ("doc_ids",)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    doc_ids: tuple[str, ...] = ()  # gold documents, in the file's order, without repeats
    extra: dict = field(default_factory=dict)  # every other key of the row, as it was
    origin: str = ""  # "path:line", for messages about this question later on


@dataclass
class ReadQuestions:
    questions: list[Question]
    skipped: list[BadRowError] = field(default_factory=list)


def read_questions(path: str, on_bad_row: str = "error") -> ReadQuestions:
    """Every question in the JSONL file `path`. `on_bad_row="error"` raises the first BadRowError;
    "skip" collects them. A file with no valid question raises either way.

    Duplicate ids are bad rows too (the second occurrence, naming the first): per-question results
    are keyed by id, so two questions sharing one would overwrite each other's scores.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    questions, skipped = collect_rows(jsonl_rows(str(path)), parse_question, on_bad_row, str(path), "questions",
                                      key=lambda q: q.id, key_name="question id")
    return ReadQuestions(questions=questions, skipped=skipped)


def parse_question(row: Any, origin: str) -> Question:
    """The `Question` a decoded row describes, or BadRowError saying why it describes none."""
    json_object(row, origin)
    qid = row.get("id")
    if not isinstance(qid, str) or not qid.strip():
        raise BadRowError.at(origin, f"'id' must be a non-empty string, got {qid!r}")
    for key in ("question", "answer"):
        value = row.get(key)
        if not isinstance(value, str):
            got = "nothing" if value is None else type(value).__name__
            raise BadRowError.at(origin, f"question {qid!r}: '{key}' must be a string, got {got}")
        if not value.strip():
            # An empty answer would score every prediction 0 (or an empty one 1): a broken question, not a hard one.
            raise BadRowError.at(origin, f"question {qid!r}: '{key}' is empty")
    return Question(id=qid, question=row["question"], answer=row["answer"],
                    doc_ids=_doc_ids(row.get("doc_ids"), qid, origin),
                    extra={k: v for k, v in row.items() if k not in KNOWN}, origin=origin)


def _doc_ids(value: Any, qid: str, origin: str) -> tuple[str, ...]:
    """The gold document ids of a row: absent or null means none (answer metrics only)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(d, str) and d.strip() for d in value):
        raise BadRowError.at(origin, f"question {qid!r}: 'doc_ids' must be a list of non-empty strings, got {value!r}")
    # A repeated gold id is the same document: counting it twice would skew recall's denominator.
    return tuple(dict.fromkeys(value))
