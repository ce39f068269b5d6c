"""The validated, frozen job spec that the driver and the worker loop read.

`validate_train` turns a composed Hydra config into a `TrainSpec` or raises
`ConfigError` listing every problem at once; nothing has started when it does.
Values derived from others (gradient accumulation, precision, absolute paths)
are computed here once, so the loop never re-derives them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ragft.config.schema import (
    ClusterConfig,
    DataConfig,
    LoopConfig,
    MethodConfig,
    ModelConfig,
    StrategyConfig,
    TrackingConfig,
    TrainJobConfig,
)
from ragft.model.precision import cpu_has_bf16, cuda_has_bf16

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("auto", "bf16", "fp32")
DATA_FORMATS = ("auto", "jsonl", "hf", "parquet")
TRACKING_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class DataPlan:
    """What the driver learned from the data before workers start."""

    train_path: str  # tokenized (and packed) rows, parquet
    eval_path: str
    num_train_rows: int
    num_eval_rows: int
    steps_per_epoch: int
    total_steps: int
    data_hash: str
    train_tokens: int
    packing_efficiency: float
    num_skipped: int


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run needs; read-only once built."""

    run_id: str
    out_dir: str  # absolute
    cache_dir: str  # absolute
    model: ModelConfig
    method: MethodConfig
    strategy: StrategyConfig
    data: DataConfig
    cluster: ClusterConfig
    tracking: TrackingConfig
    train: LoopConfig
    seed: int
    resume: Optional[str]
    grad_accum: int  # derived: global / (micro * workers), or train.grad_accum when global is unset
    precision: str  # resolved: bf16 | fp32
    config_hash: str
    registry_path: str = ""  # absolute; the final checkpoint is recorded there
    base_model_path: str = ""  # set by the driver: a from_pretrained folder or hub id
    tokenizer_path: str = ""
    plan: Optional[DataPlan] = None  # set by the driver after tokenization
    report_evals: bool = False  # report every evaluation to Ray, not only checkpoints (a Tune trial's ASHA needs them)
    resolved_config: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def world_size(self) -> int:
        return self.cluster.num_workers

    @property
    def global_batch_size(self) -> int:
        """Rows per optimizer step over all workers."""
        return self.train.micro_batch_size * self.world_size * self.grad_accum

    @property
    def is_adapter(self) -> bool:
        return self.method.name in ("lora", "qlora")

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"


