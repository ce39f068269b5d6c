"""LoRA adapters loaded into a running `ragft serve` (POST /v1/adapters, DELETE /v1/adapters/{name}).

Every TextGenerator replica must serve the same adapters, including replicas that start later
(autoscaling, a replica restarted after a crash). The desired set lives in one `AdapterSet` actor,
a deployment-scoped actor of the TextGenerator deployment (Ray Serve starts it with the deployment
and removes it with the app): the ingress changes it through one replica (`change_adapters`), then
calls `sync_adapters` on every running replica with `DeploymentHandle.broadcast` and answers 200
once all of them report the change applied. A replica reads the set when it starts and again every
`SYNC_S` seconds while it serves requests, so one that started during a change catches up.

The set holds at most `serve.max_adapters` runtime-loaded adapters: one more evicts the least
recently used of them (by the ingress's record of requests), never an adapter served since start-up.

`check_adapter` is what a load request must pass before anything changes: the checkpoint
resolves (a folder, or `best` / `latest` from the registry), has a manifest whose sha256 sums
match its files, is a LoRA adapter, and was trained on the served base model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import ray

from ragft.checkpoints import MANIFEST, ServedModel, describe, resolve_checkpoint
from ragft.serve.protocol import APIError, bad_request, decode_json
from ragft.serve.spec import MODEL_ID, ServeSpec

ACTOR_NAME = "adapters"  # the TextGenerator's deployment-scoped actor
SYNC_S = 5.0  # how stale a replica's copy of the set may get when no change reached it by broadcast
BASE_SHAPE = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
LOAD_FIELDS = ("name", "checkpoint")


@ray.remote(num_cpus=0)
class AdapterSet:
    """The adapters every TextGenerator replica loads at runtime: {name: ServedModel JSON + "loaded"}, versioned."""

    def __init__(self, cap: int):
        self.cap = cap
        self.version = 0
        self.adapters: dict[str, dict] = {}

    def get(self) -> dict:
        return {"version": self.version, "adapters": self.adapters}

    def put(self, name: str, model: dict, last_used: dict[str, float]) -> dict:
        """Add or replace `name`; evict the least recently used others beyond the cap."""
        others = {n: a for n, a in self.adapters.items() if n != name}
        by_use = sorted(others, key=lambda n: last_used.get(n, others[n]["loaded"]))
        evicted = by_use[:max(0, len(others) + 1 - self.cap)]
        for old in evicted:
            del self.adapters[old]
        self.adapters[name] = {**model, "loaded": time.time()}
        self.version += 1
        return {**self.get(), "evicted": evicted}

    def remove(self, name: str) -> dict:
        if self.adapters.pop(name, None) is not None:
            self.version += 1
        return {**self.get(), "evicted": []}


def parse_load(body: bytes, spec: ServeSpec) -> tuple[str, str]:
    """(name, checkpoint) of a POST /v1/adapters body, or a 400 naming what is wrong with it."""
    data = decode_json(body)
    if not isinstance(data, dict):
        raise bad_request('expected a JSON object {"name": ..., "checkpoint": ...}', None)
    unknown = sorted(set(data) - set(LOAD_FIELDS))
    if unknown:
        raise bad_request(f"{', '.join(unknown)}: not supported (a load takes only {', '.join(LOAD_FIELDS)})",
                          unknown[0], "unsupported_parameter")
    name, checkpoint = data.get("name"), data.get("checkpoint")
    if not isinstance(name, str) or not MODEL_ID.match(name):
        raise bad_request("name: 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit",
                          "name")
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise bad_request("checkpoint: a checkpoint folder on the server, or a registry reference (best, latest)",
                          "checkpoint")
    if any(m.id == name for m in spec.models):
        raise APIError(409, f"{name!r} is served since start-up and cannot be replaced at runtime; choose another "
                            "name", param="name", code="model_exists")
    if spec.serve.max_adapters < 1:
        raise APIError(400, "this server loads no adapters at runtime (serve.max_adapters=0)",
                       code="adapters_disabled")
    return name, checkpoint.strip()


def check_adapter(spec: ServeSpec, name: str, checkpoint: str) -> ServedModel:
    """The adapter `checkpoint` names, resolved and verified; APIError (404, 422) saying why it cannot be served."""
    registry = spec.registry
    path, problems = resolve_checkpoint(checkpoint, spec.train_runs_dir, registry.path, registry.best_metric,
                                        registry.best_mode)
    if path is None:
        raise APIError(404, "; ".join(problems), param="checkpoint", code="checkpoint_not_found")
    if not (Path(path) / MANIFEST).is_file():
        raise APIError(422, f"checkpoint {path} has no {MANIFEST}, so its files cannot be verified (sha256): "
                            f"load checkpoints written by ragft train", param="checkpoint", code="checkpoint_unverified")
    model, base, problems = describe(path, name)
    if model is None:
        raise APIError(422, "; ".join(problems), param="checkpoint", code="checkpoint_invalid")
    if model.kind != "lora":
        raise APIError(422, f"checkpoint {path} is a {model.kind} model, not a LoRA adapter: only adapters load "
                            f"into a running server", param="checkpoint", code="not_an_adapter")
    if not same_base(base, spec.base_path):
        raise APIError(422, f"checkpoint {path} was trained on {base}, not on the served base model "
                            f"{spec.base_path}", param="checkpoint", code="base_model_mismatch")
    return model


def same_base(trained_on: Optional[str], served: str) -> bool:
    """Whether an adapter trained on `trained_on` fits the served base: the same folder or hub id, or a model
    of the same architecture and shape (a copy of it)."""
    if not trained_on:
        return False
    if trained_on == served or Path(trained_on).resolve() == Path(served).resolve():
        return True
    shapes = [shape_of(Path(p) / "config.json") for p in (trained_on, served)]
    return shapes[0] is not None and shapes[0] == shapes[1]


def shape_of(config: Path) -> Optional[dict]:
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    data = data.get("text_config", data)
    return {k: data.get(k) for k in BASE_SHAPE}


def served_model(entry: dict) -> ServedModel:
    """An AdapterSet entry as the catalog's ServedModel."""
    return ServedModel(entry["id"], "lora", entry["checkpoint"], entry.get("run_id"), entry.get("step"),
                       entry.get("method"))


def entry_of(model: ServedModel) -> dict:
    return {"id": model.id, **model.to_json()}
