"""What the ingress records per request: one access-log line and Prometheus metrics.

Metrics go through `ray.serve.metrics`, so they are exported by Ray's metrics agent next to
Serve's own (`ray_serve_*`), on each node's Prometheus endpoint, as `ray_ragft_*`.
Access lines are JSON, to the replica log (logger `ray.serve`) and, when configured, appended
to `serve.access_log`. They never carry an API key, and carry prompt text only with
`serve.log_prompts=true`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger("ray.serve")

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
RETRIEVAL_MS = [1, 2, 5, 10, 25, 50, 100, 250, 1000]


@dataclass
class RequestRecord:
    """What one request did, filled in as it goes."""

    id: str
    method: str
    path: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 200
    role: Optional[str] = None  # admin | user | open (no keys configured)
    model: Optional[str] = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retrieval_s: float = 0.0
    generation_s: float = 0.0
    citations: int = 0
    index_version: Optional[int] = None
    error: Optional[str] = None  # the OpenAI error code
    prompt: Optional[str] = None  # only kept with serve.log_prompts=true

    def line(self) -> dict:
        out = {"ts": round(time.time(), 3), "request_id": self.id, "method": self.method, "path": self.path,
               "status": self.status, "latency_ms": round((time.perf_counter() - self.started) * 1000, 2),
               "role": self.role, "model": self.model, "stream": self.stream, "prompt_tokens": self.prompt_tokens,
               "completion_tokens": self.completion_tokens, "retrieval_ms": round(self.retrieval_s * 1000, 2),
               "generation_ms": round(self.generation_s * 1000, 2), "citations": self.citations,
               "index_version": self.index_version, "error": self.error}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


class Observer:
    def __init__(self, access_log: Optional[str]):
        from ray.serve import metrics

        self.requests = metrics.Counter("ragft_requests", description="Requests by route, model and HTTP status.",
                                        tag_keys=("route", "model", "status"))
        self.latency = metrics.Histogram("ragft_request_latency_ms", description="End-to-end request latency.",
                                         boundaries=LATENCY_MS, tag_keys=("route",))
        self.tokens = metrics.Counter("ragft_generated_tokens", description="Completion tokens generated.",
                                      tag_keys=("model",))
        self.retrieval = metrics.Histogram("ragft_retrieval_ms", description="Time the retriever spent per search.",
                                           boundaries=RETRIEVAL_MS)
        self._file = None
        if access_log:
            Path(access_log).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(access_log, "a", buffering=1)  # line-buffered: one write per line

    def record(self, r: RequestRecord) -> None:
        line = r.line()
        self.requests.inc(tags={"route": r.route, "model": r.model or "", "status": str(r.status)})
        self.latency.observe(line["latency_ms"], tags={"route": r.route})
        if r.completion_tokens:
            self.tokens.inc(r.completion_tokens, tags={"model": r.model or ""})
        if r.retrieval_s:
            self.retrieval.observe(line["retrieval_ms"])
        text = json.dumps(line, ensure_ascii=False)
        log.info("access %s", text)
        if self._file is not None:
            self._file.write(text + "\n")
