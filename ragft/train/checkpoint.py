"""Checkpoints: HF-loadable weights + DeepSpeed state + a manifest, written atomically.

Layout of `<out_dir>/checkpoints/<step>/`:
  model.safetensors + config.json (full) or adapter_model.safetensors + adapter_config.json (LoRA),
  tokenizer files, `deepspeed/` (engine state for resume), `rng/rank-<r>.pt` (each rank's RNG streams),
  `trainer_state.json` (step, epoch, micro-batches consumed), `manifest.json`.

All ranks write into `.tmp-<step>` (DeepSpeed's state is sharded); rank 0 then
adds the gathered weights and the manifest and renames the folder, so a folder
named by its step is always complete.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
RNG_DIR = "rng"


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
    save_rng_state(tmp, dist.get_rank())
    weights = gathered_state_dict(model, trainable_only=spec.is_adapter, zero3=spec.strategy.zero_stage == 3,
                                  is_rank0=is_rank0)
    dist.barrier()  # every rank's shard and RNG state is on disk before rank 0 hashes them
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


def save_rng_state(folder: Path, rank: int) -> None:
    """Each rank's RNG streams (dropout masks, shuffles), so a resumed run draws what the original would."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    (folder / RNG_DIR).mkdir(exist_ok=True)
    torch.save(state, folder / RNG_DIR / f"rank-{rank}.pt")


def load_rng_state(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG streams; False when the checkpoint has none for it (other world size)."""
    path = folder / RNG_DIR / f"rank-{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def latest_valid(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match their manifest; damaged ones are named and skipped."""
    for folder in reversed(complete_checkpoints(checkpoints_dir)):
        bad = verify(folder)
        if not bad:
            return folder
        print(f"warning: skipping damaged checkpoint {folder}: sha256 mismatch in {', '.join(bad[:3])}",
              flush=True)
    return None


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
