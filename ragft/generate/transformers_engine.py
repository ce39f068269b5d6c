"""The Engine on transformers + PEFT (`serve.engine=transformers`): a hand-written, continuously batched decode loop.

`model.generate` serves one model per call and runs a batch to its end in one go. The server
needs more: requests of one batch may name different models (the base, any LoRA adapter, a full
fine-tune), every step must be streamed, requests end at different steps, and each samples
with its own settings and seed. So the loop is written out, in four modules: this one (loading
the weights, the engine, the continuous batch), `ragft.generate.decode_group` (the sequences that
decode on one set of weights and their shared KV cache), `ragft.generate.sampling` and
`ragft.generate.detokenize`.

- Weights. The base is loaded once and every LoRA adapter is loaded onto it (PEFT), so adapters
  cost only their low-rank matrices. Requests naming the base or any adapter share one forward per
  step through PEFT's mixed-adapter batches (`adapter_names=[...]`, "__base__" for the bare
  base): each LoRA layer runs the base matmul for the whole batch and adds each adapter's update
  on its own rows. A full fine-tune is a separate set of weights, so its requests form their own
  group with their own cache; a step runs one forward per group.
- Continuous batching. A `RunningBatch` takes requests at any time; at the next step they are
  prefilled together and their caches stacked onto the running sequences' (left-padded to the
  wider), so a request never waits for another to finish. `generate` is the same machinery with
  every request added up front.
- Prefill budget. The running sequences wait for a step's prefill, so a step prefills at most
  `max_prefill_tokens` prompt tokens (sequences x padded length; a longer prompt goes alone) and the
  requests beyond it join at the following steps, in arrival order, while the running sequences go
  on decoding. Letting a whole burst of long prompts join at once stalls every running stream for
  the whole burst (launch/bench_serve.py --engine measures it: docs/benchmarks.md).

- Adapters at runtime. `load_adapter` adds a LoRA adapter to the shared base (PEFT `load_adapter`) under the
  engine lock, so between two decode steps: running requests go on at the next step, on their own weights.
  `unload_adapter` removes the name at once (new requests for it are refused) and deletes the weights at the
  end of the first step after which no request, running or waiting, uses them. At most `max_adapters` are
  loaded this way; one more evicts the least recently used of them (never an adapter the engine started with).

Steps may run on a different thread each time (the TextGenerator deployment runs each in
`asyncio.to_thread`). Grad mode is thread-local, so inference mode is entered inside each step
rather than around the loop, and a lock keeps two batches' steps from running at once on the
shared PEFT model.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from ragft.model.build import load_tokenizer
from ragft.generate.decode_group import DecodeGroup, DecodingSequence, ModelWeights
from ragft.generate.detokenize import IncrementalDetokenizer
from ragft.generate.engine import (Batch, Delta, GenerationRequest, LoadsAdapters, RuntimeAdapters, TokenLogprob,
    UnknownModelError, check_logprobs_request, check_request, model_names, stop_token_ids)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
LOGPROB_CHUNK = 256  # positions projected onto the vocabulary at once when scoring a sequence
# Prompt tokens one step prefills (prompts x padded length). Lower: a running stream pauses less at a step that
# prefills, and fewer prompts are padded to the longest one; higher: a burst joins in fewer steps (and cache
# merges), which a GPU prefills about as fast in one forward. launch/bench_serve.py measures it (docs/benchmarks.md).
MAX_PREFILL_TOKENS = 2048  # about 7 RAG prompts of 300 tokens
MAX_ADAPTERS = 8  # adapters loaded at runtime (serve.max_adapters): each costs only its low-rank matrices


class TransformersEngine(LoadsAdapters):
    """The Engine on transformers + PEFT: the base, LoRA adapters on one shared copy of it, full fine-tunes."""

    def __init__(self, base_path: str, *, base_name: Optional[str] = "base", adapters: Optional[dict[str, str]] = None,
                 full_models: Optional[dict[str, str]] = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "sdpa", max_prefill_tokens: Optional[int] = MAX_PREFILL_TOKENS,
                 max_adapters: int = MAX_ADAPTERS):
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
        self._routes: dict[str, tuple[ModelWeights, Optional[str]]] = {}
        self._shared: Optional[ModelWeights] = None  # the base that adapters sit on (None: full fine-tunes only)
        self._runtime = RuntimeAdapters(max_adapters)
        self._adapter_ids = itertools.count(len(adapters))  # PEFT names adapter<i>; never reused
        self._retiring: set[str] = set()  # PEFT names of unloaded adapters, deleted once no request uses them
        self._batches: weakref.WeakSet = weakref.WeakSet()  # open batches: what they hold keeps weights alive
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

    def _weights(self, module: torch.nn.Module, mixed: bool) -> ModelWeights:
        config = module.config
        layers = DynamicCache(config=config).layers
        return ModelWeights(module, config, mixed, plain_cache=all(type(layer) is DynamicLayer for layer in layers))

    def _load_shared(self, base_path: str, base_name: Optional[str], adapters: dict[str, str]) -> None:
        base = self._load(base_path)
        if not adapters:
            # The base's requests name BASE_ADAPTER even unmixed (ignored then): once an adapter loads at runtime
            # these weights become mixed in place, and requests already running go on as base rows.
            self._shared = self._weights(base, mixed=False)
            if base_name is not None:
                self._routes[base_name] = (self._shared, BASE_ADAPTER)
            return
        from peft import PeftModel

        # Served names may hold "." or ":", which PEFT adapter names (module keys) cannot.
        internal = {name: f"adapter{i}" for i, name in enumerate(adapters)}
        (first, first_path), *rest = adapters.items()
        model = PeftModel.from_pretrained(base, first_path, adapter_name=internal[first])
        for name, path in rest:
            model.load_adapter(path, adapter_name=internal[name])
        model.eval()
        weights = self._shared = self._weights(model, mixed=True)
        if base_name is not None:
            self._routes[base_name] = (weights, BASE_ADAPTER)
        for name in adapters:
            self._routes[name] = (weights, internal[name])

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[Optional[Delta]]]:
        # Not a generator function itself: a bad request raises here, at the call, before any compute.
        sequences = [self._sequence(i, request) for i, request in enumerate(requests)]
        return self._run(sequences, len(requests))

    def _check_adapter(self, path: str) -> None:
        if self._shared is None:
            raise ValueError("this engine serves full fine-tunes only: no base model to load an adapter onto")

    def _attach(self, name: str, path: str) -> str:
        from peft import PeftModel

        internal = f"adapter{next(self._adapter_ids)}"
        weights = self._shared
        if weights.mixed:
            weights.module.load_adapter(path, adapter_name=internal)
        else:  # in place: the base's running requests go on as base rows of a mixed batch
            weights.module = PeftModel.from_pretrained(weights.module, path, adapter_name=internal).eval()
            weights.mixed = True
        return internal

    def _route(self, name: str, internal: str) -> Optional[str]:
        replaced = self._routes.get(name)
        self._routes[name] = (self._shared, internal)
        return None if replaced is None else replaced[1]

    def _unroute(self, name: str) -> str:
        return self._routes.pop(name)[1]

    def _detach(self, internal: str) -> None:
        self._retiring.add(internal)

    @property
    def peft_adapters(self) -> list[str]:
        """PEFT's names of the adapters on the shared base: those served, and unloaded ones until freed."""
        return list(self._shared.module.peft_config) if self._shared is not None and self._shared.mixed else []

    def _drop_unused(self) -> None:
        """Delete the retired adapters no open batch uses any more (lock held). PEFT needs one adapter left on a
        PeftModel, so the last one stays loaded, unused, until another replaces it."""
        if not self._retiring:
            return
        in_use = set().union(*(batch.adapters_in_use() for batch in list(self._batches)))
        module = self._shared.module
        for internal in sorted(self._retiring - in_use):
            if len(module.peft_config) > 1:
                module.delete_adapter(internal)
                self._retiring.discard(internal)

    def _sequence(self, key, request: GenerationRequest) -> DecodingSequence:
        check_request(self, request)
        route = self._routes.get(request.model)
        if route is None:  # unloaded since check_request looked
            raise UnknownModelError(f"request {request.request_id!r}: model {request.model!r} was just unloaded")
        self._runtime.used(request.model)
        weights, adapter = route
        limit = min(request.params.max_tokens, self.context_length - len(request.prompt_ids))
        detok = IncrementalDetokenizer(self.tokenizer, request.params.stop, lstrip=request.params.lstrip)
        return DecodingSequence(key, request, weights, adapter, limit, detok, self.stop_token_ids, self.device)

    def open_batch(self, max_rows: Optional[int] = None) -> RunningBatch:
        """A batch that requests join between steps (continuous batching); see `RunningBatch`."""
        batch = RunningBatch(self, max_rows)
        self._batches.add(batch)
        return batch

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
        # Position t - 1 predicts token t: only the positions from start - 1 on are projected onto the vocabulary,
        # LOGPROB_CHUNK of them at a time, so a long echoed prompt never holds positions × vocab fp32 logits.
        targets = torch.tensor(token_ids[start:], device=self.device)
        chosen, tops = [], []
        for lo, logits in self._logit_chunks(model, token_ids, start - 1):
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen += logprobs.gather(1, targets[lo:lo + len(logits)].unsqueeze(1)).squeeze(1).tolist()
            if top_k:
                values, indices = logprobs.topk(top_k, dim=-1)
                tops += [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
            else:
                tops += [()] * len(logits)
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids[start:], chosen, tops)]

    def _logit_chunks(self, model: str, token_ids: Sequence[int], first: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, fp32 logits) of positions first .. len - 2 of one sequence, LOGPROB_CHUNK positions at a time:
        the final hidden states come from one forward (a hook on the decoder), the vocabulary projection runs per
        chunk. Models whose head is not a plain linear layer (LoRA on lm_head, logit soft-capping) take the whole
        projection at once."""
        weights, adapter = self._routes[model]
        module = weights.module
        head = module.get_output_embeddings()
        config = module.config
        if type(head) is not torch.nn.Linear or getattr(config, "final_logit_softcapping", None) \
                or getattr(config, "logit_scale", None):
            yield 0, self._logits(model, [token_ids], keep=len(token_ids) - first)[0, :-1]
            return
        captured = {}

        def keep_hidden(_module, _args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        ids = torch.tensor([list(token_ids)], device=self.device)
        kwargs = {"adapter_names": [adapter]} if weights.mixed else {}
        with self._lock:
            hook = module.get_decoder().register_forward_hook(keep_hidden)
            try:
                module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1,
                       **kwargs)
            finally:
                hook.remove()
        hidden = captured["hidden"][0, first:len(token_ids) - 1]
        for lo in range(0, len(hidden), LOGPROB_CHUNK):
            yield lo, head(hidden[lo:lo + LOGPROB_CHUNK]).float()

    def _logits(self, model: str, input_ids: Sequence[Sequence[int]], keep: int = 0) -> torch.Tensor:
        """fp32 logits (rows, positions, vocab) of right-padded `input_ids` on `model`'s weights: the last `keep`
        positions of the widest row (0: all)."""
        weights, adapter = self._routes[model]
        width = max(len(ids) for ids in input_ids)
        ids = torch.full((len(input_ids), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(input_ids), width), dtype=torch.long)
        for i, tokens in enumerate(input_ids):
            ids[i, :len(tokens)], mask[i, :len(tokens)] = torch.tensor(tokens), 1
        kwargs = {"adapter_names": [adapter] * len(input_ids)} if weights.mixed else {}
        with self._lock:
            return weights.module(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False,
                                  logits_to_keep=keep, **kwargs).logits.float()

    def _run(self, sequences: list[DecodingSequence], n: int) -> Iterator[list[Optional[Delta]]]:
        batch = self.open_batch()
        batch.queue(sequences)
        while batch.busy:
            out = batch.step()
            yield [out.get(i) for i in range(n)]


class RunningBatch(Batch):
    """Continuous batching: requests `add`ed at any time (from any thread) join the decoding sequences at the
    next `step`, which decodes every running sequence once and prefills the waiting requests that fit the
    engine's `max_prefill_tokens` (the others at the steps after, in arrival order). With `max_rows`,
    requests also wait until fewer than `max_rows` decode; `max_rows=1` serves one request at a time (no
    batching).

    `step` returns {key: Delta} for the requests that produced text or finished in that step, each
    request keyed by what `add` was given.
    """

    def __init__(self, engine: TransformersEngine, max_rows: Optional[int] = None):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1 or None, got {max_rows}")
        self._engine = engine
        self._max_rows = max_rows
        self._pending: list[DecodingSequence] = []
        self._pending_lock = threading.Lock()
        self._groups: dict[int, DecodeGroup] = {}  # id(weights) -> the sequences decoding on those weights

    def add(self, key, request: GenerationRequest) -> None:
        """Queue `request` (validated now: ValueError) to join at the next step."""
        self.queue([self._engine._sequence(key, request)])

    def queue(self, sequences: list[DecodingSequence]) -> None:
        """Queue validated `sequences` to be prefilled and join the running ones at a coming step."""
        with self._pending_lock:
            self._pending.extend(sequences)

    def adapters_in_use(self) -> set[str]:
        """PEFT names of the adapters the waiting and running requests decode on."""
        with self._pending_lock:
            used = {seq.adapter for seq in self._pending}
        return used.union(*({seq.adapter for seq in g.sequences} for g in self._groups.values()))

    @property
    def running(self) -> int:
        return sum(len(g.sequences) for g in self._groups.values())

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self.running > 0

    @torch.inference_mode()
    def step(self) -> dict:
        engine, out = self._engine, {}
        with engine._lock:
            now = time.time()
            for group in self._groups.values():
                if group.sequences:
                    group.step(now, out)
            joining = self._take_pending()
            by_weights: dict[int, list[DecodingSequence]] = {}
            for seq in joining:
                by_weights.setdefault(id(seq.weights), []).append(seq)
            for weights_id, sequences in by_weights.items():
                if weights_id not in self._groups or not self._groups[weights_id].sequences:
                    self._groups[weights_id] = DecodeGroup(sequences[0].weights, [], engine.device, engine._pad_id)
                group = self._groups[weights_id]
                if group.sequences and not group.weights.plain_cache:
                    self.queue(sequences)  # caches that cannot be merged: wait until the group drains
                    continue
                group.prefill_and_join(sequences, now, out)
            engine._drop_unused()
        return out

    def _take_pending(self) -> list[DecodingSequence]:
        """The waiting requests that join at this step: in arrival order, while `max_rows` allows and their prompts,
        padded to the longest, fit the engine's prefill budget (the first one joins whatever its length)."""
        budget = self._engine.max_prefill_tokens
        with self._pending_lock:
            room = len(self._pending) if self._max_rows is None else max(0, self._max_rows - self.running)
            n, width = 0, 0
            for seq in self._pending[:room]:
                width = max(width, len(seq.prompt))
                if n and budget is not None and (n + 1) * width > budget:
                    break
                n += 1
            taken, self._pending = self._pending[:n], self._pending[n:]
        return taken
