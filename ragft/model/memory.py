"""A memory plan per GPU, from the model's `config.json` alone: no weights are read, nothing is downloaded.

Training (`train_plan`) counts, per GPU, in GB (1e9 bytes):
- Model states, after Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models" (section 3.1): mixed-precision Adam keeps 16 bytes per trained parameter, 2 for the bf16 weight, 2 for
  its gradient and 12 for the fp32 master copy and Adam's two moments; ZeRO-1 shards the 12, ZeRO-2 the gradient
  too, ZeRO-3 the weight too (section 5). DeepSpeed also holds an fp32 copy of the gradients it steps on (4 bytes
  per parameter of its partition; under ZeRO-3 one optimizer sub-group of at most 1e9 elements at a time) and,
  under ZeRO-3, the layer it has gathered (4 bytes per parameter of the largest module, as DeepSpeed's own
  `estimate_zero3_model_states_mem_needs` counts it). FSDP2 (ragft.train.fsdp2) keeps fp32 shards of the weights,
  gradients and both moments (16 bytes per parameter over the ranks) and gathers bf16 copies of one decoder layer
  and the next (prefetch) plus the root module (embeddings, LM head), which it keeps gathered between forward and
  backward. Offload moves the optimizer side (and with `offload_params` the weights) to host memory. A LoRA base
  is frozen: its weights only; the adapter matrices train as above.
- Activations, after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (section 4.1, eq. 1: `sbh(34 + 5as/h)` bytes per layer for GPT without tensor parallelism), redone for the
  Llama/Qwen block the same way: per token and layer autograd keeps, for each RMSNorm, its input upcast to fp32
  and its normalized output (4h + 2h bytes: transformers' RMSNorm computes in fp32), and in 16 bits the inputs of
  the QKV and MLP projections (2 × 2h), Q and the attention output (2 × 2·heads·head_dim), K and V
  (2 × 2·kv_heads·head_dim) and the SwiGLU's gate, up, SiLU(gate) and product (4 × 2·intermediate): no dropout
  masks (Llama has none), and no attention-score term (`5as/h`): SDPA / flash attention never store the s × s
  scores. With 16-bit LayerNorms, f = 4h, MHA, GELU and dropout masks the same count gives Korthikanti's 34h.
  With gradient checkpointing each layer keeps only its input (2h per token, Korthikanti's full recomputation)
  while one layer at a time is recomputed with all of the above. In fp32 every 16-bit figure doubles. LoRA with
  dropout adds, per adapter, its dropped-out input and the dropout mask (peft drops out each adapter's input).
- Logits: ragft projects only the labelled positions onto the vocabulary (ragft/train/loss.py); the plan assumes
  every position of every row is labelled (text rows, data.train_on_prompt=true: an upper bound for chat rows,
  whose prompts carry no label), and per labelled position and vocabulary entry 2 bytes of bf16 logits, 4 of their
  fp32 copy, 4 of the log-softmax kept for backward and 4 of its gradient. With a fused loss (model.kernels=ragft
  or liger) logits exist one chunk at a time, about the size of the hidden states.
- Preference tuning (objective=dpo, ragft.train.dpo): a row holds a pair, the chosen and the rejected sequence, so
  activations and logits count twice the tokens of a row; the reference's forward runs without gradients (one
  layer's activations at a time, within the runtime allowance). A full fine-tune adds the frozen reference copy:
  its weights, sharded as the policy's are (ZeRO-3, FSDP2) or whole on every GPU; LoRA's reference is the base
  with the adapters off, so nothing.
- Runtime: 2 GB assumed for the CUDA context, NCCL and the communication buckets.

Serving (`serve_plan`) counts the weights over tensor × pipeline parallel GPUs and the KV cache
(2 × layers × kv_heads × head_dim values per token, kv heads split by tensor parallelism and layers by pipeline
stages) for the model's context length × the sequences the engine runs at once, against vLLM's share of a GPU.

The shapes come from a local model folder, the Hugging Face cache, or the config.json files shipped in
ragft/model/configs for the recipe models (their published values), in that order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

GB = 1e9
SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # <org>--<name>/config.json of the recipe models
RUNTIME_BYTES = 2 * GB  # CUDA context, NCCL and communication buckets (assumed)
DEEPSPEED_SUB_GROUP = 1_000_000_000  # DeepSpeed's default zero_optimization.sub_group_size (ZeRO-3)
QUANTIZED_BYTES = 0.5 + 0.02  # 4-bit NF4 plus its double-quantized constants, per quantized parameter


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer (Llama / Qwen2 / Mistral family: RMSNorm, GQA, SwiGLU)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    context_length: int = 0

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        """From a config.json's dict (a multimodal config's `text_config` when it has one)."""
        c = config.get("text_config") or config
        h, heads = c["hidden_size"], c["num_attention_heads"]
        return cls(hidden_size=h, num_layers=c["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or h // heads,
                   intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                   tied_embeddings=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
                   context_length=c.get("max_position_embeddings") or 0)

    @property
    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer, by module name."""
        h, q, kv, f = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.projections.values())

    @property
    def layer_params(self) -> int:
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layer_linear_params + bias + 2 * self.hidden_size

    @property
    def root_params(self) -> int:
        """Embeddings, final norm and LM head: what sits outside the decoder layers."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.root_params

    @property
    def largest_module_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's "largest layer"): the embedding, as a rule."""
        return max(self.vocab_size * self.hidden_size, *(i * o for i, o in self.projections.values()))

    def lora_params(self, r: int, targets: tuple[str, ...] | list[str]) -> int:
        """Trainable parameters of rank-`r` adapters on the named projections of every layer."""
        return self.num_layers * sum(r * (i + o) for name, (i, o) in self.projections.items() if name in targets)

    def activation_bytes_per_token(self, value_bytes: int) -> int:
        """Bytes one decoder layer keeps for backward per token (module docstring: Korthikanti et al., redone)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        norms = 2 * (4 + value_bytes) * self.hidden_size  # fp32 input and normalized output of both RMSNorms
        return norms + value_bytes * (2 * self.hidden_size + 2 * q + 2 * kv + 4 * self.intermediate_size)

    def kv_bytes_per_token(self, value_bytes: int, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> float:
        """KV cache per token on one GPU: kv heads split over tensor-parallel ranks (replicated when fewer)."""
        kv_heads = max(1, math.ceil(self.num_kv_heads / tensor_parallel))
        return 2 * self.num_layers / pipeline_parallel * kv_heads * self.head_dim * value_bytes


def find_config(source: str, revision: Optional[str] = None) -> Optional[Path]:
    """The folder holding `source`'s config.json: a local folder, the Hugging Face cache, or ragft's shipped copy
    for the recipe models. None when none has it (nothing is downloaded)."""
    if (Path(source).expanduser() / "config.json").is_file():
        return Path(source).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json", revision=revision)
    except Exception:  # not a valid repo id: a path that does not exist
        cached = None
    if isinstance(cached, str):
        return Path(cached).parent
    shipped = SHIPPED_CONFIGS / source.replace("/", "--")
    return shipped if (shipped / "config.json").is_file() and revision in (None, "main") else None


def config_source(source: str, revision: Optional[str] = None) -> str:
    """What to hand `AutoConfig.from_pretrained` for `source`: a folder with its config.json when one is on this
    machine (find_config), else `source` itself (a download, where the hub is reachable)."""
    found = find_config(source, revision)
    return str(found) if found is not None else source


def shape_of(model) -> Optional[Shape]:
    """The Shape of a ModelConfig (ragft.config.schema): tiny from its fields, others from their config.json;
    None when no config.json is on this machine."""
    if model.source == "tiny":
        return Shape(hidden_size=model.hidden_size, num_layers=model.num_layers, num_heads=model.num_heads,
                     num_kv_heads=model.num_kv_heads, head_dim=model.hidden_size // model.num_heads,
                     intermediate_size=model.intermediate_size, vocab_size=model.vocab_size,
                     context_length=model.max_position_embeddings)
    return shape_from_source(model.source, model.revision) if model.source else None


def shape_from_source(source: str, revision: Optional[str] = None) -> Optional[Shape]:
    """The Shape of a model folder or hub id from its config.json (find_config); None when it is not here, or is
    not a decoder-only transformer this module can count (no `intermediate_size`, say)."""
    folder = find_config(source, revision)
    if folder is None:
        return None
    try:
        return Shape.from_config(json.loads((folder / "config.json").read_text()))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


@dataclass(frozen=True)
class Row:
    part: str
    gpu: float  # bytes per GPU
    host: float  # bytes per GPU worker in host memory
    basis: str  # how it was counted


@dataclass(frozen=True)
class Plan:
    title: str
    rows: tuple[Row, ...]
    budget: float  # bytes per GPU the job may use
    budget_source: str  # where the budget comes from, for messages

    @property
    def total(self) -> float:
        return sum(r.gpu for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def gb(self, *parts: str) -> float:
        """GB per GPU of the named rows together."""
        return sum(r.gpu for r in self.rows if r.part in parts) / GB

    def summary(self) -> str:
        """One line: the total and its largest parts."""
        parts = " + ".join(f"{r.part} {r.gpu / GB:.1f}" for r in self.rows if r.gpu >= 0.05 * GB)
        return f"≈{self.total / GB:.1f} GB per GPU ({parts})"

    def table(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        lines = [self.title, f"  {'part':<22}{'GPU GB':>9}{'host GB':>9}  how"]
        for r in self.rows:
            host = f"{r.host / GB:9.1f}" if r.host else f"{'-':>9}"
            lines.append(f"  {r.part:<22}{r.gpu / GB:9.1f}{host}  {r.basis}")
        lines.append(f"  {'total':<22}{self.total / GB:9.1f}{'':9}  of {self.budget / GB:.1f} GB "
                     f"({self.budget_source}): {verdict}")
        return "\n".join(lines)


@dataclass(frozen=True)
class TrainSetup:
    """What besides the shape decides a training job's memory."""

    method: str = "full"  # full | lora | qlora
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_dropout: float = 0.0
    strategy: str = "zero2"  # the strategy group's name, for the table
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp2: bool = False
    fsdp2_offload: bool = False
    precision: str = "bf16"  # bf16 | fp32
    gpus: int = 1
    micro_batch_size: int = 1
    seq_len: int = 2048
    checkpointing: bool = False
    fused_loss: bool = False  # model.kernels=ragft or liger
    preference: bool = False  # objective=dpo: pairs per row, and a frozen reference copy for a full fine-tune


