"""`ragft eval`: score base, base + retrieval, fine-tuned and fine-tuned + retrieval on a question set.

    questions ─▶ retrieval (once, on the driver: the same Index.search_versioned serve calls)
              ─▶ prompts (ragft.rag.prompt_ids: the function serve's ingress calls) + reference-answer labels
              ─▶ fixed batches, one system each ─▶ Ray actors (EvalWorker: greedy answers, answer likelihood)
              ─▶ per-question scores ─▶ splits (all / unchanged / changed) ─▶ report + registry + W&B

Deterministic for a fixed seed: retrieval is exact, decoding greedy, and the batches are fixed before
any actor starts, so which actor runs a batch changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ragft import registry
from ragft.data.rows import Example
from ragft.data.tokenize import encode
from ragft.eval import metrics as m
from ragft.eval.conclusions import conclusions
from ragft.eval.questions import Question, read_questions
from ragft.eval.spec import EvalSpec
from ragft.eval.worker import Answer, EvalWorker, Item
from ragft.model.build import context_length
from ragft.rag import prompt_ids, rag_messages

log = logging.getLogger(__name__)

RATE_METRICS = ("exact_match", "token_f1", "contains")


@dataclass(frozen=True)
class Case:
    """A question as eval needs it: with what changed since training and what retrieval found."""

    question: Question
    changed: Optional[bool]
    old_answer: Optional[str]


def run_eval(spec: EvalSpec, progress=print) -> dict:
    """Score the systems of `spec`, write the report into `spec.out_dir`, record the scores; the result dict."""
    started = time.time()
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = load_cases(spec)
    progress(f"ragft eval: {len(cases)} questions × {len(spec.systems)} systems ({', '.join(spec.systems)}); "
             f"checkpoint {spec.checkpoint} ({spec.ft_kind}), base {spec.base} → {out}")
    version, hits = retrieve(spec, [c.question for c in cases])
    if version is not None:
        progress(f"retrieved {spec.rag.k} chunks per question from {spec.index_path} (version {version})")
    batches = make_batches(spec, cases, hits)
    answers = run_batches(spec, batches, progress)
    result = build_result(spec, cases, hits, answers, version, time.time() - started)
    from ragft.eval.report import write_report

    paths = write_report(result, out)
    record(spec, result, paths)
    if spec.tracking.name == "wandb":
        log_wandb(spec, result)
    progress(summary_table(result))
    progress(f"report: {paths['md']}")
    return result


def load_cases(spec: EvalSpec) -> list[Case]:
    read = read_questions(spec.qa.path, spec.qa.on_bad_row)
    if read.skipped:
        print(f"ragft eval: skipped {len(read.skipped)} bad question rows (first: {read.skipped[0]})", file=sys.stderr)
    questions = read.questions[:spec.eval.max_questions] if spec.eval.max_questions else read.questions
    old: dict[str, Question] = {}
    if spec.qa.changed_from:
        old = {q.id: q for q in read_questions(spec.qa.changed_from, spec.qa.on_bad_row).questions}
        return [Case(q, q.id not in old or m.normalize(old[q.id].answer) != m.normalize(q.answer),
                     old[q.id].answer if q.id in old else None) for q in questions]
    flags = [q.extra.get("changed") for q in questions]
    if all(isinstance(f, bool) for f in flags):  # the file says itself which answers changed
        return [Case(q, f, None) for q, f in zip(questions, flags)]
    return [Case(q, None, None) for q in questions]


def retrieve(spec: EvalSpec, questions: Sequence[Question]):
    if not spec.uses_retrieval:
        return None, [[] for _ in questions]
    from ragft.index.index import Index

    index = Index.open(spec.index_path, spec.retrieval, device=spec.index_device)
    return index.search_versioned([q.question for q in questions], spec.rag.k, mode=spec.rag.mode)


def make_batches(spec: EvalSpec, cases: Sequence[Case], hits: Sequence[list]) -> list[list[Item]]:
    """Fixed batches of `eval.batch_size` items, one system per batch (RAG prompts are longer: a batch of
    one kind keeps padding and per-answer latency honest)."""
    from ragft.model.build import load_tokenizer

    tokenizer = load_tokenizer(spec.base)
    context = context_length(spec.base)
    batches = []
    for system in spec.systems:
        items = []
        for case, found in zip(cases, hits):
            q = case.question
            used = found if system.endswith("_rag") else []
            messages = [{"role": "user", "content": q.question}]
            prompt = prompt_ids(tokenizer, messages, used, spec.rag)
            score_ids, score_labels = (), ()
            if spec.eval.perplexity:
                full = rag_messages(messages, used, spec.rag) + [{"role": "assistant", "content": q.answer}]
                enc = encode(Example(kind="chat", messages=tuple(full), origin=q.origin), tokenizer, context)
                score_ids, score_labels = tuple(enc.input_ids), tuple(enc.labels)
            items.append(Item(f"{q.id}|{system}", system.removesuffix("_rag"), tuple(prompt), score_ids, score_labels))
        batches += [items[i:i + spec.eval.batch_size] for i in range(0, len(items), spec.eval.batch_size)]
    return batches


def run_batches(spec: EvalSpec, batches: list[list[Item]], progress) -> dict[str, Answer]:
    """Every batch through `eval.num_workers` Ray actors; answers by item key."""
    import ray
    from ray.util import ActorPool

    from ragft.cluster import init_ray

    e = spec.eval
    init_ray(spec.cluster.address if spec.cluster.name == "ray" else None, e.num_workers * e.cpus_per_worker)
    actor = ray.remote(num_cpus=e.cpus_per_worker, num_gpus=1 if e.use_gpu else 0)(EvalWorker)
    workers = [actor.remote(spec.base, spec.checkpoint, spec.ft_kind, device="cuda" if e.use_gpu else "cpu",
                            threads=0 if e.use_gpu else e.cpus_per_worker, max_tokens=e.max_tokens, dtype=e.dtype,
                            engine=e.engine, vllm=dataclasses.asdict(e.vllm))
               for _ in range(min(e.num_workers, len(batches)))]
    answers: dict[str, Answer] = {}
    start = time.time()
    try:
        pool = ActorPool(workers)
        for i, done in enumerate(pool.map(lambda w, b: w.run.remote(b), batches), start=1):
            answers.update((a.key, a) for a in done)
            if i == len(batches) or i % max(1, len(batches) // 10) == 0:
                progress(f"eval: {i}/{len(batches)} batches ({len(answers)} answers, {time.time() - start:.0f} s)")
    finally:
        for w in workers:
            ray.kill(w)
    return answers


def score_answer(case: Case, answer: Answer) -> dict:
    q = case.question
    row = {"text": answer.text, **{name: getattr(m, name)(answer.text, q.answer) for name in RATE_METRICS},
           "stale": None, "latency_s": round(answer.latency_s, 6), "tokens": answer.tokens,
           "prompt_tokens": answer.prompt_tokens,
           "nll": answer.nll, "nll_tokens": answer.nll_tokens}
    if case.changed and case.old_answer is not None:
        row["stale"] = m.exact_match(answer.text, case.old_answer)  # answered what was true at training time
    return row


def aggregate_system(rows: list[dict], retrieval: list[dict] | None) -> dict:
    nll = sum(r["nll"] for r in rows if r["nll"] is not None)
    counted = sum(r["nll_tokens"] for r in rows if r["nll"] is not None)
    latencies = [r["latency_s"] for r in rows]
    out = {name: m.mean(r[name] for r in rows) for name in RATE_METRICS}
    out["stale"] = m.mean(r["stale"] for r in rows)
    out["perplexity"] = math.exp(nll / counted) if counted else None
    for name in ("recall_at_k", "mrr", "citation_accuracy"):
        out[name] = m.mean(r[name] for r in retrieval) if retrieval else None
    out["latency_mean_s"] = m.mean(latencies)
    out["latency_p95_s"] = float(np.percentile(latencies, 95)) if latencies else None
    out["tokens_mean"] = m.mean(r["tokens"] for r in rows)
    out["tokens_total"] = sum(r["tokens"] for r in rows)
    return out


def build_result(spec: EvalSpec, cases: list[Case], hits: list[list], answers: dict[str, Answer],
                 version: Optional[int], wall_s: float) -> dict:
    questions = []
    for case, found in zip(cases, hits):
        q = case.question
        retrieved = [h.doc_id for h in found]
        questions.append({
            "id": q.id, "question": q.question, "answer": q.answer, "old_answer": case.old_answer,
            "changed": case.changed, "doc_ids": list(q.doc_ids), "retrieved_doc_ids": retrieved,
            "retrieval": {"recall_at_k": m.recall_at_k(retrieved, q.doc_ids, spec.rag.k),
                          "mrr": m.reciprocal_rank(retrieved, q.doc_ids),
                          # serve cites every chunk it put in the prompt: these are the citations
                          "citation_accuracy": m.citation_accuracy(retrieved, q.doc_ids)} if found else None,
            "answers": {s: score_answer(case, answers[f"{q.id}|{s}"]) for s in spec.systems},
        })
    splits = {"all": questions}
    if all(c.changed is not None for c in cases):
        splits["unchanged"] = [q for q in questions if not q["changed"]]
        splits["changed"] = [q for q in questions if q["changed"]]
    metrics = {}
    for split, rows in splits.items():
        if not rows:
            continue
        metrics[split] = {s: aggregate_system([q["answers"][s] for q in rows],
                                              [q["retrieval"] for q in rows if q["retrieval"]] if s.endswith("_rag")
                                              else None)
                          for s in spec.systems}
    result = {
        "meta": {"checkpoint": spec.checkpoint, "kind": spec.ft_kind, "run_id": spec.run_id, "step": spec.step,
                 "base": spec.base, "index": spec.index_path, "index_version": version, "questions": spec.qa.path,
                 "changed_from": spec.qa.changed_from, "k": spec.rag.k,
                 "retrieval_mode": spec.rag.mode or spec.retrieval.mode, "seed": spec.seed,
                 "n_questions": len(cases), "batch_size": spec.eval.batch_size, "max_tokens": spec.eval.max_tokens,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(wall_s, 1)},
        "systems": list(spec.systems),
        "metrics": metrics,
        "split_sizes": {split: len(rows) for split, rows in splits.items() if rows},
        "questions": questions,
    }
    result["conclusions"] = conclusions(result)
    return result


def summary_table(result: dict) -> str:
    cols = ("exact_match", "token_f1", "contains", "perplexity", "recall_at_k", "latency_mean_s")
    lines = []
    for split, table in result["metrics"].items():
        lines.append(f"{split} ({result['split_sizes'][split]} questions)")
        lines.append(f"  {'system':<9}" + "".join(f"{c:>15}" for c in cols))
        for system, row in table.items():
            cells = "".join(f"{'-' if row.get(c) is None else format(row[c], '.3f'):>15}" for c in cols)
            lines.append(f"  {system:<9}{cells}")
    return "\n".join(lines + result.get("conclusions", []))


def record(spec: EvalSpec, result: dict, paths: dict) -> None:
    """The checkpoint's scores into the registry as `<system>.<metric>` (all questions) and
    `<system>.<metric>@<split>`, which is what registry.best_metric names."""
    scores = {}
    for split, table in result["metrics"].items():
        suffix = "" if split == "all" else f"@{split}"
        for system, row in table.items():
            scores.update({f"{system}.{k}{suffix}": v for k, v in row.items() if v is not None})
    registry.record(spec.registry.path, spec.checkpoint, metrics=scores,
                    links={"report": str(paths["md"]), "report_json": str(paths["json"])})


def log_wandb(spec: EvalSpec, result: dict) -> None:
    import wandb

    from ragft.eval.report import log_to_wandb

    t = spec.tracking
    run = wandb.init(project=t.project, entity=t.entity, group=t.group or spec.run_id, tags=list(t.tags),
                     mode=t.mode, dir=spec.out_dir, job_type="eval", config=spec.resolved_config,
                     name=f"eval-{spec.run_id or Path(spec.checkpoint).name}")
    try:
        log_to_wandb(result, run)
        (Path(spec.out_dir) / "wandb.json").write_text(json.dumps({"id": run.id, "url": run.url, "mode": t.mode}))
    finally:
        run.finish()
