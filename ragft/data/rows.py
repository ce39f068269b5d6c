"""Reading training rows from JSONL, a `datasets` folder or parquet, and validating their shape.

Every row must be exactly one of the three formats of DESIGN.md §3 (chat, prompt/completion,
text). A row that is not becomes a `ragft.jsonl.BadRowError` naming its file and line, so a bad row never
passes silently: the caller either stops on the first one or skips and counts them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ragft.jsonl import JSONL_SUFFIXES, ON_BAD_ROW, BadRowError, collect_rows, json_object, jsonl_rows

FORMATS = ("auto", "jsonl", "hf", "parquet")
ROLES = ("system", "user", "assistant")
# `Dataset.save_to_disk` always writes these two files next to the arrow shards.
HF_MARKERS = ("dataset_info.json", "state.json")
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One valid training example. Exactly the fields of its `kind` are set, the others are None."""

    kind: str  # "chat" | "prompt_completion" | "text"
    messages: tuple[dict, ...] | None = None  # chat: ({"role": ..., "content": ...}, ...)
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    origin: str = ""  # "path:line", for error messages about this example later on


@dataclass
class ReadResult:
    examples: list[Example]
    skipped: list[BadRowError] = field(default_factory=list)


def read_examples(path: str, fmt: str = "auto", on_bad_row: str = "error") -> ReadResult:
    """Read and validate every row of `path`.

    `fmt` is one of auto | jsonl | hf | parquet (auto decides by suffix or folder contents).
    With `on_bad_row="error"` the first bad row raises `BadRowError`; with "skip" every bad row
    is collected in `skipped`. A source with no valid row at all raises either way.
    """
    examples, skipped = read_source(path, fmt, on_bad_row, parse_row, "valid rows")
    return ReadResult(examples=examples, skipped=skipped)


def read_source(path: str, fmt: str, on_bad_row: str, parse: Callable[[Any, str], T], what: str
                ) -> tuple[list[T], list[BadRowError]]:
    """`parse` applied to every row of `path` read as `fmt` (auto | jsonl | hf | parquet), and the bad rows
    skipped (`on_bad_row=skip`; with error the first one raises). `what` names the valid rows in the error a
    source without any raises."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"training data not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"data format must be one of {FORMATS}, got {fmt!r}")
    return collect_rows(_ROW_READERS[fmt](path), parse, on_bad_row, path, what)


def detect_format(path: str) -> str:
    """jsonl, hf or parquet, from a file's suffix or a folder's contents."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    if p.is_file():
        if p.suffix in JSONL_SUFFIXES:
            return "jsonl"
        if p.suffix == ".parquet":
            return "parquet"
        raise ValueError(f"{path}: cannot tell the format from the suffix; set data.format to jsonl or parquet")
    if any((p / name).exists() for name in HF_MARKERS + ("dataset_dict.json",)):
        return "hf"
    if _parquet_files(p):
        return "parquet"
    raise ValueError(f"{path}: folder is neither a datasets save_to_disk folder nor holds .parquet files")


def parse_row(row: Any, origin: str) -> Example:
    """The `Example` a decoded row describes, or `BadRowError` saying why it describes none.

    Keys other than the format's own (an `id`, a `source`) are ignored, so datasets with
    metadata columns load as they are.
    """
    json_object(row, origin)
    if "chosen" in row and "rejected" in row:
        raise BadRowError.at(origin, "a preference row (chosen/rejected): train on such rows with objective=dpo")
    shapes = [name for name, keys in _SHAPE_KEYS.items() if any(k in row for k in keys)]
    if not shapes:
        raise BadRowError.at(
            origin, f"unknown row shape with keys {sorted(row)}; expected 'messages', 'prompt'+'completion' or 'text'"
        )
    if len(shapes) > 1:
        raise BadRowError.at(origin, f"row mixes formats {shapes}; use exactly one of them")
    return _PARSERS[shapes[0]](row, origin)


def _parse_chat(row: dict, origin: str) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRowError.at(origin, "'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRowError.at(origin, f"messages[{i}] must be an object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise BadRowError.at(origin, f"messages[{i}] has unknown role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise BadRowError.at(origin, f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise BadRowError.at(origin, f"messages[{i}]: a system message may only come first")
        # Only role and content reach the chat template: extra keys would render differently per template.
        clean.append({"role": role, "content": content})
    last = clean[-1]
    # Turns after the last assistant reply would cost tokens and train nothing.
    if last["role"] != "assistant" or not last["content"]:
        raise BadRowError.at(origin, "the last message must be an assistant turn with non-empty content")
    return Example(kind="chat", messages=tuple(clean), origin=origin)


def _parse_prompt_completion(row: dict, origin: str) -> Example:
    for key in ("prompt", "completion"):
        if key not in row:
            raise BadRowError.at(origin, f"prompt/completion row is missing '{key}'")
        if not isinstance(row[key], str):
            raise BadRowError.at(origin, f"'{key}' must be a string, got {type(row[key]).__name__}")
    if not row["completion"]:
        raise BadRowError.at(origin, "'completion' is empty: nothing to train on")
    return Example(kind="prompt_completion", prompt=row["prompt"], completion=row["completion"], origin=origin)


def _parse_text(row: dict, origin: str) -> Example:
    text = row["text"]
    if not isinstance(text, str):
        raise BadRowError.at(origin, f"'text' must be a string, got {type(text).__name__}")
    if not text:
        raise BadRowError.at(origin, "'text' is empty: nothing to train on")
    return Example(kind="text", text=text, origin=origin)


_SHAPE_KEYS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
_PARSERS = {"chat": _parse_chat, "prompt_completion": _parse_prompt_completion, "text": _parse_text}


# --- sources: each yields (origin, decoded row), or (origin, BadRowError) for a row it cannot decode ---


def _hf_rows(path: str) -> Iterator[tuple[str, Any]]:
    import datasets  # heavy import, only for this format

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path} holds a DatasetDict with splits {list(ds)}; point at one split, e.g. {path}/train")
    for index, row in enumerate(ds):
        yield f"{path}:{index + 1}", _drop_nulls(row)


def _parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    files = [Path(path)] if Path(path).is_file() else _parquet_files(Path(path))
    for file in files:
        index = 0
        for batch in pq.ParquetFile(file).iter_batches():
            for row in batch.to_pylist():
                index += 1
                yield f"{file}:{index}", _drop_nulls(row)


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.parquet"))


def _drop_nulls(value: Any) -> Any:
    """Columnar sources store one schema for all rows: a text row in a table that also has chat
    rows carries `messages=None`. Null there means "absent", so drop it before validating."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


_ROW_READERS = {"jsonl": jsonl_rows, "hf": _hf_rows, "parquet": _parquet_rows}
