"""Sections several commands share: the model (train, demo), where the work runs (train, serve, eval),
experiment tracking (train, eval) and the checkpoint registry (train, serve, eval). Each job schema in the
sibling modules embeds these, so one default holds for every command that reads the section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ragft.config.schema.choices import ClusterName, Direction, Kernels, TrackingMode, TrackingName


@dataclass
class ModelConfig:
    """What to fine-tune. `source=tiny` builds a small Llama from the fields below; `gguf_file` converts a
    llama-architecture GGUF once into a cached HF folder (ragft.model.gguf), which then is the source."""

    name: str = "tiny"  # label written into manifests and W&B
    source: Optional[str] = "tiny"  # "tiny", a hub id, or a local folder for from_pretrained (null with gguf_file)
    gguf_file: Optional[str] = None  # a .gguf file; its weights are de-quantised to fp32, tokenizer included
    tokenizer: Optional[str] = None  # defaults to `source`; ignored for tiny (trained on the corpus)
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False  # trade compute for activation memory on long sequences
    # Training kernels for Llama-family models (ragft.kernels): none (transformers' modules); ragft
    # (chunked linear + cross-entropy, memory-lean RMSNorm / SwiGLU / RoPE: Triton on CUDA, torch on CPU);
    # liger (Liger-Kernel, CUDA only, for comparison).
    kernels: Kernels = Kernels.none
    # Architecture of the tiny model (used only when source=tiny).
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 2048  # size of the BPE tokenizer trained on `tokenizer_corpus`
    tokenizer_corpus: list[str] = field(default_factory=list)  # JSONL files whose strings train it
    max_position_embeddings: int = 1024


@dataclass
class ClusterConfig:
    """Where the workers run: an embedded local Ray (default), a Ray cluster, or Slurm."""

    name: ClusterName = ClusterName.local
    address: Optional[str] = None  # Ray address for cluster=ray: host:6379, or auto on a cluster node
    num_workers: int = 2
    use_gpu: bool = False
    # memory of one GPU in GB (1e9 bytes): a GPU job whose memory plan (ragft.model.memory) exceeds it is refused
    # before anything starts; serve plans vLLM's share of it (serve.vllm.gpu_memory_utilization)
    gpu_memory_gb: float = 80.0
    cpus_per_worker: int = 1
    max_failures: int = 0  # worker restarts from the latest checkpoint before the job fails
    peak_tflops: Optional[float] = None  # per device, for MFU when the GPU is not in ragft's table
    # cluster=slurm: the allocation `ragft train` asks for (ragft.train.slurm renders ragft/templates/ray_train.sbatch).
    # One Slurm task per node runs a Ray node; the training job inside is the same Ray Train job.
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 8  # CPUs per node handed to Ray (Train workers, data readers)
    mem: Optional[str] = None  # per node, sbatch --mem syntax (e.g. 400G); null: the partition's default
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"  # the job's limit; preemption handling starts signal_lead_s before it
    qos: Optional[str] = None
    constraint: Optional[str] = None
    sbatch_extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--exclusive"]
    setup: list[str] = field(default_factory=list)  # shell lines before Ray starts (module load, venv ...)
    # USR1 this long before the limit: checkpoint, requeue, resume on the next run. Give it the time one
    # checkpoint of your model takes to write, with margin.
    signal_lead_s: int = 300
    requeue: bool = True  # false: a preempted/timed-out job checkpoints and ends instead of requeueing
    ray_port: int = 6379  # the head's GCS port inside the allocation
    dry_run: bool = False  # print the rendered sbatch script instead of submitting it


@dataclass
class TrackingConfig:
    """Experiment tracking. Rank 0 only."""

    name: TrackingName = TrackingName.none
    mode: TrackingMode = TrackingMode.offline  # offline writes wandb/offline-run-* for `wandb sync` later
    project: str = "ragft"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    upload_checkpoint: bool = False  # false: the artifact references the checkpoint's path; true: copies it


@dataclass
class RegistryConfig:
    """Where checkpoints and their eval metrics are recorded (ragft.registry), and what `best` means."""

    path: str = "runs/registry.jsonl"  # one file for every run under runs/ (shared storage on a cluster)
    best_metric: str = "ft_rag.token_f1"  # "<system>.<metric>" as `ragft eval` records it
    best_mode: Direction = Direction.max  # min for a loss
