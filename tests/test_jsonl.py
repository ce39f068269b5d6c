"""JSONL files that jobs append to survive a torn last line (node crash, full disk): readers skip it with a
warning naming file and line, the next append starts on a line of its own, and rewrites are atomic."""

from __future__ import annotations

import json

import pytest

from ragft import registry
from ragft.jsonl import append_jsonl, read_records, write_jsonl
from ragft.sweep.report import collect
from ragft.train.loop import truncate_history

TORN = '{"step": 3, "loss": 0.'  # what a crash mid-write leaves: no closing brace, no newline


def history(path, steps, torn=True):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + (TORN if torn else ""))
    return path


def test_reader_skips_a_torn_line_and_names_it(tmp_path):
    path = history(tmp_path / "metrics.jsonl", [1, 2])
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3"):
        assert [r["step"] for r in read_records(path)] == [1, 2]


def test_append_after_a_torn_line_keeps_the_new_row(tmp_path):
    path = history(tmp_path / "metrics.jsonl", [1, 2])
    append_jsonl(path, [{"step": 4, "loss": 0.25}], lock=True)
    with pytest.warns(UserWarning):
        assert [r["step"] for r in read_records(path)] == [1, 2, 4]


def test_resume_truncates_a_history_that_ends_in_a_torn_line(tmp_path):
    path = history(tmp_path / "metrics.jsonl", [1, 2, 3, 4])
    with pytest.warns(UserWarning):
        truncate_history(path, 2)
    assert path.read_text() == "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in [1, 2])
    assert not list(tmp_path.glob(".*.tmp"))  # the rewrite went through a temporary file that was renamed


def test_registry_event_after_a_torn_line_is_not_swallowed(tmp_path):
    path = tmp_path / "registry.jsonl"
    first, second = tmp_path / "ckpt-a", tmp_path / "ckpt-b"
    first.mkdir(), second.mkdir()
    registry.record_checkpoint(path, first, metrics={"train.loss": 1.0})
    with open(path, "a") as f:
        f.write('{"checkpoint": "torn", "ti')  # a writer killed mid-line
    registry.record_checkpoint(path, second, metrics={"train.loss": 0.5})
    assert {e.checkpoint for e in registry.entries(path)} == {str(first), str(second)}


def test_sweep_report_reads_a_trial_whose_history_is_torn(tmp_path):
    trial = tmp_path / "0"
    trial.mkdir()
    history(trial / "metrics.jsonl", [1, 2])
    with pytest.warns(UserWarning):
        [ranked] = collect(tmp_path, "loss", "min")
    assert ranked["value"] == pytest.approx(0.5)


def test_atomic_write_replaces_whole(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}], atomic=True)
    write_jsonl(path, [{"a": 2}, {"a": 3}], atomic=True)
    assert read_records(path) == [{"a": 2}, {"a": 3}]
