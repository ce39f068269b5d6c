"""`ragft data raft`: the config checked (every problem at once), then RAFT rows written (ragft.raft.build)."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ragft.config.schema import RaftJobConfig
from ragft.config.validation import typed_job_config
from ragft.errors import ConfigError
from ragft.index import versions
from ragft.index.spec import check_retrieval
from ragft.rag import check_templates


@dataclass(frozen=True)
class RaftSpec:
    job: RaftJobConfig
    out_path: str
    out_dir: str


def validate_raft(cfg: DictConfig) -> RaftSpec:
    job: RaftJobConfig = typed_job_config(cfg)
    r, problems = job.raft, []
    if not Path(job.qa.path).is_file():
        problems.append(f"qa.path={job.qa.path} does not exist")
    if job.index.path is None or not versions.is_index(job.index.path):
        problems.append(f"index.path={job.index.path} is not a ragft index (build it with `ragft index`)")
    for key in ("closed_book_fraction", "gold_fraction", "counterfactual_fraction", "fresh_fraction"):
        if not 0 <= getattr(r, key) <= 1:
            problems.append(f"raft.{key}={getattr(r, key)} must be within [0, 1]")
    for key in ("k", "copies", "distractor_depth"):
        if getattr(r, key) < 1:
            problems.append(f"raft.{key}={getattr(r, key)} must be at least 1")
    if r.max_questions is not None and r.max_questions < 1:
        problems.append(f"raft.max_questions={r.max_questions} must be at least 1 (or null: every question)")
    problems += check_retrieval(job.retrieval)
    problems += [p.replace("serve.rag.", "rag.") for p in check_templates(job.rag)]
    if problems:
        raise ConfigError(problems)
    return RaftSpec(job, str(Path(r.out_path).expanduser().resolve()), str(Path(job.out_dir).expanduser().resolve()))


def run_raft(spec: RaftSpec, progress=print) -> dict:
    from ragft.eval.questions import read_questions
    from ragft.index.index import Index
    from ragft.raft.build import build_raft, write_raft

    started, job = time.time(), spec.job
    read = read_questions(job.qa.path, job.qa.on_bad_row)
    if read.skipped:
        print(f"ragft data raft: skipped {len(read.skipped)} bad question rows (first: {read.skipped[0]})",
              file=sys.stderr)
    questions = sample_questions(read.questions, job.raft.max_questions, job.seed)
    index = Index.open(job.index.path, job.retrieval, device=job.index.device)
    rows, stats = build_raft(questions, index, job.rag, job.raft, job.seed)
    write_raft(rows, spec.out_path)
    summary = {"out_path": spec.out_path, "questions": len(questions), "questions_read": len(read.questions),
               "skipped": len(read.skipped),
               **stats.to_json(), "seconds": round(time.time() - started, 1)}
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(spec.out_dir) / "raft.json").write_text(json.dumps(summary, indent=2))
    kinds = ", ".join(f"{n} {k}" for k, n in stats.kinds.items())
    sampled = f" (a seeded sample of {len(read.questions)})" if len(questions) < len(read.questions) else ""
    rows = "preference pairs" if job.raft.pairs else "rows"
    progress(f"ragft data raft: {stats.rows} {rows} ({kinds}) from {len(questions)} questions{sampled} and index "
             f"version {stats.index_version} → {spec.out_path}")
    return summary


def sample_questions(questions: list, limit: int | None, seed: int) -> list:
    """At most `limit` of `questions`, drawn with `seed` and kept in file order (all of them when None)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    keep = set(random.Random(f"{seed}:questions").sample(range(len(questions)), limit))
    return [q for i, q in enumerate(questions) if i in keep]
