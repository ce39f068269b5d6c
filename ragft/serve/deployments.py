"""The two model-holding deployments of `ragft serve`: Retriever (an index) and Generator (an engine).

Retriever answers searches from one loaded index version and switches versions with
`Index.reload`, which swaps the loaded version in one assignment: a search already running
finishes on the version it started with. It notices new versions by itself (every
`POLL_S`) and at once when a caller asks for at least a given version (`min_version`),
which is how the ingress makes the answer after a live update cite the new text.

Generator runs the engine with dynamic batching (`serve.batch`): concurrent requests that
arrive while a batch decodes form the next batch. Every request streams internally; a
non-streaming caller receives only the final item, with the whole text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Optional, Sequence

import torch
from ray import serve

from ragft.config.schema import CorpusConfig, IndexConfig, RetrievalConfig
from ragft.index.documents import Document
from ragft.index.index import Index
from ragft.index.spec import IndexSpec
from ragft.index.update import update_index
from ragft.serve.engine import GenerationRequest, TransformersEngine

log = logging.getLogger("ray.serve")

POLL_S = 2.0  # how stale a replica's idea of the newest index version may get when nobody tells it


@serve.deployment
class Retriever:
    def __init__(self, index_path: str, index: IndexConfig, retrieval: RetrievalConfig):
        self.path = index_path
        self.config = index
        self.index = Index.open(index_path, retrieval, device=index.device)
        self.index.search("warm-up", 1)  # loads the embedding model and builds BM25 now, not in a user's request
        self._checked = time.monotonic()
        self._reload_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()  # one writer per replica; versions.writer_lock serialises replicas

    async def search(self, query: str, k: int, mode: Optional[str] = None, min_version: int = 0) -> dict:
        await self._fresh(min_version)
        started = time.perf_counter()
        version, (hits,) = await asyncio.to_thread(self.index.search_versioned, [query], k, mode=mode)
        return {"hits": hits, "version": version, "seconds": time.perf_counter() - started}

    async def version(self) -> int:
        await self._fresh(0)
        return self.index.version

    async def upsert(self, documents: Sequence[Document]) -> dict:
        return await self._update(documents=documents)

    async def delete(self, doc_ids: Sequence[str]) -> dict:
        return await self._update(delete_ids=doc_ids)

    async def _update(self, documents: Sequence[Document] = (), delete_ids: Sequence[str] = ()) -> dict:
        async with self._write_lock:
            spec = self._update_spec(delete_ids)
            stats = await asyncio.to_thread(update_index, spec, self.index.embedder(), documents)
        await self._fresh(stats.version)
        return dataclasses.asdict(stats)

    def _update_spec(self, delete_ids: Sequence[str]) -> IndexSpec:
        """The spec `ragft index` would build for this update: the index's own chunking and embedding
        settings (from its manifest, so nothing is re-embedded needlessly), no corpus file."""
        m = self.index.manifest
        index = dataclasses.replace(
            self.config, path=self.path, embedding_model=m["embedding"]["model"],
            query_prefix=m["embedding"]["query_prefix"], chunk_tokens=m["chunking"]["chunk_tokens"],
            chunk_overlap=m["chunking"]["chunk_overlap"], prepend_title=m["chunking"]["prepend_title"],
            kind=m["store"].get("requested_kind", "auto"), delete_ids=list(delete_ids), rebuild=False,
            remove_missing=False)
        return IndexSpec(command="index", index_path=self.path, corpus_path=None, corpus=CorpusConfig(), index=index,
                         retrieval=self.index.retrieval, query=None, k=1, out_dir=self.path)

    async def _fresh(self, min_version: int) -> None:
        stale = time.monotonic() - self._checked > POLL_S
        if self.index.version >= min_version and not stale:
            return
        async with self._reload_lock:
            if self.index.version >= min_version and time.monotonic() - self._checked <= POLL_S:
                return  # another request reloaded while this one waited
            self._checked = time.monotonic()
            await asyncio.to_thread(self.index.reload)


@serve.deployment
class Generator:
    def __init__(self, engine_args: dict, batch_enabled: bool, max_batch_size: int, batch_wait_timeout_s: float):
        self.engine = TransformersEngine(**on_this_node(engine_args))
        # batching off = batches of one: the same code path, so the benchmark compares only the batching.
        self._batched.set_max_batch_size(max_batch_size if batch_enabled else 1)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s if batch_enabled else 0.0)

    def ping(self) -> bool:
        return True

    async def generate(self, request: GenerationRequest, stream: bool) -> AsyncIterator[dict]:
        """Items {text, completion_tokens, finish_reason, timed_out, generation_s}: each new piece of text
        when streaming, else one item with the whole text when the request finishes."""
        pieces = []
        async for item in self._batched(request):
            if item is None:
                continue
            if stream:
                yield item
            else:
                pieces.append(item["text"])
            if item["finish_reason"] is not None:
                if not stream:
                    yield {**item, "text": "".join(pieces)}
                return

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        started = time.perf_counter()
        steps = self.engine.generate(requests)
        finished = [False] * len(requests)
        while True:
            # Each decode step runs in a thread (torch releases the GIL), so the event loop keeps taking
            # requests in: they queue for the next batch instead of waiting for this one to finish.
            out = await asyncio.to_thread(next, steps, None)
            if out is None:
                return
            row: list[Any] = []
            for i, delta in enumerate(out):
                if finished[i]:
                    row.append(StopIteration)  # tells serve.batch this caller's stream is over
                elif delta is None:
                    row.append(None)  # nothing new for this request in this step
                else:
                    finished[i] = delta.finish_reason is not None
                    row.append({"text": delta.text, "completion_tokens": delta.completion_tokens,
                                "finish_reason": delta.finish_reason, "timed_out": delta.timed_out,
                                "generation_s": time.perf_counter() - started})
            yield row


def on_this_node(engine_args: dict) -> dict:
    """Resolve device and dtype "auto" where the replica runs (the driver may have no GPU)."""
    device, dtype = engine_args.get("device", "auto"), engine_args.get("dtype", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return {**engine_args, "device": device, "dtype": getattr(torch, dtype)}
