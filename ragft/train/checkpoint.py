"""Checkpoints: HF-loadable weights + DeepSpeed state + a manifest, written atomically.

Layout of `<out_dir>/checkpoints/<step>/`:
  model.safetensors + config.json (full) or adapter_model.safetensors + adapter_config.json (LoRA),
  tokenizer files, `deepspeed/` (engine state for resume), `trainer_state.json`, `manifest.json`.

All ranks write into `.tmp-<step>` (DeepSpeed's state is sharded); rank 0 then
adds the gathered weights and the manifest and renames the folder, so a folder
named by its step is always complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path
    size_bytes: int
    seconds: float


def gathered_state_dict(model: torch.nn.Module, trainable_only: bool, zero3: bool, is_rank0: bool) -> dict | None:
    """Full (unsharded) tensors of `model` on rank 0; None elsewhere. Collective under ZeRO-3.

    Under ZeRO-3 each rank holds a slice of every large parameter (`p.numel() == 0`
    locally), so the tensors are gathered one parameter at a time to bound memory.
    """
    import deepspeed

    state = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if zero3:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_rank0:
                    state[name] = param.detach().cpu().clone()
        elif is_rank0:
            state[name] = param.detach().cpu().clone()
    if not trainable_only and is_rank0:
        persistent = model.state_dict(keep_vars=True).keys()
        state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers() if n in persistent})
    return state if is_rank0 else None


def save(engine, model, tokenizer, spec, step: int, metrics: dict, trainer_state: dict, is_rank0: bool) -> SavedCheckpoint | None:
    """Write checkpoint `step` (collective: every rank calls it). Returns its description on rank 0."""
    started = time.perf_counter()
    root = spec.checkpoints_dir
    tmp = root / f".tmp-{step}"
    if is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state=trainer_state)
    weights = gathered_state_dict(model, trainable_only=spec.is_adapter, zero3=spec.strategy.zero_stage == 3,
                                  is_rank0=is_rank0)
    saved = None
    if is_rank0:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        write_manifest(tmp, spec, step, metrics)
        final = root / str(step)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run may redo a step it had saved
        tmp.rename(final)
        prune(root, spec.train.keep_last)
        saved = SavedCheckpoint(step, final, folder_size(final), time.perf_counter() - started)
    dist.barrier()
    return saved


def write_manifest(folder: Path, spec, step: int, metrics: dict) -> None:
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {
        "format": "ragft-checkpoint/1",
        "run_id": spec.run_id,
        "step": step,
        "model": {"name": spec.model.name, "source": spec.base_model_path},
        "method": spec.method.name,
        "strategy": spec.strategy.name,
        "config_hash": spec.config_hash,
        "data_hash": spec.plan.data_hash if spec.plan else None,
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def complete_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Checkpoint folders that finished writing (named by step, with a manifest), oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def verify(folder: Path) -> list[str]:
    """Files of a checkpoint whose sha256 differs from its manifest (or that are missing)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    bad = []
    for rel, digest in manifest["files"].items():
        path = folder / rel
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(rel)
    return bad


def prune(checkpoints_dir: Path, keep_last: int) -> None:
    for old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
