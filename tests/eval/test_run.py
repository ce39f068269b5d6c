"""`ragft eval` end to end on the shared local Ray: a tiny base and a LoRA checkpoint, the real sample index.

The models are random (tests/helpers/serve_models.py), so the scores themselves are noise: what is
checked is what the numbers are made of (a perplexity equal to a plain PEFT forward, retrieval
scores equal to the metric functions over the real hits), the splits, the report, the registry and
determinism. What a trained tiny model reaches is pinned in tests/test_demo.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from ragft import registry
from ragft.config.compose import compose_config
from ragft.errors import ConfigError
from ragft.eval import metrics as m
from ragft.eval.run import run_eval
from ragft.eval.spec import validate_eval
from ragft.jsonl import read_rows
from ragft.sample import sample_path

pytestmark = pytest.mark.ray

N = 40  # the first 40 questions of qa_v2.jsonl hold changed and unchanged ones


def compose_eval(tmp_path, *overrides):
    return compose_config("eval", [f"out_dir={tmp_path / 'eval'}", f"registry.path={tmp_path / 'registry.jsonl'}",
                                   f"eval.max_questions={N}", "eval.batch_size=16", *overrides])


@pytest.fixture(scope="module")
def result(ray_cluster, serve_models, sample_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    spec = validate_eval(compose_eval(tmp, f"checkpoint={serve_models.alpha}", f"index.path={sample_index}",
                                      f"qa.path={sample_path('qa_v2.jsonl')}", f"qa.changed_from={sample_path('qa.jsonl')}",
                                      "eval.dtype=float32"))  # the perplexity reference below runs fp32
    return run_eval(spec, progress=lambda line: None), spec, tmp


def test_four_systems_splits_and_report(result):
    got, spec, tmp = result
    assert got["systems"] == ["base", "base_rag", "ft", "ft_rag"]
    sizes = got["split_sizes"]
    assert sizes["all"] == N and sizes["changed"] > 0 and sizes["changed"] + sizes["unchanged"] == N
    for split in ("all", "unchanged", "changed"):
        for system in got["systems"]:
            row = got["metrics"][split][system]
            assert 0 <= row["exact_match"] <= row["contains"] + 1e-9 <= 1 + 1e-9
            assert row["perplexity"] > 1 and row["latency_p95_s"] >= row["latency_mean_s"] * 0.5 > 0
            assert (row["recall_at_k"] is None) == (not system.endswith("_rag"))
    assert got["metrics"]["changed"]["ft"]["stale"] is not None and got["metrics"]["unchanged"]["ft"]["stale"] is None
    for name in ("report.json", "report.md", "report.png"):
        assert (tmp / "eval" / name).stat().st_size > 0
    assert json.loads((tmp / "eval" / "report.json").read_text())["metrics"] == json.loads(json.dumps(got["metrics"]))


def test_changed_split_comes_from_the_old_answers(result):
    got, _, _ = result
    old = {q["id"]: q for q in read_rows(sample_path("qa.jsonl"))}
    for q in got["questions"]:
        assert q["changed"] == (q["id"] not in old or old[q["id"]]["answer"] != q["answer"])
        assert q["old_answer"] == (old[q["id"]]["answer"] if q["id"] in old else None)


def test_retrieval_scores_are_the_metric_functions_over_the_real_hits(result, sample_index):
    from ragft.index.index import Index

    got, spec, _ = result
    hits = Index.open(sample_index, device="cpu").search_many([q["question"] for q in got["questions"]], spec.rag.k)
    recalls = []
    for q, found in zip(got["questions"], hits):
        assert q["retrieved_doc_ids"] == [h.doc_id for h in found]
        recalls.append(m.recall_at_k(q["retrieved_doc_ids"], q["doc_ids"], spec.rag.k))
    assert got["metrics"]["all"]["ft_rag"]["recall_at_k"] == pytest.approx(m.mean(recalls))
    assert got["metrics"]["all"]["ft_rag"]["recall_at_k"] == got["metrics"]["all"]["base_rag"]["recall_at_k"] > 0.5


def test_perplexity_equals_a_plain_peft_forward(result, serve_models):
    """The reference: PeftModel.from_pretrained on the checkpoint, loss over the answer's tokens only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ragft.model.build import load_tokenizer

    got, _, _ = result
    tokenizer = load_tokenizer(str(serve_models.base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(serve_models.base), serve_models.alpha).eval()
    nll, count = 0.0, 0
    for q in got["questions"]:
        messages = [{"role": "user", "content": q["question"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": q["answer"]}], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, start - 1:-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, start:], reduction="sum").item()
        count += ids.shape[1] - start
    # the template closes the answer with its end-of-turn marker: training and eval score it, so does this
    assert got["metrics"]["all"]["ft"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_scores_are_recorded_and_best_resolves(result, serve_models):
    got, spec, _ = result
    entry = registry.resolve(spec.registry.path, "best", "ft_rag.exact_match", "max")
    assert entry.checkpoint == str(serve_models.alpha)
    assert entry.metrics["ft_rag.token_f1"] == pytest.approx(got["metrics"]["all"]["ft_rag"]["token_f1"])
    assert entry.metrics["ft.exact_match@changed"] == pytest.approx(got["metrics"]["changed"]["ft"]["exact_match"])
    assert entry.links["report"].endswith("report.md")


def test_deterministic_with_other_workers_checkpoint_best_and_wandb(result, ray_cluster, serve_models, sample_index, tmp_path):
    got, spec, _ = result
    registry.record(tmp_path / "registry.jsonl", serve_models.beta, metrics={"ft_rag.token_f1": -1.0})
    registry.record(tmp_path / "registry.jsonl", serve_models.alpha, metrics={"ft_rag.token_f1": 2.0})
    again = run_eval(validate_eval(compose_eval(
        tmp_path, "checkpoint=best", f"index.path={sample_index}", f"qa.path={sample_path('qa_v2.jsonl')}",
        f"qa.changed_from={sample_path('qa.jsonl')}", "eval.num_workers=1", "tracking=wandb",
        "tracking.mode=offline", "eval.dtype=float32")), progress=lambda line: None)
    assert again["meta"]["checkpoint"] == str(serve_models.alpha)
    assert json.loads((tmp_path / "eval" / "wandb.json").read_text())["mode"] == "offline"
    assert list((tmp_path / "eval" / "wandb").glob("offline-run-*/run-*.wandb"))
    strip = lambda qs: [{s: {k: v for k, v in a.items() if k != "latency_s"} for s, a in q["answers"].items()}  # noqa
                        for q in qs]
    assert strip(again["questions"]) == strip(got["questions"])


def test_every_config_problem_at_once(tmp_path, serve_models):
    with pytest.raises(ConfigError) as err:
        validate_eval(compose_eval(tmp_path, f"checkpoint={serve_models.alpha}", "eval.systems=[base,rag]",
                                   "index.path=/nonexistent", "eval.batch_size=0", "qa.path=/nope.jsonl",
                                   "rag.template=no-question"))
    text = str(err.value)
    # a closed choice (eval.dtype=fp8) is refused at compose already: tests/config/test_defaults.py
    for needle in ("eval.systems", "index.path=/nonexistent", "eval.batch_size=0", "qa.path=/nope.jsonl", "{question}"):
        assert needle in text


def test_cli_reports_a_bad_question_row_with_its_line(tmp_path, serve_models):
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "q?", "answer": "x"}) + "\n"
                   + json.dumps({"id": "b", "question": "no answer"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "ragft", "eval", f"checkpoint={serve_models.alpha}", f"qa.path={bad}",
                          f"out_dir={tmp_path / 'run'}", f"registry.path={tmp_path / 'r.jsonl'}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert f"{bad}:2" in run.stderr and "answer" in run.stderr
