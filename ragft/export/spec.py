"""`ragft export`'s config checked before anything loads: every problem at once, as for the other commands.

The checkpoint is resolved (a folder, `latest` or `best` from the registry), its inference files verified
against its manifest, and its base found (`ragft.checkpoints.describe`: the manifest's `model.source`).
`out_dir` must be new, empty, or replaced on purpose (`export.overwrite=true`), and never a folder the export
reads from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from ragft.checkpoints import MANIFEST, describe, resolve_checkpoint
from ragft.config.schema import ExportConfig, ExportJobConfig
from ragft.config.validation import typed_job_config
from ragft.errors import ConfigError

GGUF_ARCHITECTURES = ("llama",)  # what ragft.export.gguf writes: transformers' GGUF loader reads these back


@dataclass(frozen=True)
class ExportSpec:
    checkpoint: str  # resolved folder
    kind: str  # lora | full
    base: str  # the model a LoRA adapter is folded into (for a full fine-tune: the model its run started from)
    run_id: Optional[str]
    step: Optional[int]
    method: Optional[str]
    export: ExportConfig
    out_dir: str


def validate_export(cfg: DictConfig) -> ExportSpec:
    job: ExportJobConfig = typed_job_config(cfg)
    problems: list[str] = []
    out_dir = Path(job.out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        problems.append(f"out_dir={job.out_dir} is a file, not a folder")
    elif out_dir.is_dir() and any(out_dir.iterdir()) and not job.export.overwrite:
        problems.append(f"out_dir={job.out_dir} exists and is not empty: choose a new folder, or set "
                        f"export.overwrite=true to replace what is there")

    served, base = None, None
    resolved, found = resolve_checkpoint(job.checkpoint, job.train_runs_dir, job.registry.path,
                                         job.registry.best_metric, job.registry.best_mode)
    problems += found
    if resolved is not None:
        if not (Path(resolved) / MANIFEST).is_file():
            problems.append(f"checkpoint={job.checkpoint} ({resolved}) is not a ragft checkpoint (no {MANIFEST}): "
                            f"export merges what `ragft train` wrote")
        else:
            served, base, described = describe(resolved, "export")
            problems += described
            if served is not None and served.kind == "base":
                problems.append(f"checkpoint={job.checkpoint} ({resolved}) is a plain model, not a LoRA adapter or "
                                f"a fine-tune: there is nothing to merge")
                served = None
    if served is not None:
        problems += reads_from_out_dir(out_dir, [Path(resolved), Path(base)] if Path(base).is_dir() else
                                       [Path(resolved)])
        if job.export.format == "gguf":
            own_tokenizer = (Path(resolved) / "tokenizer.json").is_file()
            problems += check_gguf(resolved if served.kind == "full" else base, resolved if own_tokenizer else base)
    if problems:
        raise ConfigError(problems)
    return ExportSpec(checkpoint=resolved, kind=served.kind, base=base, run_id=served.run_id, step=served.step,
                      method=served.method, export=job.export, out_dir=str(out_dir))


def reads_from_out_dir(out_dir: Path, sources: list[Path]) -> list[str]:
    """Problems when out_dir is, holds, or sits inside a folder the export reads (overwrite would delete it)."""
    problems = []
    for source in (s.resolve() for s in sources):
        if out_dir == source or source.is_relative_to(out_dir) or out_dir.is_relative_to(source):
            problems.append(f"out_dir={out_dir} overlaps {source}, which the export reads: choose a folder outside it")
    return problems


def check_gguf(model_source: str, tokenizer_source: str) -> list[str]:
    """What export.format=gguf cannot write (ragft.export.gguf): another architecture than llama, RoPE scaling,
    a tokenizer that is not byte-level BPE (sentencepiece vocabularies need scores this writer does not take).
    Each source is a folder or a hub id (read from the local HF cache)."""
    try:
        config = json.loads(model_file(model_source, "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"export.format=gguf: cannot read the model's config.json in {model_source}: {err}"]
    problems = []
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        problems.append(f"export.format=gguf writes {', '.join(GGUF_ARCHITECTURES)} models; {model_source} is "
                        f"{model_type} (export.format=safetensors works for every model)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"export.format=gguf: RoPE scaling ({rope.get('rope_type', rope.get('type'))}) is not "
                        f"written; use export.format=safetensors")
    try:
        state = json.loads(model_file(tokenizer_source, "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return problems + [f"export.format=gguf needs a fast tokenizer (tokenizer.json) in {tokenizer_source}"]
    if state.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        problems.append(f"export.format=gguf writes byte-level BPE tokenizers (GPT-2 style); the one in "
                        f"{tokenizer_source} is not: use export.format=safetensors")
    return problems


def model_file(source: str, name: str) -> Path:
    """The file `name` of a model folder, or of a hub id's snapshot in the local HF cache (OSError if absent)."""
    if Path(source).is_dir():
        return Path(source) / name
    from transformers.utils import cached_file

    return Path(cached_file(source, name))  # an OSError when the cache has no such file
