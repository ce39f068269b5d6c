"""JSON Lines files: the one writer every ragft artifact of that format goes through (sample data, RAFT
rows, index tables, metrics, the registry). UTF-8, one object per line, non-ASCII text kept as is.

Files that grow while a job runs (metrics, the registry) can end in a torn line when a node dies or a disk
fills mid-write. Readers of those (`read_records`) skip what does not parse and say so, appends start on a
fresh line, and rewrites go through a temporary file that is synced before it replaces the old one."""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Iterable


def line(obj: dict, **dumps_kwargs) -> str:
    return json.dumps(obj, ensure_ascii=False, **dumps_kwargs) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict], atomic: bool = False) -> Path:
    """Write `rows` to `path`, replacing it. `atomic`: through a temporary file, so that a reader sees the
    old file or the new one, never half of one."""
    path = Path(path)
    if atomic:
        return write_text_atomic(path, "".join(line(row) for row in rows))
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(line(row))
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` so that after a crash it holds the old text or the new, whole: written to a
    temporary file beside it, synced to disk, renamed over it, and the rename synced too."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    sync_folder(path.parent)
    return path


def sync_folder(folder: str | Path) -> None:
    """Make renames and new names inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | Path) -> list[dict]:
    """The objects of a JSONL file that a job appends to; lines that do not parse as an object (a line torn by a
    crash) are skipped with a warning naming the file and line. A missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                warnings.warn(f"{path}:{number}: skipped a line that is not a JSON object (torn by a crash?)",
                              stacklevel=2)
    return records


def append_jsonl(path: str | Path, rows: Iterable[dict], lock: bool = False, **dumps_kwargs) -> None:
    """Append `rows` to `path`. `lock`: under an exclusive lock on the file, for files several processes append
    to, so that no line is ever split by another writer's."""
    with open(path, "a+", encoding="utf-8", newline="\n") as f:  # "+": to read the last byte
        if lock:
            fcntl.flock(f, fcntl.LOCK_EX)
        size = os.fstat(f.fileno()).st_size
        if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
            f.write("\n")  # a torn last line must not swallow the first new one
        for row in rows:
            f.write(line(row, **dumps_kwargs))
        f.flush()
