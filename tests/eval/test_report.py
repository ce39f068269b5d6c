"""The eval report on a hand-made result of five questions and four systems: which values are best
(worked out by hand below), what report.md shows, that report.json round-trips and report.png is a
PNG, and that W&B (offline) gets the tables and the summary keys."""

from __future__ import annotations

import copy
import json
import math
import struct

import pytest

from ragft.eval.report import best_per_metric, disagreements, log_to_wandb, render_markdown, write_report

SYSTEMS = ["base", "base_rag", "ft", "ft_rag"]


def row(em, f1, ppl, lat, p95, tokens, recall=None, mrr=None, cite=None, stale=None):
    return {"exact_match": em, "token_f1": f1, "contains": em, "perplexity": ppl, "latency_mean_s": lat,
            "latency_p95_s": p95, "tokens_mean": tokens, "tokens_total": tokens * 5, "recall_at_k": recall,
            "mrr": mrr, "citation_accuracy": cite, "stale": stale}


def answer(text, em, stale=None):
    return {"text": text, "exact_match": em, "token_f1": em, "contains": em, "stale": stale,
            "latency_s": 0.01, "tokens": 3, "nll": 1.0}


def question(qid, changed, ems, old=None, texts=None):
    texts = texts or ["Drastond" if em else "Krofel" for em in ems]
    return {"id": qid, "question": f"Where does ferry {qid} dock?", "answer": "Drastond", "old_answer": old,
            "changed": changed, "doc_ids": ["ferry-0001"], "retrieved_doc_ids": ["ferry-0001", "ferry-0203"],
            "answers": {s: answer(t, em) for s, t, em in zip(SYSTEMS, texts, ems)}}


@pytest.fixture
def result():
    # exact match per question, in SYSTEMS order; q-2 and q-4 agree, the others do not
    questions = [
        question("q-1", False, [0.0, 1.0, 1.0, 1.0], texts=["Krofel | Yard\nnext line", "Drastond", "Drastond",
                                                             "Drastond"]),
        question("q-2", False, [1.0, 1.0, 1.0, 1.0]),
        question("q-3", True, [0.0, 1.0, 0.0, 1.0], old="Krofel"),
        question("q-4", True, [0.0, 0.0, 0.0, 0.0], old="Krofel"),
        question("q-5", False, [0.0, 0.0, 1.0, 0.0]),
    ]
    retrieval = {"recall": 0.75, "mrr": 0.625, "cite": 0.5}
    return {
        "meta": {"checkpoint": "/abs/ckpt", "base": "/abs/base", "index": "/abs/index", "index_version": 2,
                 "questions": "/abs/qa.jsonl", "changed_from": None, "seed": 0, "k": 4, "retrieval_mode": "hybrid",
                 "n_questions": 5, "wall_s": 1.5},
        "systems": SYSTEMS,
        "metrics": {
            "all": {"base": row(0.2, 0.3, 1234.56, 0.010, 0.020, 5.0),
                    "base_rag": row(0.6, 0.7, 12.5, 0.030, 0.050, 4.0, **retrieval),
                    "ft": row(0.6, 0.65, 3.25, 0.010, 0.015, 3.0),
                    "ft_rag": row(0.6, 0.5, 4.0, 0.040, 0.060, 3.0, **retrieval)},
            "unchanged": {"base": row(1 / 3, 0.4, 900.0, 0.010, 0.020, 5.0),
                          "base_rag": row(2 / 3, 0.8, 11.0, 0.030, 0.050, 4.0, **retrieval),
                          "ft": row(1.0, 1.0, 2.5, 0.010, 0.015, 3.0),
                          "ft_rag": row(2 / 3, 0.6, 3.0, 0.040, 0.060, 3.0, **retrieval)},
            "changed": {"base": row(0.0, 0.1, 1500.0, 0.010, 0.020, 5.0, stale=0.0),
                        "base_rag": row(0.5, 0.5, 14.0, 0.030, 0.050, 4.0, stale=0.0, **retrieval),
                        "ft": row(0.0, 0.1, 4.5, 0.010, 0.015, 3.0, stale=0.5),
                        "ft_rag": row(0.5, 0.4, 5.0, 0.040, 0.060, 3.0, stale=0.0, **retrieval)},
        },
        "split_sizes": {"all": 5, "unchanged": 3, "changed": 2},
        "questions": questions,
        "conclusions": ["unchanged facts: ft beats base (exact match 1.000 vs 0.333)"],
    }


