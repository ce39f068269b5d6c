"""The generation contract of `ragft serve` and `ragft eval`: what every engine implements and callers use.

A caller sends `GenerationRequest`s, each carrying its own sampling settings (`SamplingParams`), model
name (the base, a LoRA adapter or a full fine-tune), seed, stop strings and deadline, and gets `Delta`s
back: the new text of each request as it decodes. `Engine` is the interface: `open_batch` gives a
continuous `Batch` that requests join at any step (what the TextGenerator deployment drives),
`generate` runs a fixed set of requests, `score` and `token_logprobs` are teacher-forced.

Two engines implement it: `ragft.generate.transformers_engine` (ragft's own decode loop over the
transformers KV cache, `serve.engine=transformers`) and `ragft.generate.vllm_engine` (vLLM's). The helpers
here (`check_request`, `check_logprobs_request`, `model_names`, `stop_token_ids`, `RuntimeAdapters`) are what
both share, so a request is refused, a completion ends and an adapter loaded at runtime is evicted the same way
whichever engine runs it.
"""

from __future__ import annotations

import abc
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from ragft.model.tokenizer import CHAT_TEMPLATE

END_OF_TURN = "<|end|>"  # closes every turn of ragft's chat template; a chat model trained on it emits it to stop
GREEDY_BELOW = 1e-5  # temperatures under this are argmax: logits / T would overflow long before T reaches 0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence, which is not returned
    seed: Optional[int] = None  # same seed + same prompt -> same output, batched with others or not
    # Drop whitespace before the first character: a chat reply (ragft's template has the model generate
    # the space that follows the assistant header; an OpenAI reply starts with its text).
    lstrip: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str  # one of engine.models
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    deadline: Optional[float] = None  # time.time() at which generation stops early ("length", timed_out)


