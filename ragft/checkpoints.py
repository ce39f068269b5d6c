"""Reading checkpoints: their manifest, their files checked against it, and what a checkpoint value names.

A checkpoint is `<out_dir>/checkpoints/<step>/` with a `manifest.json` listing the sha256 of every file
(`ragft.train.checkpoint` writes them). Here is what every reader shares: the manifest and the folders
that finished writing, verification (all files, or only those loading the model reads: `inference_files`),
the best checkpoint by eval loss, and the registry-aware resolution `ragft eval` and `ragft serve` both use
(`resolve_checkpoint`: a folder, a hub id, `latest` or `best`; `describe`: a LoRA adapter, a full
fine-tune or a plain model, and the base it needs).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ragft import registry

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_DIR = "deepspeed"
FSDP_DIR = "fsdp"  # strategy=fsdp2's sharded state (torch.distributed.checkpoint)
RNG_DIR = "rng"
RESUME_ONLY = (DEEPSPEED_DIR + "/", FSDP_DIR + "/", RNG_DIR + "/", TRAINER_STATE)  # what serving and evaluation never read
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ServedModel:
    """A model to load under an id: one entry of serve's /v1/models, or the checkpoint eval scores."""

    id: str
    kind: str  # base | lora | full
    path: str  # the folder (or hub id) its weights load from
    run_id: Optional[str] = None
    step: Optional[int] = None
    method: Optional[str] = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "checkpoint": self.path, "run_id": self.run_id, "step": self.step,
                "method": self.method}


def read_manifest(folder: Path) -> dict | None:
    """A checkpoint's manifest, or None when it cannot be read as one (a damaged checkpoint, to be skipped)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
          and isinstance(manifest.get("metrics", {}), dict))
    return manifest if ok else None


def complete_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Checkpoint folders that finished writing (named by step, with a manifest), oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def verify(folder: Path, files: list[str] | None = None) -> list[str]:
    """Files of a checkpoint (all, or those named) whose sha256 differs from its manifest, or that are missing."""
    manifest = json.loads((folder / MANIFEST).read_text())["files"]
    bad = []
    for rel in manifest if files is None else files:
        path = folder / rel
        if rel not in manifest or not path.is_file() or sha256_file(path) != manifest[rel]:
            bad.append(rel)
    return bad


def inference_files(folder: Path) -> list[str]:
    """The manifest's files that loading the checkpoint as a model reads: weights, configs, tokenizer."""
    return [rel for rel in json.loads((folder / MANIFEST).read_text())["files"] if not rel.startswith(RESUME_ONLY)]


def best_by_eval_loss(checkpoints: list[Path]) -> Path | None:
    """The checkpoint evaluated at its own step with the lowest eval loss (the earliest on ties); None if none was."""
    best, best_loss = None, float("inf")
    for folder in checkpoints:
        manifest = read_manifest(folder)
        loss = manifest.get("metrics", {}).get("eval_loss") if manifest else None
        if loss is not None and loss < best_loss:
            best, best_loss = folder, loss
    return best


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint(value: str, train_runs_dir: str, registry_path: str, best_metric: Optional[str],
                       best_mode: str) -> tuple[Optional[str], list[str]]:
    """A checkpoint folder (or hub id) for `value`: a path, or `latest` / `best` from the registry."""
    if value in ("latest", "best"):
        try:
            return registry.resolve(registry_path, value, best_metric, best_mode).checkpoint, []
        except registry.RegistryError as err:
            if value == "best":
                return None, [str(err)]
        # latest with an empty registry: the newest checkpoint of the runs on disk (older runs, copied runs)
        found = [c for run in sorted(Path(train_runs_dir).glob("*/checkpoints")) for c in complete_checkpoints(run)]
        if not found:
            return None, [f"checkpoint=latest: no checkpoint in the registry {registry_path} nor under "
                          f"train_runs_dir={train_runs_dir}"]
        newest = max(found, key=lambda p: (p / MANIFEST).stat().st_mtime)
        return str(newest.resolve()), []
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve()), []
    if re.match(r"^[\w.-]+/[\w.-]+$", value) and not value.startswith((".", "/")):
        return value, []  # a hub id: from_pretrained resolves it (offline: from the local HF cache)
    return None, [f"checkpoint={value} does not exist (a checkpoint folder, a model folder or hub id, latest or best)"]


def describe(path: str, model_id: str) -> tuple[Optional[ServedModel], Optional[str], list[str]]:
    """What the folder at `path` is, served as `model_id`, and the base model it needs."""
    folder = Path(path)
    if not folder.is_dir():
        return ServedModel(model_id, "base", path), path, []  # a hub id
    manifest = {}
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
        if "files" in manifest:
            bad = verify(folder, inference_files(folder))  # the resume-only state is never read here
            if bad:
                return None, None, [f"checkpoint {path} is damaged: sha256 mismatch in {', '.join(bad[:3])}"]
    run_id, step, method = manifest.get("run_id"), manifest.get("step"), manifest.get("method")
    if (folder / ADAPTER_CONFIG).is_file():
        adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
        base = (manifest.get("model") or {}).get("source") or adapter_config.get("base_model_name_or_path")
        if not base:
            return None, None, [f"{path}: a LoRA adapter that names no base model (base_model_name_or_path)"]
        if Path(base).is_absolute() and not Path(base).is_dir():
            return None, None, [f"{path}: its base model {base} does not exist"]
        return ServedModel(model_id, "lora", path, run_id, step, method or "lora"), base, []
    if (folder / "config.json").is_file():
        if run_id is not None:
            base = (manifest.get("model") or {}).get("source")
            return ServedModel(model_id, "full", path, run_id, step, method or "full"), base or path, []
        return ServedModel(model_id, "base", path), path, []
    return None, None, [f"{path} is neither a LoRA adapter ({ADAPTER_CONFIG}) nor a model (config.json)"]
