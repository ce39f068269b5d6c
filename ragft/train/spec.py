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
    ObjectiveConfig,
    StrategyConfig,
    TrackingConfig,
    TrainJobConfig,
)
from ragft.config.validation import cuda_available, first_line, has_module, typed_job_config
from ragft.errors import ConfigError
from ragft.model.precision import cpu_has_bf16, cuda_has_bf16


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
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # sft, or dpo and its settings

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


@dataclass(frozen=True)
class Hardware:
    """What validation knows of the GPUs the job will run on."""

    cuda: bool  # this process sees a CUDA device
    remote_gpus: bool  # the workers' GPUs are a cluster's, not this machine's: a CPU-only head validates GPU jobs


def validate_train(cfg: DictConfig) -> TrainSpec:
    """Check a composed `ragft train` config and build its spec; raise ConfigError with all problems."""
    job: TrainJobConfig = typed_job_config(cfg)
    hardware = Hardware(cuda=cuda_available(),
                        remote_gpus=job.cluster.name in ("ray", "slurm") and job.cluster.use_gpu)
    grad_accum, problems = check_batch(job.train, job.cluster)
    problems += check_method(job.method, job.strategy, job.cluster, hardware)
    problems += check_backend(job.strategy, job.method, job.train)
    problems += check_data(job.data)
    problems += check_objective(job.objective, job.data, job.model)
    model, model_problems = check_model_and_kernels(job, hardware)
    problems += model_problems
    problems += check_memory(job, model, hardware)
    problems += check_cluster(job.cluster)
    problems += check_resume(job)
    if problems:
        raise ConfigError(problems)
    return build_spec(cfg, job, model, grad_accum, hardware)


def check_batch(train: LoopConfig, cluster: ClusterConfig) -> tuple[int, list[str]]:
    """(gradient accumulation steps, problems) of the batch arithmetic, step counts and learning rate."""
    problems = []
    for name in ("micro_batch_size", "grad_accum", "log_every", "eval_every", "save_every", "keep_last"):
        if getattr(train, name) < 1:
            problems.append(f"train.{name}={getattr(train, name)} must be at least 1")
    if cluster.num_workers < 1:
        problems.append(f"cluster.num_workers={cluster.num_workers} must be at least 1")
    grad_accum, batch_problem = derive_grad_accum(train.global_batch_size, train.micro_batch_size, cluster.num_workers,
                                                  train.grad_accum)
    if batch_problem:
        problems.append(batch_problem)
    if train.max_steps == 0 or train.max_steps < -1:
        problems.append(f"train.max_steps={train.max_steps}: use a positive number, or -1 to run train.epochs")
    if train.max_steps == -1 and train.epochs < 1:
        problems.append(f"train.epochs={train.epochs} must be at least 1 when train.max_steps=-1")
    if train.lr <= 0:
        problems.append(f"train.lr={train.lr} must be positive")
    if not 0 <= train.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio={train.warmup_ratio} must be in [0, 1)")
    return grad_accum, problems


def check_method(method: MethodConfig, strategy: StrategyConfig, cluster: ClusterConfig,
                 hardware: Hardware) -> list[str]:
    """What stops the method and the DeepSpeed strategy from running on the hardware the job gets."""
    problems = []
    if method.name == "qlora":
        if not (hardware.cuda or hardware.remote_gpus):
            problems.append("method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); none is visible here")
        if not has_module("bitsandbytes"):
            problems.append("method=qlora needs bitsandbytes: pip install 'ragft[qlora]'")
        if strategy.zero_stage == 3:
            problems.append("method=qlora cannot be combined with ZeRO-3 (4-bit weights cannot be partitioned); "
                            "use strategy=zero2 or ddp")
    if method.name in ("lora", "qlora") and method.r < 1:
        problems.append(f"method.r={method.r} must be at least 1")
    if cluster.use_gpu and not hardware.cuda and cluster.name == "local":
        problems.append("cluster.use_gpu=true but no CUDA GPU is visible on this machine")
    if strategy.zero_stage not in (0, 1, 2, 3):
        problems.append(f"strategy.zero_stage={strategy.zero_stage} must be 0, 1, 2 or 3")
    if strategy.offload_params and strategy.zero_stage != 3:
        problems.append("strategy.offload_params needs ZeRO stage 3")
    if strategy.offload_optimizer and strategy.zero_stage == 0:
        problems.append("strategy.offload_optimizer needs ZeRO stage 1, 2 or 3")
    if strategy.precision == "bf16" and cluster.use_gpu and not (cuda_has_bf16() or hardware.remote_gpus):
        problems.append("strategy.precision=bf16 needs a GPU with bf16 support (Ampere or newer); use auto or fp32")
    return problems


