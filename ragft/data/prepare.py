"""Tokenize and pack the training data once, on the driver, cached by content hash.

Workers never tokenize: they read the parquet files written here. The cache key covers
everything the output depends on (input bytes, tokenizer, packing settings, seed, this
pipeline's version), so a changed input gives a new folder and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ragft.config.schema import DataConfig
from ragft.data.pack import ROW_COLUMNS, Row, pack, packing_efficiency, unpacked
from ragft.data.pairs import encode_pair, pair_rows, read_pairs
from ragft.data.rows import detect_format, read_examples
from ragft.data.tokenize import IGNORE_INDEX, Encoded, encode
from ragft.jsonl import BadRowError

log = logging.getLogger(__name__)

# Bump when the output of the same inputs changes (tokenization, masking, packing, file layout).
PIPELINE_VERSION = 1
SHOWN_BAD_ROWS = 3  # how many skipped rows the warning names


@dataclass(frozen=True)
class PreparedData:
    """Where the tokenized rows are and what they hold. Mirrors `stats.json` in the cache folder."""

    train_path: str  # parquet: input_ids, labels, position_ids as list<int32>
    eval_path: str
    num_train_rows: int
    num_eval_rows: int
    num_examples: int  # examples in train + eval after skipping bad rows
    num_skipped: int  # bad rows skipped (always 0 with on_bad_row=error)
    train_tokens: int  # non-pad tokens in the train rows
    packing_efficiency: float  # train tokens / (train rows * max_seq_len); see pack.packing_efficiency
    data_hash: str  # sha256 hex of the cache key; recorded in checkpoint manifests


def prepare(data: DataConfig, tokenizer, cache_dir: str, seed: int, objective: str = "sft") -> PreparedData:
    """Read, validate, tokenize, split and pack `data`, or reuse the cached result.

    `objective="dpo"` reads preference rows instead (ragft.data.pairs): one row per pair, never packed.

    With `data.eval_path` unset, `data.eval_fraction` of the examples (at least one) is held out
    for eval, chosen by `seed`, before packing. Train rows are shuffled by `seed` after packing.
    A bad row raises `BadRowError` with on_bad_row=error; with skip it is counted and logged.
    """
    data_hash = cache_key(data, tokenizer, seed, objective)
    folder = Path(cache_dir) / "data" / data_hash[:16]
    if (folder / "stats.json").exists():
        stats = json.loads((folder / "stats.json").read_text())
        log.info("data cache hit → %s (%d train rows, %d eval rows)", folder, stats["num_train_rows"],
                 stats["num_eval_rows"])  # fmt: skip
        _warn_skipped(stats["num_skipped"], stats["skipped_first"])
        return _prepared(folder, stats)

    started = time.perf_counter()
    train, eval_, skipped = _encode_splits(data, tokenizer, seed, objective)
    train_rows, eval_rows = _rows(train, data, objective), _rows(eval_, data, objective)
    row_len = data.max_seq_len * (2 if objective == "dpo" else 1)  # a pair's row holds two sequences
    random.Random(seed).shuffle(train_rows)  # FFD leaves the long examples first; shuffled, batches mix lengths

    stats = {
        "num_train_rows": len(train_rows),
        "num_eval_rows": len(eval_rows),
        "num_examples": len(train) + len(eval_),
        "num_skipped": len(skipped),
        "train_tokens": sum(len(row["input_ids"]) for row in train_rows),
        "packing_efficiency": packing_efficiency(train_rows, row_len),
        "data_hash": data_hash,
        # Not part of PreparedData: for people reading the folder, and for the warning on a cache hit.
        "num_train_examples": len(train),
        "num_eval_examples": len(eval_),
        "train_label_tokens": sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in train_rows),
        "skipped_first": [str(err) for err in skipped[:SHOWN_BAD_ROWS]],
        "train_source": data.train_path,
        "eval_source": data.eval_path,
        "max_seq_len": data.max_seq_len,
        "packing": data.packing and objective != "dpo",
        "objective": objective,
        "seed": seed,
        "pipeline_version": PIPELINE_VERSION,
    }
    _write_atomically(folder, {"train.parquet": train_rows, "eval.parquet": eval_rows}, stats)
    _warn_skipped(stats["num_skipped"], stats["skipped_first"])
    log.info(
        "prepared data → %s: %d examples → %d train rows + %d eval rows, %d train tokens, packing %.1f%% (%.1f s)",
        folder, stats["num_examples"], len(train_rows), len(eval_rows), stats["train_tokens"],
        100 * stats["packing_efficiency"], time.perf_counter() - started,
    )  # fmt: skip
    return _prepared(folder, stats)


def cache_key(data: DataConfig, tokenizer, seed: int, objective: str = "sft") -> str:
    """sha256 hex over everything the prepared rows depend on."""
    settings = {
        "pipeline_version": PIPELINE_VERSION,
        # The resolved format, so format=auto and format=jsonl on the same file share a cache entry.
        "format": data.format if data.format != "auto" else detect_format(data.train_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": data.max_seq_len,
        "packing": data.packing,
        "train_on_prompt": data.train_on_prompt,
        "eval_fraction": data.eval_fraction,
        "on_bad_row": data.on_bad_row,
        "seed": seed,
    }
    if objective != "sft":  # only then: SFT keys stay what they were, and so do the caches they name
        settings["objective"] = objective
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    _hash_source(digest, "train", data.train_path)
    if data.eval_path is not None:
        _hash_source(digest, "eval", data.eval_path)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of what decides token ids: the tokenizer's full serialization (vocab, merges,
    normalizer, added tokens), its chat template and its special token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; ragft needs one for offset mappings")
    parts = {
        "backend": backend.to_str(),
        "chat_template": tokenizer.chat_template,
        "special_ids": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "all": sorted(tokenizer.all_special_ids),
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _hash_source(digest, role: str, path: str) -> None:
    """Add the bytes of a file, or of every file under a folder (with its relative name), to `digest`."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        name = file.name if file == root else file.relative_to(root).as_posix()
        digest.update(f"\0{role}\0{name}\0".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)