def train_plan(shape: Shape, setup: TrainSetup, gpu_memory_gb: float, name: str = "model") -> Plan:
    """Per-GPU memory of a training job (module docstring: what is counted and after whom)."""
    s, n = setup, max(setup.gpus, 1)
    rows = _fsdp2_states(shape, s, n) if s.fsdp2 else _deepspeed_states(shape, s, n)
    if s.preference and s.method == "full":
        rows.append(_reference_copy(shape, s, n))
    rows += _activation_rows(shape, s)
    rows.append(Row("runtime", RUNTIME_BYTES, 0, "CUDA context, NCCL, communication buckets (assumed)"))
    title = (f"memory plan per GPU: {name} ({shape.params / 1e9:.2f}B parameters), method={s.method}, "
             f"{'objective=dpo, ' if s.preference else ''}"
             f"strategy={s.strategy}, {s.precision}, {n} GPUs, micro batch {s.micro_batch_size} × {s.seq_len} tokens, "
             f"gradient checkpointing {'on' if s.checkpointing else 'off'}")
    return Plan(title, tuple(rows), gpu_memory_gb * GB, "cluster.gpu_memory_gb")


def _trained_and_frozen(shape: Shape, s: TrainSetup) -> tuple[int, int]:
    if s.method == "full":
        return shape.params, 0
    return shape.lora_params(s.lora_r, s.lora_targets), shape.params


