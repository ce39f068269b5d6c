"""Fixtures for the data pipeline tests: a tiny trained tokenizer and a JSONL writer."""

from __future__ import annotations

import json
import random

import pytest

from ragft.model.tokenizer import train_tokenizer

WORDS = (
    "the a model reads writes trains data token loss row batch packs question answer document "
    "retrieval index vector query small large fast slow good bad first last river mountain city"
).split()


def generate_sentences(count: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English, enough to give the BPE trainer merges to learn."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(count)]


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny model's tokenizer (byte-level BPE, chat template, <s> </s> <pad>), vocab ~400."""
    return train_tokenizer(generate_sentences(400), vocab_size=400)


@pytest.fixture(scope="session")
def sentences():
    """sentences(count, seed=0) -> deterministic pseudo-English lines (the tokenizer's training text)."""
    return generate_sentences


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name) -> path: one JSON object per line; a str row is written verbatim."""

    def write(rows: list, name: str = "train.jsonl") -> str:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(path)

    return write