def job_of(cfg: DictConfig):
    """The composed config as its schema dataclass (interpolations resolved, types checked), or a
    ConfigError naming every required key left unset: the first step of every command's validation."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError([f"{key} is required (set {key}=...)" for key in missing])
    try:
        return OmegaConf.to_object(cfg)
    except Exception as err:  # an interpolation that cannot resolve, e.g. ${sample:...} of a missing file
        raise ConfigError([_first_line(err)]) from None


def validate_train(cfg: DictConfig) -> TrainSpec:
    """Check a composed `ragft train` config and build its spec; raise ConfigError with all problems."""
    problems: list[str] = []
    job: TrainJobConfig = job_of(cfg)

    cuda = _cuda_available()
    t, cl, m, s, d = job.train, job.cluster, job.method, job.strategy, job.data
    # On a cluster the workers' GPUs are not this machine's: a CPU-only head or login node validates GPU jobs.
    remote_gpus = cl.name in ("ray", "slurm") and cl.use_gpu

    # --- batch arithmetic
    for name in ("micro_batch_size", "grad_accum", "log_every", "eval_every", "save_every", "keep_last"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}={getattr(t, name)} must be at least 1")
    if cl.num_workers < 1:
        problems.append(f"cluster.num_workers={cl.num_workers} must be at least 1")
    grad_accum, batch_problem = derive_grad_accum(t.global_batch_size, t.micro_batch_size, cl.num_workers,
                                                  t.grad_accum)
    if batch_problem:
        problems.append(batch_problem)
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"train.max_steps={t.max_steps}: use a positive number, or -1 to run train.epochs")
    if t.max_steps == -1 and t.epochs < 1:
        problems.append(f"train.epochs={t.epochs} must be at least 1 when train.max_steps=-1")
    if t.lr <= 0:
        problems.append(f"train.lr={t.lr} must be positive")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")

    # --- method and hardware
    if m.name not in METHODS:
        problems.append(f"method.name={m.name!r} is not one of {', '.join(METHODS)}")
    if m.name == "qlora":
        if not (cuda or remote_gpus):
            problems.append("method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); none is visible here")
        if not _has_module("bitsandbytes"):
            problems.append("method=qlora needs bitsandbytes: pip install 'ragft[qlora]'")
        if s.zero_stage == 3:
            problems.append("method=qlora cannot be combined with ZeRO-3 (4-bit weights cannot be partitioned); "
                            "use strategy=zero2 or ddp")
    if m.name in ("lora", "qlora") and m.r < 1:
        problems.append(f"method.r={m.r} must be at least 1")
    if cl.use_gpu and not cuda and cl.name == "local":
        problems.append("cluster.use_gpu=true but no CUDA GPU is visible on this machine")
    if s.zero_stage not in (0, 1, 2, 3):
        problems.append(f"strategy.zero_stage={s.zero_stage} must be 0, 1, 2 or 3")
    if s.offload_params and s.zero_stage != 3:
        problems.append("strategy.offload_params needs ZeRO stage 3")
    if s.offload_optimizer and s.zero_stage == 0:
        problems.append("strategy.offload_optimizer needs ZeRO stage 1, 2 or 3")
    if s.precision not in PRECISIONS:
        problems.append(f"strategy.precision={s.precision!r} is not one of {', '.join(PRECISIONS)}")
    if s.precision == "bf16" and cl.use_gpu and not (cuda_has_bf16() or remote_gpus):
        problems.append("strategy.precision=bf16 needs a GPU with bf16 support (Ampere or newer); use auto or fp32")

    # --- data
    if d.format not in DATA_FORMATS:
        problems.append(f"data.format={d.format!r} is not one of {', '.join(DATA_FORMATS)}")
    for key in ("train_path", "eval_path"):
        path = getattr(d, key)
        if path is not None and not Path(path).exists():
            problems.append(f"data.{key}={path} does not exist")
    if d.on_bad_row not in ("error", "skip"):
        problems.append(f"data.on_bad_row={d.on_bad_row!r} must be error or skip")
    if d.eval_path is None and not 0 < d.eval_fraction < 1:
        problems.append(f"data.eval_fraction={d.eval_fraction} must be in (0, 1) when data.eval_path is unset")
    if d.max_seq_len < 8:
        problems.append(f"data.max_seq_len={d.max_seq_len} is too short")

    # --- model (probed on the meta device: no weights are loaded; a GGUF file is converted once, cached)
    model, model_problems = resolve_model(job.model, job.cache_dir)
    problems += model_problems or _check_model(model, m, d)

    if cl.name not in ("local", "ray", "slurm"):
        problems.append(f"cluster.name={cl.name!r} is not one of local, ray, slurm")
    if cl.name == "ray" and str(cl.address or "").startswith("ray://"):
        problems.append(f"cluster.address={cl.address}: Ray Client cannot run ragft train (Ray Data and Ray Train "
                        "need the driver on the cluster); run it on a cluster node (cluster.address=auto) or submit "
                        "it as a Ray job: launch/ray/submit.sh http://<head>:8265 <overrides>")
    if cl.name == "slurm":
        from ragft.slurm import check

        problems += check(cl)

    # --- tracking and resume
    if job.tracking.name not in ("none", "wandb"):
        problems.append(f"tracking.name={job.tracking.name!r} must be none or wandb")
    if job.tracking.mode not in TRACKING_MODES:
        problems.append(f"tracking.mode={job.tracking.mode!r} is not one of {', '.join(TRACKING_MODES)}")
    if job.resume is not None and not (Path(job.resume) / "spec.json").is_file():
        problems.append(f"resume={job.resume} is not a ragft train run (no spec.json there)")
    if job.resume is None and any(Path(job.out_dir, "checkpoints").glob("[0-9]*")):
        problems.append(f"out_dir={job.out_dir} already holds checkpoints: pass resume={job.out_dir} to continue "
                        f"that run, or choose another out_dir")

    if problems:
        raise ConfigError(problems)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    return TrainSpec(
        run_id=_previous_run_id(job.resume) or _run_id(),
        out_dir=str(Path(job.out_dir).resolve()),
        cache_dir=str(Path(os.path.expanduser(job.cache_dir)).resolve()),
        registry_path=str(Path(job.registry.path).expanduser().resolve()),
        model=model,
        method=m,
        strategy=s,
        data=d,
        cluster=cl,
        tracking=job.tracking,
        train=t,
        seed=job.seed,
        resume=job.resume,
        grad_accum=grad_accum,
        precision=_resolve_precision(s.precision, cl.use_gpu and (cuda or remote_gpus), assume_gpu_bf16=remote_gpus),
        config_hash=config_hash(resolved),
        resolved_config=resolved,
    )


def derive_grad_accum(global_batch: Optional[int], micro: int, workers: int, grad_accum: int) -> tuple[int, str]:
    """(accumulation steps, problem or ""): from `train.global_batch_size` when set, else `train.grad_accum`."""
    per_step = max(micro, 1) * max(workers, 1)
    if global_batch is None:
        return max(grad_accum, 1), ""
    if global_batch < 1 or global_batch % per_step:
        below = global_batch // per_step * per_step
        fits = [n for n in (below, below + per_step, below + 2 * per_step) if n >= per_step]
        return 1, (f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size × "
                   f"cluster.num_workers = {micro} × {workers} = {per_step}: use a multiple of {per_step} "
                   f"({', '.join(map(str, fits))}, ...), or leave it unset (null) for {per_step} × train.grad_accum")
    if grad_accum not in (1, global_batch // per_step):
        return 1, (f"train.grad_accum={grad_accum} contradicts train.global_batch_size={global_batch} "
                   f"({global_batch} / ({micro} × {workers}) = {global_batch // per_step}): set only one of them")
    return global_batch // per_step, ""


def config_hash(resolved: dict) -> str:
    """Hash of what decides the result: everything but where outputs go and the resume pointer."""
    relevant = {k: v for k, v in resolved.items() if k not in ("out_dir", "runs_dir", "resume", "hydra", "registry")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_summary(spec: TrainSpec) -> dict:
    return {k: v for k, v in asdict(spec).items() if k != "resolved_config"}


def resolve_model(model: ModelConfig, cache_dir: str) -> tuple[ModelConfig, list[str]]:
    """The model config with `source` set to the converted folder when `gguf_file` is given (converted on
    first use, then cached by the file's hash), and the problems that stop it."""
    if model.gguf_file is None:
        if not model.source:
            return model, ["model.source is required: a hub id, a local folder, or tiny (or set model.gguf_file)"]
        return model, []
    if not Path(model.gguf_file).is_file():
        return model, [f"model.gguf_file={model.gguf_file} does not exist"]
    from ragft.model.gguf import converted_folder

    try:
        folder = converted_folder(model.gguf_file, os.path.expanduser(cache_dir))
    except Exception as err:  # not a GGUF, or an architecture transformers cannot read from GGUF
        return model, [f"model.gguf_file={model.gguf_file}: cannot convert it ({_first_line(err)})"]
    return replace(model, source=str(folder), tokenizer=model.tokenizer or str(folder)), []


def _check_model(model: ModelConfig, method: MethodConfig, data: DataConfig) -> list[str]:
    from ragft.model.build import module_names, tiny_module_names

    problems = []
    if model.source == "tiny":
        for path in model.tokenizer_corpus:
            if not Path(path).exists():
                problems.append(f"model.tokenizer_corpus: {path} does not exist")
        if not model.tokenizer_corpus:
            problems.append("model=tiny needs model.tokenizer_corpus (JSONL files to train its tokenizer on)")
        if data.max_seq_len > model.max_position_embeddings:
            problems.append(f"data.max_seq_len={data.max_seq_len} exceeds model.max_position_embeddings="
                            f"{model.max_position_embeddings}")
        if model.hidden_size % model.num_heads or model.num_heads % model.num_kv_heads:
            problems.append("model.hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        names = tiny_module_names(model) if not problems else set()
    else:
        try:
            names = module_names(model.source, model)
        except Exception as err:
            return [f"model.source={model.source}: cannot load its config ({_first_line(err)})"]
    if method.name in ("lora", "qlora") and names:
        missing = [t for t in method.target_modules if t not in names]
        if missing:
            linear = sorted(n for n in names if n.endswith("proj") or n in ("fc1", "fc2", "c_attn", "c_proj"))
            problems.append(
                f"method.target_modules: {missing} not found in model {model.name}; "
                f"its projection modules are {linear}"
            )
    return problems


def _resolve_precision(precision: str, on_gpu: bool, assume_gpu_bf16: bool = False) -> str:
    """auto: bf16 where the device computes it natively (ragft.model.precision); a cluster's GPUs are assumed
    to (pre-Ampere ones need precision=fp32)."""
    if precision == "auto":
        if on_gpu:
            return "bf16" if assume_gpu_bf16 or cuda_has_bf16() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _previous_run_id(resume: str | None) -> str | None:
    """A resumed run keeps its id, so its checkpoints, metrics and W&B run stay one run."""
    if resume is None:
        return None
    return json.loads((Path(resume) / "spec.json").read_text())["run_id"]


def _run_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
