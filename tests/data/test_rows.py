"""Reading rows: every source format gives the same Examples, and every bad row is located and explained.

Reference: Example objects written out by hand from the rows the test itself wrote.
"""

from __future__ import annotations

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ragft.data.rows import Example, read_examples
from ragft.jsonl import BadRowError

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
PROMPT_COMPLETION = {"prompt": "Two plus two is", "completion": " four."}
TEXT = {"text": "A river runs through the city."}
ROWS = [CHAT, PROMPT_COMPLETION, TEXT]


def expected(source: str) -> list[Example]:
    """The three rows above as Examples whose origins are `source`:1..3."""
    return [
        Example(kind="chat", messages=tuple(CHAT["messages"]), origin=f"{source}:1"),
        Example(kind="prompt_completion", prompt="Two plus two is", completion=" four.", origin=f"{source}:2"),
        Example(kind="text", text="A river runs through the city.", origin=f"{source}:3"),
    ]


def columnar(rows: list[dict]) -> dict[str, list]:
    """Rows as columns, with None where a row lacks a column: how parquet and datasets store mixed rows."""
    names = sorted({key for row in rows for key in row})
    return {name: [row.get(name) for row in rows] for name in names}


def test_jsonl_reads_each_format(write_jsonl):
    path = write_jsonl(ROWS)
    result = read_examples(path)
    assert result.examples == expected(path)
    assert result.skipped == []


def test_save_to_disk_folder_reads_each_format(tmp_path):
    folder = str(tmp_path / "ds")
    datasets.Dataset.from_dict(columnar(ROWS)).save_to_disk(folder)
    assert read_examples(folder).examples == expected(folder)  # auto-detected via dataset_info.json
    assert read_examples(folder, fmt="hf").examples == expected(folder)


def test_parquet_file_and_folder_read_each_format(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    file = folder / "part-0.parquet"
    pq.write_table(pa.Table.from_pydict(columnar(ROWS)), file)
    assert read_examples(str(file)).examples == expected(str(file))
    # A folder of parquet files: rows are numbered per file, in file name order.
    pq.write_table(pa.Table.from_pydict(columnar([TEXT])), folder / "part-1.parquet")
    result = read_examples(str(folder), fmt="parquet")
    assert result.examples[:3] == expected(str(file))
    assert result.examples[3].origin == f"{folder / 'part-1.parquet'}:1"


def test_bad_row_on_line_3_raises_with_file_and_line(write_jsonl):
    path = write_jsonl([TEXT, TEXT, '{"text": "unterminated'])
    with pytest.raises(BadRowError) as info:
        read_examples(path)
    err = info.value
    assert (err.path, err.line) == (path, 3)
    assert str(err).startswith(f"{path}:3: invalid JSON")


def test_bad_parquet_row_reports_row_index_plus_one(tmp_path):
    file = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pydict({"text": ["fine", ""]}), file)
    with pytest.raises(BadRowError, match=r"data\.parquet:2: 'text' is empty"):
        read_examples(str(file))


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("[1, 2]", "expected a JSON object, got list"),
        ({"foo": "bar"}, "unknown row shape with keys ['foo']"),
        ({"text": "x", "prompt": "y", "completion": "z"}, "row mixes formats"),
        ({"text": 42}, "'text' must be a string, got int"),
        ({"text": ""}, "'text' is empty"),
        ({"prompt": "p"}, "missing 'completion'"),
        ({"prompt": "p", "completion": ""}, "'completion' is empty"),
        ({"prompt": ["p"], "completion": "c"}, "'prompt' must be a string, got list"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0] has unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string, got int"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the last message must be an assistant turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "non-empty"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                          {"role": "assistant", "content": "a"}]},
            "messages[1]: a system message may only come first",
        ),
    ],
)
def test_each_kind_of_bad_row_has_a_clear_reason(write_jsonl, row, reason):
    path = write_jsonl([TEXT, row])
    with pytest.raises(BadRowError) as info:
        read_examples(path)
    assert info.value.line == 2
    assert reason in info.value.reason


def test_broken_utf8_is_a_bad_row(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(BadRowError, match=r":2: not UTF-8 text"):
        read_examples(str(path))


def test_skip_counts_bad_rows_and_keeps_good_ones(write_jsonl):
    path = write_jsonl([CHAT, "not json", {"text": ""}, PROMPT_COMPLETION, {"foo": 1}, TEXT, ""])
    result = read_examples(path, on_bad_row="skip")
    assert [e.kind for e in result.examples] == ["chat", "prompt_completion", "text"]
    assert [e.origin for e in result.examples] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert [err.line for err in result.skipped] == [2, 3, 5]  # line 7 is blank: not a row


def test_no_valid_rows_is_an_error_even_when_skipping(write_jsonl, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BadRowError, match="no valid rows"):
        read_examples(str(empty))
    with pytest.raises(BadRowError, match=r"no valid rows \(2 bad rows skipped"):
        read_examples(write_jsonl(["{", {"text": ""}]), on_bad_row="skip")