def _encode_splits(data: DataConfig, tokenizer, seed: int, objective: str) -> tuple[list, list, list[BadRowError]]:
    """Train and eval examples (or pairs), tokenized, and every bad row skipped on the way."""
    train, skipped = _read_and_encode(data.train_path, tokenizer, data, objective)
    if data.eval_path is not None:
        eval_, eval_skipped = _read_and_encode(data.eval_path, tokenizer, data, objective)
        return train, eval_, skipped + eval_skipped
    # Held out after tokenizing, so the eval set is never left empty by an example that cannot be trained on.
    train, eval_ = _hold_out(train, data.eval_fraction, random.Random(seed), data.train_path)
    return train, eval_, skipped


def _read_and_encode(path: str, tokenizer, data: DataConfig, objective: str) -> tuple[list, list[BadRowError]]:
    """The tokenized examples (Encoded, or EncodedPair for dpo) of one source, and its bad rows (both kinds:
    unreadable and untrainable)."""
    if objective == "dpo":
        examples, skipped = read_pairs(path, data.format, data.on_bad_row)

        def encode_one(pair):
            return encode_pair(pair, tokenizer, data.max_seq_len)
    else:
        read = read_examples(path, data.format, data.on_bad_row)
        examples, skipped = read.examples, read.skipped

        def encode_one(example):
            return encode(example, tokenizer, data.max_seq_len, data.train_on_prompt)
    encoded, skipped = [], list(skipped)
    for example in tqdm(examples, desc=f"tokenizing {Path(path).name}", unit="ex", disable=None):
        try:
            encoded.append(encode_one(example))
        except BadRowError as err:
            if data.on_bad_row == "error":
                raise
            skipped.append(err)
    if not encoded:
        raise BadRowError(path, None, f"no example has a trainable token within data.max_seq_len={data.max_seq_len}")
    return encoded, skipped


def _hold_out(
    encoded: list[Encoded], fraction: float, rng: random.Random, path: str
) -> tuple[list[Encoded], list[Encoded]]:
    """(train, eval): `fraction` of the examples, at least one, drawn by `rng`; both keep input order."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.eval_fraction must be between 0 and 1 when data.eval_path is unset, got {fraction}")
    if len(encoded) < 2:
        raise BadRowError(path, None, "need at least 2 valid examples to hold one out for eval; set data.eval_path")
    num_eval = min(max(1, round(fraction * len(encoded))), len(encoded) - 1)
    held = set(rng.sample(range(len(encoded)), num_eval))
    train = [e for i, e in enumerate(encoded) if i not in held]
    eval_ = [e for i, e in enumerate(encoded) if i in held]
    return train, eval_


def _rows(encoded: list, data: DataConfig, objective: str) -> list[Row]:
    if objective == "dpo":
        return pair_rows(encoded)
    return pack(encoded, data.max_seq_len) if data.packing else unpacked(encoded)


def _write_atomically(folder: Path, tables: dict[str, list[Row]], stats: dict) -> None:
    """Write into a temporary sibling folder and rename it into place: a reader (or a crash)
    never sees a half-written cache entry, and `stats.json` existing means the entry is whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        schema = pa.schema([(name, pa.list_(pa.int32())) for name in ROW_COLUMNS])
        for filename, rows in tables.items():
            columns = {name: [row[name] for row in rows] for name in ROW_COLUMNS}
            pq.write_table(pa.Table.from_pydict(columns, schema=schema), tmp / filename)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "stats.json").exists():
            raise
        # Another process prepared the same inputs first; its copy is identical.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _warn_skipped(num_skipped: int, first: list[str]) -> None:
    if num_skipped:
        log.warning("skipped %d bad rows (data.on_bad_row=skip); first: %s", num_skipped, "; ".join(first))


def _prepared(folder: Path, stats: dict) -> PreparedData:
    paths = {"train_path": str(folder / "train.parquet"), "eval_path": str(folder / "eval.parquet")}
    return PreparedData(**paths, **{f.name: stats[f.name] for f in fields(PreparedData) if f.name not in paths})