def _placed(part: str, nbytes: float, on_host: bool, basis: str) -> Row:
    return Row(part, 0 if on_host else nbytes, nbytes if on_host else 0, basis + (" (host)" if on_host else ""))


def _frozen_bytes(shape: Shape, s: TrainSetup, frozen: int, weight_bytes: int) -> float:
    if s.method != "qlora":
        return frozen * weight_bytes
    quantized = shape.num_layers * shape.layer_linear_params  # bitsandbytes quantizes the decoder's linear layers
    return quantized * QUANTIZED_BYTES + (frozen - quantized) * weight_bytes


def _deepspeed_states(shape: Shape, s: TrainSetup, n: int) -> list[Row]:
    bf16, stage = s.precision == "bf16", s.zero_stage
    w = 2 if bf16 else 4
    trained, frozen = _trained_and_frozen(shape, s)
    over = {k: (n if stage >= k else 1) for k in (1, 2, 3)}

    def shard(k: int) -> str:
        return f"÷ {n} GPUs" if stage >= k and n > 1 else "whole on every GPU"

    weights = (_frozen_bytes(shape, s, frozen, w) + trained * w) / over[3]
    base = " (4-bit base)" if s.method == "qlora" else ""
    optimizer_bytes = 12 if bf16 else 8  # fp32 master + 2 moments; in fp32 the weight is the master
    master = ", fp32 master" if bf16 else ""
    rows = [_placed("weights", weights, s.offload_params,
                    f"{(trained + frozen) / 1e9:.2f}B × {w} B{base}, {shard(3)}"),
            _placed("gradients", trained * w / over[2], s.offload_optimizer,
                    f"{trained / 1e9:.3g}B trained × {w} B, {shard(2)}"),
            _placed("optimizer states", trained * optimizer_bytes / over[1], s.offload_optimizer,
                    f"{trained / 1e9:.3g}B × {optimizer_bytes} B (Adam{master}), {shard(1)}")]
    if bf16:
        partition = trained / over[1]
        fp32_grads = 4 * (min(partition, DEEPSPEED_SUB_GROUP) if stage == 3 else partition)
        rows.append(_placed("fp32 gradients", fp32_grads, s.offload_optimizer,
                            "DeepSpeed's fp32 copy of the gradients it steps on"
                            + (" (one sub-group at a time)" if stage == 3 else f", {shard(1)}")))
    if stage == 3:
        rows.append(Row("gathered layer", 4 * shape.largest_module_params, 0,
                        f"4 B × largest module ({shape.largest_module_params / 1e6:.0f}M), as DeepSpeed counts"))
    return rows


