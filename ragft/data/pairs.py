"""Preference pairs for `objective=dpo`: reading {prompt, chosen, rejected} rows and turning each into one row.

A row holds a prompt and two replies to it:

    {"prompt": "Q: ...\\nA:", "chosen": " right", "rejected": " wrong"}
    {"prompt": [{"role": "user", "content": "..."}], "chosen": "right", "rejected": "wrong"}
    {"messages": [...history ending in a user turn...], "chosen": [{"role": "assistant", "content": "right"}],
     "rejected": [{"role": "assistant", "content": "wrong"}]}

A string prompt makes two prompt/completion examples ([bos] prompt reply eos); chat messages (`prompt` as a list, or
`messages`) make two chat examples rendered by the tokenizer's chat template, the reply a string (one assistant turn)
or a list of assistant messages. Either way each sequence is validated and tokenized by the same code as SFT rows
(`ragft.data.rows`, `ragft.data.tokenize`), a bad row is a `BadRowError` naming its file and line, and the loss mask
covers the reply only (its tokens and the end-of-turn marker; never the prompt, nor earlier assistant turns).

Packing is off for pairs: each pair is one row holding the chosen sequence then the rejected one, two segments
whose positions restart at 0, so attention stays inside each (the packed-row mask of `ragft.data.pack`) and
`ragft.train.dpo` sums each segment's reply log-probs. `data.max_seq_len` bounds each sequence, so a row is at
most twice that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ragft.data.pack import Row, segments_row
from ragft.data.rows import Example, parse_row, read_source
from ragft.data.tokenize import Encoded, encode
from ragft.jsonl import BadRowError, json_object

REPLIES = ("chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    """One valid preference row: the same prompt with each reply, as two SFT examples."""

    chosen: Example
    rejected: Example
    reply_from: int = 0  # chat: index of the first reply message (the loss starts there)
    origin: str = ""


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized pair: the chosen and rejected sequences, each with its reply-only labels."""

    chosen: Encoded
    rejected: Encoded
    origin: str = ""

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def read_pairs(path: str, fmt: str = "auto", on_bad_row: str = "error") -> tuple[list[Pair], list[BadRowError]]:
    """Every preference row of `path` (jsonl, a datasets folder or parquet), and the bad rows skipped."""
    return read_source(path, fmt, on_bad_row, parse_pair, "valid preference rows")


def parse_pair(row: Any, origin: str) -> Pair:
    """The `Pair` a decoded row describes, or `BadRowError` saying why it describes none."""
    json_object(row, origin)
    missing = [key for key in REPLIES if key not in row]
    prompt_keys = [key for key in ("prompt", "messages") if key in row]
    if len(prompt_keys) != 1:
        found = "both 'prompt' and 'messages'" if prompt_keys else "neither 'prompt' nor 'messages'"
        missing_note = f"; missing {missing}" if missing else ""
        raise BadRowError.at(origin, f"a preference row needs one prompt ('prompt' or 'messages'), found {found}"
                                     f"{missing_note}; keys {sorted(row)}")
    if missing:
        hint = "; an SFT row? train on those with objective=sft" if len(missing) == 2 else ""
        raise BadRowError.at(origin, f"a preference row needs 'chosen' and 'rejected'; missing {missing}{hint}")
    prompt = row[prompt_keys[0]]
    if isinstance(prompt, str):
        return _text_pair(row, prompt, origin)
    if isinstance(prompt, list):
        return _chat_pair(row, prompt, prompt_keys[0], origin)
    raise BadRowError.at(origin, f"'{prompt_keys[0]}' must be a string or a list of messages, "
                                 f"got {type(prompt).__name__}")


def _text_pair(row: dict, prompt: str, origin: str) -> Pair:
    replies = {}
    for key in REPLIES:
        if not isinstance(row[key], str):
            raise BadRowError.at(origin, f"with a string prompt, '{key}' must be a string, got {type(row[key]).__name__}")
        if not row[key]:
            raise BadRowError.at(origin, f"'{key}' is empty: nothing to compare")
        replies[key] = _as_example({"prompt": prompt, "completion": row[key]}, origin, key)
    return Pair(replies["chosen"], replies["rejected"], origin=origin)


def _chat_pair(row: dict, prompt: list, prompt_key: str, origin: str) -> Pair:
    if not prompt:
        raise BadRowError.at(origin, f"'{prompt_key}' is an empty list of messages")
    if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        raise BadRowError.at(origin, f"'{prompt_key}' must end before the reply (its last message is an assistant "
                                     "turn); the replies are 'chosen' and 'rejected'")
    replies = {}
    for key in REPLIES:
        reply = row[key]
        if isinstance(reply, str):
            reply = [{"role": "assistant", "content": reply}]
        if not isinstance(reply, list) or not reply:
            raise BadRowError.at(origin, f"'{key}' must be a string or a non-empty list of assistant messages")
        roles = {m.get("role") if isinstance(m, dict) else None for m in reply}
        if roles != {"assistant"}:
            raise BadRowError.at(origin, f"'{key}' may hold assistant messages only, found roles {sorted(map(str, roles))}")
        replies[key] = _as_example({"messages": list(prompt) + reply}, origin, key)
    return Pair(replies["chosen"], replies["rejected"], reply_from=len(prompt), origin=origin)


def _as_example(row: dict, origin: str, key: str) -> Example:
    """The SFT example of the prompt with one reply, validated as SFT rows are; errors name the reply."""
    try:
        return parse_row(row, origin)
    except BadRowError as err:
        raise BadRowError(err.path, err.line, f"'{key}': {err.reason}") from None


def encode_pair(pair: Pair, tokenizer, max_seq_len: int) -> EncodedPair:
    """Both sequences tokenized, each truncated to `max_seq_len`, labels on the reply only."""
    encoded = {}
    for key, example in zip(REPLIES, (pair.chosen, pair.rejected)):
        try:
            encoded[key] = encode(example, tokenizer, max_seq_len, reply_from=pair.reply_from)
        except BadRowError as err:
            raise BadRowError(err.path, err.line, f"'{key}': {err.reason}") from None
    return EncodedPair(encoded["chosen"], encoded["rejected"], pair.origin)


def pair_rows(pairs: list[EncodedPair]) -> list[Row]:
    """One row per pair: chosen then rejected, each a segment of its own."""
    return [segments_row([pair.chosen, pair.rejected]) for pair in pairs]
