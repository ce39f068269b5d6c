"""The eval question file: valid rows become Questions; bad rows are reported with file and line."""

from __future__ import annotations

import pytest

from ragft.eval.questions import Question, read_questions
from ragft.jsonl import BadRowError
from ragft.sample import sample_path

GOOD = '{"id": "q1", "question": "Who built it?", "answer": "Krofel Yard", "doc_ids": ["d1"], "topic": "yards"}'
GOOD2 = '{"id": "q2", "question": "Where?", "answer": "Drastond"}'


def write(path, *lines: str):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_questions(tmp_path):
    path = write(tmp_path / "qa.jsonl", GOOD, "", GOOD2)  # a blank line is not a row
    result = read_questions(str(path))
    assert result.skipped == []
    assert result.questions == [
        Question(id="q1", question="Who built it?", answer="Krofel Yard", doc_ids=("d1",), extra={"topic": "yards"},
                 origin=f"{path}:1"),
        Question(id="q2", question="Where?", answer="Drastond", origin=f"{path}:3"),  # no doc_ids: ()
    ]


def test_doc_ids_null_and_repeats(tmp_path):
    path = write(tmp_path / "qa.jsonl",
                 '{"id": "q1", "question": "Q", "answer": "A", "doc_ids": null}',
                 '{"id": "q2", "question": "Q", "answer": "A", "doc_ids": ["b", "a", "b"]}')
    first, second = read_questions(str(path)).questions
    assert first.doc_ids == ()
    assert second.doc_ids == ("b", "a")  # repeats dropped, order kept


@pytest.mark.parametrize("row, reason", [
    ('["q3", "Q", "A"]', "expected a JSON object, got list"),
    ('{"question": "Q", "answer": "A"}', "'id' must be a non-empty string, got None"),
    ('{"id": " ", "question": "Q", "answer": "A"}', "'id' must be a non-empty string"),
    ('{"id": 3, "question": "Q", "answer": "A"}', "'id' must be a non-empty string, got 3"),
    ('{"id": "q3", "answer": "A"}', "question 'q3': 'question' must be a string, got nothing"),
    ('{"id": "q3", "question": "Q"}', "question 'q3': 'answer' must be a string, got nothing"),
    ('{"id": "q3", "question": "Q", "answer": 42}', "'answer' must be a string, got int"),
    ('{"id": "q3", "question": ["Q"], "answer": "A"}', "'question' must be a string, got list"),
    ('{"id": "q3", "question": "", "answer": "A"}', "'question' is empty"),
    ('{"id": "q3", "question": "Q", "answer": "  "}', "'answer' is empty"),
    ('{"id": "q3", "question": "Q", "answer": "A", "doc_ids": "d1"}', "'doc_ids' must be a list of non-empty strings"),
    ('{"id": "q3", "question": "Q", "answer": "A", "doc_ids": ["d1", 2]}', "'doc_ids' must be a list of non-empty"),
    ('{"id": "q3", "question": "Q", "answer": "A", "doc_ids": [""]}', "'doc_ids' must be a list of non-empty"),
    ('{"id": "q1", "question": "Again?", "answer": "A"}', "duplicate question id 'q1' (first at "),
    ('{"id": "q3", "question": "Q"', "invalid JSON"),
])
def test_bad_row_names_file_and_line(tmp_path, row, reason):
    path = write(tmp_path / "qa.jsonl", GOOD, GOOD2, row)
    with pytest.raises(BadRowError) as err:
        read_questions(str(path))
    assert str(err.value).startswith(f"{path}:3: ")
    assert reason in str(err.value)
    assert (err.value.path, err.value.line) == (str(path), 3)


def test_duplicate_names_the_first(tmp_path):
    path = write(tmp_path / "qa.jsonl", GOOD, GOOD2, GOOD)
    with pytest.raises(BadRowError, match=r"duplicate question id 'q1' \(first at .*qa\.jsonl:1\)"):
        read_questions(str(path))


def test_skip_mode_counts_bad_rows(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\n".join([GOOD.encode(), GOOD2.encode(), b'{"id": "q3"}', b"\xff\xfe not utf-8",
                                 GOOD.encode()]) + b"\n")
    result = read_questions(str(path), on_bad_row="skip")
    assert [q.id for q in result.questions] == ["q1", "q2"]
    assert [(e.line, e.reason.split(":")[0]) for e in result.skipped] == [
        (3, "question 'q3'"), (4, "not UTF-8 text"), (5, "duplicate question id 'q1' (first at " + str(path))]


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n\n")
    with pytest.raises(BadRowError, match="no questions") as err:
        read_questions(str(path))
    assert err.value.line is None
    with pytest.raises(BadRowError, match="no questions"):
        read_questions(str(path), on_bad_row="skip")


def test_all_bad_in_skip_mode_is_an_error(tmp_path):
    path = write(tmp_path / "qa.jsonl", '{"id": "q1"}', "[]")
    with pytest.raises(BadRowError, match=r"no questions \(2 bad rows skipped, first: .*qa\.jsonl:1: "):
        read_questions(str(path), on_bad_row="skip")


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="question file not found"):
        read_questions(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        read_questions(str(write(tmp_path / "qa.jsonl", GOOD)), on_bad_row="ignore")


def test_sample_questions():
    path = sample_path("qa.jsonl")
    result = read_questions(path)
    assert len(result.questions) == 387
    assert result.skipped == []
    assert all(q.doc_ids for q in result.questions)
    assert all(set(q.extra) == {"attribute", "changed"} for q in result.questions)
    first = result.questions[0]
    assert (first.id, first.answer, first.doc_ids) == ("q-0001", "Drastond", ("ferry-0001",))
    assert first.extra == {"attribute": "home_port", "changed": False}
    assert first.origin == f"{path}:1"
