"""JSON Lines files: the one writer every ragft artifact of that format goes through (sample data, RAFT
rows, index tables, metrics, the registry), and the two readers. UTF-8, one object per line, non-ASCII
text kept as is.

Input rows (training data, documents, questions, an index's tables) are read strictly (`jsonl_rows`,
`read_rows`, `collect_rows`): a line that is not what it should be is a `BadRowError` naming its file and
line, and the caller either stops on the first one or skips and counts them all (`on_bad_row`).

Files that grow while a job runs (metrics, the registry) can end in a torn line when a node dies or a disk
fills mid-write. Readers of those (`read_records`) skip what does not parse and say so, appends start on a
fresh line, and rewrites go through a temporary file that is synced before it replaces the old one."""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from ragft.errors import BadDataError

T = TypeVar("T")

ON_BAD_ROW = ("error", "skip")
JSONL_SUFFIXES = (".jsonl", ".json")


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


# --- input rows: strict, every problem located by file and line ---


class BadRowError(BadDataError):
    """One input row that is not what its file should hold, located by file and 1-based line (row index + 1
    for parquet and datasets folders). `line` is None for problems of the whole file, e.g. no rows."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"

    def __reduce__(self):  # keep the attributes when pickled across processes (Ray)
        return (type(self), (self.path, self.line, self.reason))

    @classmethod
    def at(cls, origin: str, reason: str) -> BadRowError:
        """The error for a row known by its origin ("path:line")."""
        path, _, line = origin.rpartition(":")
        return cls(path, int(line), reason)


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("path:line", decoded value) per non-blank line, or ("path:line", BadRowError) for one that is not JSON."""
    # Bytes, decoded per line, so one line of broken UTF-8 is one bad row rather than a crash.
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            origin = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield origin, BadRowError.at(origin, f"not UTF-8 text: {err.reason} at byte {err.start}")
                continue
            if not text.strip():  # blank lines (a trailing newline, spacing) are not rows
                continue
            try:
                yield origin, json.loads(text)
            except json.JSONDecodeError as err:
                yield origin, BadRowError.at(origin, f"invalid JSON: {err.msg} at column {err.colno}")


def read_rows(path: str | Path) -> list[dict]:
    """Every object of the JSONL file `path`, in order; the first line that is not a JSON object raises
    `BadRowError` naming it. For files whose rows need no further checks (an index's own tables)."""
    return collect_rows(jsonl_rows(path), json_object, "error", str(path), "rows", allow_empty=True)[0]


def json_object(row: Any, origin: str) -> dict:
    """`row` when it is a JSON object, else the BadRowError saying what it is instead."""
    if not isinstance(row, dict):
        raise BadRowError.at(origin, f"expected a JSON object, got {type(row).__name__}")
    return row


def collect_rows(rows: Iterable[tuple[str, Any]], parse: Callable[[Any, str], T], on_bad_row: str, source: str,
                 what: str, key: Optional[Callable[[T], str]] = None, key_name: str = "id",
                 allow_empty: bool = False) -> tuple[list[T], list[BadRowError]]:
    """Parse each (origin, row) of `source`; a bad row raises (on_bad_row="error") or is collected ("skip").

    A row the source could not decode arrives as a BadRowError. With `key`, a row repeating an earlier
    row's key is bad too (naming the first): keeping either copy silently would hide a mistake.
    A source without a single good row is an error either way, unless `allow_empty`.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    parsed: list[T] = []
    skipped: list[BadRowError] = []
    first_seen: dict[str, str] = {}
    for origin, row in rows:
        try:
            if isinstance(row, BadRowError):
                raise row
            item = parse(row, origin)
            if key is not None:
                k = key(item)
                if k in first_seen:
                    raise BadRowError.at(origin, f"duplicate {key_name} {k!r} (first at {first_seen[k]})")
                first_seen[k] = origin
            parsed.append(item)
        except BadRowError as err:
            if on_bad_row == "error":
                raise
            skipped.append(err)
    if not parsed and not allow_empty:
        detail = f" ({len(skipped)} bad rows skipped, first: {skipped[0]})" if skipped else ""
        raise BadRowError(str(source), None, f"no {what}{detail}")
    return parsed, skipped
