"""The closed choices of the config schemas: a value outside one is refused when Hydra composes, with the
allowed values listed (OmegaConf validates Enum fields).

Each member's name is its value, so a YAML file or an override spells the value (`strategy.precision=bf16`),
`--cfg job` prints it, and a member compares, hashes and formats as that plain string. Validation turns the
members back into plain strings (`plain_choices`) before anything is written or sent to a worker.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any


class Choice(str, Enum):
    """A closed choice whose members are their own string values (`str(m)`, `f"{m}"` and `m == "value"`)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ClusterName(Choice):
    local = "local"
    ray = "ray"
    slurm = "slurm"


class Kernels(Choice):
    none = "none"
    ragft = "ragft"
    liger = "liger"


class TrackingName(Choice):
    none = "none"
    wandb = "wandb"


class TrackingMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Direction(Choice):
    """Which way a metric is better."""

    max = "max"
    min = "min"


class MethodName(Choice):
    full = "full"
    lora = "lora"
    qlora = "qlora"


class Backend(Choice):
    deepspeed = "deepspeed"
    fsdp2 = "fsdp2"


class QuantType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class Precision(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class DataFormat(Choice):
    auto = "auto"
    jsonl = "jsonl"
    hf = "hf"
    parquet = "parquet"


class OnBadRow(Choice):
    error = "error"
    skip = "skip"


class Objective(Choice):
    """What training minimises: next-token loss on replies (sft) or a preference loss on chosen/rejected pairs."""

    sft = "sft"
    dpo = "dpo"


class DpoLoss(Choice):
    sigmoid = "sigmoid"  # DPO (Rafailov et al.), conservative with label_smoothing > 0
    ipo = "ipo"  # IPO (Azar et al.), on per-token mean log-ratios


class Scheduler(Choice):
    fifo = "fifo"
    asha = "asha"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class IndexKind(Choice):
    auto = "auto"
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"


class RetrievalMode(Choice):
    dense = "dense"
    bm25 = "bm25"
    hybrid = "hybrid"


class Fusion(Choice):
    relative = "relative"
    rrf = "rrf"


class Dtype(Choice):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Engine(Choice):
    transformers = "transformers"
    vllm = "vllm"


class ExportFormat(Choice):
    safetensors = "safetensors"  # an HF model folder: transformers, vLLM, TGI, SGLang
    gguf = "gguf"  # one llama.cpp file (llama-architecture models): llama.cpp, Ollama, transformers' GGUF loader


class GoldPosition(Choice):
    retrieved = "retrieved"
    random = "random"


def plain_choices(value: Any) -> Any:
    """`value` (a schema dataclass, or a list / dict of them) with every Choice member replaced by its plain
    string, in place for dataclasses: what pickles, serialises and compares without ragft's Enum types."""
    if isinstance(value, Choice):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            object.__setattr__(value, f.name, plain_choices(getattr(value, f.name)))
        return value
    if isinstance(value, list):
        return [plain_choices(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_choices(v) for k, v in value.items()}
    return value
