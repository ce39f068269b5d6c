"""The OpenAI-compatible HTTP front of `ragft serve`: a FastAPI app in a Ray Serve ingress deployment.

Every route runs through `Ingress._serve`: authorize (bearer key), run the handler under the
request timeout, turn any failure into OpenAI's error shape, and record one access line plus
metrics. A chat request then: validates → retrieves for the last user message (unless the
request's `rag` object says otherwise) → renders the prompt with ragft.rag (the code eval and
RAFT data use) → checks it fits the context → generates through the TextGenerator's handle, one
engine request per choice → answers with `citations` beside `choices`.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /v1/index/documents and DELETE /v1/index/documents/{id} (admin key), POST /v1/adapters and
DELETE /v1/adapters/{name} (admin key: LoRA adapters loaded into every generator replica at runtime,
ragft.serve.adapters).

Here are the deployment, its routes, the frame they run in and the steps they share (limits, retrieval,
generation); what belongs to one concern lives beside it: /v1/completions' limits and prompts in
ragft.serve.completions, the answers' logprobs in ragft.serve.logprobs, `stream=true` in ragft.serve.streaming,
request parsing and response shapes in ragft.serve.protocol.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (Request) at runtime.

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import jinja2
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragft.generate.engine import GenerationRequest, SamplingParams, UnknownModelError
from ragft.index.documents import parse_document
from ragft.jsonl import BadRowError
from ragft.rag import citations, prompt_ids, query_of
from ragft.serve.adapters import SYNC_S, check_adapter, entry_of, parse_load, served_model
from ragft.serve.completions import check_prompt_count, check_retrievable, prompt_inputs, prompt_summary
from ragft.serve.logprobs import choices_logprobs
from ragft.serve.observe import Observer, RequestRecord, log
from ragft.serve.protocol import (
    INT64, APIError, ChatRequest, CompletionRequest, RagOptions, bad_request, chat_response, completion_response,
    decode_json, new_id, openapi_body, openapi_components, parse, usage,
)
from ragft.serve.spec import ServeSpec
from ragft.serve.streaming import stream_events

app = FastAPI(title="ragft", docs_url=None, redoc_url=None)  # /openapi.json: the schema clients and fuzzers read
MAX_DOCUMENTS_PER_REQUEST = 10_000
# Open mode (no keys) answers only requests addressed to this machine by name, so that a web page cannot reach
# it through DNS rebinding (its Host would be the page's domain), and only JSON bodies (a page's form posts
# send other content types without a CORS preflight).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods answer in OpenAI's shape too.
    return error_response(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                     code="not_found" if err.status_code == 404 else "method_not_allowed"))


def _openapi() -> dict:
    """FastAPI's document plus the request schemas the routes' bodies refer to."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        document.setdefault("components", {}).setdefault("schemas", {}).update(
            openapi_components(ChatRequest, CompletionRequest))
        app.openapi_schema = document
    return app.openapi_schema


app.openapi = _openapi


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _update_summary(stats: dict[str, Any]) -> dict:
    keys = ("version", "published", "documents", "chunks", "added", "changed", "unchanged", "deleted",
            "embedded_chunks", "reused_chunks")
    return {k: stats[k] for k in keys}