def check_backend(strategy: StrategyConfig, method: MethodConfig, train: LoopConfig) -> list[str]:
    """What the chosen sharding backend (DeepSpeed or FSDP2) cannot do; each knob names the backend it needs."""
    problems = []
    if strategy.backend == "fsdp2":
        if method.name == "qlora":
            problems.append("method=qlora cannot be combined with strategy=fsdp2 (fully_shard cannot shard "
                            "bitsandbytes 4-bit weights); use strategy=zero2 or ddp")
        for knob in ("offload_optimizer", "offload_params"):
            if getattr(strategy, knob):
                problems.append(f"strategy.{knob} is DeepSpeed's; under strategy=fsdp2 use strategy.cpu_offload=true")
    else:
        if strategy.cpu_offload:
            problems.append(f"strategy.cpu_offload is FSDP2's (strategy={strategy.name} runs DeepSpeed): use "
                            "strategy=zero3_offload, or strategy=fsdp2 strategy.cpu_offload=true")
        if train.compile:
            problems.append(f"train.compile=true needs strategy=fsdp2 (strategy={strategy.name} runs DeepSpeed)")
    return problems


def check_objective(objective: ObjectiveConfig, data: DataConfig, model: ModelConfig) -> list[str]:
    """What `objective=dpo` cannot run with: a loss on prompts, Liger's fused loss, out-of-range settings."""
    if objective.name != "dpo":
        return []
    dpo, problems = objective.dpo, []
    if data.train_on_prompt:
        problems.append("objective=dpo compares replies only: data.train_on_prompt=true has no meaning there")
    if model.kernels == "liger":
        problems.append("objective=dpo needs per-token log-probs, which Liger's fused loss never returns; "
                        "use model.kernels=none or ragft")
    if dpo.beta <= 0:
        problems.append(f"objective.dpo.beta={dpo.beta} must be positive")
    if not 0 <= dpo.label_smoothing < 0.5:
        problems.append(f"objective.dpo.label_smoothing={dpo.label_smoothing} must be in [0, 0.5)")
    if dpo.loss_type == "ipo" and dpo.label_smoothing:
        problems.append("objective.dpo.label_smoothing applies to loss_type=sigmoid only (conservative DPO)")
    return problems


def check_data(data: DataConfig) -> list[str]:
    """The data files exist, and the eval split and sequence length make sense."""
    problems = []
    for key in ("train_path", "eval_path"):
        path = getattr(data, key)
        if path is not None and not Path(path).exists():
            problems.append(f"data.{key}={path} does not exist")
    if data.eval_path is None and not 0 < data.eval_fraction < 1:
        problems.append(f"data.eval_fraction={data.eval_fraction} must be in (0, 1) when data.eval_path is unset")
    if data.max_seq_len < 8:
        problems.append(f"data.max_seq_len={data.max_seq_len} is too short")
    return problems


def check_model_and_kernels(job: TrainJobConfig, hardware: Hardware) -> tuple[ModelConfig, list[str]]:
    """The model config as the run will use it and its problems, probed on the meta device: no weights are
    loaded (a GGUF file is converted once, then cached)."""
    model, problems = resolve_model(job.model, job.cache_dir)
    problems = problems or _check_model(model, job.method, job.data)
    problems += check_kernels(model, job.strategy, cuda=hardware.cuda or hardware.remote_gpus,
                              use_gpu=job.cluster.use_gpu, check_model=not problems)
    return model, problems