def section(markdown: str, heading: str) -> str:
    """The text under `## heading` up to the next `## `."""
    return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def table_row(text: str, system: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {system} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_best_per_metric_directions_ties_and_none(result):
    best = best_per_metric(result["metrics"]["all"])
    assert best["exact_match"] == {"base_rag", "ft", "ft_rag"}  # a three-way tie: all best
    assert best["token_f1"] == {"base_rag"}
    assert best["perplexity"] == {"ft"}  # lower is better
    assert best["latency_mean_s"] == {"base", "ft"}  # lower is better, tied
    assert best["latency_p95_s"] == {"ft"}
    assert best["recall_at_k"] == {"base_rag", "ft_rag"}  # None (no retrieval) is never best
    assert "stale" not in best  # None for every system
    assert "tokens_mean" not in best and "tokens_total" not in best  # informational
    assert best_per_metric(result["metrics"]["changed"])["stale"] == {"base", "base_rag", "ft_rag"}  # lower: 0.0


def test_best_per_metric_edge_values():
    table = {"a": {"exact_match": 0.1 + 0.2, "perplexity": math.nan, "mrr": None},
             "b": {"exact_match": 0.3, "perplexity": 7.0},  # 0.1 + 0.2 != 0.3 in floats: still a tie
             "c": {"exact_match": None, "perplexity": math.inf}}
    assert best_per_metric(table) == {"exact_match": {"a", "b"}, "perplexity": {"b"}}


def test_markdown_tables(result):
    md = render_markdown(result)
    assert md.startswith("# ragft eval report\n")
    assert "- checkpoint: `/abs/ckpt`" in md and "- changed_from: –" in md
    assert "- unchanged facts: ft beats base (exact match 1.000 vs 0.333)" in section(md, "conclusions")
    assert md.index("## all questions (5)") < md.index("## unchanged questions (3)") < md.index(
        "## changed questions (2)")

    everything = section(md, "all questions (5)")
    header = everything.strip().splitlines()[0]
    assert header == ("| system | exact match | token F1 | contains | perplexity | recall@4 | MRR | citation acc. "
                      "| latency mean (ms) | latency p95 (ms) | tokens mean |")  # no stale: None everywhere
    base, ft, ft_rag = (table_row(everything, s) for s in ("base", "ft", "ft_rag"))
    assert base == ["base", "0.200", "0.300", "0.200", "1234.6", "–", "–", "–", "**10.0**", "20.0", "5.0"]
    assert ft[1] == "**0.600**" and ft[4] == "**3.25**" and ft[9] == "**15.0**"
    assert ft_rag[1] == "**0.600**" and ft_rag[5] == "**0.750**" and ft_rag[4] == "4.00"

    changed = section(md, "changed questions (2)")
    assert "| stale |" in changed.splitlines()[1]
    assert table_row(changed, "ft")[4] == "0.500" and table_row(changed, "base")[4] == "**0.000**"


def test_markdown_disagreements(result):
    md = section(render_markdown(result), "where the systems disagree")
    assert "3 questions where the systems' exact match differs" in md and "are shown" not in md
    rows = [line for line in md.splitlines() if line.startswith("| q-")]
    assert [r.split(" | ")[0] for r in rows] == ["| q-3", "| q-1", "| q-5"]  # changed first, then file order
    header = next(line for line in md.splitlines() if line.startswith("| id |"))
    assert header == "| id | question | reference answer | old answer | base | base_rag | ft | ft_rag |"
    q1 = rows[1]
    assert "✗ Krofel \\| Yard<br>next line" in q1 and "✓ Drastond" in q1
    unescaped = lambda line: line.replace("\\|", "").count("|")  # noqa: E731
    assert all(unescaped(r) == unescaped(header) for r in rows)


def test_disagreements_lists_changed_first_and_limits(result):
    assert [q["id"] for q in disagreements(result)] == ["q-3", "q-1", "q-5"]
    assert [q["id"] for q in disagreements(result, limit=2)] == ["q-3", "q-1"]
    many = copy.deepcopy(result)
    many["questions"] = [question(f"q-{i:02d}", i % 2 == 0, [0.0, 1.0, 1.0, 1.0]) for i in range(35)]
    assert len(disagreements(many)) == 30
    md = section(render_markdown(many), "where the systems disagree")
    assert "35 questions where the systems' exact match differs; the first 30 are shown" in md
    assert sum(line.startswith("| q-") for line in md.splitlines()) == 30


def test_write_report_files(result, tmp_path):
    paths = write_report(result, tmp_path / "out")
    assert set(paths) == {"json", "md", "png"} and all(p.parent == tmp_path / "out" for p in paths.values())
    assert json.loads(paths["json"].read_text()) == result
    assert paths["md"].read_text() == render_markdown(result)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width > 800 and height > 300


def test_subset_of_systems(result, tmp_path):
    small = copy.deepcopy(result)
    small["systems"] = ["base", "ft"]
    small["metrics"] = {"all": {s: small["metrics"]["all"][s] for s in ("base", "ft")}}
    small["split_sizes"] = {"all": 5}
    for q in small["questions"]:
        q.update(changed=None, old_answer=None, retrieved_doc_ids=[])
        q["answers"] = {s: q["answers"][s] for s in ("base", "ft")}
    del small["conclusions"]
    md = render_markdown(small)
    assert "## unchanged" not in md and "## conclusions" not in md
    assert "recall" not in section(md, "all questions (5)") and "base_rag" not in md
    assert "| id | question | reference answer | base | ft |" in md  # no old answers: no column
    assert [q["id"] for q in disagreements(small)] == ["q-1", "q-5"]  # q-3: base and ft both wrong
    paths = write_report(small, tmp_path)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_log_to_wandb_offline(result, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(mode="offline", dir=tmp_path, project="t")
    try:
        log_to_wandb(result, run)
        summary = dict(run.summary)
        assert summary["ft.exact_match"] == 0.6 and summary["base.perplexity"] == 1234.56
        assert summary["ft.stale@changed"] == 0.5 and "base.recall_at_k" not in summary  # None is not logged
        assert {f"{s}.{m}" for s in SYSTEMS for m in ("exact_match", "token_f1", "latency_mean_s")} <= set(summary)
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
