"""The loss mask: exactly the assistant replies (chat) or the completion (prompt/completion) are trained.

Reference: the strings the rows hold and the tiny chat template's known turn markers
("<|role|>\\n {content}<|end|>\\n"), compared with the decoded labelled and unlabelled tokens.
"""

from __future__ import annotations

import copy

import pytest

from ragft.data.rows import Example
from ragft.data.tokenize import IGNORE_INDEX, ChatTemplateError, encode
from ragft.jsonl import BadRowError

MESSAGES = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The river city?"},
    {"role": "assistant", "content": "The first river."},
    {"role": "user", "content": "And the mountain?"},
    {"role": "assistant", "content": "A small mountain."},
)
CHAT = Example(kind="chat", messages=MESSAGES, origin="chat.jsonl:7")


def runs(tokenizer, ids: list[int], labels: list[int], trained: bool) -> list[str]:
    """Decoded maximal runs of tokens that are (or are not) trained on."""
    out, current = [], []
    for token, label in zip(ids, labels):
        if (label != IGNORE_INDEX) == trained:
            current.append(token)
        elif current:
            out.append(tokenizer.decode(current))
            current = []
    if current:
        out.append(tokenizer.decode(current))
    return out


def test_chat_trains_exactly_the_assistant_turns_and_their_end_markers(tokenizer):
    enc = encode(CHAT, tokenizer, max_seq_len=256)
    # A label is the token itself (the model shifts) or IGNORE_INDEX.
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(enc.input_ids, enc.labels))
    assert runs(tokenizer, enc.input_ids, enc.labels, trained=True) == [
        " The first river.<|end|>\n",  # the space that follows the header is the reply's first token's
        " A small mountain.<|end|>\n",
    ]
    # Everything else, system and user text and the assistant headers, has no loss.
    assert runs(tokenizer, enc.input_ids, enc.labels, trained=False) == [
        "<|system|>\n Be brief.<|end|>\n<|user|>\n The river city?<|end|>\n<|assistant|>\n",
        "<|user|>\n And the mountain?<|end|>\n<|assistant|>\n",
    ]
    assert tokenizer.decode(enc.input_ids) == tokenizer.apply_chat_template(list(MESSAGES), tokenize=False)
    assert enc.origin == "chat.jsonl:7"


def test_train_on_prompt_trains_every_token_but_the_first(tokenizer):
    enc = encode(CHAT, tokenizer, max_seq_len=256, train_on_prompt=True)
    assert enc.input_ids == encode(CHAT, tokenizer, max_seq_len=256).input_ids
    assert enc.labels == [IGNORE_INDEX] + enc.input_ids[1:]


def test_prompt_completion_trains_completion_and_eos_only(tokenizer):
    example = Example(kind="prompt_completion", prompt="Question: the river?", completion=" A city.", origin="x:1")
    enc = encode(example, tokenizer, max_seq_len=256)
    assert tokenizer.decode(enc.input_ids) == "<s>Question: the river? A city.</s>"
    assert runs(tokenizer, enc.input_ids, enc.labels, trained=False) == ["<s>Question: the river?"]
    assert runs(tokenizer, enc.input_ids, enc.labels, trained=True) == [" A city.</s>"]


def test_text_trains_everything_after_bos(tokenizer):
    enc = encode(Example(kind="text", text="The city reads the river.", origin="x:1"), tokenizer, max_seq_len=256)
    assert tokenizer.decode(enc.input_ids) == "<s>The city reads the river.</s>"
    # bos has no loss: nothing precedes it, and in a packed row it would be scored across the boundary.
    assert enc.labels == [IGNORE_INDEX] + enc.input_ids[1:]


def test_truncation_keeps_the_first_max_seq_len_tokens(tokenizer):
    example = Example(kind="text", text="The model reads a large document about the river. " * 20, origin="x:1")
    full = encode(example, tokenizer, max_seq_len=10_000)
    cut = encode(example, tokenizer, max_seq_len=16)
    assert len(full) > 16
    assert (cut.input_ids, cut.labels) == (full.input_ids[:16], full.labels[:16])


def test_nothing_trainable_after_truncation_is_a_bad_row_with_its_origin(tokenizer):
    with pytest.raises(BadRowError) as info:
        encode(CHAT, tokenizer, max_seq_len=8)  # the first reply starts after ~23 tokens
    assert str(info.value) == "chat.jsonl:7: no trainable tokens within data.max_seq_len=8"


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    # Marks the final message differently from earlier ones, as templates that strip reasoning from old turns do.
    unstable = copy.deepcopy(tokenizer)
    unstable.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if loop.last %}<|end|>{% else %}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not prefix-stable"):
        encode(CHAT, unstable, max_seq_len=256)


def test_template_that_rejects_a_conversation_makes_it_a_bad_row(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tokenizer.chat_template
    )
    with pytest.raises(BadRowError, match=r"^chat\.jsonl:7: the chat template rejected .*System role not supported"):
        encode(CHAT, strict, max_seq_len=256)
