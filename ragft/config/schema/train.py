"""The schema of `ragft train` (conf/train.yaml): which weights train (method), how DeepSpeed shards them
(strategy), the training data, the optimisation loop, a multirun sweep, and `TrainJobConfig`, which joins
them with the shared model, cluster, tracking and registry sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from ragft.config.schema.choices import (Backend, DataFormat, Direction, DpoLoss, MethodName, Objective, OnBadRow,
                                         Precision, QuantType, Scheduler)
from ragft.config.schema.common import ClusterConfig, ModelConfig, RegistryConfig, TrackingConfig


@dataclass
class MethodConfig:
    """Which weights train: all of them (full) or low-rank adapters (lora / qlora)."""

    name: MethodName = MethodName.lora
    r: int = 16  # rank: more capacity, more memory
    alpha: int = 32  # the update is scaled by alpha / r
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    quant_type: QuantType = QuantType.nf4  # qlora only


@dataclass
class StrategyConfig:
    """How the work is sharded: by DeepSpeed (rendered into its config by ragft.train.deepspeed_config) or by
    PyTorch FSDP2 (ragft.train.fsdp2)."""

    name: str = "zero2"  # ddp | zero1 | zero2 | zero3 | zero3_offload | fsdp2
    backend: Backend = Backend.deepspeed
    zero_stage: int = 2  # 0 = plain data parallel (ddp); DeepSpeed only
    offload_optimizer: bool = False  # DeepSpeed only
    offload_params: bool = False  # DeepSpeed only
    # FSDP2 only: weight shards, gradients and the AdamW step in host memory (fits larger models, slower steps)
    cpu_offload: bool = False
    # auto: bf16 where the device multiplies it natively (Ampere+ GPUs; CPUs with AMX or AVX-512 BF16), else
    # fp32. On GPUs DeepSpeed keeps bf16 weights with fp32 master copies; on CPUs the weights and gradients
    # stay fp32 (gloo reduces them) and the forward pass runs under bf16 autocast.
    precision: Precision = Precision.auto
    grad_clip: float = 1.0
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's own default).
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = 9_223_372_036_854_775_807
    max_live_parameters: int = 1_000_000_000
    reduce_bucket_size: int = 50_000_000


@dataclass
class DataConfig:
    """Training data: JSONL (chat, prompt/completion or text), a datasets folder, or parquet."""

    name: str = "sample"
    train_path: str = MISSING
    eval_path: Optional[str] = None  # when unset, `eval_fraction` of train is held out
    eval_fraction: float = 0.05
    format: DataFormat = DataFormat.auto
    max_seq_len: int = 256
    packing: bool = True  # several examples per row; attention never crosses their boundaries
    # Loss on prompt/user tokens too (Axolotl's train_on_inputs), not only on replies. More signal per token
    # for a model that must still learn the language (a tiny one from scratch); a pretrained chat model
    # fine-tuned this way drifts toward imitating its users.
    train_on_prompt: bool = False
    on_bad_row: OnBadRow = OnBadRow.error  # error: stop with file and line | skip: skip and count
    # A worker keeps its shard in memory after one read when it is smaller than this (MiB); larger
    # shards stream from Ray Data every epoch. See ragft.data.shard.
    worker_cache_mb: int = 1024


@dataclass
class DpoConfig:
    """Direct preference optimisation on {prompt, chosen, rejected} rows (ragft.train.dpo)."""

    beta: float = 0.1  # strength of the pull toward the reference model: lower lets the policy move further
    # conservative DPO: the assumed share of pairs whose labels are flipped (0 = plain DPO; sigmoid only)
    label_smoothing: float = 0.0
    loss_type: DpoLoss = DpoLoss.sigmoid


@dataclass
class ObjectiveConfig:
    """What the loop minimises: sft (next-token loss on replies) or dpo (a preference loss on pairs)."""

    name: Objective = Objective.sft
    dpo: DpoConfig = field(default_factory=DpoConfig)  # read with name=dpo


@dataclass
class LoopConfig:
    """The optimisation loop. Gradient accumulation is derived, never set."""

    max_steps: int = -1  # optimizer steps; -1 means run `epochs` epochs
    epochs: int = 1
    micro_batch_size: int = 8  # rows per worker per forward pass
    # rows per optimizer step over all workers; null derives it as micro_batch_size × workers × grad_accum,
    # so the default fits any world size, while a fixed value keeps the optimisation the same across clusters
    global_batch_size: Optional[int] = None
    grad_accum: int = 1  # micro-batches per optimizer step when global_batch_size is null
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05  # share of steps with linear warmup before the cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    log_every: int = 10
    eval_every: int = 50
    eval_max_batches: int = 20  # per worker; bounds the time one eval pass takes
    save_every: int = 100
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    # torch.compile each decoder layer (strategy=fsdp2 only): faster steps after a compile at start-up
    compile: bool = False


@dataclass
class SweepConfig:
    """A Hydra multirun (`ragft train -m key=a,b ...`): every combination is a trial with its own out_dir under
    the sweep folder, and sweep.json and sweep.md rank them when the sweep ends. Trials run one after another by
    default, as Ray Tune trials with hydra/launcher=ray_tune, or as Slurm jobs with hydra/launcher=submitit_slurm."""

    name: Optional[str] = None  # W&B group of every trial and sweep folder name; null: the sweep folder's name
    metric: str = "eval_loss"  # what trials are ranked (and ASHA-stopped) by: a key of the logged metrics
    mode: Direction = Direction.min
    max_concurrent: int = 2  # Ray Tune launcher: trials running at once (each a whole Ray Train job)
    scheduler: Scheduler = Scheduler.fifo  # fifo: every trial runs to the end | asha: stop trials behind at each rung
    grace_period: int = 1  # asha: evaluations (train.eval_every steps apart) a trial gets before it can be stopped
    reduction_factor: int = 2  # asha: 1/reduction_factor of the trials go on at each rung


@dataclass
class TrainJobConfig:
    """The primary config of `ragft train` (conf/train.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    seed: int = 0
    runs_dir: str = "runs/train"  # where new runs go, and where resume=latest looks
    out_dir: str = MISSING
    resume: Optional[str] = None  # an earlier run's out_dir, or "latest" (expanded by ragft.train.resume)
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # the final checkpoint is registered
    sweep: SweepConfig = field(default_factory=SweepConfig)  # read only by `ragft train -m` (multirun)
    cache_dir: str = "${oc.env:RAGFT_CACHE,${oc.env:HOME}/.cache/ragft}"
