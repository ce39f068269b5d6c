"""The OpenAI-compatible HTTP front of `ragft serve`: a FastAPI app in a Ray Serve ingress deployment.

Every route runs through `Ingress._serve`: authorize (bearer key), run the handler under the
request timeout, turn any failure into OpenAI's error shape, and record one access line plus
metrics. A chat request then: validates → retrieves for the last user message (unless the
request's `rag` object says otherwise) → renders the prompt with ragft.rag (the code eval and
RAFT data use) → checks it fits the context → generates through the Generator's handle, one
engine request per choice → answers with `citations` beside `choices`.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /v1/index/documents and DELETE /v1/index/documents/{id} (admin key).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (Request) at runtime.

import asyncio
import time
from typing import Any, AsyncIterator, Optional, Sequence

import jinja2
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragft.data.rows import BadRowError
from ragft.data.tokenize import text_prompt_ids
from ragft.index.documents import parse_document
from ragft.rag import citations, prompt_ids, query_of, with_context
from ragft.serve import protocol as p
from ragft.serve.engine import GenerationRequest, SamplingParams
from ragft.serve.observe import Observer, RequestRecord, log
from ragft.serve.spec import ServeSpec

app = FastAPI(title="ragft", docs_url=None, redoc_url=None)  # /openapi.json: the schema clients and fuzzers read
MAX_DOCUMENTS_PER_REQUEST = 10_000


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods answer in OpenAI's shape too.
    return error_response(p.APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                     code="not_found" if err.status_code == 404 else "method_not_allowed"))


def _openapi() -> dict:
    """FastAPI's document plus the request schemas the routes' bodies refer to."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        document.setdefault("components", {}).setdefault("schemas", {}).update(
            p.openapi_components(p.ChatRequest, p.CompletionRequest))
        app.openapi_schema = document
    return app.openapi_schema


app.openapi = _openapi


