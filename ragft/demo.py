"""`ragft demo`: the sample pipeline end to end, answering "fine-tune, retrieve, or both?" with numbers.

    index the handbook (v1) ─▶ RAFT rows from the training questions ─▶ train the tiny model (Ray Train)
      ─▶ eval the four systems on v1 ─▶ update the index in place to the handbook v2
      ─▶ eval again, split into changed / unchanged facts ─▶ report.md ─▶ the command that serves the best

Every stage is its own command's config (conf/index.yaml, raft.yaml, train.yaml, eval.yaml) composed
with the overrides conf/demo.yaml lists, and runs through the same validate → run functions the
commands call, in this one process and on one embedded Ray. Nothing here trains or scores by itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ragft.cli import compose_config
from ragft.config.schema import DemoJobConfig


def run_demo(cfg: DictConfig, progress=print) -> dict:
    job: DemoJobConfig = OmegaConf.to_object(cfg)
    out = Path(job.out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    index_path, raft_path = out / "index", out / "data" / "raft.jsonl"
    shared = [f"registry.path={job.registry_path}"]
    started = time.time()
    stages = 7

    def stage(n: int, what: str) -> None:
        progress(f"\n=== ragft demo [{n}/{stages}] {what} (+{time.time() - started:.0f} s)")

    from ragft.data.raft_job import run_raft, validate_raft
    from ragft.config.spec import validate_train
    from ragft.eval.run import run_eval
    from ragft.eval.spec import validate_eval
    from ragft.index.build import run_index, validate_index
    from ragft.train.run import run as run_train

    stage(1, f"index the handbook {job.corpus}")
    run_index(validate_index(compose_config("index", [
        f"corpus.path={job.corpus}", f"index.path={index_path}", f"out_dir={out / 'index_v1'}", *job.index])))

    stage(2, "RAFT training rows from the training questions")
    run_raft(validate_raft(compose_config("raft", [
        f"qa.path={job.train_questions}", f"index.path={index_path}", f"raft.out_path={raft_path}",
        f"out_dir={out / 'data'}", *job.raft])), progress=progress)

    stage(3, "fine-tune the tiny model on them (Ray Train + DeepSpeed)")
    trained = run_train(validate_train(compose_config("train", [
        "data=jsonl", f"data.train_path={raft_path}", f"out_dir={out / 'train'}", *shared, *job.train])))
    checkpoint = trained["final_checkpoint"]

    evals = {}
    stage(4, "evaluate base / base+RAG / fine-tuned / fine-tuned+RAG on the handbook as trained")
    evals["original"] = run_eval(validate_eval(compose_config("eval", [
        f"checkpoint={checkpoint}", f"index.path={index_path}", f"qa.path={job.questions}",
        f"out_dir={out / 'eval_original'}", *shared, *job.eval])), progress=progress)

    stage(5, f"update the index in place to the changed handbook {job.corpus_updated}")
    run_index(validate_index(compose_config("index", [
        f"corpus.path={job.corpus_updated}", f"index.path={index_path}", "index.remove_missing=true",
        f"out_dir={out / 'index_v2'}", *job.index])))

    stage(6, "evaluate again on the updated handbook: changed vs unchanged facts")
    evals["updated"] = run_eval(validate_eval(compose_config("eval", [
        f"checkpoint={checkpoint}", f"index.path={index_path}", f"qa.path={job.questions_updated}",
        f"qa.changed_from={job.questions}", f"out_dir={out / 'eval_updated'}", *shared, *job.eval])),
        progress=progress)

    stage(7, "report")
    summary = write_summary(out, job, trained, evals, time.time() - started)
    progress(Path(summary["report"]).read_text())
    progress(f"serve the best checkpoint:\n  {summary['serve_command']}")
    return summary


def write_summary(out: Path, job: DemoJobConfig, trained: dict, evals: dict, wall_s: float) -> dict:
    """report.md: the headline numbers of both evals and where the full reports are; demo.json: the same."""
    k = next((o.split("=", 1)[1] for o in job.eval if o.startswith("rag.k=")), None)
    serve = (f"ragft serve checkpoint=best registry.path={job.registry_path} index.path={out / 'index'}"
             + (f" serve.rag.k={k}" if k else ""))
    lines = ["# ragft demo: fine-tune, retrieve, or both?", "",
             f"- fine-tuned checkpoint: `{trained['final_checkpoint']}` ({trained['method']}, {trained['steps']} steps, "
             f"{trained['wall_time_s']} s, final loss {trained['metrics'].get('loss')})",
             f"- total time: {wall_s / 60:.1f} min", ""]
    headline = ("exact_match", "token_f1", "contains", "stale", "perplexity")
    for name, result in evals.items():
        lines.append(f"## {name} handbook ({result['meta']['n_questions']} questions; full report: "
                     f"`{Path(result['meta'].get('report', out / ('eval_' + name) / 'report.md'))}`)")
        lines.append("")
        for split, table in result["metrics"].items():
            cols = [c for c in headline if any(row.get(c) is not None for row in table.values())]
            lines.append(f"{split} ({result['split_sizes'][split]}) | " + " | ".join(cols))
            lines.append("---|" + "|".join("---" for _ in cols))
            for system, row in table.items():
                lines.append(f"{system} | " + " | ".join("–" if row.get(c) is None else f"{row[c]:.3f}" for c in cols))
            lines.append("")
        lines += [f"- {c}" for c in result.get("conclusions", [])] + [""]
    lines += ["Serve the best checkpoint (by `registry.best_metric`):", "", f"    {serve}", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    summary = {"out_dir": str(out), "checkpoint": trained["final_checkpoint"], "report": str(report),
               "serve_command": serve, "wall_s": round(wall_s, 1),
               "evals": {name: {"report": str(out / f"eval_{name}" / "report.md"), "metrics": r["metrics"],
                                "conclusions": r.get("conclusions", [])} for name, r in evals.items()}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
