"""POST /v1/completions' own steps: its limits, and its prompts (text or token ids, with retrieved context) as ids.

A request holds one prompt or several, each text or token ids. Text prompts are tokenized as they are
(`ragft.data.tokenize.text_prompt_ids`), after the retrieved context when retrieval is on
(`ragft.rag.with_context`); token-id prompts are scored as sent. Retrieval serves one text prompt per request,
and echo with logprobs scores the prompt as sent: `check_retrievable` refuses the rest with a way out.
The route itself (its frame, model, shared limits and generation) is `ragft.serve.ingress.Ingress`.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

from ragft.data.tokenize import text_prompt_ids
from ragft.rag import with_context
from ragft.serve.protocol import CompletionRequest, bad_request

Search = Callable[[str], Awaitable[tuple[list, int]]]  # query → (hits, index version)
Tokenize = Callable[..., Awaitable[list[int]]]  # (fn, *args) → fn(*args), off the event loop


def check_prompt_count(req: CompletionRequest, prompts: list, config) -> None:
    """At most serve.max_prompts prompts, and serve.max_sequences sequences (prompts × n), per request."""
    if len(prompts) > config.max_prompts:
        raise bad_request(f"prompt: at most serve.max_prompts={config.max_prompts} prompts per request, got "
                          f"{len(prompts)}", "prompt")
    if len(prompts) * req.n > config.max_sequences:
        raise bad_request(f"n: {len(prompts)} prompts × n={req.n} is {len(prompts) * req.n} sequences; at most "
                          f"serve.max_sequences={config.max_sequences} per request", "n")


def check_retrievable(req: CompletionRequest, prompts: list) -> None:
    """Retrieval puts context before one text prompt and cites it: what else a request asks for must fit that."""
    off = "; send rag: {\"enabled\": false}"
    if len(prompts) > 1:
        raise bad_request(f"rag: retrieval serves one prompt per request, got {len(prompts)}{off}", "rag")
    if not isinstance(prompts[0], str):
        raise bad_request(f"rag: token-id prompts are scored as sent, without retrieved context{off}", "rag")
    if req.echo and req.logprobs is not None:
        raise bad_request(f"rag: echo with logprobs scores the prompt as sent, without retrieved context{off}",
                          "rag")


async def prompt_inputs(prompts: list, echo: bool, tokenizer, rag_config, search: Optional[Search],
                        tokenize: Tokenize) -> tuple[list[list[int]], list[str], list, Optional[int]]:
    """Each prompt's token ids and the text an echo puts before its completion; the hits retrieved and their
    index version. `search` is None when retrieval is off for this request."""
    hits, version = [], None
    inputs, echoes = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            if search is not None and prompt.strip():
                hits, version = await search(prompt)
            ids = await tokenize(text_prompt_ids, tokenizer, with_context(prompt, hits, rag_config))
            text = prompt
        else:
            if max(prompt) >= len(tokenizer):
                raise bad_request(f"prompt: token ids must be below the vocabulary size {len(tokenizer)}", "prompt")
            ids, text = list(prompt), tokenizer.decode(prompt)
        if not ids:
            raise bad_request("prompt: the prompt is empty (this model's tokenizer adds no start token)", "prompt")
        inputs.append(ids)
        echoes.append(text if echo else "")
    return inputs, echoes, hits, version


def prompt_summary(prompts: list) -> str:
    """The prompts as the access log shows them (serve.log_prompts): texts, and token-id prompts by length."""
    return " | ".join(t if isinstance(t, str) else f"<{len(t)} token ids>" for t in prompts)