def _fsdp2_states(shape: Shape, s: TrainSetup, n: int) -> list[Row]:
    trained, frozen = _trained_and_frozen(shape, s)
    compute = 2 if s.precision == "bf16" else 4
    off = s.fsdp2_offload
    rows = [_placed("weights", 4 * (trained + frozen) / n, off,
                    f"{(trained + frozen) / 1e9:.2f}B × 4 B fp32 shards ÷ {n}"),
            _placed("gradients", 4 * trained / n, off, f"{trained / 1e9:.3g}B trained × 4 B ÷ {n}"),
            _placed("optimizer states", 8 * trained / n, off, f"{trained / 1e9:.3g}B × 8 B (Adam moments) ÷ {n}")]
    gathered = shape.root_params + 2 * shape.layer_params
    grad = max(shape.root_params, shape.layer_params) if s.method == "full" else 0
    rows.append(Row("gathered layers", compute * (gathered + grad), 0,
                    f"{compute} B × (root + 2 decoder layers{' + one unsharded gradient' if grad else ''})"))
    return rows


def _reference_copy(shape: Shape, s: TrainSetup, n: int) -> Row:
    """objective=dpo, full fine-tune: the frozen reference model, sharded like the policy's weights."""
    if s.fsdp2:
        return Row("reference model", 4 * shape.params / n, 0, f"{shape.params / 1e9:.2f}B × 4 B fp32 shards ÷ {n}")
    w, sharded = (2 if s.precision == "bf16" else 4), s.zero_stage == 3 and n > 1
    return _placed("reference model", w * shape.params / (n if sharded else 1), s.offload_params,
                   f"{shape.params / 1e9:.2f}B × {w} B, frozen, " + (f"÷ {n} GPUs" if sharded else "whole on every GPU"))


