"""The `logprobs` of a chat or completions answer: each choice's tokens scored by the TextGenerator.

A choice is scored by teacher forcing its prompt + completion (`Engine.token_logprobs`), for the completion's
tokens, and the prompt's too when the request echoes it. Choices with the same prompt and completion (every
choice of an echo with max_tokens=0, greedy n > 1) are scored once. The shapes are OpenAI's (ragft.serve.protocol).
"""

from __future__ import annotations

import asyncio

from ragft.serve.protocol import bad_request, chat_logprobs, completion_logprobs


async def choices_logprobs(generator, tokenizer, kind: str, model: str, inputs: list[list[int]], items: list[dict],
                           n: int, top_k: int, echo: bool) -> list[dict]:
    """The `logprobs` object of each choice in `items` (choice i * n + j: prompt i's j-th)."""
    scoring: dict[tuple, asyncio.Task] = {}
    for index, item in enumerate(items):
        key = (index // n, tuple(item["token_ids"]))
        if key not in scoring:
            scoring[key] = asyncio.ensure_future(choice_logprobs(
                generator, tokenizer, kind, model, inputs[index // n], item["token_ids"], top_k, echo=echo))
    return await asyncio.gather(*(scoring[(index // n, tuple(item["token_ids"]))] for index, item in enumerate(items)))


async def choice_logprobs(generator, tokenizer, kind: str, model: str, prompt: list[int], completion: list[int],
                          top_k: int, echo: bool) -> dict:
    """A choice's `logprobs` object: for its completion's tokens, and its prompt's too when echoed (the
    first prompt token, which nothing predicts, gets null, as in OpenAI's and vLLM's answers)."""
    sequence = list(prompt) + list(completion)
    start = 1 if echo else len(prompt)
    try:
        scored = await generator.token_logprobs.remote(model, sequence, start, top_k)
    except NotImplementedError as err:  # an engine that cannot score here (vLLM 0.32 with adapters loaded)
        cause = getattr(err, "cause", err)  # Ray's wrapper is the cause's type; its text carries a traceback
        raise bad_request(f"logprobs: {cause}", "logprobs", "unsupported_parameter") from None

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    if kind == "chat":
        return chat_logprobs([(text(t.token_id), t.logprob, [(text(i), lp) for i, lp in t.top]) for t in scored])
    entries = [(text(sequence[0]), None, None)] if echo else []
    entries += [(text(t.token_id), t.logprob, {text(i): lp for i, lp in t.top}) for t in scored]
    return completion_logprobs(entries)
