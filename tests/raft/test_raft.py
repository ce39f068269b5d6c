"""RAFT rows (ragft.raft.build) built from the shipped training questions and the real sample index."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from ragft.config.schema import RaftConfig, RagConfig
from ragft.raft.build import FreshValues, answer_shape, build_raft, gold_chunks, write_raft
from ragft.data.rows import parse_row
from ragft.eval.questions import read_questions
from ragft.index.index import Index
from ragft.rag import rag_messages
from ragft.sample import sample_path

RAG = RagConfig(k=3)


@pytest.fixture(scope="module")
def index(sample_index):
    return Index.open(sample_index, device="cpu")


@pytest.fixture(scope="module")
def questions():
    return read_questions(sample_path("train_qa.jsonl")).questions[:300]


@pytest.mark.parametrize("answer, shape", [("M-61", "A-9"), ("Krofel Yard", "Aa Aa"), ("1773", "9"),
                                           ("Geipae ochre", "Aa a"), ("Pakrafe Dranafon", "Aa Aa"), ("625", "9")])
def test_answer_shape(answer, shape):
    assert answer_shape(answer) == shape


def test_kinds_follow_the_fractions_and_rows_are_valid_training_rows(index, questions):
    raft = RaftConfig(out_path="unused", k=3, copies=2, closed_book_fraction=0.25, gold_fraction=0.8,
                      counterfactual_fraction=0.5)
    rows, stats = build_raft(questions, index, RAG, raft, seed=0)
    assert stats.rows == len(rows) == 600 and stats.no_gold_span == 0 and stats.index_version == 1
    share = {k: stats.kinds[k] / 600 for k in ("closed_book", "gold", "counterfactual", "distractors")}
    # expected 0.25 / 0.30 / 0.30 / 0.15; 600 draws: within ~4 standard deviations
    assert share["closed_book"] == pytest.approx(0.25, abs=0.07)
    assert share["gold"] == pytest.approx(0.30, abs=0.08) and share["counterfactual"] == pytest.approx(0.30, abs=0.08)
    assert share["distractors"] == pytest.approx(0.15, abs=0.06)
    for i, row in enumerate(rows):
        parse_row(row, f"raft:{i + 1}")  # the training reader accepts every row


def test_each_kind_has_the_context_it_promises(index, questions):
    raft = RaftConfig(out_path="unused", k=3, copies=2)
    rows, _ = build_raft(questions, index, RAG, raft, seed=0)
    by_id = {q.id: q for q in questions}
    chunks = {c.chunk_id: c for c in index.document_chunks(sorted({d for q in questions for d in q.doc_ids}))}
    seen = set()
    for row in rows:
        q, kind = by_id[row["raft"]["question_id"]], row["raft"]["kind"]
        user, reply = row["messages"][-2]["content"], row["messages"][-1]["content"]
        seen.add(kind)
        if kind == "closed_book":
            assert user == q.question and reply == q.answer
            continue
        assert user.startswith(f"Question: {q.question}\nContext:\n[1] ") and "[3] " in user
        assert user.endswith(f"\n\nQuestion: {q.question}")
        gold_texts = [c.text for c in gold_chunks(q, list(chunks.values()))]
        if kind == "gold":
            assert reply == q.answer and any(t in user for t in gold_texts)
        elif kind == "counterfactual":
            # swapped in the reply and in the chunk: same shape, the old value gone from that chunk
            assert reply != q.answer and answer_shape(reply) == answer_shape(q.answer)
            assert any(t.replace(q.answer, reply) in user for t in gold_texts)
        else:
            assert reply == q.answer and not any(t in user for t in gold_texts)
    assert seen == {"closed_book", "gold", "counterfactual", "distractors"}


def test_made_up_values_keep_the_shape_and_are_no_known_answer(questions):
    answers = [q.answer for q in questions]
    fresh = FreshValues(answers)
    assert {"Yard", "M", "ochre"} <= fresh.shared  # parts of an answer's form, kept
    rng = random.Random(0)
    for answer in answers:
        value = fresh.make(rng, answer, avoid=f"the chunk naming {answer}")
        assert value != answer and answer_shape(value) == answer_shape(answer)
        names = [w for w in re.findall(r"[A-Za-z]+", value) if w not in fresh.shared]
        assert all(w.casefold() not in fresh.known for w in names), value  # a new name, not a recalled one
        assert value.endswith(" Yard") == answer.endswith(" Yard")
    assert FreshValues(["1773", "625"]).make(random.Random(1), "1773") == "3914"  # pinned: keyed by the rng


def test_fresh_fraction_swaps_in_made_up_values(index, questions):
    raft = RaftConfig(out_path="unused", k=3, copies=2, gold_fraction=1.0, closed_book_fraction=0.0,
                      counterfactual_fraction=1.0, fresh_fraction=0.5)
    rows, stats = build_raft(questions[:100], index, RAG, raft, seed=0)
    known = {q.answer for q in questions}
    made_up = [r for r in rows if r["messages"][-1]["content"] not in known]
    assert stats.fresh == len(made_up) and 70 <= len(made_up) <= 130  # half of 200, within ~4 sd
    for row in made_up:
        assert row["messages"][-1]["content"] in row["messages"][-2]["content"]  # it is in the context to copy
    plain, _ = build_raft(questions[:100], index, RAG, RaftConfig(out_path="unused", k=3, copies=2), seed=0)
    again, _ = build_raft(questions[:100], index, RAG, RaftConfig(out_path="unused", k=3, copies=2,
                                                                   fresh_fraction=0.0), seed=0)
    assert again == plain  # fresh_fraction=0 draws nothing extra: earlier RAFT files stay as they were


def test_prompt_is_the_one_serve_and_eval_build(index, questions):
    """A row's user turn is rag_messages() over the chunks it names: the served prompt, not a copy of its code."""
    raft = RaftConfig(out_path="unused", k=3, counterfactual_fraction=0.0)
    rows, _ = build_raft(questions[:40], index, RAG, raft, seed=3)
    hits = index.search_many([q.question for q in questions[:40]], 3 + raft.distractor_depth)
    for q, row, found in zip(questions, rows, hits):
        known = {h.chunk_id: h for h in index.document_chunks(q.doc_ids) + found}
        context = [known[c] for c in row["raft"]["chunk_ids"]]
        assert rag_messages([{"role": "user", "content": q.question}], context, RAG) == row["messages"][:-1]


