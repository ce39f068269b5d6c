"""The two model-holding deployments of `ragft serve`: Retriever (an index) and TextGenerator (an engine).

Retriever answers searches from one loaded index version and switches versions with
`Index.reload`, which swaps the loaded version in one assignment: a search already running
finishes on the version it started with. It notices new versions by itself (every
`POLL_S`) and at once when a caller asks for at least a given version (`min_version`),
which is how the ingress makes the answer after a live update cite the new text.

TextGenerator runs the engine with continuous batching: requests that arrive together are
grouped by `serve.batch` (max_batch_size, batch_wait_timeout_s) and join the running batch at
the next decode step (a burst over the next few, within the engine's prefill budget per step), so
no request waits for another to finish. (serve.batch alone forms a
batch from the requests that arrive within its timeout and runs it to the end: under a closed
loop the arrivals spread out and every batch ends up holding one request.) `complete` returns
the final text, `stream` yields each piece. Adapters loaded at runtime are kept in step with the
app's AdapterSet (ragft.serve.adapters): `sync_adapters` loads and unloads what differs from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator, Optional, Sequence

from ray import serve

from ragft.config.schema import CorpusConfig, IndexConfig, RetrievalConfig
from ragft.index.documents import Document
from ragft.index.index import Index
from ragft.index.spec import IndexSpec
from ragft.index.update import update_index
from ragft.model.precision import resolve_device, resolve_dtype
from ragft.generate.engine import Engine, GenerationRequest, TokenLogprob
from ragft.generate.transformers_engine import TransformersEngine
from ragft.serve.adapters import ACTOR_NAME, SYNC_S

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
class TextGenerator:
    def __init__(self, engine: str, engine_args: dict, batch_enabled: bool, max_batch_size: int,
                 batch_wait_timeout_s: float):
        self.engine = open_engine(engine, on_this_node(engine_args))
        # batching off = one request decoding at a time, through the same code: the benchmark's baseline.
        self._max_rows = max_batch_size if batch_enabled else 1
        self._batch = self.engine.open_batch(self._max_rows)
        self._admit.set_max_batch_size(self._max_rows)
        self._admit.set_batch_wait_timeout_s(batch_wait_timeout_s if batch_enabled else 0.0)
        self._sinks: dict[str, asyncio.Queue] = {}  # request id -> the queue its deltas go to
        self._decoding: Optional[asyncio.Task] = None
        self._adapters_lock = asyncio.Lock()
        self._adapters_synced = 0.0
        self._load_adapters_at_start()

    def _load_adapters_at_start(self) -> None:
        """A replica started after adapters were loaded serves them too. Synchronous: Serve runs a coroutine
        constructor on another event loop than the requests, and the batch's queues would wake the wrong one."""
        import ray

        state = ray.get(serve.get_deployment_actor(ACTOR_NAME).get.remote())
        for name, entry in state["adapters"].items():
            try:
                self.engine.load_adapter(name, entry["checkpoint"])
            except Exception:  # the next sync reports it to whoever loads adapters
                log.exception("could not load adapter %s from %s", name, entry["checkpoint"])
        self._adapters_synced = time.monotonic()

    def ping(self) -> bool:
        return True

    async def adapters(self) -> dict:
        """The app's AdapterSet: {version, adapters: {name: entry}}."""
        return await serve.get_deployment_actor(ACTOR_NAME).get.remote()

    async def change_adapters(self, name: str, entry: Optional[dict], last_used: dict[str, float]) -> dict:
        """Put (entry) or remove (None) adapter `name` in the app's AdapterSet: {version, adapters, evicted}."""
        adapters = serve.get_deployment_actor(ACTOR_NAME)
        if entry is None:
            return await adapters.remove.remote(name)
        return await adapters.put.remote(name, entry, last_used)

    async def sync_adapters(self) -> dict:
        """Load and unload what this replica's engine holds until it matches the AdapterSet (called on every
        replica by broadcast after a change): {version, adapters: {name: checkpoint}, failed: {name: error}}."""
        async with self._adapters_lock:
            state = await serve.get_deployment_actor(ACTOR_NAME).get.remote()
            self._adapters_synced = time.monotonic()
            want = {name: entry["checkpoint"] for name, entry in state["adapters"].items()}
            failed = {}
            for name in set(self.engine.runtime_adapters) - set(want):
                await asyncio.to_thread(self.engine.unload_adapter, name)
            for name, path in want.items():
                if self.engine.runtime_adapters.get(name) != path:
                    started = time.perf_counter()
                    try:
                        await asyncio.to_thread(self.engine.load_adapter, name, path)
                    except Exception as err:  # this adapter's problem (a rank the engine cannot hold): report it
                        failed[name] = f"{type(err).__name__}: {err}"
                        continue
                    log.info("loaded adapter %s from %s in %.2f s", name, path, time.perf_counter() - started)
            return {"version": state["version"], "adapters": self.engine.runtime_adapters, "failed": failed}

    async def complete(self, request: GenerationRequest) -> dict:
        """The finished completion: {text, token_ids, completion_tokens, finish_reason, timed_out, generation_s}.
        A plain call, not a stream: a non-streaming client needs one reply, and Ray's streaming
        calls cost more per request."""
        pieces, token_ids = [], []
        async for item in self._items(request):
            pieces.append(item["text"])
            token_ids.extend(item["token_ids"])
            if item["finish_reason"] is not None:
                return {**item, "text": "".join(pieces), "token_ids": token_ids}
        raise RuntimeError(f"the engine ended request {request.request_id} without a finish reason")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[dict]:
        """The same items as `complete`, one per new piece of text (call with handle.options(stream=True))."""
        async for item in self._items(request):
            yield item

    async def token_logprobs(self, model: str, token_ids: Sequence[int], start: int, top_k: int) -> list[TokenLogprob]:
        """`Engine.token_logprobs`, in a thread: it takes the engine's lock between two decode steps."""
        return await asyncio.to_thread(self.engine.token_logprobs, model, token_ids, start, top_k)

    async def _items(self, request: GenerationRequest) -> AsyncIterator[dict]:
        queue = await self._admit(request)
        admitted = time.perf_counter()
        while True:
            delta = await queue.get()
            if isinstance(delta, BaseException):
                raise delta
            yield {"text": delta.text, "token_ids": list(delta.token_ids), "completion_tokens": delta.completion_tokens,
                   "finish_reason": delta.finish_reason, "timed_out": delta.timed_out,
                   "generation_s": time.perf_counter() - admitted}
            if delta.finish_reason is not None:
                return

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _admit(self, requests: list[GenerationRequest]) -> list[asyncio.Queue]:
        """Requests that arrive together join the running batch (prefilled together, as many per step as the
        engine's prefill budget takes); returns at once, so admission never waits for a decode."""
        if time.monotonic() - self._adapters_synced > SYNC_S and not self._adapters_lock.locked():
            self._adapters_synced = time.monotonic()  # one catch-up at a time
            asyncio.get_running_loop().create_task(self.sync_adapters())
        queues = []
        for request in requests:
            queue: asyncio.Queue = asyncio.Queue()
            queues.append(queue)
            try:
                self._batch.add(request.request_id, request)
            except Exception as err:  # this request's problem only (bad values, a seed torch refuses): others go on
                queue.put_nowait(err if isinstance(err, ValueError) else ValueError(f"{type(err).__name__}: {err}"))
                continue
            self._sinks[request.request_id] = queue
        if self._decoding is None or self._decoding.done():
            self._decoding = asyncio.get_running_loop().create_task(self._decode())
        return queues

    async def _decode(self) -> None:
        """Step the running batch while it has work, routing each request's deltas to its queue."""
        try:
            while self._batch.busy:
                # Each step runs in a thread (torch releases the GIL), so the event loop keeps admitting
                # requests meanwhile: they join at the next step.
                out = await asyncio.to_thread(self._batch.step)
                for key, delta in out.items():
                    self._sinks[key].put_nowait(delta)
                    if delta.finish_reason is not None:
                        del self._sinks[key]
        except Exception as err:  # a bug, not a request's fault: fail every waiting request, never hang them
            log.exception("the decode loop failed; failing %d requests", len(self._sinks))
            for queue in self._sinks.values():
                queue.put_nowait(RuntimeError(f"generation failed: {type(err).__name__}: {err}"))
            self._sinks.clear()
            self._batch = self.engine.open_batch(self._max_rows)


def open_engine(kind: str, engine_args: dict) -> Engine:
    """The engine `serve.engine` names: transformers (ragft's decode loop) or vllm."""
    if kind == "vllm":
        from ragft.generate.vllm_engine import VLLMEngine

        return VLLMEngine(**engine_args)
    return TransformersEngine(**engine_args)


def on_this_node(engine_args: dict) -> dict:
    """Resolve device and dtype "auto" where the replica runs (the driver may have another GPU or CPU, or none)."""
    device, dtype = resolve_device(engine_args.get("device", "auto")), engine_args.get("dtype", "auto")
    return {**engine_args, "device": device, "dtype": resolve_dtype(dtype, device)}
