"""`stream=true`: a request's choices as server-sent events, OpenAI's chunks, as the TextGenerator decodes them.

Every choice's stream from the TextGenerator is read at once and their pieces interleaved as they arrive.
The first chunk of each choice carries its role (chat) or its echoed prompt (completions); the last chunk
of the request carries the citations; `stream_options.include_usage` adds a usage chunk before `[DONE]`.
Once the headers are sent, a failure can only travel as an event in OpenAI's error shape. The request's
access line is recorded when the stream ends, however it ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional

from ragft.generate.engine import GenerationRequest
from ragft.serve.observe import Observer, RequestRecord, log
from ragft.serve.protocol import APIError, chat_chunk, completion_chunk, sse, usage


async def stream_events(generator, observer: Observer, kind: str, rec: RequestRecord, model: str,
                        jobs: list[GenerationRequest], extra: dict, include_usage: bool,
                        echo: list[str]) -> AsyncIterator[str]:
    """The server-sent events of one request: `jobs[i]` is choice i, `echo[i]` the text its first chunk carries."""
    created, left = int(time.time()), len(jobs)

    def chunk(index: int, text: Optional[str], finish: Optional[str], role: bool = False) -> dict:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return chat_chunk(rec.id, model, created, index, delta, finish)
        return completion_chunk(rec.id, model, created, index, text or "", finish)

    try:
        for j in range(len(jobs)):
            yield sse(chunk(j, echo[j] or None, None, role=kind == "chat"))
        async for index, item in interleaved(generator, jobs):
            if item["text"]:
                yield sse(chunk(index, item["text"], None))
            if item["finish_reason"] is not None:
                left -= 1
                rec.completion_tokens += item["completion_tokens"]
                rec.generation_s = max(rec.generation_s, item["generation_s"])
                final = chunk(index, None, item["finish_reason"])
                yield sse({**final, **extra} if left == 0 else final)  # citations ride on the last chunk
        if include_usage:
            yield sse({"id": rec.id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                       "created": created, "model": model, "choices": [],
                       "usage": usage(rec.prompt_tokens, rec.completion_tokens)})
        yield sse("[DONE]")
    except Exception as err:  # headers are gone: the error travels as an event, as OpenAI's API does
        log.exception("stream %s failed", rec.id)
        rec.status, rec.error = 500, "internal_error"
        yield sse(APIError(500, f"generation failed ({type(err).__name__}); request id {rec.id}",
                           "server_error", code="internal_error").body())
    finally:
        observer.record(rec)


async def interleaved(generator, jobs: list[GenerationRequest]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, item) from every job's TextGenerator stream, interleaved as they arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: GenerationRequest) -> None:
        try:
            async for item in generator.options(stream=True).stream.remote(job):
                await queue.put((index, item))
        except Exception as err:
            await queue.put((index, err))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(j, job)) for j, job in enumerate(jobs)]
    try:
        done = 0
        while done < len(jobs):
            index, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
