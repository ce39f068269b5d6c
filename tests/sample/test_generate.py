"""The shipped sample: regenerating it gives the committed bytes, and the data holds its promises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ragft.jsonl import read_rows
from ragft.sample import SAMPLE_DIR, sample_path
from ragft.sample.generate import generate

FILES = ("corpus.jsonl", "corpus_v2.jsonl", "train.jsonl", "train_text.jsonl",
         "train_prompt.jsonl", "train_qa.jsonl", "qa.jsonl", "qa_v2.jsonl")


def _lines(name: str) -> list[str]:
    return (SAMPLE_DIR / name).read_text(encoding="utf-8").splitlines()


def _rows(name: str) -> list[dict]:
    return read_rows(SAMPLE_DIR / name)


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: _rows(name) for name in FILES}


def test_regenerating_gives_the_shipped_bytes(tmp_path: Path):
    written = generate(tmp_path, seed=0)
    assert sorted(written) == sorted(FILES)
    for name in FILES:
        assert written[name].read_bytes() == (SAMPLE_DIR / name).read_bytes(), (
            f"{name} drifted from the generator: run `python -m ragft.sample.generate`"
        )


def test_another_seed_gives_other_data(tmp_path: Path):
    generate(tmp_path, seed=1)
    assert (tmp_path / "corpus.jsonl").read_bytes() != (SAMPLE_DIR / "corpus.jsonl").read_bytes()


def test_files_are_commit_sized():
    assert sum((SAMPLE_DIR / n).stat().st_size for n in FILES) < 3 * 1024 * 1024


def test_sample_path():
    assert sample_path("qa.jsonl") == str(SAMPLE_DIR / "qa.jsonl")
    with pytest.raises(FileNotFoundError, match="ragft.sample.generate"):
        sample_path("nope.jsonl")


def test_corpus_shape(data):
    v1, v2 = data["corpus.jsonl"], data["corpus_v2.jsonl"]
    assert 240 <= len(v1) <= 320
    for docs in (v1, v2):
        ids = [d["id"] for d in docs]
        assert ids == sorted(set(ids))
        for d in docs:
            assert list(d) == ["id", "title", "text", "source", "metadata"]
            assert d["text"] and d["source"].startswith("handbook/ferries/")
        assert len({d["source"] for d in docs}) == len(docs)
    v1_ids, v2_ids = {d["id"] for d in v1}, {d["id"] for d in v2}
    assert 1 <= len(v1_ids - v2_ids) <= 3
    assert 3 <= len(v2_ids - v1_ids) <= 8
    # About 15% of documents change (text and revision only); every other line is byte-identical.
    v1_lines = dict(zip((d["id"] for d in v1), _lines("corpus.jsonl")))
    v2_lines = zip((d["id"] for d in v2), _lines("corpus_v2.jsonl"))
    changed = [json.loads(line) for id_, line in v2_lines if id_ in v1_lines and line != v1_lines[id_]]
    assert 0.10 * len(v1) <= len(changed) <= 0.20 * len(v1)
    by_id = {d["id"]: d for d in v1}
    for d in changed:
        old = by_id[d["id"]]
        assert d["text"] != old["text"] and d["metadata"]["revision"] == 2
        assert {**d, "text": old["text"], "metadata": {**d["metadata"], "revision": 1}} == old


@pytest.mark.parametrize(
    "qa_name, corpus_name", [("qa.jsonl", "corpus.jsonl"), ("qa_v2.jsonl", "corpus_v2.jsonl")]
)
def test_answers_are_in_their_documents(data, qa_name, corpus_name):
    texts = {d["id"]: d["text"] for d in data[corpus_name]}
    qa = data[qa_name]
    assert 300 <= len(qa) <= 420
    assert len({q["id"] for q in qa}) == len(qa)
    for q in qa:
        assert list(q) == ["id", "question", "answer", "doc_ids", "attribute", "changed"]
        assert q["doc_ids"] and all(q["answer"] in texts[d] for d in q["doc_ids"]), q


def test_answers_are_unique_per_attribute(data):
    # Exact match only means something if guessing another ferry's value is wrong.
    seen = {}
    for q in data["qa.jsonl"]:
        other = seen.setdefault((q["attribute"], q["answer"]), q["doc_ids"][0])
        assert other == q["doc_ids"][0], q


def test_changed_questions(data):
    qa, qa_v2 = data["qa.jsonl"], data["qa_v2.jsonl"]
    v2 = {q["id"]: q for q in qa_v2}
    changed = [q for q in qa if q["changed"]]
    assert len(changed) >= 0.10 * len(data["corpus.jsonl"])
    for q in changed:
        assert v2[q["id"]]["answer"] != q["answer"]
    for q in qa:
        if not q["changed"] and q["id"] in v2:
            assert v2[q["id"]] == q
    # Every changed v2 document has its changes asked about.
    v1_docs = {d["id"]: d for d in data["corpus.jsonl"]}
    changed_docs = {d["id"] for d in data["corpus_v2.jsonl"] if d["id"] in v1_docs and d != v1_docs[d["id"]]}
    assert changed_docs == {q["doc_ids"][0] for q in changed}
    # Questions about removed documents are dropped, added documents get questions.
    v2_ids = {d["id"] for d in data["corpus_v2.jsonl"]}
    added = v2_ids - set(v1_docs)
    kept = {q["doc_ids"][0] for q in qa if q["doc_ids"][0] in v2_ids}
    assert {q["doc_ids"][0] for q in qa_v2} == kept | added
    assert all(q["changed"] for q in qa_v2 if q["doc_ids"][0] in added)


def test_train_chat(data):
    train = data["train.jsonl"]
    assert 3000 <= len(train) <= 5000
    held_out = {q["question"] for q in data["qa.jsonl"]} | {q["question"] for q in data["qa_v2.jsonl"]}
    pairs = []
    for ex in train:
        roles = [m["role"] for m in ex["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        question, answer = ex["messages"][-2]["content"], ex["messages"][-1]["content"]
        assert question not in held_out
        pairs.append((question, answer))
    # Every v1 fact asked in qa is trained in several phrasings (one phrasing is known not to stick).
    names = {d["id"]: d["title"].split(" (")[0] for d in data["corpus.jsonl"]}
    for q in data["qa.jsonl"]:
        name = names[q["doc_ids"][0]]
        phrasings = {qu for qu, an in pairs if q["answer"] in an and name in qu}
        assert len(phrasings) >= 3, q


def test_text_and_prompt_formats(data):
    assert [r["text"] for r in data["train_text.jsonl"]] == [d["text"] for d in data["corpus.jsonl"]]
    prompts = data["train_prompt.jsonl"]
    assert 200 <= len(prompts) <= 600
    for r in prompts:
        assert list(r) == ["prompt", "completion"] and r["completion"].strip()


def test_reading_practice_rows_are_answerable_only_from_their_context():
    from ragft.data.rows import parse_row
    from ragft.sample.generate import reading_practice

    rows = reading_practice(200, k=3)
    handbook = set(re.findall(r"\w+", (SAMPLE_DIR / "corpus.jsonl").read_text()))
    first_chunks = 0
    for i, row in enumerate(rows):
        parse_row(row, f"reading:{i}")
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        context, question = user.split("\n\nQuestion: ")
        assert context.startswith(f"Question: {question}\nContext:\n[1] ") and "[3] " in context
        assert answer in context  # copyable ...
        names = [n for n in re.findall(r"\] (\w+) \(", context) if re.search(rf"\b{n}\b", question)]
        assert len(names) == 1 and names[0] not in handbook  # ... and about a ferry training never saw
        first_chunks += context.split("\n[2] ")[0].find(answer) >= 0
    assert 0.6 < first_chunks / len(rows) < 0.95  # mostly first, as retrieval ranks it
    assert reading_practice(200, k=3) == rows
