"""Preference rows (objective=dpo): each shape of row, the reply-only loss mask, bad rows with file:line, and the
pair rows prepare() writes and caches.

References: encode() on the same prompt and reply as an SFT row (the chosen sequence must be exactly that), the
rows the test wrote, and the cache folder on disk.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ragft.config.schema import DataConfig
from ragft.data.pairs import encode_pair, pair_rows, read_pairs
from ragft.data.prepare import prepare
from ragft.data.rows import parse_row
from ragft.data.tokenize import IGNORE_INDEX, encode
from ragft.jsonl import BadRowError
from ragft.train.dpo import pair_segments

import torch

PROMPT = [{"role": "system", "content": "Answer from the document."}, {"role": "user", "content": "Where is it?"}]


def reply_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX]).strip()


def test_string_prompt_makes_two_prompt_completion_sequences(tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": "The river is", "chosen": " good.", "rejected": " bad.", "id": 7}])
    (pair,), skipped = read_pairs(path)
    assert skipped == []
    encoded = encode_pair(pair, tokenizer, 64)
    expected = encode(parse_row({"prompt": "The river is", "completion": " good."}, "x:1"), tokenizer, 64)
    assert encoded.chosen.input_ids == expected.input_ids and encoded.chosen.labels == expected.labels
    assert reply_text(tokenizer, encoded.chosen).startswith("good.")
    assert reply_text(tokenizer, encoded.rejected).startswith("bad.")


@pytest.mark.parametrize("key", ["prompt", "messages"])
def test_chat_prompt_labels_the_reply_only(tokenizer, write_jsonl, key):
    history = PROMPT + [{"role": "assistant", "content": "Which one?"}, {"role": "user", "content": "The city."}]
    path = write_jsonl([{key: history, "chosen": "In the city.",
                         "rejected": [{"role": "assistant", "content": "On the mountain."}]}])
    (pair,), _ = read_pairs(path)
    encoded = encode_pair(pair, tokenizer, 256)
    # the earlier assistant turn of the history is context, not reply: no loss on it
    assert "Which one?" not in reply_text(tokenizer, encoded.chosen)
    assert reply_text(tokenizer, encoded.chosen).startswith("In the city.")
    assert reply_text(tokenizer, encoded.rejected).startswith("On the mountain.")
    prompt_len = next(i for i, t in enumerate(encoded.chosen.labels) if t != IGNORE_INDEX)
    assert encoded.chosen.input_ids[:prompt_len] == encoded.rejected.input_ids[:prompt_len]


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "Q", "chosen": "a"}, "missing ['rejected']"),
    ({"chosen": "a", "rejected": "b"}, "neither 'prompt' nor 'messages'"),
    ({"prompt": "Q", "messages": [], "chosen": "a", "rejected": "b"}, "both 'prompt' and 'messages'"),
    ({"prompt": "Q", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "must be a string"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant messages only"),
    ({"prompt": PROMPT + [{"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"}, "end before"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "'chosen': messages[0]"),
])
def test_bad_rows_name_file_line_and_reason(write_jsonl, row, reason):
    path = write_jsonl([{"prompt": "Q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(BadRowError) as err:
        read_pairs(path)
    assert err.value.line == 2 and err.value.path == path and reason in err.value.reason, str(err.value)
    pairs, skipped = read_pairs(path, on_bad_row="skip")
    assert len(pairs) == 1 and [e.line for e in skipped] == [2]


def test_prepare_writes_one_row_per_pair_with_two_segments_and_caches_it(tokenizer, write_jsonl, tmp_path, sentences):
    lines = sentences(24)
    rows = [{"prompt": f"{a} Then", "chosen": f" {b}", "rejected": f" {c}"}
            for a, b, c in zip(lines, lines[1:], lines[2:])]
    data = DataConfig(train_path=write_jsonl(rows), eval_fraction=0.2, max_seq_len=48)
    prepared = prepare(data, tokenizer, str(tmp_path), seed=0, objective="dpo")
    assert prepared.num_train_rows + prepared.num_eval_rows == len(rows)
    assert prepared.num_eval_rows == round(0.2 * len(rows))
    sft_hash = prepare(DataConfig(**{**data.__dict__, "train_path": write_jsonl(
        [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows], "sft.jsonl")}),
        tokenizer, str(tmp_path), seed=0).data_hash
    assert prepared.data_hash != sft_hash
    assert prepare(data, tokenizer, str(tmp_path), seed=0, objective="dpo") == prepared  # a cache hit

    table = pq.read_table(prepared.train_path).to_pylist()
    by_first_segment = {}
    for row in table:
        segments = pair_segments(torch.tensor([row["position_ids"]]))[0].tolist()
        assert sorted(set(segments)) == [0, 1] and segments == sorted(segments)  # chosen, then rejected
        by_first_segment[tuple(row["input_ids"][:segments.index(1)])] = row
    expected = pair_rows([encode_pair(p, tokenizer, 48) for p in read_pairs(data.train_path)[0]])
    matched = [r for r in expected if tuple(r["input_ids"][:r["position_ids"].index(0, 1)]) in by_first_segment]
    assert len(matched) == prepared.num_train_rows
    for row in matched:
        written = by_first_segment[tuple(row["input_ids"][:row["position_ids"].index(0, 1)])]
        assert written == row
