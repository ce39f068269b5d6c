"""Checkpoints: HF-loadable weights + DeepSpeed state + a manifest, written atomically.

Layout of `<out_dir>/checkpoints/<step>/`:
  model.safetensors + config.json (full) or adapter_model.safetensors + adapter_config.json (LoRA),
  tokenizer files, `deepspeed/` (engine state for resume; `fsdp/` under strategy=fsdp2, see ragft.train.fsdp2),
  `rng/rank-<r>.pt` (each rank's RNG streams),
  `trainer_state.json` (step, epoch, micro-batches consumed), `manifest.json` (sha256 of every file).

All ranks write into `.tmp-<step>` (DeepSpeed's state is sharded) and hash the files they wrote,
in parallel; rank 0 then adds the gathered weights, merges the digests into the manifest and
renames the folder, so a folder named by its step is always complete. An adapter's DeepSpeed
state leaves out the frozen base weights: they are the base model's, loaded again on resume.
Reading checks what it loads: resume splits the checkpoint's files over the ranks (`latest_valid`);
what every reader shares (the manifest, verification, resolution for eval and serve) is `ragft.checkpoints`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ragft.checkpoints import (DEEPSPEED_DIR, FSDP_DIR, MANIFEST, RNG_DIR, TRAINER_STATE, best_by_eval_loss,
                               complete_checkpoints, read_manifest, sha256_file, verify)
from ragft.jsonl import sync_folder, write_text_atomic
from ragft.train import fsdp2

DEEPSPEED_TAG = "state"
# Files DeepSpeed (zero_pp_rank_<r>_...), torch.distributed.checkpoint (__<r>_0.distcp) or ragft (rng/rank-<r>.pt)
# write once per rank; the rest are rank 0's.
_RANK_OF_FILE = re.compile(r"(?:zero_pp_rank_|^__|rank-)(\d+)[_.]")


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path
    size_bytes: int
    seconds: float
    hash_seconds: float  # the slowest rank's hashing, part of `seconds`


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
    rank, world_size = dist.get_rank(), dist.get_world_size()
    root = spec.checkpoints_dir
    tmp = root / f".tmp-{step}"
    if is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    fsdp = spec.strategy.backend == "fsdp2"
    if fsdp:
        fsdp2.save_state(engine, tmp / FSDP_DIR, trainer_state, trainable_only=spec.is_adapter, is_rank0=is_rank0)
    else:
        with adapter_module_state(engine, spec):
            engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state=trainer_state,
                                   exclude_frozen_parameters=spec.is_adapter)
    save_rng_state(tmp, rank)
    if fsdp:
        weights = fsdp2.full_state_dict(model, trainable_only=spec.is_adapter, is_rank0=is_rank0)
    else:
        weights = gathered_state_dict(model, trainable_only=spec.is_adapter, zero3=spec.strategy.zero_stage == 3,
                                      is_rank0=is_rank0)
    dist.barrier()  # every rank's files are on disk: each knows which are its own
    if is_rank0:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    hash_started = time.perf_counter()
    mine = {rel: sha256_file(tmp / rel) for rel in files_written_by(tmp, rank, world_size)}
    parts = [None] * world_size if is_rank0 else None
    dist.gather_object((mine, time.perf_counter() - hash_started), parts, dst=0)
    saved = None
    if is_rank0:
        files = {rel: digest for digests, _ in parts for rel, digest in digests.items()}
        hash_seconds = max(seconds for _, seconds in parts)
        write_manifest(tmp, spec, step, metrics, files)
        final = root / str(step)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run may redo a step it had saved
        tmp.rename(final)
        sync_folder(root)  # the rename is what makes the checkpoint count: make it durable before pruning
        prune(root, spec.train.keep_last)
        saved = SavedCheckpoint(step, final, folder_size(final), time.perf_counter() - started,
                                hash_seconds)
    dist.barrier()
    return saved


@contextmanager
def adapter_module_state(engine, spec):
    """Under an adapter, DeepSpeed's copy of the module keeps only what resume cannot get elsewhere.

    Frozen weights are the base model's, loaded again on resume. `exclude_frozen_parameters` alone
    misses tied aliases of them (it filters by `named_parameters()`, which lists a tied weight once, so
    a tied LM head stays: the whole embedding matrix). Under ZeRO 1-3 the trained weights are also
    left out: the optimizer's fp32 partitions hold them, and `load_engine_state` restores the module
    from those. Stage 0 keeps them: its optimizer state has only the moments.
    """
    if not spec.is_adapter:
        yield
        return
    module = engine.module
    params = {name: p for name, p in module.named_parameters(remove_duplicate=False)}
    keep_trained = spec.strategy.zero_stage == 0

    def module_state_dict(*args, **kwargs):
        state = module.state_dict()
        return {k: v for k, v in state.items() if k not in params or (keep_trained and params[k].requires_grad)}

    engine.module_state_dict = module_state_dict  # DeepSpeed's save calls it through the instance
    try:
        yield
    finally:
        del engine.module_state_dict


def load_engine_state(engine, folder: Path, spec) -> dict:
    """Load the DeepSpeed (or FSDP2) state of checkpoint `folder` into `engine` (collective); returns the trainer
    state."""
    if spec.strategy.backend == "fsdp2":
        return fsdp2.load_state(engine, folder / FSDP_DIR, trainable_only=spec.is_adapter)
    # An adapter's state holds no frozen weights (adapter_module_state): those stay as loaded from the base.
    _, state = engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                      load_module_strict=not spec.is_adapter)
    if spec.is_adapter and spec.strategy.zero_stage in (1, 2):
        # The trained weights came back only into the fp32 partitions: copy them into the module,
        # as DeepSpeed does itself after loading a universal checkpoint. ZeRO-3 does this on load.
        engine.optimizer.update_lp_params()
    return state


def files_written_by(folder: Path, rank: int, world_size: int) -> list[str]:
    """The files of `folder` (relative, sorted) that `rank` wrote: its own DeepSpeed shards and RNG state,
    and for rank 0 everything written once. With a world of one, every file."""
    owned = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        found = _RANK_OF_FILE.search(path.name)
        writer = int(found.group(1)) if found and int(found.group(1)) < world_size else 0
        if writer == rank:
            owned.append(rel)
    return owned


def save_rng_state(folder: Path, rank: int) -> None:
    """Each rank's RNG streams (dropout masks, shuffles), so a resumed run draws what the original would.

    Stored as tensors and plain numbers only, so that resume loads it with `weights_only=True`: a checkpoint
    that travelled between machines cannot run code through this file."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    (folder / RNG_DIR).mkdir(exist_ok=True)
    torch.save(state, folder / RNG_DIR / f"rank-{rank}.pt")


