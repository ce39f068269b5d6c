"""The checkpoint registry: which checkpoints exist, what eval measured on them, and `best` / `latest`.

Embedded by default: one JSON-lines file (`registry=runs/registry.jsonl`), appended to under an
exclusive lock, so concurrent runs on one filesystem never interleave lines. Each line is an
event about one checkpoint folder: `ragft train` records its final checkpoint when the run ends,
`ragft eval` records the metrics it measured (and the W&B run or artifact when tracking is on).
Reading folds the events per checkpoint, later metrics updating earlier ones.

`resolve("latest")` is the most recently registered checkpoint that still exists;
`resolve("best", metric=..., mode="max")` the one with the best recorded value of `metric`
(e.g. `ft_rag.token_f1`). Checkpoints deleted from disk are skipped, never returned.

`ragft serve promote` records what it loaded into a running server (`record_serving`): which
checkpoint serves under which name at which address, since when; `serving` reads it back.
"""

from __future__ import annotations

import fcntl
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ragft.jsonl import append_jsonl, read_records

class RegistryError(LookupError):
    """`best` or `latest` named a checkpoint the registry cannot provide."""


@dataclass
class Entry:
    checkpoint: str  # absolute folder
    run_id: Optional[str] = None
    step: Optional[int] = None
    model: Optional[str] = None
    method: Optional[str] = None
    registered: float = 0.0  # time of the first event
    updated: float = 0.0  # time of the last event
    metrics: dict = field(default_factory=dict)  # "<system>.<metric>" -> value, e.g. "ft_rag.exact_match"
    links: dict = field(default_factory=dict)  # report, wandb, ...
    served: list = field(default_factory=list)  # {name, url, since, ...} each time it was promoted into a server

    @property
    def exists(self) -> bool:
        return Path(self.checkpoint).is_dir()


def record(path: str | Path, checkpoint: str | Path, *, metrics: Optional[dict] = None,
           links: Optional[dict] = None, **info) -> dict:
    """Append one event about `checkpoint` (run_id, step, model, method in `info`); returns the event."""
    event = {"checkpoint": str(Path(checkpoint).resolve()), "time": time.time(), **info,
             "metrics": metrics or {}, "links": links or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, [event], lock=True, sort_keys=True)  # runs register concurrently
    return event


def record_checkpoint(path: str | Path, checkpoint: str | Path, **kwargs) -> dict:
    """Register a checkpoint folder with what its manifest says (run id, step, model, method)."""
    manifest_path = Path(checkpoint) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    info = {"run_id": manifest.get("run_id"), "step": manifest.get("step"),
            "model": (manifest.get("model") or {}).get("name"), "method": manifest.get("method")}
    return record(path, checkpoint, **{**info, **kwargs})


def entries(path: str | Path) -> list[Entry]:
    """Every registered checkpoint, oldest registration first."""
    folded: dict[str, Entry] = {}
    for event in _events(Path(path)):
        entry = folded.get(event["checkpoint"])
        if entry is None:
            entry = folded[event["checkpoint"]] = Entry(event["checkpoint"], registered=event["time"])
        for key in ("run_id", "step", "model", "method"):
            if event.get(key) is not None:
                setattr(entry, key, event[key])
        entry.metrics.update(event.get("metrics") or {})
        entry.links.update(event.get("links") or {})
        if event.get("served"):
            entry.served.append(event["served"])
        entry.updated = event["time"]
    return sorted(folded.values(), key=lambda e: e.registered)


def resolve(path: str | Path, which: str, metric: Optional[str] = None, mode: str = "max") -> Entry:
    """The checkpoint `which` ("latest" or "best") names; RegistryError saying why when there is none."""
    alive = [e for e in entries(path) if e.exists]
    if which == "latest":
        if not alive:
            raise RegistryError(f"checkpoint=latest: the registry {path} lists no checkpoint that still exists "
                                f"(ragft train registers its final checkpoint)")
        return max(alive, key=lambda e: e.registered)
    if which == "best":
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got {mode!r}")
        scored = [e for e in alive if isinstance(e.metrics.get(metric), (int, float))]
        if not scored:
            known = sorted({k for e in alive for k in e.metrics})
            raise RegistryError(f"checkpoint=best: no checkpoint in {path} has metric {metric!r} "
                                f"(run `ragft eval` first; metrics recorded: {known or 'none'})")
        pick = max if mode == "max" else min
        return pick(scored, key=lambda e: (e.metrics[metric], e.registered))
    raise ValueError(f"which must be latest or best, got {which!r}")


def record_serving(path: str | Path, checkpoint: str | Path, name: str, url: str, **details) -> dict:
    """Record that `checkpoint` serves as `name` at `url` from now on (`details`: the gate's numbers)."""
    return record(path, checkpoint, served={"name": name, "url": url, "since": time.time(), **details})


def serving(path: str | Path, url: str) -> dict[str, dict]:
    """What serves under each name at `url`, by the promotions recorded: {name: {checkpoint, since, ...}}."""
    latest: dict[str, dict] = {}
    for entry in entries(path):
        for served in entry.served:
            if served["url"] == url and served["since"] >= latest.get(served["name"], {}).get("since", 0):
                latest[served["name"]] = {**served, "checkpoint": entry.checkpoint}
    return latest


def table(path: str | Path, metrics: Optional[list[str]] = None) -> str:
    """`ragft registry list`: one row per checkpoint, the chosen metrics as columns."""
    rows = entries(path)
    if not rows:
        return f"(no checkpoints registered in {path})"
    metrics = metrics or sorted({k for e in rows for k in e.metrics})
    header = ["checkpoint", "run_id", "step", "method", *metrics]
    lines = [header]
    for e in rows:
        values = [f"{e.metrics[m]:.4f}" if isinstance(e.metrics.get(m), float) else str(e.metrics.get(m, ""))
                  for m in metrics]
        gone = "" if e.exists else " (deleted)"
        lines.append([e.checkpoint + gone, str(e.run_id or ""), str(e.step or ""), str(e.method or ""), *values])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def _events(path: Path) -> Iterator[dict]:
    if not path.is_file():
        return
    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # no writer is mid-line while we read
        for event in read_records(path):  # a line cut by a crash is skipped: the rest is still good
            if "checkpoint" in event and "time" in event:
                yield event
