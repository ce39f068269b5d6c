"""The part of `ragft eval` that runs models: answer and score prompts with the base and the fine-tuned model.

One `EvalWorker` holds both models in one serving engine, the one `eval.engine` names (transformers: a LoRA
checkpoint shares the base's weights, a full one is a second model; vllm: LoRA checkpoints only), and takes
batches of `Item`s: greedy answers with the serving code's stop handling, and the teacher-forced
log-likelihood of the reference answer.
`ragft.eval.run` runs workers as Ray actors; the class itself needs no Ray, so tests and a lone GPU
box can call it directly. Everything is deterministic: greedy decoding, fixed batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ragft.model.precision import resolve_dtype
from ragft.generate.engine import Engine, GenerationRequest, SamplingParams
from ragft.generate.transformers_engine import TransformersEngine


@dataclass(frozen=True)
class Item:
    """One question for one system."""

    key: str  # "<question id>|<system>"
    model: str  # "base" or "ft"
    prompt_ids: tuple[int, ...]
    score_ids: tuple[int, ...] = ()  # prompt + reference answer as training renders it
    score_labels: tuple[int, ...] = ()  # -100 except on the answer tokens


@dataclass
class Answer:
    key: str
    text: str
    tokens: int  # generated
    latency_s: float  # from the batch's start to this answer's last token
    prompt_tokens: int = 0
    nll: Optional[float] = None  # summed over the reference answer's tokens
    nll_tokens: int = 0


class EvalWorker:
    def __init__(self, base_path: str, ft_path: str, ft_kind: str, *, device: str = "cpu", dtype: str = "auto",
                 threads: int = 0, max_tokens: int = 24, engine: str = "transformers", vllm: Optional[dict] = None):
        if threads:
            torch.set_num_threads(threads)  # one actor per core: torch's default would oversubscribe them
        adapters = {"ft": ft_path} if ft_kind == "lora" else {}
        full = {"ft": ft_path} if ft_kind != "lora" else {}
        args = dict(base_name="base", adapters=adapters, full_models=full, device=device,
                    dtype=resolve_dtype(dtype, device))
        if engine == "vllm":
            from ragft.generate.vllm_engine import VLLMEngine

            self.engine: Engine = VLLMEngine(base_path, **args, **(vllm or {}))
        else:
            self.engine = TransformersEngine(base_path, **args)
        self.max_tokens = max_tokens

    def run(self, items: Sequence[Item]) -> list[Answer]:
        """Answers in `items` order; the model of each item decides which weights answer it."""
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
        requests = [GenerationRequest(it.key, it.model, it.prompt_ids, params) for it in items]
        texts, tokens, latency = [""] * len(items), [0] * len(items), [0.0] * len(items)
        start = time.perf_counter()
        for step in self.engine.generate(requests):
            now = time.perf_counter() - start
            for i, delta in enumerate(step):
                if delta is not None:
                    texts[i] += delta.text
                    tokens[i] = delta.completion_tokens
                    if delta.finish_reason is not None:
                        latency[i] = now
        answers = [Answer(it.key, t.strip(), n, s, len(it.prompt_ids))
                   for it, t, n, s in zip(items, texts, tokens, latency)]
        self._score(items, answers)
        return answers

    def _score(self, items: Sequence[Item], answers: list[Answer]) -> None:
        for model in sorted({it.model for it in items}):
            picked = [i for i, it in enumerate(items) if it.model == model and it.score_ids]
            if not picked:
                continue
            scores = self.engine.score(model, [items[i].score_ids for i in picked],
                                       [items[i].score_labels for i in picked])
            for i, (nll, count) in zip(picked, scores):
                answers[i].nll, answers[i].nll_tokens = nll, count
