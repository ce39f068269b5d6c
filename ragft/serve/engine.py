"""The text-generation engine of `ragft serve`: a hand-written batched decode loop over the transformers KV cache.

`model.generate` serves one model per call and runs a batch to its end in one go. The server
needs more: rows of one batch may name different models (the base, any LoRA adapter, a full
fine-tune), every step must be streamed, rows end at different steps, and each row samples
with its own settings and seed. So the loop is written out here:

- Weights. The base is loaded once and every LoRA adapter is loaded onto it (PEFT), so adapters
  cost only their low-rank matrices. Rows naming the base or any adapter share one forward per
  step through PEFT's mixed-adapter batches (`adapter_names=[...]`, "__base__" for the bare
  base): each LoRA layer runs the base matmul for the whole batch and adds each adapter's update
  on its own rows. A full fine-tune is a separate set of weights, so its rows form their own group
  with their own cache; a step runs one forward per group.
- Batching. A group's prompts are left-padded, so every row's next token lands in the last
  column; `attention_mask` hides the padding and `position_ids` count only real tokens, so each
  row computes what it would alone. A request's first step prefills its prompt, later steps feed
  one token per row.
- Shrinking. A row leaves its group the step it finishes (`Cache.batch_select_indices`), and
  padding columns that no live row attends to any more are cut from the cache, so the cost of a
  step follows the live rows, not the batch the engine started with.
- Sampling. Per row, in fp32: temperature 0 is argmax; otherwise temperature, top-p, and a draw
  from the row's own `torch.Generator`, so a seeded request gets the same draws whatever else
  shares its batch. One host sync per group and step: the sampled ids, read once.
- Stopping. A row ends on an end-of-sequence id (the tokenizer's and each generation config's,
  plus `<|end|>` under ragft's own chat template, which closes assistant turns), a stop string,
  max_tokens or the context length ("length"), or its deadline (checked before each step's
  forward, so an expired row costs no more compute).
- Text. Decoding the whole completion every step would cost O(length) per token, so text is
  decoded over a short window of recent tokens (`IncrementalDetokenizer`), and held back while it
  ends in an incomplete UTF-8 character or in what may be the beginning of a stop string.

- Continuous batching. A `RunningBatch` takes requests at any time; at the next step they are
  prefilled together and their caches stacked onto the running rows' (left-padded to the wider),
  so a request never waits for another to finish. `generate` is the same machinery with every
  request added up front.
- Prefill budget. The running rows wait for a step's prefill, so a step prefills at most
  `max_prefill_tokens` prompt tokens (rows x padded length; a longer prompt goes alone) and the
  requests beyond it join at the following steps, in arrival order, while the running rows go on
  decoding. Admitting a whole burst of long prompts at once stalls every running stream for the
  whole burst (figures: launch/bench_serve.py --engine, README).

Steps may run on a different thread each time (the Generator deployment runs each in
`asyncio.to_thread`). Grad mode is
thread-local, so inference mode is entered inside each step rather than around the loop, and
a lock keeps two batches' steps from running at once on the shared PEFT model.
"""

from __future__ import annotations

import abc
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from ragft.model.build import load_tokenizer
from ragft.model.tokenizer import CHAT_TEMPLATE

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
END_OF_TURN = "<|end|>"  # closes every turn of ragft's chat template; a chat model trained on it emits it to stop
GREEDY_BELOW = 1e-5  # temperatures under this are argmax: logits / T would overflow long before T reaches 0
# Prompt tokens one step prefills (rows x padded length). Lower: a running stream pauses less at a step that
# prefills, and fewer prompts are padded to the longest one; higher: a burst joins in fewer steps (and cache
# merges), which a GPU prefills about as fast in one forward. The figures behind it are in the README.
MAX_PREFILL_TOKENS = 2048  # about 7 RAG prompts of 300 tokens


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