def error_response(err: p.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _update_summary(stats: dict[str, Any]) -> dict:
    keys = ("version", "published", "documents", "chunks", "added", "changed", "unchanged", "deleted",
            "embedded_chunks", "reused_chunks")
    return {k: stats[k] for k in keys}


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, retriever, generator, spec: ServeSpec, context_length: int):
        from ragft.model.build import load_tokenizer

        self.spec, self.s = spec, spec.serve
        self.retriever, self.generator = retriever, generator
        self.models = {m.id: m for m in spec.models}
        self.tokenizer = load_tokenizer(spec.base_path)
        self.context_length = context_length
        self.min_version = 0  # the newest index version this ingress published: searches must see at least it
        self.observer = Observer(self.s.access_log)

    # --- routes

    @app.get("/health")
    async def health(self) -> dict:
        version = await self.retriever.version.remote() if self.retriever else None
        await self.generator.ping.remote()
        return {"status": "ok", "models": list(self.models), "index_version": version}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return await self._serve(request, "models", self._models)

    @app.post("/v1/chat/completions", openapi_extra=p.openapi_body(p.ChatRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat", self._chat)

    @app.post("/v1/completions", openapi_extra=p.openapi_body(p.CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions", self._completions)

    @app.post("/v1/index/documents")
    async def upsert_documents(self, request: Request) -> Response:
        return await self._serve(request, "index_upsert", self._upsert, admin=True)

    @app.delete("/v1/index/documents/{doc_id:path}")
    async def delete_document(self, request: Request, doc_id: str) -> Response:
        return await self._serve(request, "index_delete", lambda req, rec: self._delete(doc_id, rec), admin=True)

    # --- the frame every route runs in

    async def _serve(self, request: Request, route: str, handler, admin: bool = False) -> Response:
        rec = RequestRecord(id=p.new_id("req"), method=request.method, path=request.url.path, route=route)
        try:
            rec.role = self._authorize(request, admin)
            response = await asyncio.wait_for(handler(request, rec), timeout=self.s.request_timeout_s)
        except p.APIError as err:
            response = error_response(err)
            rec.error = err.code
        except asyncio.TimeoutError:
            err = p.APIError(504, f"the request took longer than serve.request_timeout_s={self.s.request_timeout_s}",
                             "timeout", code="request_timeout")
            response, rec.error = error_response(err), err.code
        except Exception as err:  # a bug or a dead replica: still an answer in OpenAI's shape, never a hang
            log.exception("request %s failed", rec.id)
            response = error_response(p.APIError(500, f"internal error ({type(err).__name__}); request id {rec.id}",
                                                 "server_error", code="internal_error"))
            rec.error = "internal_error"
        response.headers["x-request-id"] = rec.id
        rec.status = response.status_code
        if not isinstance(response, StreamingResponse):
            self.observer.record(rec)  # a stream records itself when it ends
        return response

    def _authorize(self, request: Request, admin: bool) -> str:
        keys = self.spec.keys
        if not keys.configured and not admin:
            return "open"  # loopback only: the spec refuses other addresses without keys
        role = keys.role(request.headers.get("authorization"))
        if role is None:
            raise p.APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                             code="invalid_api_key")
        if admin and role != "admin":
            reason = "this key is not an admin key" if keys.admin else "no admin key is configured (RAGFT_ADMIN_KEY)"
            raise p.APIError(403, f"index updates need the admin key: {reason}", "permission_error",
                             code="insufficient_permissions")
        return role

    # --- handlers

    async def _models(self, request: Request, rec: RequestRecord) -> Response:
        version = await self.retriever.version.remote() if self.retriever else None
        base = self.spec.base_name
        data = [{"id": m.id, "object": "model", "created": 0, "owned_by": "ragft",
                 "parent": base if m.kind == "lora" else None, **m.to_json(), "index_version": version}
                for m in self.models.values()]
        return JSONResponse({"object": "list", "data": data})

    async def _chat(self, request: Request, rec: RequestRecord) -> Response:
        req = p.parse(p.ChatRequest, await request.body())
        model = self._model(req.model, rec)
        stop = req.stop_strings()
        requested = req.max_completion_tokens or req.max_tokens
        self._check_request(req, requested)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        query = query_of(messages)
        hits, version = [], None
        enabled, k, mode = self._rag(req.rag, self.s.rag.enabled)
        if enabled and query:
            hits, version = await self._search(query, k, mode, rec)
        try:
            ids = prompt_ids(self.tokenizer, messages, hits, self.s.rag)
        except jinja2.TemplateError as err:
            raise p.bad_request(f"messages: the model's chat template rejected the conversation: {err}",
                                "messages") from None
        if self.s.log_prompts:
            rec.prompt = query
        return await self._generate("chat", rec, model, ids, req, requested, stop, hits, version, "messages")

    async def _completions(self, request: Request, rec: RequestRecord) -> Response:
        req = p.parse(p.CompletionRequest, await request.body())
        model = self._model(req.model, rec)
        stop = req.stop_strings()
        self._check_request(req, req.max_tokens)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise p.bad_request("prompt: ragft serves one prompt per completion request (use n for more "
                                    "choices)", "prompt")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        hits, version = [], None
        enabled, k, mode = self._rag(req.rag, self.s.rag.completions)
        if enabled and prompt.strip():
            hits, version = await self._search(prompt, k, mode, rec)
        ids = text_prompt_ids(self.tokenizer, with_context(prompt, hits, self.s.rag))
        if self.s.log_prompts:
            rec.prompt = prompt
        echo = prompt if req.echo else ""
        return await self._generate("completions", rec, model, ids, req, req.max_tokens, stop, hits, version,
                                    "prompt", echo=echo)

    async def _upsert(self, request: Request, rec: RequestRecord) -> Response:
        self._need_index()
        body = p.decode_json(await request.body())
        rows = body.get("documents") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not rows:
            raise p.bad_request("documents: expected a non-empty list of {id, text, title?, source?, metadata?}",
                                "documents")
        if len(rows) > MAX_DOCUMENTS_PER_REQUEST:
            raise p.bad_request(f"documents: at most {MAX_DOCUMENTS_PER_REQUEST} per request", "documents")
        documents, seen = [], {}
        for i, row in enumerate(rows):
            try:
                doc = parse_document(row, f"documents:{i}")
            except BadRowError as err:
                raise p.bad_request(f"documents[{i}]: {err.reason}", f"documents.{i}") from None
            if doc.id in seen:
                raise p.bad_request(f"documents[{i}]: duplicate id {doc.id!r} (first at documents[{seen[doc.id]}])",
                                    f"documents.{i}.id")
            seen[doc.id] = i
            documents.append(doc)
        stats = await self.retriever.upsert.remote(documents)
        self.min_version = max(self.min_version, stats["version"])
        rec.index_version = stats["version"]
        return JSONResponse({"object": "index.update", **_update_summary(stats)})

    async def _delete(self, doc_id: str, rec: RequestRecord) -> Response:
        self._need_index()
        stats = await self.retriever.delete.remote([doc_id])
        if doc_id in stats["delete_not_found"]:
            raise p.APIError(404, f"document {doc_id!r} is not in the index", param="id", code="document_not_found")
        self.min_version = max(self.min_version, stats["version"])
        rec.index_version = stats["version"]
        return JSONResponse({"id": doc_id, "object": "index.document", "deleted": True, **_update_summary(stats)})

    # --- pieces

    def _model(self, model: str, rec: RequestRecord) -> str:
        if model not in self.models:
            raise p.APIError(404, f"The model '{model}' does not exist; GET /v1/models lists the ones served.",
                             param="model", code="model_not_found")
        rec.model = model
        return model

    def _check_request(self, req: p._Sampling, max_tokens: Optional[int]) -> None:
        if max_tokens is not None and not 1 <= max_tokens <= self.s.max_tokens_limit:
            raise p.bad_request(f"max_tokens={max_tokens} must be between 1 and {self.s.max_tokens_limit}",
                                "max_tokens")
        if req.n > self.s.max_n:
            raise p.bad_request(f"n={req.n} must be at most {self.s.max_n}", "n")

    def _rag(self, options: Optional[p.RagOptions], default: bool) -> tuple[bool, int, Optional[str]]:
        options = options or p.RagOptions()
        enabled = default if options.enabled is None else options.enabled
        k = options.k or self.s.rag.k
        if enabled and self.retriever is None:
            if options.enabled:
                raise p.bad_request("rag.enabled: this server has no index (started with index.path=null)", "rag")
            return False, k, None
        if k > self.s.rag.max_k:
            raise p.bad_request(f"rag.k={k} must be at most serve.rag.max_k={self.s.rag.max_k}", "rag.k")
        return enabled, k, options.mode or self.s.rag.mode

    def _need_index(self) -> None:
        if self.retriever is None:
            raise p.APIError(404, "this server has no index (started with index.path=null)", code="no_index")

    async def _search(self, query: str, k: int, mode: Optional[str], rec: RequestRecord) -> tuple[list, int]:
        try:
            out = await self.retriever.search.remote(query, k, mode, self.min_version)
        except Exception as err:
            raise p.APIError(503, f"retrieval failed: {type(err).__name__}", "server_error",
                             code="retrieval_unavailable") from err
        rec.retrieval_s, rec.index_version = out["seconds"], out["version"]
        return out["hits"], out["version"]

    def _max_tokens(self, requested: Optional[int], prompt_tokens: int, param: str) -> int:
        room = self.context_length - prompt_tokens
        if requested is None and room >= 1:
            return min(self.s.default_max_tokens, room)
        if requested is None or requested > room:
            asked = f" + {requested} for the completion" if requested else ""
            raise p.APIError(400, f"This model's maximum context length is {self.context_length} tokens; the "
                                  f"request needs {prompt_tokens} for the prompt (retrieved context included){asked}.",
                             param=param, code="context_length_exceeded")
        return requested

    async def _generate(self, kind: str, rec: RequestRecord, model: str, ids: list[int], req: p._Sampling,
                        requested: Optional[int], stop: tuple[str, ...], hits: Sequence, version: Optional[int],
                        param: str, echo: str = "") -> Response:
        max_tokens = self._max_tokens(requested, len(ids), param)
        remaining = self.s.request_timeout_s - (time.perf_counter() - rec.started)
        deadline = time.time() + min(self.s.generation_timeout_s, max(remaining, 0.0))
        jobs = [GenerationRequest(
            request_id=f"{rec.id}-{j}", model=model, prompt_ids=tuple(ids), deadline=deadline,
            params=SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=stop,
                                  seed=None if req.seed is None else req.seed + j, lstrip=kind == "chat"))
            for j in range(req.n)]
        rec.prompt_tokens, rec.citations = len(ids), len(hits)
        extra = {"citations": [c.to_json() for c in citations(hits, version, self.s.rag.quote_chars)]
                 if version is not None else [], "index_version": version}
        if req.stream:
            rec.stream = True
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(kind, rec, model, jobs, extra, include_usage, echo),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        choices = []
        for index, item in enumerate(await asyncio.gather(*(self.generator.complete.remote(j) for j in jobs))):
            choices.append({"index": index, "text": echo + item["text"], "finish_reason": item["finish_reason"]})
            rec.completion_tokens += item["completion_tokens"]
            rec.generation_s = max(rec.generation_s, item["generation_s"])
        build = p.chat_response if kind == "chat" else p.completion_response
        body = build(rec.id, model, choices, p.usage(len(ids), rec.completion_tokens), extra)
        timing = f"retrieval;dur={rec.retrieval_s * 1000:.2f}, generation;dur={rec.generation_s * 1000:.2f}"
        return JSONResponse(body, headers={"server-timing": timing})

    async def _stream(self, kind: str, rec: RequestRecord, model: str, jobs: list[GenerationRequest], extra: dict,
                      include_usage: bool, echo: str) -> AsyncIterator[str]:
        created, left = int(time.time()), len(jobs)

        def chunk(index: int, text: Optional[str], finish: Optional[str], role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return p.chat_chunk(rec.id, model, created, index, delta, finish)
            return p.completion_chunk(rec.id, model, created, index, text or "", finish)

        try:
            for j in range(len(jobs)):
                yield p.sse(chunk(j, echo or None, None, role=kind == "chat"))
                if echo and kind == "chat":
                    yield p.sse(chunk(j, echo, None))
            async for index, item in self._streams(jobs):
                if item["text"]:
                    yield p.sse(chunk(index, item["text"], None))
                if item["finish_reason"] is not None:
                    left -= 1
                    rec.completion_tokens += item["completion_tokens"]
                    rec.generation_s = max(rec.generation_s, item["generation_s"])
                    final = chunk(index, None, item["finish_reason"])
                    yield p.sse({**final, **extra} if left == 0 else final)  # citations ride on the last chunk
            if include_usage:
                yield p.sse({"id": rec.id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                             "created": created, "model": model, "choices": [],
                             "usage": p.usage(rec.prompt_tokens, rec.completion_tokens)})
            yield p.sse("[DONE]")
        except Exception as err:  # headers are gone: the error travels as an event, as OpenAI's API does
            log.exception("stream %s failed", rec.id)
            rec.status, rec.error = 500, "internal_error"
            yield p.sse(p.APIError(500, f"generation failed ({type(err).__name__}); request id {rec.id}",
                                   "server_error", code="internal_error").body())
        finally:
            self.observer.record(rec)

    async def _streams(self, jobs: list[GenerationRequest]) -> AsyncIterator[tuple[int, dict]]:
        """(choice index, item) from every job's Generator stream, interleaved as they arrive."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: GenerationRequest) -> None:
            try:
                async for item in self.generator.options(stream=True).stream.remote(job):
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