# Defined above the deployment: Serve serialises the class as the module is imported, with the globals
# that exist at that moment.
def check_open_request(request: Request) -> None:
    """Open mode: refuse what only a browser tricked by another site would send (see LOOPBACK_HOSTS)."""
    host = (request.headers.get("host") or "").strip().lower()
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    if name not in LOOPBACK_HOSTS:
        raise APIError(403, f"this server has no API keys and answers only requests to localhost, not Host: {host!r}; "
                            "configure keys (RAGFT_API_KEYS) to serve other names", "permission_error",
                       code="invalid_host")
    if request.method == "POST":
        media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(415, f"the request body must be sent as application/json, not {media or 'no content type'!r}",
                           param="content-type", code="unsupported_media_type")


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, retriever, generator, spec: ServeSpec, context_length: int):
        from ragft.model.build import load_tokenizer

        self.spec, self.config = spec, spec.serve
        self.retriever, self.generator = retriever, generator
        self.models = {m.id: m for m in spec.models}
        self.runtime: dict = {}  # adapters loaded at runtime: id -> ServedModel (the AdapterSet's, as last read)
        self.last_used: dict[str, float] = {}  # runtime adapter -> when a request last named it (for eviction)
        self._adapters_read = 0.0  # monotonic time the runtime set was last read (0: never)
        self._adapters_change = asyncio.Lock()  # one load or unload at a time through this ingress
        self.tokenizer = load_tokenizer(spec.base_path)
        self.context_length = context_length
        self.min_version = 0  # the newest index version this ingress published: searches must see at least it
        self.observer = Observer(self.config.access_log)
        # Tokenizing and chat templates run here, off the event loop (a long prompt must not stall other
        # requests' routing), one at a time (a fast tokenizer is not safe to call from several threads at once).
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    # --- routes

    @app.get("/health")
    async def health(self) -> Response:
        """200 while the app serves; 503 once it is being deleted (the command was told to stop), so a load
        balancer stops sending requests while the replicas drain the ones in flight."""
        if await asyncio.to_thread(self._stopping):
            return error_response(APIError(503, "the server is shutting down", "server_error",
                                              code="shutting_down"))
        version = await self.retriever.version.remote() if self.retriever else None
        await self.generator.ping.remote()
        return JSONResponse({"status": "ok", "models": list(self.models), "index_version": version})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return await self._serve(request, "models", self._models)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat", self._chat)

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions", self._completions)

    @app.post("/v1/index/documents")
    async def upsert_documents(self, request: Request) -> Response:
        return await self._serve(request, "index_upsert", self._upsert, admin=True)

    @app.delete("/v1/index/documents/{doc_id:path}")
    async def delete_document(self, request: Request, doc_id: str) -> Response:
        return await self._serve(request, "index_delete", lambda req, rec: self._delete(doc_id, rec), admin=True)

    @app.post("/v1/adapters")
    async def load_adapter(self, request: Request) -> Response:
        return await self._serve(request, "adapter_load", self._load_adapter, admin=True)

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(self, request: Request, name: str) -> Response:
        return await self._serve(request, "adapter_unload", lambda req, rec: self._unload_adapter(name, rec),
                                 admin=True)

    # --- the frame every route runs in

    async def _serve(self, request: Request, route: str, handler, admin: bool = False) -> Response:
        rec = RequestRecord(id=new_id("req"), method=request.method, path=request.url.path, route=route)
        try:
            rec.role = self._authorize(request, admin)
            if time.monotonic() - self._adapters_read > SYNC_S:
                await self._read_adapters()
            response = await asyncio.wait_for(handler(request, rec), timeout=self.config.request_timeout_s)
        except APIError as err:
            response = error_response(err)
            rec.error = err.code
        except UnknownModelError as err:  # unloaded between this ingress's check and the generator's
            response = error_response(APIError(404, str(err), param="model", code="model_not_found"))
            rec.error = "model_not_found"
        except asyncio.TimeoutError:
            err = APIError(504, f"the request took longer than serve.request_timeout_s={self.config.request_timeout_s}",
                             "timeout", code="request_timeout")
            response, rec.error = error_response(err), err.code
        except Exception as err:  # a bug or a dead replica: still an answer in OpenAI's shape, never a hang
            log.exception("request %s failed", rec.id)
            response = error_response(APIError(500, f"internal error ({type(err).__name__}); request id {rec.id}",
                                                 "server_error", code="internal_error"))
            rec.error = "internal_error"
        response.headers["x-request-id"] = rec.id
        rec.status = response.status_code
        if not isinstance(response, StreamingResponse):
            self.observer.record(rec)  # a stream records itself when it ends
        return response

    def _stopping(self) -> bool:
        status = serve.status().applications.get(self.config.app_name)
        return status is None or status.status == "DELETING"

    def _authorize(self, request: Request, admin: bool) -> str:
        keys = self.spec.keys
        if not keys.configured and not admin:
            check_open_request(request)
            return "open"  # loopback only: the spec refuses other addresses without keys
        role = keys.role(request.headers.get("authorization"))
        if role is None:
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                             code="invalid_api_key")
        if admin and role != "admin":
            reason = "this key is not an admin key" if keys.admin else "no admin key is configured (RAGFT_ADMIN_KEY)"
            raise APIError(403, f"this route needs the admin key: {reason}", "permission_error",
                             code="insufficient_permissions")
        return role

    # --- handlers

    async def _models(self, request: Request, rec: RequestRecord) -> Response:
        version = await self.retriever.version.remote() if self.retriever else None
        base = self.spec.base_name
        data = [{"id": m.id, "object": "model", "created": 0, "owned_by": "ragft",
                 "parent": base if m.kind == "lora" else None, **m.to_json(), "index_version": version}
                for m in self.models.values()]
        data += [{"id": m.id, "object": "model", "created": int(loaded), "owned_by": "ragft", "parent": base,
                  **m.to_json(), "index_version": version, "runtime": True}
                 for m, loaded in self.runtime.values()]
        return JSONResponse({"object": "list", "data": data})

    async def _load_adapter(self, request: Request, rec: RequestRecord) -> Response:
        name, checkpoint = parse_load(await self._body(request), self.spec)
        model = await asyncio.to_thread(check_adapter, self.spec, name, checkpoint)  # reads and hashes the files
        started = time.perf_counter()
        async with self._adapters_change:
            state = await self.generator.change_adapters.remote(name, entry_of(model), dict(self.last_used))
            replicas = await self._sync_replicas()
            failed = {r["failed"][name] for r in replicas if name in r["failed"]}
            if failed:  # a replica could not load it: no replica serves it
                await self.generator.change_adapters.remote(name, None, {})
                await self._sync_replicas()
                raise APIError(422, f"checkpoint {model.path}: {'; '.join(sorted(failed))}", param="checkpoint",
                               code="adapter_load_failed")
        rec.model = name
        return JSONResponse({"id": name, "object": "adapter", "loaded": True, **model.to_json(),
                             "replicas": len(replicas), "evicted": state["evicted"],
                             "load_s": round(time.perf_counter() - started, 3)})

    async def _unload_adapter(self, name: str, rec: RequestRecord) -> Response:
        if name in self.models:
            raise APIError(409, f"{name!r} is served since start-up; only adapters loaded at runtime unload",
                           param="name", code="model_not_unloadable")
        async with self._adapters_change:
            await self._read_adapters()
            if name not in self.runtime:
                raise APIError(404, f"no adapter {name!r} was loaded at runtime", param="name",
                               code="model_not_found")
            self.runtime.pop(name)  # later requests through this ingress: 404 from now on
            await self.generator.change_adapters.remote(name, None, {})
            replicas = await self._sync_replicas()
        rec.model = name
        return JSONResponse({"id": name, "object": "adapter", "deleted": True, "replicas": len(replicas)})

    async def _sync_replicas(self) -> list[dict]:
        """Have every generator replica apply the AdapterSet; what each reports. Then this ingress reads it too."""
        replicas = await self.generator.broadcast("sync_adapters").results_async(
            timeout_s=self.config.request_timeout_s)
        await self._read_adapters()
        return replicas

    async def _read_adapters(self) -> None:
        """This ingress's copy of the runtime-loaded adapters, from the AdapterSet (through one generator)."""
        self._adapters_read = time.monotonic()
        state = await self.generator.adapters.remote()
        self.runtime = {name: (served_model(entry), entry["loaded"]) for name, entry in state["adapters"].items()}
        self.last_used = {name: t for name, t in self.last_used.items() if name in self.runtime}

    async def _chat(self, request: Request, rec: RequestRecord) -> Response:
        req = parse(ChatRequest, await self._body(request))
        model = self._model(req.model, rec)
        stop = req.stop_strings()
        requested = req.max_completion_tokens or req.max_tokens
        self._check_request(req, requested)
        messages = [m.to_template() for m in req.messages]
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        query = query_of(messages)
        hits, version = [], None
        enabled, k, mode = self._rag(req.rag, self.config.rag.enabled)
        if enabled and query:
            hits, version = await self._search(query, k, mode, rec)
        try:
            ids = await self._tokenize(prompt_ids, self.tokenizer, messages, hits, self.config.rag)
        except jinja2.TemplateError as err:
            raise bad_request(f"messages: the model's chat template rejected the conversation: {err}",
                                "messages") from None
        if self.config.log_prompts:
            rec.prompt = query
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await self._generate("chat", rec, model, [ids], req, requested, stop, hits, version, "messages",
                                    top_logprobs=top)

    async def _completions(self, request: Request, rec: RequestRecord) -> Response:
        req = parse(CompletionRequest, await self._body(request))
        model = self._model(req.model, rec)
        stop = req.stop_strings()
        self._check_request(req, req.max_tokens, zero_ok=req.echo)
        prompts = req.prompts()
        check_prompt_count(req, prompts, self.config)
        self._check_chars(sum(len(p) for p in prompts), "prompt")
        enabled, k, mode = self._rag(req.rag, self.config.rag.completions)
        if enabled:
            check_retrievable(req, prompts)
        search = (lambda query: self._search(query, k, mode, rec)) if enabled else None
        inputs, echoes, hits, version = await prompt_inputs(prompts, req.echo, self.tokenizer, self.config.rag, search,
                                                            self._tokenize)
        if self.config.log_prompts:
            rec.prompt = prompt_summary(prompts)
        return await self._generate("completions", rec, model, inputs, req, req.max_tokens, stop, hits, version,
                                    "prompt", echoes=echoes, top_logprobs=req.logprobs)

    async def _upsert(self, request: Request, rec: RequestRecord) -> Response:
        self._need_index()
        body = decode_json(await self._body(request))
        rows = body.get("documents") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not rows:
            raise bad_request("documents: expected a non-empty list of {id, text, title?, source?, metadata?}",
                                "documents")
        if len(rows) > MAX_DOCUMENTS_PER_REQUEST:
            raise bad_request(f"documents: at most {MAX_DOCUMENTS_PER_REQUEST} per request", "documents")
        documents, seen = [], {}
        for i, row in enumerate(rows):
            try:
                doc = parse_document(row, f"documents:{i}")
            except BadRowError as err:
                raise bad_request(f"documents[{i}]: {err.reason}", f"documents.{i}") from None
            if doc.id in seen:
                raise bad_request(f"documents[{i}]: duplicate id {doc.id!r} (first at documents[{seen[doc.id]}])",
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
            raise APIError(404, f"document {doc_id!r} is not in the index", param="id", code="document_not_found")
        self.min_version = max(self.min_version, stats["version"])
        rec.index_version = stats["version"]
        return JSONResponse({"id": doc_id, "object": "index.document", "deleted": True, **_update_summary(stats)})

    # --- pieces

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 once it passes serve.max_body_bytes: before it is read when it says
        its length, while it streams in when it does not (chunked)."""
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than serve.max_body_bytes={limit} bytes",
                             code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def _check_chars(self, chars: int, param: str) -> None:
        """Refuse a prompt too long to be worth tokenizing: no model's context holds it."""
        if chars > self.config.max_prompt_chars:
            raise APIError(400, f"{param}: {chars} characters; at most serve.max_prompt_chars="
                                f"{self.config.max_prompt_chars} per request", param=param,
                           code="context_length_exceeded")

    async def _tokenize(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def _model(self, model: str, rec: RequestRecord) -> str:
        if model in self.runtime:
            self.last_used[model] = time.time()
        elif model not in self.models:
            raise APIError(404, f"The model '{model}' does not exist; GET /v1/models lists the ones served.",
                             param="model", code="model_not_found")
        rec.model = model
        return model

    def _check_request(self, req, max_tokens: Optional[int], zero_ok: bool = False) -> None:
        """Limits every route shares. `zero_ok`: max_tokens=0 asks for the prompt's logprobs alone (echo)."""
        low = 0 if zero_ok else 1
        if max_tokens is not None and not low <= max_tokens <= self.config.max_tokens_limit:
            raise bad_request(f"max_tokens={max_tokens} must be between {low} and {self.config.max_tokens_limit}"
                                + ("" if zero_ok else " (0 only with echo=true)"), "max_tokens")
        if req.n > self.config.max_n:
            raise bad_request(f"n={req.n} must be at most {self.config.max_n}", "n")
        # `not in (None, False)` would let logprobs=0 through (0 == False): chat's is a bool, completions' an int
        if req.stream and req.logprobs is not None and req.logprobs is not False:
            raise bad_request("logprobs: ragft serve returns logprobs only without stream=true", "logprobs",
                                "unsupported_parameter")
        if req.stream and max_tokens == 0:
            raise bad_request("max_tokens=0 scores the prompt alone: there is nothing to stream", "max_tokens")

    def _rag(self, options: Optional[RagOptions], default: bool) -> tuple[bool, int, Optional[str]]:
        options = options or RagOptions()
        enabled = default if options.enabled is None else options.enabled
        k = options.k or self.config.rag.k
        if enabled and self.retriever is None:
            if options.enabled:
                raise bad_request("rag.enabled: this server has no index (started with index.path=null)", "rag")
            return False, k, None
        if k > self.config.rag.max_k:
            raise bad_request(f"rag.k={k} must be at most serve.rag.max_k={self.config.rag.max_k}", "rag.k")
        return enabled, k, options.mode or self.config.rag.mode

    def _need_index(self) -> None:
        if self.retriever is None:
            raise APIError(404, "this server has no index (started with index.path=null)", code="no_index")

    async def _search(self, query: str, k: int, mode: Optional[str], rec: RequestRecord) -> tuple[list, int]:
        try:
            out = await self.retriever.search.remote(query, k, mode, self.min_version)
        except Exception as err:
            raise APIError(503, f"retrieval failed: {type(err).__name__}", "server_error",
                             code="retrieval_unavailable") from err
        rec.retrieval_s, rec.index_version = out["seconds"], out["version"]
        return out["hits"], out["version"]

    def _max_tokens(self, requested: Optional[int], prompt_tokens: int, param: str) -> int:
        room = self.context_length - prompt_tokens
        if requested == 0 and room >= 0:
            return 0
        if requested is None and room >= 1:
            return min(self.config.default_max_tokens, room)
        if requested is None or requested > room:
            asked = f" + {requested} for the completion" if requested else ""
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens; the "
                                  f"request needs {prompt_tokens} for the prompt (retrieved context included){asked}.",
                             param=param, code="context_length_exceeded")
        return requested

    async def _generate(self, kind: str, rec: RequestRecord, model: str, inputs: list[list[int]], req,
                        requested: Optional[int], stop: tuple[str, ...], hits: Sequence, version: Optional[int],
                        param: str, echoes: Optional[list[str]] = None, top_logprobs: Optional[int] = None) -> Response:
        """Generate n choices for each prompt in `inputs` (choice i * n + j: prompt i's j-th); `echoes[i]` is put
        before prompt i's text, `top_logprobs` (None: no logprobs) asks for each token's log-probability."""
        echoes = echoes or [""] * len(inputs)
        limits = [self._max_tokens(requested, len(ids), param) for ids in inputs]
        remaining = self.config.request_timeout_s - (time.perf_counter() - rec.started)
        deadline = time.time() + min(self.config.generation_timeout_s, max(remaining, 0.0))
        jobs = [GenerationRequest(
            request_id=f"{rec.id}-{i * req.n + j}", model=model, prompt_ids=tuple(ids), deadline=deadline,
            params=SamplingParams(max_tokens=limit, temperature=req.temperature, top_p=req.top_p, stop=stop,
                                  seed=None if req.seed is None else (req.seed + j) % INT64, lstrip=kind == "chat"))
            for i, (ids, limit) in enumerate(zip(inputs, limits)) for j in range(req.n)]
        rec.prompt_tokens, rec.citations = sum(map(len, inputs)), len(hits)
        extra = {"citations": [c.to_json() for c in citations(hits, version, self.config.rag.quote_chars)]
                 if version is not None else [], "index_version": version}
        if req.stream:
            rec.stream = True
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            echo = [echoes[i] for i in range(len(inputs)) for _ in range(req.n)]
            events = stream_events(self.generator, self.observer, kind, rec, model, jobs, extra, include_usage, echo)
            return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        if requested == 0:  # echo alone: the prompt's logprobs, no completion
            items = [{"text": "", "token_ids": [], "finish_reason": "length", "completion_tokens": 0,
                      "generation_s": 0.0} for _ in jobs]
        else:
            items = await asyncio.gather(*(self.generator.complete.remote(job) for job in jobs))
        choices = []
        for index, item in enumerate(items):
            echo = echoes[index // req.n]
            choices.append({"index": index, "text": echo + item["text"], "finish_reason": item["finish_reason"]})
            rec.completion_tokens += item["completion_tokens"]
            rec.generation_s = max(rec.generation_s, item["generation_s"])
        if top_logprobs is not None:
            scored = await choices_logprobs(self.generator, self.tokenizer, kind, model, inputs, items, req.n,
                                            top_logprobs, echo=getattr(req, "echo", False))
            for choice, logprobs in zip(choices, scored):
                choice["logprobs"] = logprobs
        build = chat_response if kind == "chat" else completion_response
        body = build(rec.id, model, choices, usage(rec.prompt_tokens, rec.completion_tokens), extra)
        timing = f"retrieval;dur={rec.retrieval_s * 1000:.2f}, generation;dur={rec.generation_s * 1000:.2f}"
        return JSONResponse(body, headers={"server-timing": timing})