class Batch(abc.ABC):
    """A continuous batch: requests join with `add` at any time (from any thread); each `step` decodes one
    token for every running request, prefilling those that joined. The Generator deployment drives one."""

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
    """What the Generator deployment (`open_batch`) and evaluation (`generate`, `score`) call: the contract a
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


class IncrementalDetokenizer:
    """One completion's text as it grows token by token, cut at the first stop string.

    The concatenation of the pieces `push` and `finish` return equals
    `tokenizer.decode(ids, skip_special_tokens=True)` truncated before the first stop string (and with
    `lstrip`, without the whitespace it starts with).
    Each step decodes only a window that starts a few tokens back (vLLM's scheme): the tokens
    before the window's new part give the decoder its context (SentencePiece drops the leading
    space of a window's first token, byte-level BPE needs the earlier bytes of a character), and
    the new text is what the window decodes to beyond its old part.
    """

    __slots__ = ("_decode", "_ids", "_prefix", "_read", "_prefix_text", "_text", "_sent", "_stops", "_scan",
                 "_lstrip")

    def __init__(self, tokenizer, stops: Sequence[str] = (), lstrip: bool = False):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # ids before this are decoded into _text
        self._prefix_text = ""  # ids[_prefix:_read] decoded on their own
        self._text = ""  # everything decoded so far (up to _read)
        self._sent = 0  # characters of _text already returned
        self._stops = tuple(stops)
        # A stop string that ends in new text starts at most this far before it.
        self._scan = max(map(len, self._stops), default=1) - 1
        self._lstrip = lstrip

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return the text that is now final, and whether a stop string ended the completion."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :], skip_special_tokens=True)
        # A trailing U+FFFD is the start of a character whose remaining bytes are in tokens still to come.
        if len(window) <= len(self._prefix_text) or window.endswith("\ufffd"):
            return "", False
        grown_from = len(self._text)
        self._text += window[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix :], skip_special_tokens=True)
        return self._emit(grown_from, final=False)

    def finish(self) -> tuple[str, bool]:
        """The text still held back, now that the completion ends; and whether it completed a stop string."""
        grown_from = len(self._text)
        if self._read < len(self._ids):
            window = self._decode(self._ids[self._prefix :], skip_special_tokens=True)
            self._text += window[len(self._prefix_text) :]
            self._read = len(self._ids)
        return self._emit(grown_from, final=True)

    def _emit(self, grown_from: int, final: bool) -> tuple[str, bool]:
        end, stopped = len(self._text), False
        if self._stops:
            stop_at = self._find_stop(max(0, grown_from - self._scan))
            if stop_at is not None:
                self._text = self._text[:stop_at]
                end, stopped = stop_at, True
            elif not final:
                end -= self._partial_stop()
        if self._lstrip and (self._sent == 0 or self._text[: self._sent].isspace()):
            self._sent = len(self._text) - len(self._text.lstrip())  # nothing but whitespace sent so far
        if end <= self._sent:
            return "", stopped
        piece, self._sent = self._text[self._sent : end], end
        return piece, stopped

    def _find_stop(self, start: int) -> Optional[int]:
        found = [at for at in (self._text.find(stop, start) for stop in self._stops) if at >= 0]
        return min(found) if found else None

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that begins some stop string: not sendable yet."""
        text, longest = self._text, 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


@dataclass
class _Weights:
    """One loaded model: the shared base (with its adapters) or a full fine-tune."""

    module: torch.nn.Module
    config: PretrainedConfig  # what its caches are built from
    mixed: bool  # forward takes PEFT's adapter_names
    plain_cache: bool  # every cache layer a DynamicLayer: caches may be merged and trimmed by column


class _Row:
    """One request while it decodes."""

    __slots__ = ("index", "request_id", "prompt", "weights", "adapter", "limit", "temperature", "top_p", "generator",
                 "deadline", "count", "detok", "stop_ids", "unsent")

    def __init__(self, index: int, request: GenerationRequest, weights: _Weights, adapter: Optional[str], limit: int,
                 detok: IncrementalDetokenizer, stop_ids: frozenset[int], device: torch.device):
        params = request.params
        self.index = index
        self.request_id = request.request_id
        self.prompt = request.prompt_ids
        self.weights = weights
        self.adapter = adapter
        self.limit = limit
        self.temperature = float(params.temperature)
        self.top_p = float(params.top_p)
        self.generator = _generator(params.seed, device) if self.temperature >= GREEDY_BELOW else None
        self.deadline = request.deadline
        self.count = 0
        self.detok = detok
        self.stop_ids = stop_ids
        self.unsent: list[int] = []  # tokens sampled since the last Delta

    def advance(self, token_id: int) -> Optional[Delta]:
        """Take the token sampled for this row; the Delta to send, if any."""
        self.count += 1
        self.unsent.append(token_id)
        if token_id in self.stop_ids:
            piece, _ = self.detok.finish()
            return self._delta(piece, "stop")
        piece, stopped = self.detok.push(token_id)
        if not stopped and self.count >= self.limit:
            rest, stopped = self.detok.finish()
            return self._delta(piece + rest, "stop" if stopped else "length")
        if stopped or piece:
            return self._delta(piece, "stop" if stopped else None)
        return None

    def expire(self) -> Delta:
        piece, _ = self.detok.finish()
        return self._delta(piece, "length", timed_out=True)

    def _delta(self, text: str, finish_reason: Optional[str], timed_out: bool = False) -> Delta:
        ids, self.unsent = tuple(self.unsent), []
        return Delta(self.request_id, text, self.count, finish_reason, timed_out, ids)


def _generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1  # manual_seed takes a non-negative int64
    return torch.Generator(device=device).manual_seed(seed)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token id per row of fp32 `logits` (rows, vocab), each at its temperature within its top-p nucleus,
    drawn with its own generator."""
    probs = torch.softmax(logits / temperatures.unsqueeze(1), dim=-1)
    if bool((top_ps < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens above it already hold top_p: the one that crosses top_p stays.
        sorted_probs.masked_fill_(sorted_probs.cumsum(-1) - sorted_probs > top_ps.unsqueeze(1), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race, as vLLM samples): no renormalisation
    # after the top-p cut, and each row takes one fixed-size draw per step from its own generator, so what a
    # seeded row draws does not depend on the rest of the batch.
    noise = torch.empty_like(probs)
    for row, generator in zip(noise, generators):
        row.exponential_(generator=generator)
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)


class _Group:
    """Rows that share one forward per step: one set of weights, one KV cache."""

    def __init__(self, weights: _Weights, rows: list[_Row], device: torch.device, pad_id: int):
        self.weights = weights
        self.rows = rows
        self.device = device
        self.pad_id = pad_id
        self.cache: Optional[DynamicCache] = None
        self.mask = torch.empty(0)  # (rows, cache columns): 1 where a row has a real token
        self.positions = torch.empty(0)  # (rows,): position of each row's next token
        self.next_ids: Optional[torch.Tensor] = None  # (rows,): each row's newest token, the next forward's input

    def admit(self, rows: list[_Row], now: float, out) -> None:
        """Prefill `rows` and join them to the rows already decoding; their first tokens go to `out`.

        The running rows' cache and the new rows' cache are left-padded to the wider of the two and
        stacked, which is exact for the same reason left padding is: masks hide the padding and
        every row keeps its own positions.
        """
        live = []
        for row in rows:
            if row.deadline is not None and row.deadline <= now:
                out[row.index] = row.expire()
            else:
                live.append(row)
        if not live:
            return
        new = _Group(self.weights, live, self.device, self.pad_id)
        new.next_ids = new._sample(new._prefill())
        new._advance(out)
        if not new.rows:
            return
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask = new.rows, new.cache, new.mask
            self.positions, self.next_ids = new.positions, new.next_ids
            return
        self.cache, self.mask = _merge([self.cache, new.cache], [self.mask, new.mask], self.weights.config)
        self.rows = self.rows + new.rows
        self.positions = torch.cat([self.positions, new.positions])
        self.next_ids = torch.cat([self.next_ids, new.next_ids])

    def step(self, now: float, out: list[Optional[Delta]]) -> None:
        expired = {i for i, row in enumerate(self.rows) if row.deadline is not None and row.deadline <= now}
        if expired:
            for i in expired:
                out[self.rows[i].index] = self.rows[i].expire()
            self._keep([i for i in range(len(self.rows)) if i not in expired])
            if not self.rows:
                return
        self.next_ids = self._sample(self._decode())  # rows join prefilled, through `admit`
        self._advance(out)

    def _advance(self, out) -> None:
        """Hand each row its newly sampled token; drop the rows that finished."""
        keep = []
        for i, (row, token) in enumerate(zip(self.rows, self.next_ids.tolist())):  # the step's one host sync
            delta = row.advance(token)
            if delta is not None:
                out[row.index] = delta
            if delta is None or delta.finish_reason is None:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _prefill(self) -> torch.Tensor:
        """One forward over the rows' prompts (the step's prefill budget chose the rows); their last logits."""
        ids, self.mask = _left_pad([r.prompt for r in self.rows], self.pad_id, self.device)
        positions = (self.mask.cumsum(-1) - 1).clamp_(min=0)  # pad columns get 0; they are masked anyway
        self.cache = DynamicCache(config=self.weights.config)
        logits = self._forward(ids, self.mask, positions, self.cache, [r.adapter for r in self.rows])
        self.positions = torch.tensor([len(r.prompt) for r in self.rows], device=self.device)
        return logits

    def _decode(self) -> torch.Tensor:
        self.mask = F.pad(self.mask, (0, 1), value=1)
        adapters = [r.adapter for r in self.rows]
        logits = self._forward(self.next_ids.unsqueeze(1), self.mask, self.positions.unsqueeze(1), self.cache, adapters)
        self.positions += 1
        return logits

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 adapters: list[Optional[str]]) -> torch.Tensor:
        kwargs = {}
        if self.weights.mixed:
            kwargs["adapter_names"] = adapters
        # use_cache explicitly: configs saved by training carry use_cache=false.
        out = self.weights.module(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                  use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        sampled = [i for i, row in enumerate(self.rows) if row.generator is not None]
        if sampled:
            rows = [self.rows[i] for i in sampled]
            index = torch.tensor(sampled, device=self.device)
            temperatures = torch.tensor([r.temperature for r in rows], device=self.device)
            top_ps = torch.tensor([r.top_p for r in rows], device=self.device)
            tokens[index] = sample_tokens(logits[index], temperatures, top_ps, [r.generator for r in rows])
        return tokens

    def _keep(self, keep: list[int]) -> None:
        """Drop every row not in `keep` from the batch, and the padding columns no remaining row needs."""
        self.rows = [self.rows[i] for i in keep]
        if self.cache is None or not keep:
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
        if self.weights.plain_cache:
            self._trim_padding()

    def _trim_padding(self) -> None:
        first = int(self.mask.any(0).int().argmax())  # the first column some live row attends to
        if first == 0:
            return
        self.mask = self.mask[:, first:]
        # DynamicLayer has no left crop; slicing its tensors gives views that the next update's cat copies.
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]


def _left_pad(prompts: list[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _merge(caches: list[DynamicCache], masks: list[torch.Tensor], config) -> tuple[DynamicCache, torch.Tensor]:
    """One cache and mask from the caches of several sets of rows, each left-padded to the widest."""
    width = max(m.shape[1] for m in masks)
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
    layers = []
    for per_chunk in zip(*(c.layers for c in caches)):
        keys = torch.cat([F.pad(layer.keys, (0, 0, width - layer.keys.shape[-2], 0)) for layer in per_chunk])
        values = torch.cat([F.pad(layer.values, (0, 0, width - layer.values.shape[-2], 0)) for layer in per_chunk])
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers, config=config), mask


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
        raise ValueError(f"{where}: unknown model {request.model!r}; this engine serves {', '.join(engine.models)}")
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
        raise ValueError(f"unknown model {model!r}; this engine serves {', '.join(engine.models)}")
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


class TransformersEngine(Engine):
    """The Engine on transformers + PEFT: the base, LoRA adapters on one shared copy of it, full fine-tunes."""

    def __init__(self, base_path: str, *, base_name: Optional[str] = "base", adapters: Optional[dict[str, str]] = None,
                 full_models: Optional[dict[str, str]] = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "sdpa", max_prefill_tokens: Optional[int] = MAX_PREFILL_TOKENS):
        adapters, full_models = dict(adapters or {}), dict(full_models or {})
        self.models = model_names(base_name, adapters, full_models)
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1 or None, got {max_prefill_tokens}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.max_prefill_tokens = max_prefill_tokens  # None: every waiting request joins at the next step
        self.tokenizer = load_tokenizer(base_path)
        config = AutoConfig.from_pretrained(base_path).get_text_config(decoder=True)
        self.context_length: int = config.max_position_embeddings
        self.vocab_size: int = config.vocab_size
        # name -> (weights, PEFT adapter name or None)
        self._routes: dict[str, tuple[_Weights, Optional[str]]] = {}
        if base_name is not None or adapters:
            self._load_shared(base_path, base_name, adapters)
        for name, path in full_models.items():
            self._routes[name] = (self._weights(self._load(path), mixed=False), None)
        self.stop_token_ids: frozenset[int] = stop_token_ids(
            self.tokenizer, [weights.module.generation_config for weights, _ in self._routes.values()])
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # PEFT passes adapter_names to the LoRA layers through hooks that live on the shared modules for the
        # length of a forward: forwards of two batches at once (two threads) would see each other's names.
        self._lock = threading.Lock()

    def _load(self, path: str) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype,
                                                     attn_implementation=self.attn_implementation)
        return model.to(self.device).eval()

    def _weights(self, module: torch.nn.Module, mixed: bool) -> _Weights:
        config = module.config
        layers = DynamicCache(config=config).layers
        return _Weights(module, config, mixed, plain_cache=all(type(layer) is DynamicLayer for layer in layers))

    def _load_shared(self, base_path: str, base_name: Optional[str], adapters: dict[str, str]) -> None:
        base = self._load(base_path)
        if not adapters:
            self._routes[base_name] = (self._weights(base, mixed=False), None)
            return
        from peft import PeftModel

        # Served names may hold "." or ":", which PEFT adapter names (module keys) cannot.
        internal = {name: f"adapter{i}" for i, name in enumerate(adapters)}
        (first, first_path), *rest = adapters.items()
        model = PeftModel.from_pretrained(base, first_path, adapter_name=internal[first])
        for name, path in rest:
            model.load_adapter(path, adapter_name=internal[name])
        model.eval()
        weights = self._weights(model, mixed=True)
        if base_name is not None:
            self._routes[base_name] = (weights, BASE_ADAPTER)
        for name in adapters:
            self._routes[name] = (weights, internal[name])

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[Optional[Delta]]]:
        # Not a generator function itself: a bad request raises here, at the call, before any compute.
        rows = [self._row(i, request) for i, request in enumerate(requests)]
        return self._run(rows, len(requests))

    def _row(self, index: int, request: GenerationRequest) -> _Row:
        check_request(self, request)
        weights, adapter = self._routes[request.model]
        limit = min(request.params.max_tokens, self.context_length - len(request.prompt_ids))
        detok = IncrementalDetokenizer(self.tokenizer, request.params.stop, lstrip=request.params.lstrip)
        return _Row(index, request, weights, adapter, limit, detok, self.stop_token_ids, self.device)

    def open_batch(self, max_rows: Optional[int] = None) -> RunningBatch:
        """A batch that requests join between steps (continuous batching); see `RunningBatch`."""
        return RunningBatch(self, max_rows)

    @torch.inference_mode()
    def score(self, model: str, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
        """Teacher-forced negative log-likelihood of each sequence's labelled tokens, as (sum, count).

        `labels` align with `input_ids` and hold -100 where nothing is scored (what `ragft.data.tokenize.encode`
        produces), so the answer tokens of an eval question are scored exactly as training weighted them."""
        width = max(len(ids) for ids in input_ids)
        target = torch.full((len(input_ids), width), -100, dtype=torch.long)
        for i, lab in enumerate(labels):
            target[i, :len(lab)] = torch.tensor(lab)
        logits = self._logits(model, input_ids)
        target = target[:, 1:].to(self.device)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
        counted = target != -100
        return [(float(n), int(c)) for n, c in zip((nll * counted).sum(1).tolist(), counted.sum(1).tolist())]

    @torch.inference_mode()
    def token_logprobs(self, model: str, token_ids: Sequence[int], start: int, top_k: int = 0) -> list[TokenLogprob]:
        check_logprobs_request(self, model, token_ids, start)
        if start == len(token_ids):
            return []
        # Position t - 1 predicts token t: only the positions from start - 1 on are projected onto the vocabulary.
        logits = self._logits(model, [token_ids], keep=len(token_ids) - start + 1)[0, :-1]
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(token_ids[start:], device=self.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        if top_k:
            values, indices = logprobs.topk(top_k, dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            tops = [()] * len(chosen)
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids[start:], chosen, tops)]

    def _logits(self, model: str, input_ids: Sequence[Sequence[int]], keep: int = 0) -> torch.Tensor:
        """fp32 logits (rows, positions, vocab) of right-padded `input_ids` on `model`'s weights: the last `keep`
        positions of the widest row (0: all)."""
        weights, adapter = self._routes[model]
        width = max(len(ids) for ids in input_ids)
        ids = torch.full((len(input_ids), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(input_ids), width), dtype=torch.long)
        for i, row in enumerate(input_ids):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        kwargs = {"adapter_names": [adapter] * len(input_ids)} if weights.mixed else {}
        with self._lock:
            return weights.module(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False,
                                  logits_to_keep=keep, **kwargs).logits.float()

    def _run(self, rows: list[_Row], n: int) -> Iterator[list[Optional[Delta]]]:
        batch = self.open_batch()
        batch.admit_rows(rows)
        while batch.busy:
            out = batch.step()
            yield [out.get(i) for i in range(n)]


class RunningBatch(Batch):
    """Continuous batching: requests `add`ed at any time (from any thread) join the decoding rows at the
    next `step`, which decodes every running row once and prefills the waiting requests that fit the
    engine's `max_prefill_tokens` (the others at the steps after, in arrival order). With `max_rows`,
    requests also wait until a row is free; `max_rows=1` serves one request at a time (no batching).

    `step` returns {key: Delta} for the requests that produced text or finished in that step, each
    request keyed by what `add` was given.
    """

    def __init__(self, engine: TransformersEngine, max_rows: Optional[int] = None):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1 or None, got {max_rows}")
        self._engine = engine
        self._max_rows = max_rows
        self._pending: list[_Row] = []
        self._pending_lock = threading.Lock()
        self._groups: dict[int, _Group] = {}  # id(weights) -> the rows decoding on those weights

    def add(self, key, request: GenerationRequest) -> None:
        """Queue `request` (validated now: ValueError) to join at the next step."""
        self.admit_rows([self._engine._row(key, request)])

    def admit_rows(self, rows: list[_Row]) -> None:
        with self._pending_lock:
            self._pending.extend(rows)

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self._groups.values())

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self.running > 0

    @torch.inference_mode()
    def step(self) -> dict:
        engine, out = self._engine, {}
        with engine._lock:
            now = time.time()
            for group in self._groups.values():
                if group.rows:
                    group.step(now, out)
            joining = self._take_pending()
            by_weights: dict[int, list[_Row]] = {}
            for row in joining:
                by_weights.setdefault(id(row.weights), []).append(row)
            for key, rows in by_weights.items():
                if key not in self._groups or not self._groups[key].rows:
                    self._groups[key] = _Group(rows[0].weights, [], engine.device, engine._pad_id)
                group = self._groups[key]
                if group.rows and not group.weights.plain_cache:
                    self.admit_rows(rows)  # caches that cannot be merged: wait until the group drains
                    continue
                group.admit(rows, now, out)
        return out

    def _take_pending(self) -> list[_Row]:
        """The waiting requests that join at this step: in arrival order, while rows are free and their prompts,
        padded to the longest, fit the engine's prefill budget (the first one joins whatever its length)."""
        budget = self._engine.max_prefill_tokens
        with self._pending_lock:
            room = len(self._pending) if self._max_rows is None else max(0, self._max_rows - self.running)
            n, width = 0, 0
            for row in self._pending[:room]:
                width = max(width, len(row.prompt))
                if n and budget is not None and (n + 1) * width > budget:
                    break
                n += 1
            taken, self._pending = self._pending[:n], self._pending[n:]
        return taken