def check_cluster(cluster: ClusterConfig) -> list[str]:
    """Where the job runs: Ray Client cannot drive it; a Slurm allocation must be one sbatch can give."""
    problems = []
    if cluster.name == "ray" and str(cluster.address or "").startswith("ray://"):
        problems.append(f"cluster.address={cluster.address}: Ray Client cannot run ragft train (Ray Data and Ray Train "
                        "need the driver on the cluster); run it on a cluster node (cluster.address=auto) or submit "
                        "it as a Ray job: launch/ray/submit.sh http://<head>:8265 <overrides>")
    if cluster.name == "slurm":
        from ragft.train.slurm import check

        problems += check(cluster)
    return problems


def check_memory(job: TrainJobConfig, model: ModelConfig, hardware: Hardware) -> list[str]:
    """A GPU job must fit its GPUs (cluster.gpu_memory_gb) by the memory plan of ragft.model.memory, computed from
    the model's config.json; the refusal names the estimate and the changes that would fit."""
    from ragft.model.memory import knobs_that_fit

    if not job.cluster.use_gpu:
        return []
    planned = memory_plan(job, model, hardware)
    if planned is None or planned[2].fits:
        return []
    shape, setup, plan = planned
    fixes = knobs_that_fit(shape, setup, job.cluster.gpu_memory_gb)
    advice = ("; it would fit with " + ", or ".join(f"{text} (≈{gb:.1f} GB)" for text, gb in fixes) if fixes
              else "; no single change fits it: use more GPUs (cluster.num_workers) or a smaller model")
    states = plan.gb("weights", "gradients", "optimizer states")
    return [f"memory: {plan.summary()} exceeds cluster.gpu_memory_gb={job.cluster.gpu_memory_gb:g}; weights + "
            f"gradients + optimizer states alone are {states:.1f} GB{advice}\n"
            + "\n".join("      " + line for line in plan.table().splitlines())]


def memory_plan(job, model: ModelConfig, hardware: Hardware):
    """(shape, setup, plan) of a train job's per-GPU memory (`job`: a TrainJobConfig or TrainSpec), or None when
    the model's config.json is not on this machine."""
    from ragft.model.memory import shape_of, train_plan, train_setup

    shape = shape_of(model)
    if shape is None:
        return None
    precision = _resolve_precision(str(job.strategy.precision), on_gpu=True,
                                   assume_gpu_bf16=hardware.remote_gpus or not hardware.cuda)
    setup = train_setup(model, job.method, job.strategy, job.train, job.data, job.cluster, precision,
                        objective=str(job.objective.name))
    return shape, setup, train_plan(shape, setup, job.cluster.gpu_memory_gb, name=model.source or model.name)


def plan_table(spec: TrainSpec) -> str:
    """The memory plan of a validated job as a table (`ragft train --plan`)."""
    hardware = Hardware(cuda=cuda_available(), remote_gpus=spec.cluster.name in ("ray", "slurm"))
    planned = memory_plan(spec, spec.model, hardware)
    if planned is None:
        return f"no memory plan: the config.json of model.source={spec.model.source} is not on this machine"
    note = "" if spec.cluster.use_gpu else "\n  (cluster.use_gpu=false: a CPU job, not checked against it)"
    return planned[2].table() + note


def check_resume(job: TrainJobConfig) -> list[str]:
    """resume= names a ragft run; without it, out_dir must not hold another run's checkpoints."""
    problems = []
    if job.resume is not None and not (Path(job.resume) / "spec.json").is_file():
        problems.append(f"resume={job.resume} is not a ragft train run (no spec.json there)")
    if job.resume is None and any(Path(job.out_dir, "checkpoints").glob("[0-9]*")):
        problems.append(f"out_dir={job.out_dir} already holds checkpoints: pass resume={job.out_dir} to continue "
                        f"that run, or choose another out_dir")
    return problems


