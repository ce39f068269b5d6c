"""Turning one validated `Example` into token ids and a loss mask.

The mask is decided on characters, then carried to tokens through the tokenizer's offset
mapping: a token is trained when its first character lies inside a trained span. That way the
text is tokenized exactly once, as the model will see it at inference, instead of gluing
separately tokenized pieces whose joins a BPE tokenizer would merge differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jinja2

from ragft.data.rows import Example
from ragft.errors import BadDataError
from ragft.jsonl import BadRowError

IGNORE_INDEX = -100  # label of a token with no loss (PyTorch cross_entropy's default ignore_index)

Span = tuple[int, int]  # [start, end) in characters


class ChatTemplateError(BadDataError):
    """The tokenizer's chat template cannot support an assistant-only loss mask.

    A configuration problem (the same for every row), so it is never skipped as a bad row."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: `labels[i]` is the target for `input_ids[i]`, IGNORE_INDEX where no loss."""

    input_ids: list[int]
    labels: list[int]
    origin: str = ""  # "path:line" of the row it came from

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(example: Example, tokenizer, max_seq_len: int, train_on_prompt: bool = False,
           reply_from: int = 0) -> Encoded:
    """Tokenize `example` with its loss mask, truncated to `max_seq_len` tokens.

    chat: the rendered chat template, loss on each assistant turn's content and end-of-turn marker.
    prompt_completion: [bos] prompt completion eos, loss on completion and eos.
    text: [bos] text eos, loss on all of it.
    train_on_prompt: loss on every token of any kind (the prompt and user turns too).
    reply_from (chat): loss only on the assistant turns from message `reply_from` on, as a preference pair's
    reply after a history that may hold earlier assistant turns.
    Raises `BadRowError` when truncation leaves no token to train on.
    """
    if example.kind == "chat":
        text, spans = chat_text_and_spans(example, tokenizer, reply_from)
        input_ids, labels = _tokenize(tokenizer, text, spans)
    elif example.kind == "prompt_completion":
        text = example.prompt + example.completion
        input_ids, labels = _document(tokenizer, text, trained_from=len(example.prompt))
    elif example.kind == "text":
        input_ids, labels = _document(tokenizer, example.text, trained_from=0)
    else:
        raise ValueError(f"unknown example kind {example.kind!r}")

    # Nothing precedes the first token, so its label is never a target when the example stands
    # alone. In a packed row it would be scored as the prediction of the *previous* example's
    # last token: a loss across the boundary. Masking it keeps packed and unpacked losses equal.
    if train_on_prompt:
        labels = list(input_ids)
    labels[0] = IGNORE_INDEX
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRowError.at(example.origin, f"no trainable tokens within data.max_seq_len={max_seq_len}")
    return Encoded(input_ids=input_ids, labels=labels, origin=example.origin)


def chat_text_and_spans(example: Example, tokenizer, first_turn: int = 0) -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn (from message `first_turn` on).

    An assistant turn i spans from the end of `render(messages[:i], add_generation_prompt=True)`
    (the history plus the assistant header) to the end of `render(messages[:i+1])`, so it holds the
    reply and whatever the template closes a turn with (the end-of-turn token the model must learn
    to emit). This only works if each rendering is a prefix of the next; checked for every turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the tokenizer has no chat template, which chat rows need")
    messages = list(example.messages)
    full = _render(tokenizer, messages, example.origin)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_turn:
            continue
        before = _render(tokenizer, messages[:i], example.origin, add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], example.origin)
        _check_prefix(before, through, f"the history before turn {i} with the generation prompt", f"turn {i}")
        _check_prefix(through, full, f"the conversation up to turn {i}", "the whole conversation")
        spans.append((len(before), len(through)))
    return full, spans


def _render(tokenizer, messages: list[dict], origin: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:  # e.g. "roles must alternate user/assistant": this row's problem
        raise BadRowError.at(origin, f"the chat template rejected this conversation: {err}") from err


def _check_prefix(prefix: str, text: str, prefix_name: str, text_name: str) -> None:
    if text.startswith(prefix):
        return
    at = next((i for i, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
    raise ChatTemplateError(
        "the tokenizer's chat template is not prefix-stable, so assistant turns cannot be located for the loss mask: "
        f"around character {at}, {prefix_name} renders as {prefix[max(0, at - 30) : at + 30]!r} "
        f"but {text_name} renders as {text[max(0, at - 30) : at + 30]!r}. "
        "Use a template whose rendering of the first n messages is a prefix of the rendering of n+1 "
        "(templates that rewrite earlier turns, e.g. by dropping reasoning, are not)."
    )


def _document(tokenizer, text: str, trained_from: int) -> tuple[list[int], list[int]]:
    """[bos] text eos with loss from character `trained_from` on, eos included."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: text and prompt/completion rows need one to end on")
    input_ids, labels = _tokenize(tokenizer, text, [(trained_from, len(text))])
    # bos marks a document start the same way inference-time tokenization of a prompt does.
    if tokenizer.bos_token_id is not None:
        input_ids, labels = [tokenizer.bos_token_id] + input_ids, [IGNORE_INDEX] + labels
    return input_ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


def _tokenize(tokenizer, text: str, spans: Sequence[Span]) -> tuple[list[int], list[int]]:
    """Token ids of `text` (no special tokens added: templates carry their own) and labels that
    copy the id for each token whose first character lies in one of `spans`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _end) in zip(input_ids, enc["offset_mapping"])
    ]
    return input_ids, labels


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids a model trained on `encode`'s chat rows sees before it answers: history + assistant header.

    Raises jinja2.TemplateError when the template rejects the conversation (e.g. roles that do not alternate).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """[bos] text, as `encode` starts prompt/completion and text rows."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
