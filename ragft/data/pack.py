"""Rows for the model: packing tokenized examples into rows, and collating rows into batches.

A row is `{"input_ids", "labels", "position_ids"}` (lists of ints, no padding). In a packed row
several examples sit back to back and `position_ids` restart at 0 at each one. The model is
then called with `input_ids`, `position_ids`, `labels`, NO attention mask, and `use_cache=False`:
transformers (masking_utils.find_packed_sequence_indices) reads the position resets and builds a
block-diagonal causal mask, so packed examples never attend to each other and each one's loss
equals its loss alone (tests/data/test_pack.py proves it, for sdpa and eager attention).

`use_cache=False` matters: with the config default `use_cache=True` transformers creates a KV cache
even in training, and it builds the packed mask only when there is no cache, so the examples
would silently attend to each other.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ragft.data.tokenize import IGNORE_INDEX, Encoded

Row = dict[str, list[int]]
ROW_COLUMNS = ("input_ids", "labels", "position_ids")


def pack(encoded: Sequence[Encoded], max_seq_len: int) -> list[Row]:
    """Examples packed into rows of at most `max_seq_len` tokens by first-fit decreasing.

    Longest examples are placed first, each into the first row with room for it. Deterministic:
    ties keep input order. Rows are not padded and may be shorter than `max_seq_len`.
    """
    too_long = [e.origin for e in encoded if len(e) > max_seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_seq_len={max_seq_len}, e.g. {too_long[0]}")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # sorted() is stable
    bins = _FirstFit(num_bins=len(encoded), capacity=max_seq_len)
    members: list[list[int]] = []
    for i in order:
        b = bins.place(len(encoded[i]))
        if b == len(members):  # first fit only ever opens the next empty row
            members.append([])
        members[b].append(i)
    return [_row([encoded[i] for i in row]) for row in members]


def unpacked(encoded: Sequence[Encoded]) -> list[Row]:
    """One example per row, in input order."""
    return [_row([e]) for e in encoded]


def segments_row(encoded: Sequence[Encoded]) -> Row:
    """`encoded` back to back in one row, each a segment of its own (positions restart at 0), in the given
    order: what a preference pair is (ragft.data.pairs), with attention kept inside each segment."""
    return _row(encoded)


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one and stack them.

    Returns `input_ids`, `labels`, `position_ids` of shape (batch, longest) as int64, and
    `num_tokens`, the count of non-pad tokens, as a 0-dim tensor (for throughput; not a model
    input). Pad tokens get label IGNORE_INDEX and positions 0, 1, ... so the pad run is a segment
    of its own that no real token attends to. Rows may be lists or arrays (Ray Data gives numpy).
    """
    longest = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), longest), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(longest, dtype=torch.long).repeat(len(rows), 1),
    }
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        for name in ROW_COLUMNS:
            batch[name][b, :n] = torch.as_tensor(row[name], dtype=torch.long)
        batch["position_ids"][b, n:] -= n  # the pad run restarts at 0
    batch["num_tokens"] = torch.tensor(sum(len(row["input_ids"]) for row in rows))
    return batch


def packing_efficiency(rows: Sequence[Row], row_len: int) -> float:
    """Share of token slots holding real tokens: sum of row lengths / (len(rows) * row_len).

    `row_len` is the length a batch is padded to. prepare() passes max_seq_len, an upper bound
    (collate pads each batch only to its longest row), so the efficiency training actually gets is
    at least this number. 1.0 means no slot is spent on padding.
    """
    if not rows:
        return 0.0
    return sum(len(row["input_ids"]) for row in rows) / (len(rows) * row_len)


def _row(examples: Sequence[Encoded]) -> Row:
    row: Row = {name: [] for name in ROW_COLUMNS}
    for e in examples:
        row["input_ids"].extend(e.input_ids)
        row["labels"].extend(e.labels)
        row["position_ids"].extend(range(len(e)))
    return row


class _FirstFit:
    """Remaining room of every row in a max segment tree: finding the first row with room is
    O(log n) instead of a scan over all open rows (which is quadratic on a million examples).

    All rows start empty with full capacity; since first fit fills them left to right, "the first
    leaf with room" is either an open row or the next unopened one.
    """

    def __init__(self, num_bins: int, capacity: int):
        self.size = 1
        while self.size < max(num_bins, 1):
            self.size *= 2
        self.tree = [capacity] * (2 * self.size)  # node k has children 2k, 2k+1; leaves at size..2*size

    def place(self, length: int) -> int:
        """Put `length` tokens into the first row with room; return that row's index."""
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= length else 2 * node + 1
        self.tree[node] -= length
        leaf, node = node, node // 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2
        return leaf - self.size
