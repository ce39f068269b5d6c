"""The OpenAI wire format: request schemas, the error shape, and response / stream-chunk builders.

Requests are validated with pydantic. A field ragft does not implement (`tools`, `response_format`,
penalties, ...) is refused with a 400 naming it, never silently dropped: a client that
relies on it must not get an answer that ignores it. Every failure becomes an `APIError`, rendered in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with a 4xx status. ragft's additions are a
`rag` object in the request (`extra_body={"rag": {...}}` in the openai client) and `citations`
beside `choices` in the response (and in the last chunk of a stream).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's chat limit; vLLM's default)
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; every decode step checks each sequence's stop strings
INT64 = 2**63  # seeds are int64 in OpenAI's API and in torch's generators

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: Optional[bool] = None  # null: the server's default for the route
    k: Optional[int] = Field(default=None, ge=1)
    mode: Optional[Literal["dense", "bm25", "hybrid"]] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]  # image and audio parts are refused: the served models read text
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")  # name, tool_calls, ...: refused, as chat templates would drop them

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def to_template(self) -> dict:
        """The message as chat templates take it: content parts joined into one string."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": self.role, "content": content}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")  # what is not declared here is not implemented

    model: str
    max_tokens: Optional[int] = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOPS)], None] = None
    seed: Optional[int] = Field(default=None, ge=-INT64, lt=INT64)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    rag: Optional[RagOptions] = None
    user: Optional[str] = None

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Sampling):
    # Text, a batch of texts, token ids (what evaluation harnesses send), or a batch of token-id lists.
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], Annotated[TokenIds, Field(min_length=1)],
                  Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]]
    echo: bool = False  # the prompt is returned before the completion (and scored, with logprobs)
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # top alternatives per token

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: its text, or its token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


SCHEMA_REF = "#/components/schemas/{model}"  # where the request models' nested schemas go in /openapi.json


def openapi_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra` describing its JSON body as `model`.

    The routes read the raw body themselves instead of taking FastAPI typed bodies: FastAPI reads and parses
    the whole body before a route runs, and serve.max_body_bytes must refuse an oversized body (413) before
    anything parses it, chunked ones while they stream in. So the schema goes into /openapi.json here."""
    schema = model.model_json_schema(ref_template=SCHEMA_REF)
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openapi_components(*models: type[BaseModel]) -> dict:
    """The schemas that `openapi_body(model)` refers to, for the document's `components.schemas`."""
    found = {}
    for model in models:
        found.update(model.model_json_schema(ref_template=SCHEMA_REF).get("$defs", {}))
    return found



def decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Decode and validate a request body, or raise the APIError a client should see."""
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        # A union lists one error per member it tried. The deepest names the field best ("prompt.0.1", not "prompt"),
        # and of those, a broken constraint is the member whose type matched ("at least 1 item", not "not a string").
        first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]),
                    key=lambda e: (len(_path(e["loc"])), not e["type"].endswith(("_type", "_parsing"))))
        param = ".".join(_path(first["loc"])) or None
        more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
        if first["type"] == "extra_forbidden":
            raise bad_request(f"{param}: ragft serve does not implement this parameter; leave it out{more}", param,
                              "unsupported_parameter") from None
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise bad_request(f"{param}: {first['msg']}{more}", param, code) from None


def _path(loc: tuple) -> list[str]:
    return [str(p) for p in loc if not _is_union_member(p)]


def _is_union_member(loc_item) -> bool:
    """pydantic names the union member that failed in `loc` ("str", "list[str]"); clients want the field."""
    return isinstance(loc_item, str) and (loc_item in ("str", "int", "float", "bool", "dict", "list", "none")
                                          or "[" in loc_item or "-" in loc_item)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, choices: list[dict], usage_: dict, extra: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs")} for c in choices],
            "usage": usage_, "system_fingerprint": None, **extra}


def completion_response(rid: str, model: str, choices: list[dict], usage_: dict, extra: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"],
                         "logprobs": c.get("logprobs")} for c in choices],
            "usage": usage_, "system_fingerprint": None, **extra}


def completion_logprobs(entries: list[tuple[str, Optional[float], Optional[dict[str, float]]]]) -> dict:
    """The legacy completions `logprobs` object from (token text, its log-probability, {alternative: log-prob})
    per token; `text_offset` is where each token starts in the choice's text."""
    offsets, at = [], 0
    for token, _, _ in entries:
        offsets.append(at)
        at += len(token)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict:
    """The chat `logprobs` object from (token text, its log-probability, [(alternative, log-prob)]) per token."""
    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**token(text, lp), "top_logprobs": [token(t, v) for t, v in top]} for text, lp, top in entries],
            "refusal": None}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: Optional[str]) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: Optional[str]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