def test_deterministic_and_independent_of_question_order(index, questions):
    raft = RaftConfig(out_path="unused", k=3, copies=2)
    a, _ = build_raft(questions[:50], index, RAG, raft, seed=7)
    b, _ = build_raft(list(reversed(questions[:50])), index, RAG, raft, seed=7)
    key = lambda r: (r["raft"]["question_id"], r["raft"]["copy"])  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key)
    c, _ = build_raft(questions[:50], index, RAG, raft, seed=8)
    assert c != a


def test_cli_writes_rows_and_reports_a_bad_question_line(sample_index, tmp_path):
    bad = tmp_path / "qa.jsonl"
    good = json.dumps({"id": "a", "question": "Who commands the Fousond?", "answer": "x", "doc_ids": ["ferry-0001"]})
    bad.write_text(good + "\n" + json.dumps({"id": "b", "question": "?"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "ragft", "data", "raft", f"qa.path={bad}", f"index.path={sample_index}",
                          f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and f"{bad}:2" in run.stderr, run.stderr
    out = tmp_path / "rows.jsonl"
    write_raft([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], out)
    assert json.loads(out.read_text())["messages"][1]["content"] == "a"


def test_pairs_hold_the_context_value_as_chosen_and_a_stale_or_rival_value_as_rejected(index, questions, tmp_path):
    """raft.pairs=true: every row is a preference row the DPO reader accepts; the chosen value is in the prompt's
    context, the rejected one is not; counterfactual rows reject the answer the chunk held before the swap (the
    stale value), gold rows another question's answer for the same attribute."""
    from ragft.data.pairs import read_pairs

    raft = RaftConfig(out_path="unused", k=3, pairs=True, counterfactual_fraction=0.5)
    rows, stats = build_raft(questions, index, RAG, raft, seed=0)
    assert set(stats.kinds) == {"gold", "counterfactual"} and stats.kinds["counterfactual"] > 50
    assert stats.rows == len(rows) == len(questions) - stats.no_gold_span - stats.no_rejected
    by_id = {q.id: q for q in questions}
    attribute_answers = {}
    for q in questions:
        attribute_answers.setdefault(q.extra["attribute"], set()).add(q.answer)
    for row in rows:
        q, context = by_id[row["raft"]["question_id"]], row["prompt"][-1]["content"]
        assert row["chosen"] in context and row["rejected"] not in context and row["chosen"] != row["rejected"]
        if row["raft"]["kind"] == "counterfactual":
            assert row["raft"]["rejected"] == "stale" and row["rejected"] == q.answer
        else:
            assert row["raft"]["rejected"] == "distractor" and row["chosen"] == q.answer
            assert row["rejected"] in attribute_answers[q.extra["attribute"]]
    pairs, skipped = read_pairs(str(write_raft(rows, tmp_path / "pairs.jsonl")))
    assert len(pairs) == len(rows) and skipped == []