def build_spec(cfg: DictConfig, job: TrainJobConfig, model: ModelConfig, grad_accum: int,
               hardware: Hardware) -> TrainSpec:
    """The spec of a validated config: absolute paths, the run id (a resumed run keeps its own), precision."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    on_gpu = job.cluster.use_gpu and (hardware.cuda or hardware.remote_gpus)
    return TrainSpec(
        run_id=_previous_run_id(job.resume) or _run_id(),
        out_dir=str(Path(job.out_dir).resolve()),
        cache_dir=str(Path(os.path.expanduser(job.cache_dir)).resolve()),
        registry_path=str(Path(job.registry.path).expanduser().resolve()),
        model=model,
        method=job.method,
        strategy=job.strategy,
        data=job.data,
        cluster=job.cluster,
        tracking=job.tracking,
        train=job.train,
        objective=job.objective,
        seed=job.seed,
        resume=job.resume,
        grad_accum=grad_accum,
        precision=_resolve_precision(job.strategy.precision, on_gpu, assume_gpu_bf16=hardware.remote_gpus),
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
        return model, [f"model.gguf_file={model.gguf_file}: cannot convert it ({first_line(err)})"]
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
            return [f"model.source={model.source}: cannot load its config ({first_line(err)})"]
    if method.name in ("lora", "qlora") and names:
        missing = [t for t in method.target_modules if t not in names]
        if missing:
            linear = sorted(n for n in names if n.endswith("proj") or n in ("fc1", "fc2", "c_attn", "c_proj"))
            problems.append(
                f"method.target_modules: {missing} not found in model {model.name}; "
                f"its projection modules are {linear}"
            )
    return problems


def check_kernels(model: ModelConfig, strategy: StrategyConfig, cuda: bool, use_gpu: bool,
                  check_model: bool = True) -> list[str]:
    """What stops `model.kernels` from running here: an unknown name, Liger without its package or a GPU, a
    model that is not Llama-family, ZeRO-3 (its partitioned LM head is not handled by the fused loss)."""
    from ragft.kernels.llama import KERNELS, check_supported

    if model.kernels == "none":
        return []
    if model.kernels not in KERNELS:
        return [f"model.kernels={model.kernels!r} is not one of {', '.join(KERNELS)}"]
    problems = []
    if model.kernels == "liger":
        if not has_module("liger_kernel"):
            problems.append("model.kernels=liger needs Liger-Kernel: pip install liger-kernel (its Triton kernels "
                            "run on CUDA GPUs only); or use model.kernels=ragft, which also runs on CPUs")
        if not (cuda and use_gpu):
            problems.append("model.kernels=liger needs a CUDA GPU and cluster.use_gpu=true (Liger-Kernel is Triton "
                            "only); on CPUs use model.kernels=ragft (its torch path) or none")
    if strategy.zero_stage == 3:
        problems.append(f"model.kernels={model.kernels} is not supported with ZeRO-3 (strategy={strategy.name}): "
                        "the fused loss reads the LM head weight whole; use zero2 or model.kernels=none")
    if check_model:
        from ragft.model.build import model_architecture

        try:
            model_type, hidden_act = model_architecture(model)
        except Exception as err:
            return problems + [f"model.source={model.source}: cannot load its config ({first_line(err)})"]
        problems += check_supported(model_type, hidden_act)
    return problems


def _resolve_precision(precision: str, on_gpu: bool, assume_gpu_bf16: bool = False) -> str:
    """auto: bf16 where the device computes it natively (ragft.model.precision); a cluster's GPUs are assumed
    to (pre-Ampere ones need precision=fp32)."""
    if precision == "auto":
        if on_gpu:
            return "bf16" if assume_gpu_bf16 or cuda_has_bf16() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def _previous_run_id(resume: str | None) -> str | None:
    """A resumed run keeps its id, so its checkpoints, metrics and W&B run stay one run."""
    if resume is None:
        return None
    return json.loads((Path(resume) / "spec.json").read_text())["run_id"]


def _run_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