@dataclass
class Delta:
    request_id: str
    text: str  # new text since this request's previous Delta
    completion_tokens: int  # tokens generated so far for this request
    finish_reason: Optional[str]  # None while running; "stop" (EOS or a stop string) or "length"
    timed_out: bool = False
    # The tokens sampled since the previous Delta, what logprobs are reported for: as in vLLM's answers they
    # include the end-of-sequence token that stopped the request and a stop string's tokens, whose text is cut.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of one token given the tokens before it, and the `top` most likely tokens at
    that position as (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class UnknownModelError(ValueError):
    """A request named a model this engine does not serve (never loaded, or unloaded): a 404 over HTTP."""


class Batch(abc.ABC):
    """A continuous batch: requests join with `add` at any time (from any thread); each `step` decodes one
    token for every running request, prefilling those that joined. The TextGenerator deployment drives one."""

    @abc.abstractmethod
    def add(self, key, request: GenerationRequest) -> None:
        """Queue `request` (validated now: ValueError) to join at the next step; its Deltas come back under `key`."""

    @property
    @abc.abstractmethod
    def busy(self) -> bool:
        """Whether any request is waiting or running."""

    @abc.abstractmethod
    def step(self) -> dict:
        """{key: Delta} for the requests that produced text or finished in this step; each request gets exactly
        one Delta with finish_reason set, and none after it."""


class Engine(abc.ABC):
    """What the TextGenerator deployment (`open_batch`) and evaluation (`generate`, `score`) call: the contract a
    second backend, such as vLLM's engine on GPU clusters, implements. Sampling, adapter (the request's
    `model`), seed, stop strings and deadline travel in each `GenerationRequest`."""

    models: list[str]  # model names a request may name
    context_length: int  # max prompt + completion tokens
    vocab_size: int  # prompt token ids lie in [0, vocab_size)

    @abc.abstractmethod
    def open_batch(self, max_rows: Optional[int] = None) -> Batch:
        """A continuous batch of at most `max_rows` running requests (None: as many as the engine allows)."""

    @abc.abstractmethod
    def score(self, model: str, input_ids: Sequence[Sequence[int]],
              labels: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
        """Teacher-forced negative log-likelihood of each sequence's labelled tokens (-100 elsewhere), as
        (sum, count): how evaluation scores reference answers."""

    @abc.abstractmethod
    def token_logprobs(self, model: str, token_ids: Sequence[int], start: int, top_k: int = 0) -> list[TokenLogprob]:
        """Teacher-forced log-probabilities of `token_ids[start:]` (start >= 1), each given the tokens before it,
        with the `top_k` most likely tokens at each position: the `logprobs` of the OpenAI routes (a prompt
        echoed back, or a prompt followed by its completion)."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[Optional[Delta]]]:
        """Each next() runs one decode step for the whole batch (prefilling the requests that join in it) and
        returns a list aligned with `requests`: a Delta for each request that produced new text or finished in
        this step, None for the others. Every request gets exactly one Delta with finish_reason set and none
        after it; the iterator ends when all requests have finished."""

    def load_adapter(self, name: str, path: str) -> list[str]:
        """Serve the LoRA adapter at `path` as `name` from now on, next to the running requests (a runtime-loaded
        `name` is replaced); the names evicted to stay within the engine's cap. ValueError if it cannot."""
        raise ValueError(f"{type(self).__name__} cannot load adapters at runtime")

    def unload_adapter(self, name: str) -> None:
        """Stop serving the runtime-loaded adapter `name`: new requests for it are refused at once, the running
        ones finish on it, and its weights are freed after them. KeyError if no runtime-loaded adapter has it."""
        raise KeyError(name)

    @property
    def runtime_adapters(self) -> dict[str, str]:
        """The adapters loaded with `load_adapter` and not unloaded, {name: path}, least recently used first."""
        return {}


class LoadsAdapters(Engine):
    """`load_adapter` and `unload_adapter` as both engines do them: a name never served since start-up, at most
    `_runtime.cap` of them (the least recently used evicted), the old weights of a replaced or unloaded name kept
    until no request uses them. An engine sets `_runtime` (RuntimeAdapters) and `_lock` (held while it steps)
    and implements the hooks below, each called with the lock held except `_check_adapter`."""

    _runtime: RuntimeAdapters
    _lock: threading.Lock

    def load_adapter(self, name: str, path: str) -> list[str]:
        if name in self.models and name not in self._runtime:
            raise ValueError(f"{name!r} is served since start-up; an adapter loaded at runtime needs another name")
        if self._runtime.cap < 1:
            raise ValueError("this engine loads no adapters at runtime (serve.max_adapters=0)")
        self._check_adapter(path)
        with self._lock:  # between two decode steps
            replaced = self._route(name, self._attach(name, path))
            if replaced is not None:
                self._detach(replaced)
            elif name not in self.models:
                self.models.append(name)
            evicted = self._runtime.add(name, path)
            for old in evicted:
                self._retire(old)
            self._drop_unused()
        return evicted

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._runtime:
                raise KeyError(name)
            self._runtime.remove(name)
            self._retire(name)
            self._drop_unused()

    @property
    def runtime_adapters(self) -> dict[str, str]:
        return dict(self._runtime.paths)

    def _retire(self, name: str) -> None:
        """Refuse new requests for `name` from now on; its weights go once no request uses them."""
        if name in self.models:
            self.models.remove(name)
        self._detach(self._unroute(name))

    def _check_adapter(self, path: str) -> None:
        """Raise ValueError if this engine cannot hold the adapter at `path` (before anything loads)."""

    @abc.abstractmethod
    def _attach(self, name: str, path: str):
        """Load the adapter's weights; the engine's handle on them."""

    @abc.abstractmethod
    def _route(self, name: str, handle):
        """Send `name`'s new requests to `handle`; the handle they went to before (None: a new name)."""

    @abc.abstractmethod
    def _unroute(self, name: str):
        """Forget `name`; the handle its requests went to."""

    @abc.abstractmethod
    def _detach(self, handle) -> None:
        """Free `handle`'s weights once no request uses them (`_drop_unused`)."""

    @abc.abstractmethod
    def _drop_unused(self) -> None:
        """Free the detached weights no waiting or running request uses."""


def model_names(base_name: Optional[str], adapters: dict[str, str], full_models: dict[str, str]) -> list[str]:
    names = ([base_name] if base_name is not None else []) + list(adapters) + list(full_models)
    if not names:
        raise ValueError("nothing to serve: base_name is None and there are no adapters or full models")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"model names must be unique across base_name, adapters and full_models: {', '.join(twice)}")
    return names


def check_request(engine: Engine, request: GenerationRequest) -> None:
    """Raise ValueError if `engine` cannot serve `request`: what every engine checks before any compute."""
    where, params, prompt = f"request {request.request_id!r}", request.params, request.prompt_ids
    if request.model not in engine.models:
        raise UnknownModelError(f"{where}: unknown model {request.model!r}; this engine serves {', '.join(engine.models)}")
    if not prompt:
        raise ValueError(f"{where}: the prompt is empty; at least one token is needed")
    if len(prompt) >= engine.context_length:
        raise ValueError(f"{where}: the prompt has {len(prompt)} tokens, but the model's context is "
                         f"{engine.context_length} tokens, which leaves no room for a completion")
    if min(prompt) < 0 or max(prompt) >= engine.vocab_size:
        raise ValueError(f"{where}: prompt token ids must lie in [0, {engine.vocab_size})")
    if params.max_tokens < 1:
        raise ValueError(f"{where}: max_tokens must be at least 1, got {params.max_tokens}")
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise ValueError(f"{where}: temperature must be a finite number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"{where}: top_p must be in (0, 1], got {params.top_p}")
    if any(not s for s in params.stop):
        raise ValueError(f"{where}: stop strings must be non-empty")


def check_logprobs_request(engine: Engine, model: str, token_ids: Sequence[int], start: int) -> None:
    """Raise ValueError if `engine` cannot score `token_ids[start:]` on `model` (`Engine.token_logprobs`)."""
    if model not in engine.models:
        raise UnknownModelError(f"unknown model {model!r}; this engine serves {', '.join(engine.models)}")
    if not 1 <= start <= len(token_ids) <= engine.context_length:
        raise ValueError(f"token_logprobs: need 1 <= start ({start}) <= length ({len(token_ids)}) <= the "
                         f"model's context ({engine.context_length})")
    if token_ids and not 0 <= min(token_ids) <= max(token_ids) < engine.vocab_size:
        raise ValueError(f"token ids must lie in [0, {engine.vocab_size})")


def stop_token_ids(tokenizer, generation_configs: Sequence) -> frozenset[int]:
    """The ids that end a completion: the tokenizer's end-of-sequence, each model's generation config's, and
    `<|end|>` under ragft's own chat template."""
    ids = {tokenizer.eos_token_id}
    for config in generation_configs:
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.chat_template == CHAT_TEMPLATE:
        ids.add(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    return frozenset(i for i in ids if i is not None)


class RuntimeAdapters:
    """The adapters an engine loaded at runtime, least recently used first, at most `cap` of them: which to evict
    when one more loads (only these: the adapters an engine started with stay)."""

    def __init__(self, cap: int):
        if cap < 0:
            raise ValueError(f"the cap on runtime-loaded adapters must be at least 0, got {cap}")
        self.cap = cap
        self.paths: OrderedDict[str, str] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def used(self, name: str) -> None:
        if name in self.paths:
            self.paths.move_to_end(name)

    def add(self, name: str, path: str) -> list[str]:
        """Record `name` as the most recently used; the least recently used names to evict to stay within the cap."""
        if self.cap < 1:
            raise ValueError("this engine loads no adapters at runtime (serve.max_adapters=0)")
        self.paths[name] = path
        self.paths.move_to_end(name)
        evicted = list(self.paths)[:max(0, len(self.paths) - self.cap)]
        for old in evicted:
            del self.paths[old]
        return evicted

    def remove(self, name: str) -> None:
        del self.paths[name]
