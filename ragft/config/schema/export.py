"""The schema of `ragft export` (conf/export.yaml): one merged model written from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from ragft.config.schema.choices import Dtype, ExportFormat
from ragft.config.schema.common import RegistryConfig


@dataclass
class ExportConfig:
    """What `ragft export` writes."""

    format: ExportFormat = ExportFormat.safetensors
    # auto: the dtype the base model's config.json records (float32 where it records none), so an export does
    # not depend on the machine that wrote it | float32 | bfloat16 | float16. LoRA is folded in float32 first.
    dtype: Dtype = Dtype.auto
    overwrite: bool = False  # replace a non-empty out_dir (its old content is deleted only once the new one is whole)


@dataclass
class ExportJobConfig:
    """The primary config of `ragft export` (conf/export.yaml)."""

    checkpoint: str = MISSING  # a train checkpoint folder (LoRA or full), latest or best
    export: ExportConfig = field(default_factory=ExportConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # what checkpoint=best|latest reads
    runs_dir: str = "runs/export"
    train_runs_dir: str = "runs/train"  # where checkpoint=latest looks when the registry has none
    out_dir: str = MISSING
