"""The sequences that decode together on one set of weights, and the KV cache they share.

A `DecodeGroup` holds the `DecodingSequence`s (one per request while it decodes) that run on one
`ModelWeights`, and steps them with one forward per step; `ragft.generate.transformers_engine` groups
a batch's requests by weights and steps each group.

- Batching. A group's prompts are left-padded, so every sequence's next token lands in the last
  column; `attention_mask` hides the padding and `position_ids` count only real tokens, so each
  sequence computes what it would alone. A request's first step prefills its prompt, later steps
  feed one token per sequence. Sequences that join a running group are prefilled on their own and
  their cache stacked onto the group's (`DecodeGroup.prefill_and_join`).
- Shrinking. A sequence leaves its group the step it finishes (`Cache.batch_select_indices`), and
  padding columns that no live sequence attends to any more are cut from the cache, so the cost of
  a step follows the live sequences, not the batch the engine started with.
- Stopping. A sequence ends on one of its stop token ids (`ragft.generate.engine.stop_token_ids`), a
  stop string, max_tokens or the context length ("length"), or its deadline (checked before each
  step's forward, so an expired sequence costs no more compute).
- Sampling. One host sync per group and step: the sampled ids, read once (`ragft.generate.sampling`
  draws them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig

from ragft.generate.detokenize import IncrementalDetokenizer
from ragft.generate.engine import GREEDY_BELOW, Delta, GenerationRequest
from ragft.generate.sampling import sample_tokens, seeded_generator


@dataclass
class ModelWeights:
    """One loaded model: the shared base (with its adapters) or a full fine-tune."""

    module: torch.nn.Module
    config: PretrainedConfig  # what its caches are built from
    mixed: bool  # forward takes PEFT's adapter_names
    plain_cache: bool  # every cache layer a DynamicLayer: caches may be merged and trimmed by column


class DecodingSequence:
    """One request while it decodes: its sampling settings, its text so far, and what ends it."""

    __slots__ = ("key", "request_id", "prompt", "weights", "adapter", "limit", "temperature", "top_p", "generator",
                 "deadline", "count", "detok", "stop_ids", "unsent")

    def __init__(self, key, request: GenerationRequest, weights: ModelWeights, adapter: Optional[str], limit: int,
                 detok: IncrementalDetokenizer, stop_ids: frozenset[int], device: torch.device):
        params = request.params
        self.key = key  # what this sequence's Deltas are returned under
        self.request_id = request.request_id
        self.prompt = request.prompt_ids
        self.weights = weights
        self.adapter = adapter
        self.limit = limit
        self.temperature = float(params.temperature)
        self.top_p = float(params.top_p)
        self.generator = seeded_generator(params.seed, device) if self.temperature >= GREEDY_BELOW else None
        self.deadline = request.deadline
        self.count = 0
        self.detok = detok
        self.stop_ids = stop_ids
        self.unsent: list[int] = []  # tokens sampled since the last Delta

    def advance(self, token_id: int) -> Optional[Delta]:
        """Take the token sampled for this sequence; the Delta to send, if any."""
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


class DecodeGroup:
    """Sequences that share one forward per step: one set of weights, one KV cache."""

    def __init__(self, weights: ModelWeights, sequences: list[DecodingSequence], device: torch.device, pad_id: int):
        self.weights = weights
        self.sequences = sequences
        self.device = device
        self.pad_id = pad_id
        self.cache: Optional[DynamicCache] = None
        self.mask = torch.empty(0)  # (sequences, cache columns): 1 where a sequence has a real token
        self.positions = torch.empty(0)  # (sequences,): position of each sequence's next token
        self.next_ids: Optional[torch.Tensor] = None  # (sequences,): each one's newest token, the next forward's input

    def prefill_and_join(self, sequences: list[DecodingSequence], now: float, out: dict) -> None:
        """Prefill `sequences` and join them to the sequences already decoding; their first tokens go to `out`.

        The running sequences' cache and the new ones' cache are left-padded to the wider of the two and
        stacked, which is exact for the same reason left padding is: masks hide the padding and
        every sequence keeps its own positions.
        """
        live = []
        for seq in sequences:
            if seq.deadline is not None and seq.deadline <= now:
                out[seq.key] = seq.expire()
            else:
                live.append(seq)
        if not live:
            return
        new = DecodeGroup(self.weights, live, self.device, self.pad_id)
        new.next_ids = new._sample(new._prefill())
        new._advance(out)
        if not new.sequences:
            return
        if self.cache is None or not self.sequences:
            self.sequences, self.cache, self.mask = new.sequences, new.cache, new.mask
            self.positions, self.next_ids = new.positions, new.next_ids
            return
        self.cache, self.mask = _stack_caches([self.cache, new.cache], [self.mask, new.mask], self.weights.config)
        self.sequences = self.sequences + new.sequences
        self.positions = torch.cat([self.positions, new.positions])
        self.next_ids = torch.cat([self.next_ids, new.next_ids])

    def step(self, now: float, out: dict) -> None:
        """Decode one token for every sequence (expiring those past their deadline first); Deltas go to `out`."""
        expired = {i for i, seq in enumerate(self.sequences) if seq.deadline is not None and seq.deadline <= now}
        if expired:
            for i in expired:
                out[self.sequences[i].key] = self.sequences[i].expire()
            self._keep([i for i in range(len(self.sequences)) if i not in expired])
            if not self.sequences:
                return
        self.next_ids = self._sample(self._decode())  # sequences join prefilled, through `prefill_and_join`
        self._advance(out)

    def _advance(self, out: dict) -> None:
        """Hand each sequence its newly sampled token; drop the sequences that finished."""
        keep = []
        for i, (seq, token) in enumerate(zip(self.sequences, self.next_ids.tolist())):  # the step's one host sync
            delta = seq.advance(token)
            if delta is not None:
                out[seq.key] = delta
            if delta is None or delta.finish_reason is None:
                keep.append(i)
        if len(keep) < len(self.sequences):
            self._keep(keep)

    def _prefill(self) -> torch.Tensor:
        """One forward over the sequences' prompts (the step's prefill budget chose them); their last logits."""
        ids, self.mask = _left_pad([s.prompt for s in self.sequences], self.pad_id, self.device)
        positions = (self.mask.cumsum(-1) - 1).clamp_(min=0)  # pad columns get 0; they are masked anyway
        self.cache = DynamicCache(config=self.weights.config)
        logits = self.forward(ids, self.mask, positions, self.cache, [s.adapter for s in self.sequences])
        self.positions = torch.tensor([len(s.prompt) for s in self.sequences], device=self.device)
        return logits

    def _decode(self) -> torch.Tensor:
        self.mask = F.pad(self.mask, (0, 1), value=1)
        adapters = [s.adapter for s in self.sequences]
        logits = self.forward(self.next_ids.unsqueeze(1), self.mask, self.positions.unsqueeze(1), self.cache, adapters)
        self.positions += 1
        return logits

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                adapters: list[Optional[str]]) -> torch.Tensor:
        """The model's one forward of a step (prefill or decode): fp32 logits of each sequence's last position."""
        kwargs = {}
        if self.weights.mixed:
            kwargs["adapter_names"] = adapters
        # use_cache explicitly: configs saved by training carry use_cache=false.
        out = self.weights.module(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                  use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        sampled = [i for i, seq in enumerate(self.sequences) if seq.generator is not None]
        if sampled:
            chosen = [self.sequences[i] for i in sampled]
            index = torch.tensor(sampled, device=self.device)
            temperatures = torch.tensor([s.temperature for s in chosen], device=self.device)
            top_ps = torch.tensor([s.top_p for s in chosen], device=self.device)
            tokens[index] = sample_tokens(logits[index], temperatures, top_ps, [s.generator for s in chosen])
        return tokens

    def _keep(self, keep: list[int]) -> None:
        """Drop every sequence not in `keep` from the group, and the padding columns no remaining one needs."""
        self.sequences = [self.sequences[i] for i in keep]
        if self.cache is None or not keep:
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
        if self.weights.plain_cache:
            self._trim_padding()

    def _trim_padding(self) -> None:
        first = int(self.mask.any(0).int().argmax())  # the first column some live sequence attends to
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


def _stack_caches(caches: list[DynamicCache], masks: list[torch.Tensor], config) -> tuple[DynamicCache, torch.Tensor]:
    """One cache and mask from the caches of several sets of sequences, each left-padded to the widest."""
    width = max(m.shape[1] for m in masks)
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
    layers = []
    for per_chunk in zip(*(c.layers for c in caches)):
        keys = torch.cat([F.pad(layer.keys, (0, 0, width - layer.keys.shape[-2], 0)) for layer in per_chunk])
        values = torch.cat([F.pad(layer.values, (0, 0, width - layer.values.shape[-2], 0)) for layer in per_chunk])
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers, config=config), mask