def load_rng_state(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG streams; False when the checkpoint has none for it (other world size)."""
    path = folder / RNG_DIR / f"rank-{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def latest_valid(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match their manifest; damaged ones are named and skipped.

    Collective when a process group is initialised: every rank hashes a share of each candidate's files
    and all of them return the same folder. Without one, this process hashes everything."""
    group = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    candidates = [complete_checkpoints(checkpoints_dir)]
    if group:
        dist.broadcast_object_list(candidates, src=0)  # one list for all ranks, even if a save lands meanwhile
    for folder in reversed(candidates[0]):
        manifest = read_manifest(folder)
        files = sorted(manifest["files"]) if manifest else []
        bad = verify(folder, share(folder, files, rank, world_size)) if manifest else [MANIFEST]
        if group:
            found = [None] * world_size
            dist.all_gather_object(found, bad)
            bad = sorted(rel for part in found for rel in part)
        if not bad:
            return folder
        if rank == 0:
            why = "unreadable manifest" if bad == [MANIFEST] else f"sha256 mismatch in {', '.join(bad[:3])}"
            print(f"warning: skipping damaged checkpoint {folder}: {why}", flush=True)
    return None


def share(folder: Path, files: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's part of `files` for hashing: the largest file first to the least loaded rank, so the
    ranks finish together. Missing files weigh nothing (they fail verification at once)."""
    sizes = {rel: (folder / rel).stat().st_size if (folder / rel).is_file() else 0 for rel in files}
    loads, parts = [0] * world_size, [[] for _ in range(world_size)]
    for rel in sorted(files, key=lambda r: (-sizes[r], r)):
        least = loads.index(min(loads))
        loads[least] += sizes[rel]
        parts[least].append(rel)
    return parts[rank]


def write_manifest(folder: Path, spec, step: int, metrics: dict, files: dict[str, str]) -> None:
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
        "files": dict(sorted(files.items())),
    }
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))


def prune(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and the best by eval loss."""
    found = complete_checkpoints(checkpoints_dir)
    keep = set(found[-keep_last:]) | {best_by_eval_loss(found)}
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
