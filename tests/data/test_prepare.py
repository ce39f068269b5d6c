"""prepare(): tokenizes once per content hash, holds out eval, writes parquet, counts skipped rows.

References: the number of encode() calls (counted, not replaced), the cache folder on disk, the
rows the test wrote, and read_examples/encode/pack run by hand on the same inputs.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ragft.data.prepare as prepare_module
from ragft.config.schema import DataConfig
from ragft.data.pack import pack
from ragft.data.prepare import prepare
from ragft.data.rows import read_examples
from ragft.data.tokenize import encode
from ragft.jsonl import BadRowError

NUM_ROWS = 40


@pytest.fixture
def text_rows(sentences):
    """text_rows(count, seed=0) -> rows {"text": sentence}."""
    return lambda count=NUM_ROWS, seed=0: [{"text": s} for s in sentences(count, seed)]


@pytest.fixture
def encode_calls(monkeypatch) -> list[str]:
    """The origins encode() was called on, in order; the real encode still does the work."""
    calls: list[str] = []

    def counting_encode(example, tokenizer, max_seq_len, train_on_prompt=False):
        calls.append(example.origin)
        return encode(example, tokenizer, max_seq_len, train_on_prompt)

    monkeypatch.setattr(prepare_module, "encode", counting_encode)
    return calls


def test_second_call_with_same_inputs_is_a_cache_hit(tokenizer, write_jsonl, text_rows, tmp_path, encode_calls):
    data = DataConfig(train_path=write_jsonl(text_rows()), max_seq_len=64, eval_fraction=0.1)
    first = prepare(data, tokenizer, str(tmp_path / "cache"), seed=0)
    assert len(encode_calls) == NUM_ROWS

    second = prepare(data, tokenizer, str(tmp_path / "cache"), seed=0)
    assert len(encode_calls) == NUM_ROWS  # nothing tokenized again
    assert second == first
    assert first.train_path == str(tmp_path / "cache" / "data" / first.data_hash[:16] / "train.parquet")
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == [first.data_hash[:16]]  # no temp left


def test_written_rows_match_the_pipeline_run_by_hand(tokenizer, write_jsonl, tmp_path, text_rows):
    data = DataConfig(train_path=write_jsonl(text_rows()), max_seq_len=64, eval_fraction=0.1)
    prepared = prepare(data, tokenizer, str(tmp_path / "cache"), seed=0)
    train, eval_ = pq.read_table(prepared.train_path), pq.read_table(prepared.eval_path)
    for table in (train, eval_):
        assert table.schema == pa.schema([(c, pa.list_(pa.int32())) for c in ("input_ids", "labels", "position_ids")])

    # 10% of 40 examples held out before packing; every example is in exactly one split.
    assert (prepared.num_examples, prepared.num_skipped) == (NUM_ROWS, 0)
    eval_examples = sum(row.count(0) for row in eval_.column("position_ids").to_pylist())
    train_examples = sum(row.count(0) for row in train.column("position_ids").to_pylist())
    assert (train_examples, eval_examples) == (36, 4)
    assert (prepared.num_train_rows, prepared.num_eval_rows) == (train.num_rows, eval_.num_rows)

    # The same rows as packing the train examples by hand, up to the seeded shuffle of rows.
    encoded = [encode(e, tokenizer, 64) for e in read_examples(data.train_path).examples]
    eval_ids = {tuple(ids) for ids in _segments(eval_)}
    by_hand = pack([e for e in encoded if tuple(e.input_ids) not in eval_ids], max_seq_len=64)
    assert sorted(train.column("input_ids").to_pylist()) == sorted(row["input_ids"] for row in by_hand)
    assert prepared.train_tokens == sum(len(row["input_ids"]) for row in by_hand)
    assert prepared.packing_efficiency == pytest.approx(prepared.train_tokens / (train.num_rows * 64))


def test_changed_input_or_setting_gives_a_new_hash(tokenizer, write_jsonl, tmp_path, text_rows):
    cache = str(tmp_path / "cache")
    path = write_jsonl(text_rows())
    base = prepare(DataConfig(train_path=path, max_seq_len=64), tokenizer, cache, seed=0)
    other_seed = prepare(DataConfig(train_path=path, max_seq_len=64), tokenizer, cache, seed=1)
    unpacked = prepare(DataConfig(train_path=path, max_seq_len=64, packing=False), tokenizer, cache, seed=0)
    write_jsonl(text_rows(seed=1))  # same path, new content
    changed = prepare(DataConfig(train_path=path, max_seq_len=64), tokenizer, cache, seed=0)
    hashes = {base.data_hash, other_seed.data_hash, unpacked.data_hash, changed.data_hash}
    assert len(hashes) == 4
    assert unpacked.num_train_rows == 38  # 40 examples, 2 held out (5%), one per row


def test_skip_mode_counts_bad_rows_and_logs_them(tokenizer, write_jsonl, tmp_path, caplog, text_rows):
    long_chat = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    rows = text_rows(10)
    rows[2], rows[5], rows[7] = "not json", {"text": ""}, long_chat  # lines 3, 6 and 8
    path = write_jsonl(rows)
    data = DataConfig(train_path=path, max_seq_len=64, on_bad_row="skip", eval_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="ragft.data.prepare"):
        prepared = prepare(data, tokenizer, str(tmp_path / "cache"), seed=0)
    assert (prepared.num_examples, prepared.num_skipped) == (7, 3)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("skipped 3 bad rows")
    assert f"{path}:3: invalid JSON" in warning and f"{path}:6:" in warning
    assert f"{path}:8: no trainable tokens within data.max_seq_len=64" in warning


def test_error_mode_stops_on_the_first_bad_row(tokenizer, write_jsonl, tmp_path, text_rows):
    rows = text_rows(10)
    rows[3] = {"text": 7}
    path = write_jsonl(rows)
    with pytest.raises(BadRowError, match=rf"^{path}:4: 'text' must be a string"):
        prepare(DataConfig(train_path=path), tokenizer, str(tmp_path / "cache"), seed=0)
    assert not (tmp_path / "cache" / "data").exists() or not any((tmp_path / "cache" / "data").iterdir())


def test_explicit_eval_path_is_used_whole(tokenizer, write_jsonl, tmp_path, text_rows):
    data = DataConfig(
        train_path=write_jsonl(text_rows(20)), eval_path=write_jsonl(text_rows(5, seed=3), "eval.jsonl"),
        max_seq_len=64, packing=False,
    )  # fmt: skip
    prepared = prepare(data, tokenizer, str(tmp_path / "cache"), seed=0)
    assert (prepared.num_train_rows, prepared.num_eval_rows, prepared.num_examples) == (20, 5, 25)


def _segments(table: pa.Table) -> list[list[int]]:
    """The examples of a table of rows, split where position_ids restart."""
    out = []
    for ids, positions in zip(table.column("input_ids").to_pylist(), table.column("position_ids").to_pylist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        out += [ids[lo:hi] for lo, hi in zip(starts, starts[1:])]
    return out
