"""JSON Lines files: the one writer every ragft artifact of that format goes through (sample data, RAFT
rows, index tables, metrics, the registry). UTF-8, one object per line, non-ASCII text kept as is."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Iterable


def line(obj: dict, **dumps_kwargs) -> str:
    return json.dumps(obj, ensure_ascii=False, **dumps_kwargs) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict], atomic: bool = False) -> Path:
    """Write `rows` to `path`, replacing it. `atomic`: through a temporary file, so that a reader sees the
    old file or the new one, never half of one."""
    path = Path(path)
    target = path.with_name(f".{path.name}.tmp") if atomic else path
    with open(target, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(line(row))
    if atomic:
        target.replace(path)
    return path


def append_jsonl(path: str | Path, rows: Iterable[dict], lock: bool = False, **dumps_kwargs) -> None:
    """Append `rows` to `path`. `lock`: under an exclusive lock on the file, for files several processes append
    to, so that no line is ever split by another writer's."""
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        if lock:
            fcntl.flock(f, fcntl.LOCK_EX)
        for row in rows:
            f.write(line(row, **dumps_kwargs))
        f.flush()