def _activation_rows(shape: Shape, s: TrainSetup) -> list[Row]:
    value = 2 if s.precision == "bf16" else 4
    # objective=dpo: a row holds the chosen and the rejected sequence, each up to seq_len tokens
    tokens = s.micro_batch_size * s.seq_len * (2 if s.preference else 1)
    per_layer = shape.activation_bytes_per_token(value)
    if s.method != "full" and s.lora_dropout > 0:
        # each adapter keeps its own dropped-out input (value bytes) and dropout mask (1 byte) for lora_A's backward
        per_layer += (value + 1) * sum(i for name, (i, _) in shape.projections.items() if name in s.lora_targets)
    if s.checkpointing:
        act = tokens * (shape.num_layers * value * shape.hidden_size + per_layer)
        basis = f"{tokens} tokens × ({shape.num_layers} layer inputs × {value}h + one layer recomputed)"
    else:
        act = tokens * shape.num_layers * per_layer
        basis = f"{tokens} tokens × {shape.num_layers} layers × {per_layer / shape.hidden_size:.0f}h B"
    act += tokens * (4 + 2 * value) * shape.hidden_size  # the final norm's (as in a layer) and the LM head's input
    if s.fused_loss:
        logits, how = tokens * shape.hidden_size * 8, "fused loss: one chunk about the hidden states' size"
    else:
        per_entry = 14 if value == 2 else 12
        logits = tokens * shape.vocab_size * per_entry
        how = f"{tokens} labelled × {shape.vocab_size} vocab × {per_entry} B"
    return [Row("activations", act, 0, basis), Row("logits", logits, 0, how)]


def train_setup(model, method, strategy, train, data, cluster, precision: str, objective: str = "sft") -> TrainSetup:
    """The TrainSetup of a `ragft train` job's config sections (ragft.config.schema), resolved precision and
    objective name."""
    fsdp2 = strategy.name == "fsdp2" or str(getattr(strategy, "backend", "deepspeed")) == "fsdp2"
    return TrainSetup(method=str(method.name), lora_r=method.r, lora_targets=tuple(method.target_modules),
                      lora_dropout=method.dropout,
                      strategy=strategy.name, zero_stage=strategy.zero_stage,
                      offload_optimizer=strategy.offload_optimizer, offload_params=strategy.offload_params,
                      fsdp2=fsdp2, fsdp2_offload=bool(getattr(strategy, "cpu_offload", False)), precision=precision,
                      gpus=cluster.num_workers, micro_batch_size=train.micro_batch_size, seq_len=data.max_seq_len,
                      checkpointing=model.gradient_checkpointing, fused_loss=str(model.kernels) in ("ragft", "liger"),
                      preference=objective == "dpo")


def knobs_that_fit(shape: Shape, setup: TrainSetup, gpu_memory_gb: float) -> list[tuple[str, float]]:
    """(overrides, GB per GPU) of the single changes that would make a job fit, in order of preference; when
    none alone does, all of them at once (if that fits)."""
    s, changes = setup, []
    if s.method != "qlora" and not (s.fsdp2 or s.zero_stage == 3):
        changes.append(("strategy=zero3", replace(s, strategy="zero3", zero_stage=3)))
        changes.append(("strategy=fsdp2", replace(s, strategy="fsdp2", fsdp2=True)))
    if s.method != "qlora" and not (s.offload_optimizer and s.offload_params) and not s.fsdp2:
        changes.append(("strategy=zero3_offload", replace(s, strategy="zero3_offload", zero_stage=3,
                                                          offload_optimizer=True, offload_params=True)))
    if s.method == "full":
        changes.append(("method=lora", replace(s, method="lora")))
    if not s.checkpointing:
        changes.append(("model.gradient_checkpointing=true", replace(s, checkpointing=True)))
    micro = s.micro_batch_size // 2
    while micro >= 1:
        if train_plan(shape, replace(s, micro_batch_size=micro), gpu_memory_gb).fits:
            changes.append((f"train.micro_batch_size={micro}", replace(s, micro_batch_size=micro)))
            break
        micro //= 2
    found = [(text, train_plan(shape, other, gpu_memory_gb).total / GB) for text, other in changes
             if train_plan(shape, other, gpu_memory_gb).fits]
    if found:
        return found
    # none alone: everything that lowers memory at once
    texts, combined = ["model.gradient_checkpointing=true", "train.micro_batch_size=1"], replace(
        s, checkpointing=True, micro_batch_size=1)
    if s.method == "full":
        texts.insert(0, "method=lora")
        combined = replace(combined, method="lora")
    if s.method != "qlora" and not s.fsdp2:
        texts.insert(0, "strategy=zero3_offload")
        combined = replace(combined, strategy="zero3_offload", zero_stage=3, offload_optimizer=True,
                           offload_params=True)
    plan = train_plan(shape, combined, gpu_memory_gb)
    return [(" ".join(texts), plan.total / GB)] if plan.fits else []


@dataclass(frozen=True)
class ServeSetup:
    """What besides the shape decides a vLLM replica's memory per GPU."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    value_bytes: int = 2  # bf16 weights and KV cache
    max_model_len: int = 0  # 0: the model's context length
    sequences: int = 16  # sequences decoding at once
    utilization: float = 0.9  # vLLM's share of each GPU (serve.vllm.gpu_memory_utilization)
    kv_cache_bytes: Optional[float] = None  # set by serve.vllm.kv_cache_gb: what vLLM allocates, whatever it needs


def serve_plan(shape: Shape, setup: ServeSetup, gpu_memory_gb: float, name: str = "model") -> Plan:
    """Per-GPU memory of one vLLM replica: weights over TP × PP GPUs and the KV cache of `sequences` sequences of
    the context length."""
    s = setup
    gpus = s.tensor_parallel * s.pipeline_parallel
    length = s.max_model_len or shape.context_length
    per_token = shape.kv_bytes_per_token(s.value_bytes, s.tensor_parallel, s.pipeline_parallel)
    rows = (Row("weights", shape.params * s.value_bytes / gpus, 0,
                f"{shape.params / 1e9:.2f}B × {s.value_bytes} B ÷ {gpus} GPUs (TP {s.tensor_parallel} × PP "
                f"{s.pipeline_parallel})"),
            Row("KV cache", per_token * length * s.sequences, 0,
                f"{s.sequences} sequences × {length} tokens × {per_token / 1024:.0f} KiB per token per GPU")
            if s.kv_cache_bytes is None else Row("KV cache", s.kv_cache_bytes, 0, "serve.vllm.kv_cache_gb"),
            Row("runtime", RUNTIME_BYTES, 0, "CUDA context, NCCL, a forward pass's activations (assumed)"))
    title = (f"memory plan per GPU: serving {name} ({shape.params / 1e9:.2f}B parameters) with vLLM, "
             f"tensor parallel {s.tensor_parallel} × pipeline parallel {s.pipeline_parallel}")
    return Plan(title, rows, gpu_memory_gb * s.utilization * GB,
                f"cluster.gpu_memory_gb × serve.vllm.gpu_memory_utilization = {gpu_memory_gb:g} × {s.utilization:g}")


def sequences_that_fit(shape: Shape, setup: ServeSetup, gpu_memory_gb: float) -> int:
    """The most sequences of the full context length one replica holds at once (0: not even one)."""
    low, high = 0, max(setup.sequences, 1)
    while low < high:
        mid = (low + high + 1) // 2
        if serve_plan(shape, replace(setup, sequences=mid, kv_cache_bytes=None), gpu_memory_gb).fits:
            low = mid
        else:
            high = mid - 1
    return low
